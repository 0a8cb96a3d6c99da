"""Command line: ``python cli.py {fit,validate,test,predict} --config ...`` (LightningCLI) and ``python cli.py zoo ...``.

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

import argparse
import dataclasses
import difflib
import importlib
import inspect
import json
import logging
import os
import re
import shutil
import sys
import warnings
from argparse import ArgumentError
from pathlib import Path
from typing import Any

import lightning as L
from jsonargparse import Namespace
from lightning.fabric.utilities.exceptions import MisconfigurationException
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.cli import LightningCLI
from lightning.pytorch.loggers import CSVLogger, TensorBoardLogger
from lightning.pytorch.utilities import rank_zero_only

# Imported so that their classes resolve by short name in configs and on the command line.
from reprozoo import callbacks, datamodules
from reprozoo.zoo import _checks, classifier, distillation, engression, nca, nets, registry, tent, trm

_IMPORTED_FOR_CLASS_PATHS = (callbacks, datamodules, classifier, distillation, engression, nca, nets, tent, trm)

TRAINER_DEFAULTS = {
    "logger": {
        "class_path": "lightning.pytorch.loggers.TensorBoardLogger",
        "init_args": {"save_dir": "lightning_logs", "name": "reprozoo"},
    },
}
DEBUG_ENV = "REPROZOO_DEBUG"
_PHASE = "_reprozoo_phase"  # set on an exception: where in the run it was raised ("config", "setup" or "run")
_DATA_HPARAMS = "datamodule_hyper_parameters"  # where Lightning keeps the datamodule's in a checkpoint
_LAST = ModelCheckpoint.CHECKPOINT_NAME_LAST + ModelCheckpoint.FILE_EXTENSION


class _NoAdverts(logging.Filter):
    """Lightning's "💡 Tip: ... install litlogger / litmodels" lines: advertising, nothing for the user to act on."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not record.getMessage().startswith("💡 Tip:")


_NO_ADVERTS = _NoAdverts()  # one instance: adding it again is a no-op


def _quiet_lightning() -> None:
    """The CLI prints no warning a user cannot act on: Lightning's advertising, and a deprecation inside Lightning's
    own pytree helper (raised by Lightning for every loader, fixed only by a Lightning release)."""
    logging.getLogger("lightning.pytorch.utilities.rank_zero").addFilter(_NO_ADVERTS)
    warnings.filterwarnings(
        "ignore",
        message=r"`isinstance\(treespec, LeafSpec\)` is deprecated",
        category=FutureWarning,
        module=r"lightning\.pytorch\.utilities\._pytree",
    )


class ResumeError(ValueError):
    """``--ckpt_path`` cannot resume as asked: nothing to resume, or the config contradicts the checkpoint."""


def _debug() -> bool:
    return os.environ.get(DEBUG_ENV, "").lower() not in ("", "0", "false", "no")


@rank_zero_only
def _say(text: str) -> None:
    print(text, file=sys.stderr, flush=True)


