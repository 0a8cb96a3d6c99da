"""Resuming and undoing runs: :class:`RunGuard` (what a run writes, removed again when a user error refuses it), and
the helpers that find a logger's version folders and ``last.ckpt`` and compare the config with a checkpoint's
hyperparameters (see :mod:`reprozoo.cli` for the rules)."""

from __future__ import annotations

import dataclasses
import importlib
import json
import os
import re
import shutil
from argparse import ArgumentError
from pathlib import Path
from typing import Any

import lightning as L
from jsonargparse import Namespace
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.loggers import CSVLogger, TensorBoardLogger

from reprozoo.cli._errors import _PHASE, _mark

_DATA_HPARAMS = "datamodule_hyper_parameters"  # where Lightning keeps the datamodule's in a checkpoint
_LAST = ModelCheckpoint.CHECKPOINT_NAME_LAST + ModelCheckpoint.FILE_EXTENSION


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
