"""Which training examples a network has fitted, epoch by epoch, per group (real examples, noisy labels, random
inputs): Arpit et al. 2017 ("A Closer Look at Memorization in Deep Networks") show that real examples are learned
first and noise is memorised later, and that regularisation (dropout) slows the memorisation of noise most."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import lightning as L
import torch
from lightning.pytorch.utilities import rank_zero_only

from reprozoo._files import save_figure


class FittedExamplesMonitor(L.Callback):
    """After every ``every_n_epochs`` training epochs, classify the whole training set in order (no shuffling, no
    augmentation) and record, per example, whether the model predicts the label it is trained on; log the fraction
    fitted per group as ``fitted/<group>`` (``fitted/clean``, ``fitted/noisy_label``, ``fitted/random_input``) and
    keep each example's *first-learned epoch* (the first measured epoch at which it was fitted; -1 while never).

    What it needs of the datamodule (``trainer.datamodule``), and nothing of the module but ``forward`` giving
    logits: ``train_eval_dataloader()`` (the training split in order, ``(x, y)`` or ``(x, y, index)`` batches) and
    ``train_groups()`` (``{group: bool mask over those examples}``), as
    :class:`~reprozoo.datamodules.CIFAR10DataModule` has. Every process evaluates the whole set (the result is the
    same on all; under DDP, logging is synced as a mean of equal values).

    At the end of ``fit`` it draws, on rank zero, the fraction fitted per group against the epoch and the histogram
    of first-learned epochs per group, as ``<log_dir>/fitted_examples.png`` and into a TensorBoard logger. The
    per-example record is in :attr:`first_learned` and in checkpoints, so a resumed run keeps it.

    Args:
        every_n_epochs: measure after every N-th training epoch (and after the last).
    """

    def __init__(self, every_n_epochs: int = 1):
        if not isinstance(every_n_epochs, int) or isinstance(every_n_epochs, bool) or every_n_epochs < 1:
            raise ValueError(f"FittedExamplesMonitor: every_n_epochs must be an integer >= 1, got {every_n_epochs!r}")
        self.every_n_epochs = every_n_epochs
        self.first_learned: torch.Tensor | None = None  # long (N,), -1 = not fitted yet
        self.curves: list[dict[str, float]] = []  # per measurement: {"epoch": e, "<group>": fraction}
        self.groups: dict[str, torch.Tensor] = {}

    def _datamodule(self, trainer: L.Trainer):
        dm = trainer.datamodule
        if dm is None or not (hasattr(dm, "train_eval_dataloader") and hasattr(dm, "train_groups")):
            raise ValueError(
                "FittedExamplesMonitor needs a datamodule with train_eval_dataloader() and train_groups() "
                "(e.g. reprozoo.datamodules.CIFAR10DataModule), passed as trainer.fit(model, datamodule=...)"
            )
        return dm

    def on_fit_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self.groups = {k: v.bool().cpu() for k, v in self._datamodule(trainer).train_groups().items()}

    @torch.no_grad()
    def _fitted(self, trainer: L.Trainer, pl_module: L.LightningModule) -> torch.Tensor:
        was_training = pl_module.training
        pl_module.eval()
        fitted = []
        for batch in self._datamodule(trainer).train_eval_dataloader():
            x, y = batch[0].to(pl_module.device), batch[1].to(pl_module.device)
            fitted.append((pl_module(x).argmax(dim=-1) == y).cpu())
        pl_module.train(was_training)
        return torch.cat(fitted)  # (N,) bool

    def on_train_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        epoch = trainer.current_epoch
        last = trainer.max_epochs is not None and epoch + 1 >= trainer.max_epochs
        if trainer.sanity_checking or ((epoch + 1) % self.every_n_epochs and not last):
            return
        fitted = self._fitted(trainer, pl_module)
        if self.first_learned is None or len(self.first_learned) != len(fitted):
            self.first_learned = torch.full((len(fitted),), -1, dtype=torch.long)
        self.first_learned[(self.first_learned < 0) & fitted] = epoch
        point: dict[str, float] = {"epoch": epoch}
        for name, mask in self.groups.items():
            if mask.any():
                point[name] = fitted[mask].float().mean().item()
                pl_module.log(f"fitted/{name}", point[name], on_epoch=True, sync_dist=True)
        self.curves = [c for c in self.curves if c["epoch"] < epoch] + [point]

    def on_fit_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        folder = Path(trainer.log_dir or trainer.default_root_dir)  # every rank reads it (a broadcast)
        self._plot(trainer, folder)

    @rank_zero_only
    def _plot(self, trainer: L.Trainer, folder: Path) -> None:
        if not self.curves or self.first_learned is None:
            return
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4))
        for name in self.groups:
            points = [(c["epoch"] + 1, c[name]) for c in self.curves if name in c]
            if points:
                left.plot(*zip(*points), marker="o", markersize=3, label=name)
        left.set(xlabel="epoch", ylabel="fraction of training examples fitted", ylim=(0, 1.02))
        left.grid(alpha=0.3)
        left.legend()
        last = self.curves[-1]["epoch"] + 1
        bins = torch.arange(0, last + 2).float() - 0.5
        for name, mask in self.groups.items():
            learned = self.first_learned[mask]
            learned = learned[learned >= 0].float() + 1
            if len(learned):
                right.hist(
                    learned.numpy(), bins=bins.numpy(), alpha=0.5, density=True, label=f"{name} ({len(learned)})"
                )
        right.set(xlabel="epoch first fitted", ylabel="share of the group's fitted examples")
        right.legend()
        fig.suptitle("Training examples fitted, per group")
        fig.tight_layout()
        save_figure(fig, folder / "fitted_examples.png")
        for logger in trainer.loggers:
            experiment = getattr(logger, "experiment", None)
            if hasattr(experiment, "add_figure"):  # TensorBoard's SummaryWriter
                experiment.add_figure("fitted_examples", fig, global_step=trainer.global_step)
        plt.close(fig)

    def state_dict(self) -> dict[str, Any]:
        return {"first_learned": self.first_learned, "curves": [dict(c) for c in self.curves]}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.first_learned = state_dict.get("first_learned")
        self.curves = [dict(c) for c in state_dict.get("curves", [])]