class ReprozooCLI(LightningCLI):
    def add_arguments_to_parser(self, parser) -> None:
        # Always checkpoint; `--checkpoint.monitor val/...` etc. configure it, last.ckpt is kept for resuming.
        parser.add_lightning_class_args(ModelCheckpoint, "checkpoint")
        parser.set_defaults({"checkpoint.save_last": True})
        parser.add_argument(
            "--test_after_fit",
            type=bool,
            default=False,
            help="fit only: after training, run the test loop on the final weights",
        )

    def after_fit(self) -> None:
        if self.config[self.subcommand].get("test_after_fit"):
            self.trainer.test(self.model, datamodule=self.datamodule)

    # ------------------------------------------------------------------------------------------- parsing

    def parse_arguments(self, parser, args) -> None:
        self._resume_line: str | None = None
        self._resume_dir: Path | None = None
        self._apply: list[tuple[str, Any, Any]] = []  # model hyperparameters the config sets over the checkpoint's
        self._notes: list[str] = []
        words = sys.argv[1:] if args is None else args
        if isinstance(words, (list, tuple)):
            self._check_words(list(map(str, words)))
        try:
            super().parse_arguments(parser, args)
        except ArgumentError as err:
            subcommand = next((w for w in map(str, words) if w in self.subcommands()), None) if words else None
            _refuse_arguments(_argument_message(str(err), subcommand), err)
        try:
            self._prepare_ckpt_path(parser, args)
        except Exception as err:
            _mark(err, "config")
            raise

    def _check_words(self, words: list[str]) -> None:
        if words and not words[0].startswith("-") and words[0] not in self.subcommands():
            choices = ", ".join([*self.subcommands(), "zoo"])
            _refuse_arguments(f"unknown subcommand {words[0]!r}: choose from {choices}")
        # jsonargparse reports a YAML syntax error as being in "<unicode string>": name the file first.
        for path in _config_files(words):
            problem = _yaml_problem(path)
            if problem:
                _refuse_arguments(problem)

    def _prepare_ckpt_path(self, parser, args) -> None:
        """Before LightningCLI reads the checkpoint's hyperparameters into the config: resolve ``last``, check the
        file, continue its logger version, and compare what the config sets with what the checkpoint holds."""
        subcommand = self.config.get("subcommand")
        config = self.config.get(subcommand) if subcommand else None
        ckpt_path = config.get("ckpt_path") if config is not None else None
        if not ckpt_path:
            return
        if ckpt_path == "last":
            config["ckpt_path"] = ckpt_path = str(self._find_last(config))
        elif not os.path.isfile(ckpt_path):
            if "://" in ckpt_path or ckpt_path in ("best", "hpc", "registry") or ckpt_path.startswith("registry:"):
                return  # Lightning resolves those
            raise FileNotFoundError(f"--ckpt_path {ckpt_path}: no such checkpoint file")
        _checks.check_checkpoint_file(ckpt_path)
        model = config.get("model")
        class_path = model.get("class_path") if hasattr(model, "get") else None
        if isinstance(class_path, str):
            _checks.check_checkpoint_class(ckpt_path, class_path)
        checkpoint = _checks.peek_checkpoint(ckpt_path) or {}
        if subcommand == "fit":
            self._continue_version(config, Path(ckpt_path))
        where = f"; logs and checkpoints continue in {self._resume_dir}" if self._resume_dir else ""
        verb = {"fit": "resuming from", "validate": "validating", "test": "testing"}.get(subcommand, "predicting with")
        self._resume_line = (
            f"{verb} {ckpt_path} (epoch {checkpoint.get('epoch', '?')}, global step "
            f"{checkpoint.get('global_step', '?')}){where}"
        )
        self._compare_with_checkpoint(parser, args, config, subcommand, ckpt_path, checkpoint)

    def _find_last(self, config) -> Path:
        """The ``last.ckpt`` that ``--ckpt_path last`` means (see the module docstring), or ResumeError."""
        dirpath = config.get("checkpoint", {}).get("dirpath")
        logger = _logger_tree(config)
        if dirpath:
            where, found = f"{Path(dirpath) / _LAST}", _last_in(Path(dirpath))
        elif logger is not None:
            root, version = logger
            folders = [root / version] if version else _version_folders(root)
            where = f"{root / (version or 'version_*') / 'checkpoints' / _LAST}"
            found = next(filter(None, (_last_in(f / "checkpoints") for f in folders)), None)
        elif config.get("trainer", {}).get("logger") in (False, None):
            root = Path(config.get("trainer", {}).get("default_root_dir") or ".")
            where, found = f"{root / 'checkpoints' / _LAST}", _last_in(root / "checkpoints")
        else:
            raise ResumeError(
                "--ckpt_path last: cannot tell where this logger keeps its checkpoints (only the TensorBoard and CSV "
                "loggers are understood); give the checkpoint's path instead"
            )
        if found is None:
            raise ResumeError(
                f"--ckpt_path last: no checkpoint to resume, found no {where}. To start a new run, drop --ckpt_path"
            )
        return found

    def _continue_version(self, config, ckpt: Path) -> None:
        """``fit`` from ``<save_dir>/<name>/<version>/checkpoints/*.ckpt`` of the configured logger logs on in
        ``<version>``, so that ModelCheckpoint also finds its own state (last.ckpt, best-k) in the same folder."""
        logger = _logger_tree(config)
        if logger is None or logger[1] is not None:  # another logger, or a version set explicitly: kept
            return
        root, _ = logger
        folder = ckpt.resolve().parent
        if folder.name != "checkpoints" or folder.parent.parent != root.resolve():
            return
        version = folder.parent.name
        number = re.fullmatch(r"version_(\d+)", version)
        logger_config = config["trainer"]["logger"]
        logger_config = logger_config[0] if isinstance(logger_config, list) else logger_config
        if logger_config.get("init_args") is None:
            logger_config["init_args"] = Namespace()
        logger_config["init_args"]["version"] = int(number[1]) if number else version
        self._resume_dir = root / version

    def _compare_with_checkpoint(self, parser, args, config, subcommand, ckpt_path, checkpoint) -> None:
        """What the config (files and command line, not the classes' defaults) sets against what the checkpoint
        holds. Model hyperparameters: refused by ``fit``, applied by the other subcommands (after LightningCLI has
        merged the checkpoint's into the config). Datamodule hyperparameters: ``fit`` refuses another batch size and
        applies the rest (the datamodule is built from the config)."""
        given = _given_values(parser, args)
        given = given.get(subcommand) if given is not None else config

        def differences(part: str, stored: dict | None) -> list[tuple[str, Any, Any]]:
            mine = _plain(given.get(part)) if given is not None else None
            init_args = mine.get("init_args") if isinstance(mine, dict) else None
            theirs = {k: v for k, v in (stored or {}).items() if not str(k).startswith("_")}
            return list(_differences(init_args or {}, theirs, f"{part}.init_args"))

        model = differences("model", checkpoint.get("hyper_parameters"))
        if subcommand != "fit":
            self._apply = model
            self._config_model = config["model"].clone() if model else None
            self._notes += [f"note: {subcommand} uses {_setting(*d)}" for d in model]
            return
        if model:
            mine = " and ".join(f"--{key} {_show(value)}" for key, value, _ in model)
            theirs = " and ".join(_show(value) for _, _, value in model)
            fix = " ".join(f"--{key} {_show(value)}" for key, _, value in model)
            raise ResumeError(
                f"cannot resume fit from {ckpt_path}: {mine} differs from the checkpoint's {theirs}, and the "
                f"checkpoint's optimizer state and schedule go with its values. Resume with {fix}, or drop "
                "--ckpt_path to start a new run with the new value"
            )
        data = config.get("data")
        mine = data.get("init_args", {}).get("batch_size") if hasattr(data, "get") else None
        theirs = (checkpoint.get(_DATA_HPARAMS) or {}).get("batch_size")
        if mine is not None and theirs is not None and mine != theirs:
            raise ResumeError(
                f"cannot resume fit from {ckpt_path}: --data.init_args.batch_size {mine} differs from the "
                f"checkpoint's batch size {theirs}, and its position in the interrupted epoch counts batches of "
                f"{theirs} (another size would repeat or skip samples). Resume with --data.init_args.batch_size "
                f"{theirs}, or drop --ckpt_path to start a new run"
            )
        self._notes += [f"note: fit uses {_setting(*d)}" for d in differences("data", checkpoint.get(_DATA_HPARAMS))]

    # ------------------------------------------------------------------------------------------- building, running

    def before_instantiate_classes(self) -> None:
        # LightningCLI has replaced the model's hyperparameters by the checkpoint's; put back what the config set.
        subcommand = self.config.get("subcommand")
        for key, _, _ in self._apply:
            name = key.split(".")[2]
            self.config[subcommand]["model"]["init_args"][name] = self._config_model["init_args"][name]
        for note in self._notes:
            _say(note)

    def instantiate_classes(self) -> None:
        try:
            super().instantiate_classes()
        except Exception as err:  # out-of-range options, unknown zoo names, files named by the config
            inner = _unwrap_union_error(err)
            _mark(inner, "config")
            if inner is err:
                raise
            raise inner from inner.__cause__  # the class's own exception and message, not jsonargparse's summary

    def _before_run(self) -> None:
        guard = next((c for c in self.trainer.callbacks if isinstance(c, RunGuard)), None)
        if guard is not None:
            guard.snapshot(self.trainer)
        if self._resume_dir is not None:
            # ModelCheckpoint warns about any non-empty folder; continuing in one is the point of resuming.
            folder = re.escape(str(self._resume_dir / "checkpoints"))
            warnings.filterwarnings("ignore", message=f"Checkpoint directory {folder} exists and is not empty")
        if self._resume_line:
            _say(self._resume_line)

    before_fit = before_validate = before_test = before_predict = _before_run


