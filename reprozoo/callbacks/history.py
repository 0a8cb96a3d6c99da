"""Keep the per-epoch metrics of a run in one JSON file, so that curves can be drawn and runs compared without
reading a logger's own format (TensorBoard event files, a CSV per version)."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import lightning as L
import torch
from lightning.pytorch.utilities import rank_zero_only
from torch.nn.parameter import is_lazy

from reprozoo._files import write_atomic


def _scalars(metrics: dict[str, Any], prefixes: list[str]) -> dict[str, float]:
    """The epoch-level scalars of ``trainer.callback_metrics`` (Lightning's ``<name>_step`` copies are left out;
    ``<name>_epoch`` is recorded as ``<name>``)."""
    out = {}
    for name, value in metrics.items():
        if name.endswith("_step") or (prefixes and not any(name.startswith(p) for p in prefixes)):
            continue
        if isinstance(value, torch.Tensor):
            if value.numel() != 1:
                continue
            value = value.item()
        if isinstance(value, (int, float)):
            out[name.removesuffix("_epoch")] = float(value)
    return dict(sorted(out.items()))


class MetricsHistory(L.Callback):
    """Record the metrics Lightning holds at the end of every training epoch (``trainer.callback_metrics``: the
    epoch means of what the module logs, validation included) and those of each ``test`` / ``validate`` run, and
    write them to ``<log_dir>/metrics_history.json`` after each of them (atomically, on rank zero)::

        {"epochs": [{"epoch": 0, "step": 250, "train/loss": ..., "val/acc": ...}, ...],
         "test": {"test/loss": ..., "test/acc": ...},           # the last test run, when there was one
         "best_model_path": "...", "best_model_score": ...,      # the checkpoint callback's, after fit
         "num_parameters": ...}                                  # of the module, counted once per tensor

    It makes no assumption about the module or the logger (it reads only ``trainer.callback_metrics``, and the
    folder is ``trainer.log_dir``, or ``default_root_dir`` without a logger). The history is part of the
    checkpoint, so a resumed run goes on with the epochs before the resume. Non-finite values are written as null.

    Args:
        prefixes: record only the metrics whose names start with one of these (default: all).
        filename: the file's name in the log folder.
    """

    def __init__(self, prefixes: list[str] | None = None, filename: str = "metrics_history.json"):
        self.prefixes = list(prefixes or [])
        self.filename = filename
        self.epochs: list[dict[str, float]] = []
        self.test: dict[str, float] = {}
        self.best: dict[str, Any] = {}
        self.num_parameters: int | None = None
        self.path: Path | None = None

    def _folder(self, trainer: L.Trainer) -> Path:
        # trainer.log_dir broadcasts from rank zero: every rank reads it, outside the rank-zero write.
        return Path(trainer.log_dir or trainer.default_root_dir)

    @rank_zero_only
    def _write(self, folder: Path) -> None:
        def finite(value):
            return value if not isinstance(value, float) or math.isfinite(value) else None

        record = {
            "epochs": [{k: finite(v) for k, v in e.items()} for e in self.epochs],
            "test": {k: finite(v) for k, v in self.test.items()},
            **self.best,
            "num_parameters": self.num_parameters,
        }
        self.path = folder / self.filename
        write_atomic(self.path, (json.dumps(record, indent=1) + "\n").encode())

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        # lazy parameters have no size before their first forward: left out
        self.num_parameters = sum(p.numel() for p in pl_module.parameters() if not is_lazy(p))

    def on_train_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if trainer.sanity_checking:
            return
        entry = {"epoch": trainer.current_epoch, "step": trainer.global_step}
        entry.update(_scalars(trainer.callback_metrics, self.prefixes))
        # a resumed epoch that was already recorded (a checkpoint saved inside it) is replaced, not repeated
        self.epochs = [e for e in self.epochs if e["epoch"] < trainer.current_epoch] + [entry]
        self._write(self._folder(trainer))

    def on_fit_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        ckpt = trainer.checkpoint_callback
        if ckpt is not None and getattr(ckpt, "best_model_path", ""):
            score = getattr(ckpt, "best_model_score", None)
            self.best = {
                "best_model_path": str(ckpt.best_model_path),
                "best_model_score": None if score is None else float(score),
            }
        self._write(self._folder(trainer))

    def on_test_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self.test = _scalars(trainer.callback_metrics, self.prefixes)
        self._write(self._folder(trainer))

    def state_dict(self) -> dict[str, Any]:
        return {"epochs": [dict(e) for e in self.epochs]}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.epochs = [dict(e) for e in state_dict.get("epochs", [])]
