"""Command line: ``python cli.py {fit,validate,test,predict} --config ...`` (LightningCLI), ``python cli.py zoo ...``
``python cli.py study ...`` (grids of runs, see :mod:`reprozoo.cli._study`) and ``python cli.py configs`` (the configs shipped in the package; ``--config configs/<folder>/<name>.yaml`` names
them from any folder, see :mod:`reprozoo.cli._configs`).

Models and datamodules are chosen in subclass mode (``model: {class_path: ..., init_args: ...}``), so any
LightningModule / LightningDataModule importable by its class path works, ours or the user's. Trainer presets in
``configs/trainer/`` compose with an experiment config: ``--config configs/trainer/gpu.yaml --config configs/X.yaml``.

Resuming (``--ckpt_path``):

* ``last`` is the ``last.ckpt`` of the latest run of the config: the highest ``<save_dir>/<name>/version_N`` of the
  configured TensorBoard/CSV logger that has one (or ``<checkpoint.dirpath>/last.ckpt``, or
  ``<default_root_dir>/checkpoints/last.ckpt`` without a logger). No such file stops the run (nothing to resume).
* ``fit`` from a checkpoint in ``<save_dir>/<name>/version_N/checkpoints/`` of the configured logger continues in that
  ``version_N``: the logs and checkpoints go on in the same folders.
* A model hyperparameter set by the config or the command line that differs from the checkpoint's is refused by
  ``fit`` (the checkpoint's optimizer state and schedule belong to its values) and applied, with a note, by
  ``validate``/``test``/``predict``; hyperparameters the config does not set come from the checkpoint. ``fit`` also
  refuses another batch size than the checkpoint's (its loader position counts batches of that size).

Errors: :func:`main` ends a user error (bad option or value, config file, data file, checkpoint, zoo name, a
refused resume, a non-finite loss) with exit status 2 and a one-line ``error: ...`` on stderr, without a traceback;
``REPROZOO_DEBUG=1`` (or a leading ``--debug``) shows the traceback. Other exceptions are bugs and keep theirs. A
run refused that way leaves nothing behind (a run that diverged keeps its logs and checkpoints).
"""

from __future__ import annotations

import os
import sys

from reprozoo.cli._configs import CONFIG_DIR, list_configs, packaged_config
from reprozoo.cli._errors import DEBUG_ENV, ResumeError, _debug, _is_user_error, _say, _user_message
from reprozoo.cli._lightning import TRAINER_DEFAULTS, ReprozooCLI, run_lightning
from reprozoo.cli._resume import RunGuard
from reprozoo.cli._study import study_main
from reprozoo.cli._zoo import zoo_main

__all__ = [
    "CONFIG_DIR",
    "DEBUG_ENV",
    "TRAINER_DEFAULTS",
    "ReprozooCLI",
    "ResumeError",
    "RunGuard",
    "list_configs",
    "main",
    "packaged_config",
    "run_lightning",
    "study_main",
    "zoo_main",
]


def main(argv: list[str] | None = None) -> int:
    """``python cli.py ...``: exit status 0, or 2 with one ``error: ...`` line for a user error (see
    :func:`_is_user_error`); other exceptions are bugs and propagate with their traceback. ``REPROZOO_DEBUG=1``, or
    ``--debug`` as the first word, shows the traceback of user errors too."""
    words = sys.argv[1:] if argv is None else list(argv)
    if words[:1] == ["--debug"]:
        words = words[1:]
        os.environ[DEBUG_ENV] = "1"  # also for the processes that DDP starts from the same command line
        if argv is None:
            sys.argv[1:] = words  # LightningCLI reads sys.argv itself
    try:
        if words[:1] == ["zoo"]:
            return zoo_main(words[1:])
        if words[:1] == ["study"]:
            return study_main(words[1:])
        if words == ["configs"]:
            print("\n".join(list_configs()))
            return 0
        run_lightning(None if argv is None else words)  # None: LightningCLI reads sys.argv itself
    except SystemExit as exit_:  # parse errors (already reported on one line), --help, --print_config
        if exit_.code is None or isinstance(exit_.code, int):
            return exit_.code or 0
        print(exit_.code, file=sys.stderr)
        return 2
    except Exception as err:
        if _debug() or not _is_user_error(err):
            raise
        _say(f"error: {_user_message(err)}")
        return 2
    return 0