class RunGuard(L.Callback):
    """Records what a run's trainer will write (the logger's version folder and its parents, the checkpoint
    folder) before it starts, and which stage the run reached, so that a run refused by a user error can be undone:
    :meth:`remove_output` deletes only what did not exist before, and restores the config files of a folder it
    continued in.

    Lightning creates the version folder (the TensorBoard writer) before the datamodule's ``setup``, and
    ``SaveConfigCallback`` writes ``config.yaml`` before the module is restored from a checkpoint: both come
    before the steps that find most bad input."""

    _KEPT_FILES = ("config.yaml", "hparams.yaml")  # what Lightning writes into a folder it logs to

    def __init__(self) -> None:
        self.started = False  # the stage's loop has started: setup and checkpoint restore went through
        self.saved = False  # a checkpoint was written: the run produced something worth keeping
        self._paths: list[_Tracked] = []

    def snapshot(self, trainer: L.Trainer) -> None:
        if not trainer.is_global_zero:
            return
        owned = []  # the folders this run writes into
        for logger in trainer.loggers:
            log_dir = getattr(logger, "log_dir", None)  # TensorBoard/CSV: this fixes the version number now
            if log_dir:
                owned.append(Path(log_dir))
        owned += [Path(c.dirpath) for c in trainer.checkpoint_callbacks if getattr(c, "dirpath", None)]
        if not trainer.loggers:
            owned.append(Path(trainer.default_root_dir) / "checkpoints")
            # without a logger, SaveConfigCallback writes config.yaml into default_root_dir (often the working folder)
            root = Path(trainer.default_root_dir)
            self._paths.append(_Tracked(root, owned=False, existed=True, files=_read_files(root, self._KEPT_FILES)))
        seen: set[Path] = set()
        for folder in owned:
            for path in (folder, *folder.parents):
                if path in seen or path in (Path("."), Path(path.anchor)):
                    break
                seen.add(path)
                if path.exists():
                    if path == folder:
                        files = _read_files(path, self._KEPT_FILES)
                        self._paths.append(
                            _Tracked(path, owned=True, existed=True, entries=_entries(path), files=files)
                        )
                    break  # and so do its parents
                self._paths.append(_Tracked(path, owned=path == folder, existed=False))

    def on_fit_start(self, trainer, pl_module) -> None:
        self.started = True

    on_validation_start = on_test_start = on_predict_start = on_fit_start

    def on_save_checkpoint(self, trainer, pl_module, checkpoint) -> None:
        self.saved = True

    def on_exception(self, trainer, pl_module, exception: BaseException) -> None:
        if getattr(exception, _PHASE, None) is None:
            _mark(exception, "run" if self.started else "setup")

    def remove_output(self) -> None:
        """Deletes what this run created, deepest first. A parent folder it created that now also holds another
        run's files is kept; in a folder that is not the run's own, only the config files are put back."""
        for tracked in sorted(self._paths, key=lambda t: len(t.path.parts), reverse=True):
            path = tracked.path
            if not path.is_dir():
                continue
            if not tracked.existed:
                if tracked.owned:
                    shutil.rmtree(path)
                elif not any(path.iterdir()):
                    path.rmdir()
                continue
            if tracked.owned:
                for name in sorted(_entries(path) - tracked.entries, key=len, reverse=True):
                    target = path / name
                    if target.is_dir():
                        shutil.rmtree(target)
                    else:
                        target.unlink(missing_ok=True)
            for name in self._KEPT_FILES:
                before, target = tracked.files.get(name), path / name
                if before is None:
                    target.unlink(missing_ok=True)
                elif not target.is_file() or target.read_bytes() != before:
                    target.write_bytes(before)


