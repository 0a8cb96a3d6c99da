"""The Lightning side of the command line: :class:`ReprozooCLI` (LightningCLI with the checkpoint callback, the
``--ckpt_path`` rules and one-line parse errors) and :func:`run_lightning`, which runs it and undoes a run refused by a
user error."""

from __future__ import annotations

import logging
import os
import re
import sys
import warnings
from argparse import ArgumentError
from pathlib import Path
from typing import Any

import lightning as L
from jsonargparse import Namespace
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.cli import LightningCLI

# Imported so that their classes resolve by short name in configs and on the command line.
from reprozoo import _checks, callbacks, datamodules, methods, nets
from reprozoo.cli._configs import resolve_config_args
from reprozoo.cli._errors import (
    ResumeError,
    _argument_message,
    _config_files,
    _is_user_error,
    _mark,
    _refuse_arguments,
    _say,
    _unwrap_union_error,
    _yaml_problem,
)
from reprozoo.cli._resume import (
    _DATA_HPARAMS,
    _LAST,
    RunGuard,
    _differences,
    _given_values,
    _last_in,
    _logger_tree,
    _plain,
    _setting,
    _show,
    _version_folders,
)

_IMPORTED_FOR_CLASS_PATHS = (callbacks, datamodules, methods, nets)

TRAINER_DEFAULTS = {
    "logger": {
        "class_path": "lightning.pytorch.loggers.TensorBoardLogger",
        "init_args": {"save_dir": "lightning_logs", "name": "reprozoo"},
    },
}


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


def run_lightning(args: list[str] | None = None) -> ReprozooCLI:
    """The LightningCLI run, raising what it raises; a run refused by a user error (see :func:`main`) before it
    wrote a checkpoint first removes the folders and files it created."""
    guard = RunGuard()
    _quiet_lightning()
    if args is None:
        # LightningCLI (and DDP's relaunch of this command) read sys.argv: name the packaged configs in it.
        sys.argv[1:] = resolve_config_args(sys.argv[1:])
    elif isinstance(args, list):
        args = resolve_config_args([str(a) for a in args])
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
