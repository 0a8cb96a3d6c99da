"""TENT: Wang, Shelhamer, Liu, Olshausen & Darrell, "Tent: Fully Test-Time Adaptation by Entropy Minimization"
(ICLR 2021), as the official code does it (DequanWang/tent: ``tent.py``, ``norm.py``, ``cifar10c.py``, ``conf.py``).

A trained classifier meets unlabeled test batches from a shifted distribution (e.g. CIFAR-10-C corruptions). For
every batch, TENT

1. normalises features with the *batch's* statistics instead of the running ones from training (BatchNorm in train
   mode, running statistics dropped);
2. predicts, and minimises the mean Shannon entropy of those predictions,
   ``H = -(softmax(z) * log_softmax(z)).sum(1).mean()``, by one gradient step (Adam, lr 1e-3, betas (0.9, 0.999),
   no weight decay: the official CIFAR-10-C settings) on the BatchNorm affine parameters (scale and shift) only;
3. returns the predictions of step 2, made *before* the update (the update helps the next batches).

The two baselines of the paper are ``source`` (the model unchanged, eval mode) and ``norm`` (test-time
normalisation: batch statistics, no optimisation).

:class:`TentAdapter` is the method as an ``nn.Module`` around any classifier; :class:`TentModule` runs it in
Lightning's test loop, one test dataloader per domain, and reports error and entropy per domain.

Protocol (the defaults, as the official ``cifar10c.py``): one pass over each corruption's test set in batches of 200
(the datamodule's), one Adam step (lr 1e-3) per batch, not episodic, model and optimizer reset to the source state
at the start of every corruption (``reset="each_domain"``). The *online* variant, ``reset="never"``, adapts
continually: each corruption starts from the weights and optimizer state the previous one left
(``configs/tent/*_online.yaml``).

Choices and extensions, each documented where it is made:

* **Dropout and other train-mode behaviour.** The official ``configure_model`` calls ``model.train()``: every
  module is in train mode, so dropout is active in the forward pass whose predictions are returned and whose
  entropy is minimised (the predictions are then stochastic). That is the default here (``train_mode="all"``);
  ``train_mode="norm"`` keeps everything but the normalisation layers in eval mode (dropout off, deterministic
  predictions), which matters only for models with dropout (RobustBench's ``Standard`` WRN-28-10 has none).
* **Norm layers.** The official code adapts ``nn.BatchNorm2d``; here any BatchNorm (1d/2d/3d, SyncBatchNorm).
  A model without BatchNorm gets its GroupNorm / LayerNorm affine parameters adapted instead, an extension beyond
  the paper (those layers already normalise per sample, so only the entropy minimisation acts); it is announced
  with a warning.
* **``norm`` mode** drops the running statistics as ``tent`` does (the official ``Norm`` with ``no_stats=True``);
  the official default keeps updating running averages that a train-mode BatchNorm never reads, so the predictions
  are the same.
* The official ``forward_and_adapt`` zeroes the gradients after the step; here also before the backward pass, so
  gradients left on the model by someone else cannot leak into the first update.

Distributed and XLA: under DDP each process adapts on its own shard of every domain, dealt round-robin by
DistributedSampler, so ``norm`` and ``tent`` (batch statistics; in ``tent`` mode also each process's own drifting
weights) give other results than one process does, while ``source`` gives the same; errors and entropies are
torchmetrics, the summary files are written by rank zero. ``source`` and ``norm`` are XLA-ready; ``tent`` mode warns
at start-up on XLA (its optimizer steps run inside the test loop).
"""

from __future__ import annotations

import csv
import io
import warnings
from pathlib import Path
from typing import Literal

import lightning as L
import torch
from lightning.pytorch.utilities import rank_zero_only
from torch import nn
from torchmetrics import MeanMetric, SumMetric
from torchmetrics.classification import MulticlassAccuracy