@dataclasses.dataclass
class _Tracked:
    """A folder a run writes into (or a parent it may create), as it was before the run."""

    path: Path
    owned: bool  # the run's own folder (its version folder, its checkpoint folder): all new entries are its
    existed: bool
    entries: set[str] = dataclasses.field(default_factory=set)
    files: dict[str, bytes] = dataclasses.field(default_factory=dict)  # its config files' bytes


def _entries(folder: Path) -> set[str]:
    return {str(p.relative_to(folder)) for p in folder.rglob("*")}


def _read_files(folder: Path, names: tuple[str, ...]) -> dict[str, bytes]:
    return {name: (folder / name).read_bytes() for name in names if (folder / name).is_file()}


# ---------------------------------------------------------------------------------------------------- checkpoints


def _logger_tree(config) -> tuple[Path, str | None] | None:
    """``(<save_dir>/<name>, version folder or None)`` of the config's (first) logger when it is a TensorBoard or
    CSV logger, which keep ``<save_dir>/<name>/version_N/checkpoints``; None for any other logger or none."""
    logger = config.get("trainer", {}).get("logger")
    logger = logger[0] if isinstance(logger, list) and logger else logger
    class_path = logger.get("class_path") if isinstance(logger, Namespace) else None
    if not isinstance(class_path, str):
        return None
    module_name, _, name = class_path.rpartition(".")
    try:
        cls = getattr(importlib.import_module(module_name), name)
    except (ImportError, AttributeError, ValueError):
        return None
    if not (isinstance(cls, type) and issubclass(cls, (TensorBoardLogger, CSVLogger))):
        return None
    init_args = logger.get("init_args") or Namespace()
    save_dir = init_args.get("save_dir") or config.get("trainer", {}).get("default_root_dir") or "."
    name = init_args.get("name", "lightning_logs")
    root = Path(save_dir) / name if name else Path(save_dir)
    version = init_args.get("version")
    if version is None:
        return root, None
    return root, version if isinstance(version, str) else f"version_{version}"


