"""The plain supervised classifier: any network, cross-entropy, explicit L1/L2 penalties, SGD/Adam/AdamW.

It is the baseline of the regularization experiments (Neuromatch Academy DL, W2D1): the penalties ``l1`` and ``l2``
are added to the loss as that tutorial does, ``weight_decay`` is the optimizer's own, and a net with a max-norm
constraint (:class:`~reprozoo.nets.MLP` ``max_norm``) is projected after every optimizer step.

Distributed and XLA: every logged value is a torchmetrics object, exact under DDP (with a dataset size divisible by
the number of processes: DistributedSampler pads with repeats otherwise). XLA-ready (static shapes, no host
reads in a step; not run on a TPU here).
"""

from __future__ import annotations

import warnings
from typing import Literal

import lightning as L
import torch
import torch.nn.functional as F
from torch import nn
from torchmetrics import MeanMetric, Metric
from torchmetrics.classification import MulticlassAccuracy

from reprozoo._checks import CheckpointGuard, check_finite_loss
from reprozoo._validate import check
from reprozoo.nets import create_net
from reprozoo.zoo.registry import load_pretrained_into

__all__ = ["ClassifierModule"]

_OPTIMIZERS = ("sgd", "adam", "adamw")
_SCHEDULERS = (None, "cosine", "step")


class _SplitMetrics(nn.Module):
    """Loss mean and accuracy of one split, as torchmetrics objects: Lightning computes, syncs (DDP) and resets
    them per epoch, and the means are weighted by batch size, so a short last batch counts as what it is."""

    def __init__(self, num_classes: int, per_class: bool = False):
        super().__init__()
        self.loss = MeanMetric()
        self.acc = MulticlassAccuracy(num_classes=num_classes, average="micro")
        # Accuracy of each true class (recall), logged by hand at the epoch end: Lightning logs scalars only.
        self.per_class = MulticlassAccuracy(num_classes=num_classes, average="none") if per_class else None


