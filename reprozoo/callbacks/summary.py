"""Print the final metrics of a run as a small table, so a terminal user sees the result without TensorBoard."""

from __future__ import annotations

import lightning as L
from lightning.pytorch.utilities import rank_zero_only


class MetricsSummary(L.Callback):
    """At the end of ``fit``, ``validate`` and ``test``, print the metrics whose names start with one of
    ``prefixes`` (all when empty), as Lightning last recorded them (``trainer.callback_metrics``)."""

    def __init__(self, prefixes: list[str] | None = None, title: str = "Final metrics"):
        self.prefixes = list(prefixes or [])
        self.title = title

    def _metrics(self, trainer: L.Trainer) -> dict[str, float]:
        out = {}
        for name, value in sorted(trainer.callback_metrics.items()):
            if not self.prefixes or any(name.startswith(p) for p in self.prefixes):
                out[name] = float(value)
        return out

    @rank_zero_only
    def _print(self, trainer: L.Trainer, stage: str) -> None:
        metrics = self._metrics(trainer)
        if not metrics:
            return
        width = max(map(len, metrics))
        lines = [f"{self.title} ({stage}, epoch {trainer.current_epoch}, step {trainer.global_step}):"]
        lines += [f"  {name:<{width}}  {value:.4f}" for name, value in metrics.items()]
        print("\n".join(lines), flush=True)

    def on_fit_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._print(trainer, "fit")

    def on_validation_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if trainer.state.fn == "validate":
            self._print(trainer, "validate")

    def on_test_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._print(trainer, "test")