def _version_folders(root: Path) -> list[Path]:
    """``root/version_N`` folders, the highest N first."""
    numbered = [(int(p.name[8:]), p) for p in root.glob("version_*") if p.name[8:].isdigit() and p.is_dir()]
    return [p for _, p in sorted(numbered, reverse=True)]


def _last_in(folder: Path) -> Path | None:
    """``last.ckpt`` in ``folder``, or the newest ``last-vN.ckpt`` ModelCheckpoint wrote beside it."""
    stem, ext = ModelCheckpoint.CHECKPOINT_NAME_LAST, ModelCheckpoint.FILE_EXTENSION
    found = [p for p in folder.glob(f"{stem}*{ext}") if p.is_file() and re.fullmatch(rf"{stem}(-v\d+)?", p.stem)]
    return max(found, key=lambda p: p.stat().st_mtime, default=None)


def _given_values(parser, args) -> Namespace | None:
    """The values that config files and the command line set, without the classes' defaults."""
    try:
        if isinstance(args, (dict, Namespace)):
            return parser.parse_object(args, defaults=False)
        return parser.parse_args(args, defaults=False)
    except ArgumentError:
        return None


def _plain(value: Any) -> Any:
    """Config values as a checkpoint stores hyperparameters (LightningCLI saves them from the YAML dump)."""
    if isinstance(value, Namespace):
        value = value.as_dict()
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    if isinstance(value, os.PathLike):
        return str(value)
    return value


def _differences(given: dict, stored: dict, prefix: str):
    """``(key, given value, stored value)`` where both set a key and disagree; for a nested dict (a class given
    by class_path) only the parts the config sets are compared."""
    for key, value in given.items():
        if key not in stored:
            continue
        mine, theirs = _plain(value), _plain(stored[key])
        if isinstance(mine, dict) and isinstance(theirs, dict):
            yield from _differences(mine, theirs, f"{prefix}.{key}")
        elif mine != theirs:
            yield f"{prefix}.{key}", mine, theirs


def _setting(key: str, mine: Any, theirs: Any) -> str:
    return f"--{key} {_show(mine)} from the config, not the checkpoint's {_show(theirs)}"


def _show(value: Any) -> str:
    return value if isinstance(value, str) else json.dumps(value)


# ---------------------------------------------------------------------------------------------------- user errors


def _mark(err: BaseException, phase: str) -> None:
    try:
        setattr(err, _PHASE, phase)
    except AttributeError:  # an exception type with __slots__: left unmarked (treated as a bug)
        pass


def _unwrap_union_error(err: BaseException) -> BaseException:
    """The exception a class raised while jsonargparse instantiated it: jsonargparse wraps it in a ValueError that
    lists every type the option allows (``Union[LightningModule, None]``), raised from the first one's error."""
    while (
        isinstance(err, ValueError)
        and str(err).startswith("Does not validate against any of the Union subtypes")
        and isinstance(err.__cause__, Exception)
        and not str(err.__cause__).startswith("Expected a ")
    ):
        err = err.__cause__
    return err


def _raised_by_data_code(err: BaseException) -> bool:
    """Whether ``err`` was raised by a reprozoo datamodule (its data checks, e.g. an image read lazily)."""
    tb = err.__traceback__
    while tb is not None and tb.tb_next is not None:
        tb = tb.tb_next
    return tb is not None and str(tb.tb_frame.f_globals.get("__name__", "")).startswith("reprozoo.datamodules")