from reprozoo._checks import CheckpointGuard
from reprozoo._files import save_figure, write_atomic
from reprozoo._validate import check
from reprozoo._xla import warn_if_xla
from reprozoo.methods.tent_adapter import TentAdapter, softmax_entropy
from reprozoo.zoo.classifiers import load_classifier

__all__ = ["TentModule"]

_RESETS = ("each_domain", "never")


def _num_classes(model: nn.Module) -> int | None:
    n = getattr(model, "num_classes", None)
    if isinstance(n, int):
        return n
    linears = [m for m in model.modules() if isinstance(m, nn.Linear)]
    return linears[-1].out_features if linears else None


# ----------------------------------------------------------------------------------------------------- Lightning


class _ErrorRate(MulticlassAccuracy):
    """Top-1 error, ``1 - accuracy`` (micro average over items), with MulticlassAccuracy's states and DDP sync."""

    higher_is_better = False

    def compute(self) -> torch.Tensor:
        return 1.0 - super().compute()


class _DomainMetrics(nn.Module):
    def __init__(self, num_classes: int):
        super().__init__()
        self.error = _ErrorRate(num_classes=num_classes, average="micro")
        self.entropy = MeanMetric()
        self.count = SumMetric()


class TentModule(CheckpointGuard, L.LightningModule):
    """Test-time adaptation in Lightning's test loop: ``trainer.test(TentModule(...), datamodule=...)``.

    Every test dataloader is a domain (``CIFAR10CDataModule``: one per corruption and severity, named by its
    ``domains``). Each batch goes through a :class:`TentAdapter`, which adapts on it (``mode="tent"``) and returns
    the predictions made before its update; those are scored. With ``reset="each_domain"`` (the official
    ``cifar10c.py`` protocol) the model and optimizer go back to the source state at the start of every dataloader
    (the first one included, so a second ``trainer.test`` starts afresh); with ``"never"`` adaptation is continual,
    across domains and across ``trainer.test`` calls (:meth:`reset` by hand). ``episodic=True`` resets before
    every batch.

    Logged (per domain, ``add_dataloader_idx=False``): ``test/error/<domain>`` (1 - top-1 accuracy, torchmetrics)
    and ``test/entropy/<domain>`` (mean softmax entropy of the scored predictions, nats); at the end
    ``test/error_mean`` and ``test/entropy_mean`` (unweighted means over domains). :attr:`results` holds the rows;
    ``<log_dir>/tent/summary.md``, ``summary.csv`` and ``error_per_domain.png`` are written on rank zero (``log_dir``:
    the first logger's, else ``default_root_dir``), and the figure and table go to TensorBoard when it logs, unless
    ``write_summary=False``.

    The module does not train: ``trainer.fit`` raises. Lightning runs the test loop under inference mode; the
    adapter leaves it for its own forward and update, so the default ``Trainer(inference_mode=True)`` works.
    ``predict`` adapts too (one domain per predict dataloader) and returns ``{"logits", "probs", "pred"}``.

    Args:
        model: see :func:`load_classifier` (``nn.Module``, ``"robustbench:Standard"``, zoo name, weights file path).
        mode, lr, steps, episodic, optimizer, momentum, betas, weight_decay, nesterov, train_mode: the
            :class:`TentAdapter`'s (defaults: the official CIFAR-10-C settings).
        channels_last, compile: the :class:`TentAdapter`'s speed options (off by default: on, the logits are
            close to, not bitwise equal to, the official code's; see docs/tent.md, "Speed").
        reset: ``"each_domain"`` or ``"never"``.
        domains: names of the test dataloaders; default: the datamodule's ``domains``, else ``domain0``, ...
        num_classes: defaults to ``model.num_classes``, else the last Linear layer's width.
        robustbench_dataset, robustbench_threat_model, robustbench_dir: for ``model="robustbench:<name>"``.
        write_summary: write the summary files and figure at the end of every test run (default). False skips
            them (and TensorBoard's copies): about 0.1 s per ``trainer.test`` call, mostly the PNG, that timed or
            repeated runs need not pay; :attr:`results` and the logged metrics are the same.
    """

    def __init__(
        self,
        model: nn.Module | str,
        mode: Literal["tent", "norm", "source"] = "tent",
        lr: float = 1e-3,
        steps: int = 1,
        episodic: bool = False,
        optimizer: Literal["adam", "sgd"] = "adam",
        momentum: float = 0.9,
        betas: tuple[float, float] = (0.9, 0.999),
        weight_decay: float = 0.0,
        nesterov: bool = True,
        train_mode: Literal["all", "norm"] = "all",
        reset: Literal["each_domain", "never"] = "each_domain",
        domains: list[str] | None = None,
        num_classes: int | None = None,
        robustbench_dataset: str = "cifar10",
        robustbench_threat_model: str = "corruptions",
        robustbench_dir: str | None = None,
        write_summary: bool = True,
        channels_last: bool = False,
        compile: bool = False,
    ):
        super().__init__()
        check(
            isinstance(model, (nn.Module, str)),
            "TentModule",
            "model",
            model,
            "an nn.Module, 'robustbench:<name>', a zoo entry, a weights file or a registered net name",
        )
        check(reset in _RESETS, "TentModule", "reset", reset, "'each_domain' or 'never'")
        check(isinstance(write_summary, bool), "TentModule", "write_summary", write_summary, "True or False")
        check(
            domains is None or (len(set(map(str, domains))) == len(domains)),
            "TentModule",
            "domains",
            domains,
            "None or distinct names",
        )
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=".*is an instance of `nn.Module`")
            self.save_hyperparameters()
            if isinstance(self.hparams.get("model"), nn.Module):
                self.save_hyperparameters(ignore=["model"])
                self.hparams["model"] = None  # a Python object is not a hyperparameter
        net = load_classifier(
            model,
            robustbench_dataset=robustbench_dataset,
            robustbench_threat_model=robustbench_threat_model,
            robustbench_dir=robustbench_dir,
        )
        inferred = _num_classes(net)
        self.num_classes = int(num_classes if num_classes is not None else (inferred or 0))
        check(
            self.num_classes >= 2,
            "TentModule",
            "num_classes",
            num_classes,
            f"given (>= 2): it cannot be read from the model ({type(net).__name__})",
        )
        self.adapter = TentAdapter(
            net,
            mode=mode,
            lr=lr,
            steps=steps,
            episodic=episodic,
            optimizer=optimizer,
            momentum=momentum,
            betas=betas,
            weight_decay=weight_decay,
            nesterov=nesterov,
            train_mode=train_mode,
            channels_last=channels_last,
            compile=compile,
        )
        self.domain_metrics = nn.ModuleList()
        self.domain_names: list[str] = []
        self.results: list[dict] = []  # one row per domain after a test run: domain, error, entropy, n
        self._current_domain: int | None = None

    # ---- the adapted model ----------------------------------------------------------------------------------

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.adapter(x)

    def reset(self) -> None:
        """Back to the source weights and a fresh optimizer state."""
        self.adapter.reset()

    def start_domain(self, dataloader_idx: int) -> None:
        """Called before the first batch of every dataloader: resets with ``reset="each_domain"``."""
        self._current_domain = dataloader_idx
        if self.hparams.reset == "each_domain":
            self.adapter.reset()

    @staticmethod
    def _split(batch) -> tuple[torch.Tensor, torch.Tensor | None]:
        if isinstance(batch, torch.Tensor):
            return batch, None
        if isinstance(batch, dict):
            return batch["x"], batch.get("y")
        return batch[0], (batch[1] if len(batch) > 1 else None)

    # ---- test -----------------------------------------------------------------------------------------------

    def setup(self, stage: str) -> None:
        if self.hparams.mode == "tent":
            warn_if_xla(
                self,
                "mode='tent' takes its own optimizer step inside every test batch, outside the training "
                "loop where Lightning's XLA strategy cuts and runs the graph (modes 'source' and 'norm' "
                "are XLA-ready)",
            )

    def _names_for(self, n: int) -> list[str]:
        given = self.hparams.domains
        if given is not None:
            check(len(given) == n, "TentModule", "domains", given, f"{n} names, one per test dataloader")
            return [str(d) for d in given]
        datamodule = getattr(self.trainer, "datamodule", None)
        names = getattr(datamodule, "domains", None)
        if names is not None and len(names) == n and len(set(map(str, names))) == n:
            return [str(d) for d in names]
        return [f"domain{i}" for i in range(n)]

    def on_test_start(self) -> None:
        n = len(self.trainer.num_test_batches)
        self.domain_names = self._names_for(n)
        with torch.inference_mode(False):  # fresh metric states, as normal tensors
            self.domain_metrics = nn.ModuleList(_DomainMetrics(self.num_classes) for _ in range(n)).to(self.device)
        self.results = []
        self._current_domain = None

    def on_test_batch_start(self, batch, batch_idx: int, dataloader_idx: int = 0) -> None:
        if dataloader_idx != self._current_domain:
            self.start_domain(dataloader_idx)

    def test_step(self, batch, batch_idx: int, dataloader_idx: int = 0) -> None:
        x, y = self._split(batch)
        if y is None:
            raise ValueError("TentModule: test batches must hold labels, (x, y) or {'x', 'y'}")
        logits = self.adapter(x)  # (B, C): predictions before this batch's update
        entropy = softmax_entropy(logits)  # (B,)
        metrics: _DomainMetrics = self.domain_metrics[dataloader_idx]
        metrics.error.update(logits, y)
        metrics.entropy.update(entropy)
        metrics.count.update(torch.tensor(float(len(y)), device=logits.device))
        name, n = self.domain_names[dataloader_idx], len(y)
        common = dict(on_step=False, on_epoch=True, add_dataloader_idx=False, batch_size=n)
        self.log(
            f"test/error/{name}", metrics.error, metric_attribute=f"domain_metrics.{dataloader_idx}.error", **common
        )
        self.log(
            f"test/entropy/{name}",
            metrics.entropy,
            metric_attribute=f"domain_metrics.{dataloader_idx}.entropy",
            **common,
        )

    def on_test_epoch_end(self) -> None:
        rows = []
        for name, metrics in zip(self.domain_names, self.domain_metrics):
            if metrics.count.update_count == 0:
                continue  # an empty dataloader
            rows.append(
                {
                    "domain": name,
                    "error": float(metrics.error.compute()),
                    "entropy": float(metrics.entropy.compute()),
                    "n": int(metrics.count.compute()),
                }
            )
        self.results = rows
        if not rows:
            return
        mean_error = sum(r["error"] for r in rows) / len(rows)
        mean_entropy = sum(r["entropy"] for r in rows) / len(rows)
        self.log("test/error_mean", mean_error, add_dataloader_idx=False)
        self.log("test/entropy_mean", mean_entropy, add_dataloader_idx=False)
        if not self.hparams.write_summary:
            return
        # trainer.log_dir broadcasts from rank zero: read it on every rank, outside the rank-zero function.
        root = self.trainer.log_dir or self.trainer.default_root_dir
        self._write_summary(Path(root) / "tent", rows, mean_error, mean_entropy)

    # ---- summary --------------------------------------------------------------------------------------------

    def summary_markdown(self, rows: list[dict] | None = None) -> str:
        """The per-domain table (error in %), with the mean as the last row."""
        rows = self.results if rows is None else rows
        hp = self.hparams
        lines = [
            f"TENT test-time adaptation: mode={hp.mode}, reset={hp.reset}, episodic={hp.episodic}",
            "",
            "| domain | error (%) | entropy | n |",
            "| --- | ---: | ---: | ---: |",
        ]
        lines += [f"| {r['domain']} | {100 * r['error']:.2f} | {r['entropy']:.4f} | {r['n']} |" for r in rows]
        if rows:
            mean_error = sum(r["error"] for r in rows) / len(rows)
            mean_entropy = sum(r["entropy"] for r in rows) / len(rows)
            lines.append(f"| **mean** | {100 * mean_error:.2f} | {mean_entropy:.4f} | {sum(r['n'] for r in rows)} |")
        return "\n".join(lines) + "\n"

    def figure(self, rows: list[dict] | None = None):
        """Bar chart of the error per domain with the mean as a line (a matplotlib Figure on the Agg canvas)."""
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure

        rows = self.results if rows is None else rows
        fig = Figure(figsize=(min(40.0, max(6.0, 0.35 * len(rows) + 2.0)), 4.5), layout="constrained")
        FigureCanvasAgg(fig)
        ax = fig.add_subplot()
        errors = [100 * r["error"] for r in rows]
        ax.bar(range(len(rows)), errors, color="tab:blue")
        if rows:
            mean = sum(errors) / len(errors)
            ax.axhline(mean, color="tab:red", linestyle="--", label=f"mean = {mean:.2f}%")
            ax.legend(loc="best")
        ax.set_xticks(range(len(rows)), [r["domain"] for r in rows], rotation=90, fontsize=7)
        ax.set_ylabel("error (%)")
        ax.set_title(f"Error per domain (mode={self.hparams.mode}, reset={self.hparams.reset})")
        return fig

    @rank_zero_only
    def _write_summary(self, out_dir: Path, rows: list[dict], mean_error: float, mean_entropy: float) -> None:
        # Atomic writes (temporary file + rename): a reader or a killed run never sees half a table or figure.
        markdown = self.summary_markdown(rows)
        write_atomic(out_dir / "summary.md", markdown.encode("utf-8"))
        buffer = io.StringIO()
        writer = csv.DictWriter(buffer, fieldnames=["domain", "error", "entropy", "n"], lineterminator="\n")
        writer.writeheader()
        writer.writerows(rows)
        total = sum(r["n"] for r in rows)
        writer.writerow({"domain": "mean", "error": mean_error, "entropy": mean_entropy, "n": total})
        write_atomic(out_dir / "summary.csv", buffer.getvalue().encode("utf-8"))
        fig = self.figure(rows)
        save_figure(fig, out_dir / "error_per_domain.png")
        for logger in self.trainer.loggers:
            experiment = getattr(logger, "experiment", None)
            if hasattr(experiment, "add_figure"):  # TensorBoard's SummaryWriter
                experiment.add_figure("tent/error_per_domain", fig, global_step=self.trainer.global_step)
            if hasattr(experiment, "add_text"):
                experiment.add_text("tent/summary", markdown, global_step=self.trainer.global_step)

    # ---- predict --------------------------------------------------------------------------------------------

    def on_predict_start(self) -> None:
        self._current_domain = None

    def on_predict_batch_start(self, batch, batch_idx: int, dataloader_idx: int = 0) -> None:
        if dataloader_idx != self._current_domain:
            self.start_domain(dataloader_idx)

    def predict_step(self, batch, batch_idx: int, dataloader_idx: int = 0) -> dict[str, torch.Tensor]:
        x, _ = self._split(batch)
        logits = self.adapter(x)
        return {"logits": logits, "probs": logits.softmax(dim=-1), "pred": logits.argmax(dim=-1)}

    # ---- no training ----------------------------------------------------------------------------------------

    def training_step(self, batch, batch_idx: int):
        raise RuntimeError("TentModule does not train: it adapts at test time; run trainer.test(...)")

    def configure_optimizers(self):
        raise RuntimeError(
            "TentModule does not train (the adapter owns its optimizer): run trainer.test(...), not trainer.fit(...)"
        )