class ClassifierModule(CheckpointGuard, L.LightningModule):
    """Supervised classification of ``(x, y)`` batches (``y``: class indices) with any ``nn.Module`` giving logits.

    Training objective (``loss(batch)["loss"]``)::

        cross_entropy(net(x), y; label_smoothing) + l1 * sum |w| + l2 * sum w^2

    where the sums run over the net's *weights*: its trainable parameters of dimension > 1 (Linear and conv
    kernels), not biases or normalisation parameters, which the usual weight penalties leave alone. The tutorial's
    ``l1_reg`` / ``l2_reg`` sum over every parameter; ``penalize="all"`` does that. The L2 penalty enters the loss
    (its gradient is ``2 l2 w``), unlike ``weight_decay``, which the optimizer applies itself (coupled to the
    gradient in SGD and Adam, decoupled in AdamW).

    Logged: ``train/ce``, ``train/penalty``, ``train/loss``, ``train/acc`` (per step and per epoch),
    ``val/loss``, ``val/acc``, ``test/loss``, ``test/acc`` (per epoch; the eval losses are the cross-entropy, without
    penalties). Accuracy is top-1 over all items (micro average).

    Args:
        net: the network: an ``nn.Module`` (in a config: ``class_path: reprozoo.nets.MLP`` plus ``init_args``)
            or the name of a registered net (``"resnet20"``, see :func:`~reprozoo.nets.list_nets`).
        num_classes: number of classes; defaults to ``net.num_classes``.
        optimizer: ``"sgd"`` (with ``momentum`` and ``nesterov``), ``"adam"`` or ``"adamw"``.
        lr, momentum, nesterov, weight_decay: the optimizer's.
        l1, l2: strengths of the explicit penalties above (>= 0).
        penalize: ``"weights"`` (default) or ``"all"`` parameters in the penalties.
        label_smoothing: of the training cross-entropy, in [0, 1).
        scheduler: None, ``"cosine"`` (to zero over ``max_epochs``, or over all steps when only ``max_steps`` is
            set) or ``"step"`` (multiply the learning rate by ``gamma`` every ``step_size`` epochs).
        per_class_metrics: also log the accuracy of each true class, ``val/acc_class/<k>`` and
            ``test/acc_class/<k>`` (torchmetrics, synced under DDP; NaN for a class absent from the split).
        weights: zoo entry to initialise from (``fit --model.weights NAME`` fine-tunes it).

    A net given as a Python object (``ClassifierModule(MLP(...))``) cannot be stored in the hyperparameters: its
    checkpoints hold ``net: None`` and load with ``ClassifierModule.load_from_checkpoint(path, net=MLP(...))``. A
    net given by name, or by ``class_path`` in a LightningCLI config, is recorded and
    ``load_from_checkpoint(path)`` rebuilds it without arguments. (Lightning rebuilds a class_path net before the
    module, so a module so loaded holds a Python object again: checkpoints that *it* saves need ``net=...``, while
    zoo exports keep the original checkpoint's record.)
    """

    def __init__(
        self,
        net: nn.Module | str,
        *,
        num_classes: int | None = None,
        optimizer: Literal["sgd", "adam", "adamw"] = "adam",
        lr: float = 1e-3,
        momentum: float = 0.9,
        nesterov: bool = False,
        weight_decay: float = 0.0,
        l1: float = 0.0,
        l2: float = 0.0,
        penalize: Literal["weights", "all"] = "weights",
        label_smoothing: float = 0.0,
        scheduler: Literal["cosine", "step"] | None = None,
        step_size: int = 30,
        gamma: float = 0.1,
        per_class_metrics: bool = False,
        weights: str | None = None,
    ):
        super().__init__()
        check(
            isinstance(net, (nn.Module, str)),
            "ClassifierModule",
            "net",
            net,
            "an nn.Module or a registered net name (a checkpoint made from a Python object needs "
            "load_from_checkpoint(path, net=...))",
        )
        check(optimizer in _OPTIMIZERS, "ClassifierModule", "optimizer", optimizer, f"one of {', '.join(_OPTIMIZERS)}")
        check(lr > 0, "ClassifierModule", "lr", lr, "> 0")
        check(0 <= momentum < 1, "ClassifierModule", "momentum", momentum, "in [0, 1)")
        check(
            not nesterov or (optimizer == "sgd" and momentum > 0),
            "ClassifierModule",
            "nesterov",
            nesterov,
            "False unless optimizer='sgd' with momentum > 0",
        )
        check(weight_decay >= 0, "ClassifierModule", "weight_decay", weight_decay, ">= 0")
        check(l1 >= 0, "ClassifierModule", "l1", l1, ">= 0")
        check(l2 >= 0, "ClassifierModule", "l2", l2, ">= 0")
        check(penalize in ("weights", "all"), "ClassifierModule", "penalize", penalize, "'weights' or 'all'")
        check(0 <= label_smoothing < 1, "ClassifierModule", "label_smoothing", label_smoothing, "in [0, 1)")
        check(scheduler in _SCHEDULERS, "ClassifierModule", "scheduler", scheduler, "None, 'cosine' or 'step'")
        check(step_size >= 1, "ClassifierModule", "step_size", step_size, ">= 1")
        check(gamma > 0, "ClassifierModule", "gamma", gamma, "> 0")
        with warnings.catch_warnings():
            # Modules given as Python objects are replaced by None just below (subclasses do the same for theirs).
            warnings.filterwarnings("ignore", message=".*is an instance of `nn.Module`")
            self.save_hyperparameters()
            if isinstance(self.hparams.get("net"), nn.Module):
                # A Python object, not a class_path config (LightningCLI records that) or a name: saved again
                # without it, so that neither the checkpoint nor the loggers' copy of the hyperparameters pickles it.
                self.save_hyperparameters(ignore=["net"])
                self.hparams["net"] = None

        if isinstance(net, str):
            try:
                net = create_net(net)
            except ValueError as err:
                raise ValueError(
                    f"ClassifierModule: net must be an nn.Module or a registered net name: {err}"
                ) from None
        self.net = net
        inferred = getattr(self.net, "num_classes", None)
        check(
            num_classes is not None or inferred is not None,
            "ClassifierModule",
            "num_classes",
            num_classes,
            f"given: the net ({type(self.net).__name__}) has no num_classes attribute",
        )
        check(
            num_classes is None or inferred is None or num_classes == inferred,
            "ClassifierModule",
            "num_classes",
            num_classes,
            f"the net's num_classes ({inferred}) or None",
        )
        self.num_classes = int(num_classes if num_classes is not None else inferred)
        check(self.num_classes >= 2, "ClassifierModule", "num_classes", self.num_classes, ">= 2")
        self.train_metrics = _SplitMetrics(self.num_classes)
        self.train_ce = MeanMetric()
        self.train_penalty = MeanMetric()
        self.val_metrics = _SplitMetrics(self.num_classes, per_class_metrics)
        self.test_metrics = _SplitMetrics(self.num_classes, per_class_metrics)
        if weights:
            load_pretrained_into(self, weights)

    # --------------------------------------------------------------------------------------- the objective

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)  # (B, num_classes) logits

    def penalized_parameters(self) -> list[nn.Parameter]:
        """The parameters the L1/L2 penalties act on (see the class docstring)."""
        params = [p for p in self.net.parameters() if p.requires_grad]
        return params if self.hparams.penalize == "all" else [p for p in params if p.dim() > 1]

    def penalty(self) -> torch.Tensor:
        """``l1 * sum |w| + l2 * sum w^2`` over :meth:`penalized_parameters` (a 0-d tensor, 0 without penalties)."""
        l1, l2 = self.hparams.l1, self.hparams.l2
        total = torch.zeros((), device=self.device)
        if l1 == 0 and l2 == 0:
            return total
        for p in self.penalized_parameters():
            if l1:
                total = total + l1 * p.abs().sum()
            if l2:
                total = total + l2 * p.pow(2).sum()
        return total

    @staticmethod
    def _split(batch) -> tuple[torch.Tensor, torch.Tensor]:
        if isinstance(batch, dict):
            return batch["x"], batch["y"]
        return batch[0], batch[1]

    def loss(self, batch) -> dict[str, torch.Tensor]:
        """The training objective on ``batch`` (``(x, y)`` or ``{"x", "y"}``) and its parts, as 0-d tensors:
        ``{"loss": ce + penalty, "ce", "penalty", "accuracy"}`` (``loss`` with its graph; the caller chooses
        train/eval mode and grad). Other code evaluates the module through it without touching its metrics:
        :class:`~reprozoo.callbacks.LossLandscape` plots ``loss`` and ``accuracy`` from this mapping."""
        x, y = self._split(batch)
        logits = self.net(x)  # (B, C)
        ce = F.cross_entropy(logits, y, label_smoothing=self.hparams.label_smoothing)
        penalty = self.penalty()
        accuracy = (logits.detach().argmax(dim=-1) == y).float().mean()
        return {"loss": ce + penalty, "ce": ce, "penalty": penalty, "accuracy": accuracy, "logits": logits, "y": y}

    # --------------------------------------------------------------------------------------- steps

    def training_step(self, batch, batch_idx: int) -> torch.Tensor:
        out = self.loss(batch)
        loss, logits, y = out["loss"], out["logits"], out["y"]
        check_finite_loss(self, loss, batch_idx)
        n = len(y)
        m = self.train_metrics
        # Calling a metric updates its epoch state and returns the batch value (what on_step logs).
        self.train_ce(out["ce"].detach(), n)
        self.train_penalty(out["penalty"].detach(), n)
        m.loss(loss.detach(), n)
        m.acc(logits.detach(), y)
        log = dict(on_step=True, on_epoch=True, batch_size=n)
        self.log("train/ce", self.train_ce, **log)
        self.log("train/penalty", self.train_penalty, **log)
        self.log("train/loss", m.loss, prog_bar=True, **log)
        self.log("train/acc", m.acc, **log)
        self._log_train_extra(out, n)
        return loss

    def _log_train_extra(self, out: dict[str, torch.Tensor], n: int) -> None:
        """Subclasses log the further terms of their :meth:`loss` here."""

    def eval_logits(self, x: torch.Tensor) -> torch.Tensor:
        """The logits that validation, test and predict score: the net's (subclasses may adjust them)."""
        return self.net(x)

    def _eval_step(self, batch, metrics: _SplitMetrics, prefix: str) -> None:
        x, y = self._split(batch)
        logits = self.eval_logits(x)
        metrics.loss.update(F.cross_entropy(logits, y), len(y))
        metrics.acc.update(logits, y)
        if metrics.per_class is not None:
            metrics.per_class.update(logits, y)
        self.log(f"{prefix}/loss", metrics.loss, batch_size=len(y))
        self.log(f"{prefix}/acc", metrics.acc, prog_bar=True, batch_size=len(y))

    def _log_per_class(self, metrics: _SplitMetrics, prefix: str) -> None:
        if metrics.per_class is None:
            return
        values = metrics.per_class.compute()  # synced across processes; NaN for a class absent from the split
        metrics.per_class.reset()
        self.log_dict({f"{prefix}/acc_class/{k}": v for k, v in enumerate(values)}, sync_dist=False)

    def validation_step(self, batch, batch_idx: int) -> None:
        self._eval_step(batch, self.val_metrics, "val")

    def on_validation_epoch_end(self) -> None:
        self._log_per_class(self.val_metrics, "val")

    def test_step(self, batch, batch_idx: int) -> None:
        self._eval_step(batch, self.test_metrics, "test")

    def on_test_epoch_end(self) -> None:
        self._log_per_class(self.test_metrics, "test")

    def predict_step(self, batch, batch_idx: int, dataloader_idx: int = 0) -> dict[str, torch.Tensor]:
        """``{"logits": (B, C), "probs": (B, C), "pred": (B,)}`` for a batch ``x``, ``(x, y)`` or ``{"x", ...}``."""
        if isinstance(batch, torch.Tensor):
            x = batch
        elif isinstance(batch, dict):
            x = batch["x"]
        else:
            x = batch[0]
        logits = self.eval_logits(x)
        return {"logits": logits, "probs": logits.softmax(dim=-1), "pred": logits.argmax(dim=-1)}

    def on_fit_start(self) -> None:
        # A trainer.validate/test before fit resets the metrics under inference mode, which makes their states
        # inference tensors that fit (no inference mode) may not update in place: start fit with fresh states.
        for metric in self.modules():
            if isinstance(metric, Metric):
                metric.reset()

    # --------------------------------------------------------------------------------------- optimisation

    def optimizer_step(self, *args, **kwargs) -> None:
        # Lightning calls this hook only when the optimizer really steps (once per accumulate_grad_batches
        # batches), so the max-norm projection follows every update and nothing else.
        super().optimizer_step(*args, **kwargs)
        project = getattr(self.net, "apply_max_norm", None)
        if callable(project):
            project()

    def configure_optimizers(self):
        hp = self.hparams
        params = [p for p in self.parameters() if p.requires_grad]
        if hp.optimizer == "sgd":
            opt = torch.optim.SGD(
                params, lr=hp.lr, momentum=hp.momentum, nesterov=hp.nesterov, weight_decay=hp.weight_decay
            )
        elif hp.optimizer == "adam":
            opt = torch.optim.Adam(params, lr=hp.lr, weight_decay=hp.weight_decay)
        else:
            opt = torch.optim.AdamW(params, lr=hp.lr, weight_decay=hp.weight_decay)
        if hp.scheduler is None:
            return opt
        if hp.scheduler == "step":
            sched = torch.optim.lr_scheduler.StepLR(opt, step_size=hp.step_size, gamma=hp.gamma)
            return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "epoch"}}
        epochs = self.trainer.max_epochs
        if epochs is not None and epochs > 0:
            sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=epochs)
            return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "epoch"}}
        steps = int(self.trainer.estimated_stepping_batches)  # max_epochs=-1: the run is bounded by max_steps
        sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=max(steps, 1))
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}