def _is_user_error(err: BaseException) -> bool:
    """A problem with the input (config, command line, data, checkpoint, zoo file) rather than a bug.

    These types are only raised about input; ValueError and OSError count while the config is turned into objects
    or the trainer sets up (data files, checkpoint restore), later only from our datamodules' data checks."""
    if isinstance(
        err,
        (
            ArgumentError,
            ResumeError,
            _checks.CheckpointError,
            registry.WeightsError,
            FloatingPointError,
            MisconfigurationException,
        ),
    ):
        return True
    phase = getattr(err, _PHASE, None)
    if isinstance(err, (ValueError, OSError)):
        return phase in ("config", "setup") or (phase == "run" and _raised_by_data_code(err))
    return phase == "setup" and isinstance(err, RuntimeError) and str(err).startswith("Error(s) in loading state_dict")


def _user_message(err: BaseException) -> str:
    text = str(err).strip() or type(err).__name__
    if isinstance(err, RuntimeError) and text.startswith("Error(s) in loading state_dict"):
        lines = [line.strip() for line in text.splitlines() if line.strip()]
        more = f" (and {len(lines) - 2} more)" if len(lines) > 2 else ""
        return (
            f"the checkpoint's weights do not fit the model the config builds: {' '.join(lines[:2])}{more}. A config "
            "value that changes the architecture cannot be applied to a checkpoint: drop it, or use a checkpoint of "
            "this architecture"
        )
    if isinstance(err, ArgumentError):
        return _argument_message(text, None)
    return " ".join(line.strip() for line in text.splitlines() if line.strip())


def _refuse_arguments(message: str, err: BaseException | None = None):
    """A parse error: one line on stderr and exit status 2 (REPROZOO_DEBUG=1: jsonargparse's exception)."""
    if _debug():
        raise ArgumentError(None, message) from err
    _say(f"error: {message}")
    raise SystemExit(2)


_NOISE = (
    "Does not validate against any of the Union subtypes",
    "Subtypes:",
    "Errors:",
    "Given value type:",
    "Expected a path but",  # every class option also takes a config file's path
    "Expected a <class 'NoneType'>",
)
_GROUPS = {"trainer": L.Trainer, "checkpoint": ModelCheckpoint}
_TOP_LEVEL = [
    "trainer",
    "model",
    "data",
    "checkpoint",
    "optimizer",
    "lr_scheduler",
    "ckpt_path",
    "seed_everything",
    "test_after_fit",
    "config",
    "print_config",
]


def _argument_message(message: str, subcommand: str | None) -> str:
    """jsonargparse's error (a tree of the alternatives it tried for every key) as one line: the deepest key that
    failed, what it expected and what it got, and for an unknown option the closest known one."""
    first = message.strip().splitlines()[0] if message.strip() else message
    if first.startswith("unrecognized arguments:"):
        words = first.split(":", 1)[1].split()
        if words and words[0] == subcommand:
            words = words[1:]
        hints = [h for h in map(_suggest_option, (w for w in words if w.startswith("--"))) if h]
        help_cmd = f"python cli.py {subcommand or 'fit'} --help"
        hint = f"; did you mean {' / '.join(hints)}?" if hints else ""
        return f"unrecognized arguments: {' '.join(words)}{hint} (`{help_cmd}` lists the options)"
    stack: list[tuple[int, str, str]] = []  # (indent, "key" or "class", name)
    leaves: list[tuple[int, str, str | None, bool, str]] = []  # (depth, key, class path, directly under it, text)
    given: dict[str, str] = {}
    for raw in message.splitlines():
        text = raw.strip()
        if not text:
            continue
        indent = len(raw) - len(raw.lstrip()) + (2 if text.startswith("- ") else 0)
        text = text.removeprefix("- ")
        while stack and stack[-1][0] >= indent:
            stack.pop()
        for kind, pattern in (
            ("key", r'Parser key "([^"]+)":\s*(.*)'),
            ("class", r"Problem with given class_path '([^']+)':\s*(.*)"),
        ):
            match = re.fullmatch(pattern, text)
            if match:
                stack.append((indent, kind, match[1]))
                text = match[2]
                break
        if not text or text.startswith(_NOISE):
            continue
        key = ".".join(name if kind == "key" else "init_args" for _, kind, name in stack)
        if text.startswith("Given value:"):
            given.setdefault(key, text.split(":", 1)[1].strip())
            continue
        class_path = next((name for _, kind, name in reversed(stack) if kind == "class"), None)
        leaves.append((len(stack), key, class_path, bool(stack) and stack[-1][1] == "class", text))
    if not leaves:
        return " ".join(line.strip() for line in message.splitlines() if line.strip())
    depth = max(leaf[0] for leaf in leaves)
    shown, expected, key = [], [], ""
    for _, key, class_path, under_class, text in (leaf for leaf in leaves if leaf[0] == depth):
        line = _leaf_message(key, class_path, under_class, text, expected)
        if line and line not in shown:
            shown.append(line)
    if expected:
        got = given.get(key)
        shown.append(f"--{key}: expected {' or '.join(dict.fromkeys(expected))}" + (f", got {got!r}" if got else ""))
    return "; ".join(shown)


