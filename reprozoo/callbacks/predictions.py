"""Save what ``predict_step`` returns, so that ``python cli.py predict`` leaves its results on disk."""

from __future__ import annotations

import csv
import io
import os
from pathlib import Path
from typing import Any, Literal

import lightning as L
import torch
from lightning.pytorch.callbacks import BasePredictionWriter

from reprozoo._files import write_atomic


class PredictionWriter(BasePredictionWriter):
    """Write the outputs of ``predict_step`` to ``<output_dir>/predictions.pt`` (``predictions_rank<r>.pt`` per
    process under DDP), as ``{"predictions": [...], "batch_indices": [...]}``: one entry per dataloader, each a
    list over batches, and the dataset indices of each batch so that shards can be put back in order.

    ``output_dir`` defaults to the trainer's log directory. ``write_interval="batch"`` writes
    ``predictions_batch<i>.pt`` files as it goes instead (for outputs larger than memory).
    ``format="csv"`` writes ``predictions.csv`` instead, for ``predict_step`` outputs that are dicts of equal-length
    lists or 1-d tensors (one row per example, with its dataset ``index`` and ``dataloader`` as first columns).
    Every file is written atomically (temporary file + rename): a killed run never leaves half a file under the
    final name.
    """

    def __init__(
        self,
        output_dir: str | os.PathLike | None = None,
        write_interval: Literal["batch", "epoch"] = "epoch",
        format: Literal["pt", "csv"] = "pt",
    ):
        super().__init__(write_interval)
        if format == "csv" and write_interval != "epoch":
            raise ValueError("PredictionWriter: format='csv' needs write_interval='epoch'")
        self.output_dir = output_dir
        self.format = format

    def _dir(self, trainer: L.Trainer) -> Path:
        path = Path(self.output_dir or trainer.log_dir or trainer.default_root_dir)
        path.mkdir(parents=True, exist_ok=True)
        return path

    def _name(self, trainer: L.Trainer, stem: str) -> str:
        return f"{stem}_rank{trainer.global_rank}.pt" if trainer.world_size > 1 else f"{stem}.pt"

    def write_on_batch_end(
        self, trainer, pl_module, prediction: Any, batch_indices, batch, batch_idx: int, dataloader_idx: int
    ) -> None:
        stem = f"predictions_dl{dataloader_idx}_batch{batch_idx}"
        path = self._dir(trainer) / self._name(trainer, stem)
        _save_atomic({"predictions": prediction, "batch_indices": batch_indices}, path)

    def write_on_epoch_end(self, trainer, pl_module, predictions, batch_indices) -> None:
        # Lightning flattens the predictions (not the indices) of a single dataloader; keep one layout for both:
        # a list per dataloader of a list per batch.
        if predictions and not isinstance(predictions[0], list):
            predictions = [predictions]
        if batch_indices and batch_indices[0] and not isinstance(batch_indices[0][0], list):
            batch_indices = [batch_indices]
        path = self._dir(trainer) / self._name(trainer, "predictions")
        if self.format == "csv":
            path = path.with_suffix(".csv")
            self._write_csv(path, predictions, batch_indices)
        else:
            _save_atomic({"predictions": predictions, "batch_indices": batch_indices}, path)
        print(f"PredictionWriter: wrote {path}", flush=True)

    @staticmethod
    def _write_csv(path: Path, predictions, batch_indices) -> None:
        columns, rows = None, []
        for dl, (outputs, indices) in enumerate(zip(predictions, batch_indices)):
            for out, idx in zip(outputs, indices):
                if not isinstance(out, dict):
                    raise TypeError("PredictionWriter(format='csv') needs predict_step to return a dict of lists")
                values = {k: v.tolist() if isinstance(v, torch.Tensor) else list(v) for k, v in out.items()}
                columns = columns or list(values)
                for j, i in enumerate(idx):
                    rows.append([i, dl] + [values[c][j] for c in columns])
        text = io.StringIO(newline="")
        writer = csv.writer(text)
        writer.writerow(["index", "dataloader"] + (columns or []))
        writer.writerows(rows)
        write_atomic(path, text.getvalue().encode("utf-8"))


def _save_atomic(obj: Any, path: Path) -> None:
    """``torch.save`` to memory, then one atomic write."""
    buffer = io.BytesIO()
    torch.save(obj, buffer)
    write_atomic(path, buffer.getvalue())