def _leaf_message(key: str, class_path: str | None, under_class: bool, text: str, expected: list[str]) -> str | None:
    option = re.fullmatch(r"Option '([^']+)' is not accepted", text)
    if option and class_path:
        name, class_key = option[1], key.removesuffix(".init_args")
        cls, short = _import(class_path), class_path.rsplit(".", 1)[-1]
        known = list(inspect.signature(cls).parameters) if cls is not None else []
        close = difflib.get_close_matches(name, known, n=1)
        hint = f"; did you mean {close[0]!r}?" if close else ""
        return f"--{key}.{name}: {short} has no option {name!r}{hint} (`--{class_key}.help {short}` lists them)"
    got = re.fullmatch(r"Expected a (.+?)\. Got value: (.*)", text, flags=re.DOTALL)
    if got:
        return f"--{key}: expected {_type_name(got[1])}, got {got[2]!r}"
    alternative = re.fullmatch(r"Expected a (.+)", text)
    if alternative:
        expected.append(_type_name(alternative[1]))
        return None
    if under_class and class_path:
        return f"--{key.removesuffix('.init_args')}: cannot use class_path {class_path!r}: {text}"
    return f"--{key}: {text}" if key else text


def _type_name(text: str) -> str:
    simple = re.fullmatch(r"<class '(?:builtins\.)?([\w.]+)'>", text)
    if simple:
        return simple[1]
    literal = re.fullmatch(r"typing\.Literal\[(.*)\]", text)
    return f"one of {literal[1]}" if literal else text


def _import(class_path: str) -> Any:
    module_name, _, name = class_path.rpartition(".")
    try:
        return getattr(importlib.import_module(module_name), name)
    except (ImportError, AttributeError, ValueError):
        return None


def _suggest_option(word: str) -> str | None:
    """The closest known option to an unrecognised ``--head.tail``: a top-level group, or a Trainer /
    ModelCheckpoint argument (the model's and data's options are checked by their class, with hints)."""
    head, dot, tail = word[2:].split("=", 1)[0].partition(".")
    if head not in _TOP_LEVEL:
        close = difflib.get_close_matches(head, _TOP_LEVEL, n=1)
        return f"--{close[0]}{dot}{tail}" if close else None
    if head in _GROUPS and tail:
        close = difflib.get_close_matches(tail, list(inspect.signature(_GROUPS[head]).parameters), n=1)
        return f"--{head}.{close[0]}" if close else None
    return None


def _config_files(words: list) -> list[str]:
    """The existing files given to ``--config`` / ``-c`` (a config may also be given inline, as YAML text)."""
    found = []
    for i, word in enumerate(map(str, words)):
        value = None
        if word in ("--config", "-c") and i + 1 < len(words):
            value = str(words[i + 1])
        elif word.startswith("--config="):
            value = word.split("=", 1)[1]
        if value is not None and os.path.isfile(value):
            found.append(value)
    return found


def _yaml_problem(path: str) -> str | None:
    import yaml

    try:
        with open(path, encoding="utf-8") as fh:
            yaml.compose(fh, Loader=yaml.SafeLoader)  # syntax only: no tags are constructed
    except yaml.MarkedYAMLError as err:
        where = f"line {err.problem_mark.line + 1}, column {err.problem_mark.column + 1}" if err.problem_mark else ""
        context = ""
        if err.context and err.context_mark:
            context = f" ({err.context} at line {err.context_mark.line + 1}, column {err.context_mark.column + 1})"
        return f"config file {path} is not valid YAML: {where}: {err.problem}{context}"
    except (yaml.YAMLError, UnicodeDecodeError) as err:
        return f"config file {path} is not valid YAML: {' '.join(str(err).split())}"
    return None


def run_lightning(args: list[str] | None = None) -> ReprozooCLI:
    """The LightningCLI run, raising what it raises; a run refused by a user error (see :func:`main`) before it
    wrote a checkpoint first removes the folders and files it created."""
    guard = RunGuard()
    _quiet_lightning()
    try:
        return ReprozooCLI(
            L.LightningModule,
            L.LightningDataModule,
            subclass_mode_model=True,
            subclass_mode_data=True,
            save_config_kwargs={"overwrite": True},
            # jsonargparse raises instead of printing its usage: parse_arguments reports one line.
            parser_kwargs={"exit_on_error": False},
            # Persistent: with the resumable training loaders, a resumed run continues exactly (same random draws).
            trainer_defaults={**TRAINER_DEFAULTS, "callbacks": [callbacks.RNGStateCheckpoint(), guard]},
            args=args,
        )
    except Exception as err:
        # A diverged run keeps its logs: they show the divergence.
        if _is_user_error(err) and not isinstance(err, FloatingPointError) and not guard.saved:
            guard.remove_output()
        raise


# ---------------------------------------------------------------------------------------------------- zoo commands


class _ZooParser(argparse.ArgumentParser):
    def error(self, message: str):
        # one line, like the other commands' errors (argparse would print the usage first)
        self.exit(2, f"{self.prog}: error: {message} (`{self.prog} --help` shows the usage)\n")


def _zoo_parser() -> argparse.ArgumentParser:
    parser = _ZooParser(prog="reprozoo zoo", description="The reprozoo model zoo.")
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("list", help="list the registered entries")
    p.add_argument("pattern", nargs="?", help="only names containing this")
    p = sub.add_parser("info", help="show an entry's card")
    p.add_argument("name")
    p = sub.add_parser("export", help="turn a Lightning checkpoint into a zoo weights file and card")
    p.add_argument("ckpt", help="path of the Lightning checkpoint (.ckpt)")
    p.add_argument("--name", required=True, help="zoo name, 'method_arch.data'")
    p.add_argument("--out", default="zoo_exports", help="output folder (default: zoo_exports)")
    p.add_argument("--module", help="class path, if the checkpoint does not record it")
    p.add_argument("--url", help="where the weights file will be published (omit: shipped in the package)")
    p.add_argument("--metric", action="append", default=[], metavar="KEY=VALUE", help="a measured metric (repeat)")
    p.add_argument("--recipe", help="the config that produced the checkpoint")
    p.add_argument("--license", default="MIT")
    p.add_argument("--description", default="")
    return parser


def _parse_metric(text: str) -> tuple[str, float]:
    key, sep, value = text.partition("=")
    try:
        if not sep or not key:
            raise ValueError
        return key, float(value)
    except ValueError:
        raise registry.WeightsError(f"--metric expects KEY=NUMBER, got {text!r}") from None


def zoo_main(argv: list[str]) -> int:
    args = _zoo_parser().parse_args(argv)
    try:
        if args.command == "list":
            names = registry.list_weights(args.pattern)
            if not names:
                print("no zoo entries" + (f" matching {args.pattern!r}" if args.pattern else ""))
            for name in names:
                entry = registry.get_weights(name)
                metrics = ", ".join(f"{k}={v:.4g}" for k, v in sorted(entry.metrics.items()))
                where = "packaged" if entry.url is None else "download"
                print(f"{name:<40} {entry.module.rsplit('.', 1)[-1]:<22} {where:<9} {metrics}")
        elif args.command == "info":
            print(json.dumps(registry.get_weights(args.name).to_card(), indent=2, sort_keys=True))
        else:
            weights_file, card_file = registry.export_checkpoint(
                args.ckpt,
                args.name,
                args.out,
                module=args.module,
                url=args.url,
                metrics=dict(map(_parse_metric, args.metric)),
                recipe=args.recipe,
                license=args.license,
                description=args.description,
            )
            print(f"wrote {weights_file} and {card_file}")
    except (registry.WeightsError, _checks.CheckpointError, OSError) as err:
        if _debug():
            raise
        print(f"reprozoo zoo {args.command}: {_user_message(err)}", file=sys.stderr)
        return 2
    return 0


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


if __name__ == "__main__":
    sys.exit(main())
