"""Knowledge distillation: Hinton, Vinyals & Dean, "Distilling the Knowledge in a Neural Network" (2015).

A small student is trained on the teacher's softened class probabilities (softmax at temperature T) as well as, or
instead of, the true labels:

    L = alpha * T^2 * KL(softmax(z_t / T) || softmax(z_s / T))  +  (1 - alpha) * CE(z_s, y)

The T^2 factor keeps the soft term's gradients the same size as T changes (they scale as 1/T^2; paper, section 2),
so alpha keeps its meaning across temperatures. With T = 1 and alpha = 0 the loss is plain cross-entropy.

Which term alpha weights is not settled between libraries: here (as in the seed notebook and the paper's wording,
where the soft targets carry most of the weight) alpha weights the soft, distillation term; the Keras distillation
example, for one, uses alpha for the hard-label term instead. ``alpha=1`` trains on the teacher alone (no labels
needed).

Distributed and XLA: metrics as :mod:`~reprozoo.methods.classifier`; each process caches the teacher logits of the
training items it sees. XLA-ready with ``cache_teacher=False``; with the cache, the lookups are data-dependent and
the module warns at start-up on XLA.
"""

from __future__ import annotations

import inspect
import os
from pathlib import Path
from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn
from torchmetrics import MeanMetric

from reprozoo._checks import check_checkpoint_file
from reprozoo._xla import warn_if_xla
from reprozoo.methods.classifier import ClassifierModule
from reprozoo.zoo.registry import WeightsError, _import, is_card_path, list_weights, load_model

__all__ = ["DistillationModule", "distillation_loss", "load_teacher", "tune_logit_bias"]


# ------------------------------------------------------------------------------------------------------- the loss


def distillation_loss(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    labels: torch.Tensor | None,
    temperature: float = 4.0,
    alpha: float = 0.5,
) -> torch.Tensor:
    """``alpha * T^2 * KL(softmax(teacher / T) || softmax(student / T)) + (1 - alpha) * CE(student, labels)``.

    Logits are (B, C); the KL divergence is summed over classes and averaged over the batch, the cross-entropy
    averaged over the batch (on the unsoftened student logits, as the paper). ``labels`` (B,) may be None when
    ``alpha == 1``. The teacher's logits are treated as constants (detached).
    """
    if not (isinstance(temperature, (int, float)) and temperature > 0):
        raise ValueError(f"distillation_loss: temperature must be > 0, got {temperature!r}")
    if not 0 <= alpha <= 1:
        raise ValueError(f"distillation_loss: alpha must be in [0, 1], got {alpha!r}")
    if student_logits.shape != teacher_logits.shape or student_logits.dim() != 2:
        raise ValueError(
            "distillation_loss: student and teacher logits must both be (B, C), got "
            f"{tuple(student_logits.shape)} and {tuple(teacher_logits.shape)}"
        )
    loss = student_logits.new_zeros(())
    if alpha > 0:
        log_p_student = F.log_softmax(student_logits / temperature, dim=-1)
        log_p_teacher = F.log_softmax(teacher_logits.detach() / temperature, dim=-1)
        kl = F.kl_div(log_p_student, log_p_teacher, log_target=True, reduction="batchmean")
        loss = loss + alpha * temperature**2 * kl
    if alpha < 1:
        if labels is None:
            raise ValueError("distillation_loss: labels are needed unless alpha == 1")
        loss = loss + (1 - alpha) * F.cross_entropy(student_logits, labels)
    return loss


# ------------------------------------------------------------------------------------------------------- teachers


def load_teacher(spec: nn.Module | str | os.PathLike) -> nn.Module:
    """A teacher from an ``nn.Module``, a zoo name or the card of a ``zoo export``, or a Lightning checkpoint written by ``python cli.py fit`` (its
    hyperparameters name the class: ``_class_path``)."""
    if isinstance(spec, nn.Module):
        return spec
    text = str(spec)
    if text in list_weights() or is_card_path(text):
        return load_model(text)
    path = Path(text)
    if path.is_file():
        check_checkpoint_file(path)
        checkpoint = torch.load(path, map_location="cpu", weights_only=False)
        class_path = checkpoint.get("hyper_parameters", {}).get("_class_path")
        if not class_path:
            raise WeightsError(
                f"teacher {text}: the checkpoint does not name its class (no '_class_path' in its hyperparameters; it "
                "was not written by `python cli.py fit`); load it in Python and pass the module as teacher=..."
            )
        return _import(class_path).load_from_checkpoint(path, map_location="cpu")
    raise WeightsError(f"teacher {text!r} is neither a zoo entry (reprozoo zoo list) nor a checkpoint file")


# ------------------------------------------------------------------------------------------------------- the module


class DistillationModule(ClassifierModule):
    """Train ``student`` on :func:`distillation_loss` against a frozen ``teacher``.

    Everything of :class:`~reprozoo.methods.classifier.ClassifierModule` applies to the student (optimiser, schedule,
    L1/L2 penalties, max-norm, metrics; per-class accuracy is on by default so that a class left out of the transfer
    set shows), and the student is what the checkpoint, the optimiser and DDP see. The teacher:

    * comes from an ``nn.Module``, a zoo name or a ``cli.py fit`` checkpoint (:func:`load_teacher`);
    * is kept outside the module tree: not in ``state_dict`` (so not in checkpoints or zoo exports), not in the
      optimiser, not wrapped or synchronised by DDP; it follows the module's device and dtype moves;
    * has no gradients and stays in eval mode (BatchNorm statistics and dropout untouched) throughout.

    With ``cache_teacher=True`` the teacher's logits are computed once per training example and reused in later
    epochs. That is only valid when the training inputs are the same every epoch: the datamodule must declare
    ``deterministic_train_transform`` true (no augmentation, e.g. ``FashionMNISTDataModule`` without ``jitter``)
    and give each training item its index (``return_index=True``); otherwise fitting stops with a message saying so.

    ``logit_bias`` ({class: amount}) is added to the student's logits in validation, test and predict: the paper's
    fix for a class missing from the transfer set ("mythical" 3s), whose bias is raised by a chosen amount.
    :func:`tune_logit_bias` chooses that amount on held-out data (the paper chose it on the test set).

    Args:
        student: the network to train (an ``nn.Module``, or a registered net name).
        teacher: see above; may be None only to evaluate or predict with a trained student (``alpha == 0`` trains
            without one).
        temperature: T > 0 of the soft targets (the seed notebook: 4; the paper's MNIST runs: 20).
        alpha: weight of the soft term in [0, 1] (see the module docstring).
        cache_teacher: compute the teacher's logits once per example (see above).
        logit_bias: per-class amounts added to the student's logits at evaluation.
        other arguments: those of :class:`~reprozoo.methods.classifier.ClassifierModule`.
    """

    def __init__(
        self,
        student: nn.Module | str,
        teacher: nn.Module | str | None = None,
        *,
        temperature: float = 4.0,
        alpha: float = 0.5,
        cache_teacher: bool = False,
        logit_bias: dict[int, float] | None = None,
        num_classes: int | None = None,
        optimizer: Literal["sgd", "adam", "adamw"] = "sgd",
        lr: float = 0.01,
        momentum: float = 0.9,
        nesterov: bool = False,
        weight_decay: float = 0.0,
        l1: float = 0.0,
        l2: float = 0.0,
        label_smoothing: float = 0.0,
        scheduler: Literal["cosine", "step"] | None = None,
        step_size: int = 30,
        gamma: float = 0.1,
        per_class_metrics: bool = True,
        weights: str | None = None,
    ):
        if not (isinstance(temperature, (int, float)) and temperature > 0):
            raise ValueError(f"DistillationModule: temperature must be > 0, got {temperature!r}")
        if not (isinstance(alpha, (int, float)) and 0 <= alpha <= 1):
            raise ValueError(f"DistillationModule: alpha must be in [0, 1], got {alpha!r}")
        if teacher is not None and not isinstance(teacher, (nn.Module, str, os.PathLike)):
            raise ValueError(
                f"DistillationModule: teacher must be an nn.Module, a zoo name or a checkpoint path, got {teacher!r}"
            )
        super().__init__(
            student,
            num_classes=num_classes,
            optimizer=optimizer,
            lr=lr,
            momentum=momentum,
            nesterov=nesterov,
            weight_decay=weight_decay,
            l1=l1,
            l2=l2,
            label_smoothing=label_smoothing,
            scheduler=scheduler,
            step_size=step_size,
            gamma=gamma,
            per_class_metrics=per_class_metrics,
            weights=weights,
        )
        # The parent recorded its own arguments too (its "net" is this class's student): keep this class's only.
        # Modules given as Python objects are not hyperparameters (pass them again to load_from_checkpoint).
        own = inspect.signature(DistillationModule.__init__).parameters
        for key in [k for k in self.hparams if k not in own and not k.startswith("_")]:
            self.hparams.pop(key)  # e.g. the parent's "net" and "penalize", collected from its frame
        for field in ("student", "teacher"):
            if isinstance(self.hparams.get(field), nn.Module):
                self.hparams[field] = None
        bias = torch.zeros(self.num_classes)
        for k, amount in (logit_bias or {}).items():
            if not (isinstance(k, int) and 0 <= k < self.num_classes):
                raise ValueError(
                    f"DistillationModule: logit_bias keys must be classes in 0..{self.num_classes - 1}, got {k!r}"
                )
            bias[k] = float(amount)
        self.register_buffer("logit_bias", bias, persistent=False)  # an evaluation setting, not a weight
        self._set_teacher(load_teacher(teacher) if teacher is not None else None)
        self.train_distill = MeanMetric()
        self._cache: torch.Tensor | None = None  # (N, C) teacher logits of the training items
        self._cached: torch.Tensor | None = None  # (N,) bool

    @staticmethod
    def zoo_hparams(hparams: dict) -> dict:
        """A zoo entry holds the student alone: no teacher to load (``registry.export_checkpoint`` calls this)."""
        return {**hparams, "teacher": None}

    # ---- the teacher, outside the module tree -------------------------------------------------------------

    def _set_teacher(self, teacher: nn.Module | None) -> None:
        if teacher is not None:
            teacher.requires_grad_(False).eval()
        object.__setattr__(self, "_teacher", teacher)  # not a child: no state_dict, optimiser, DDP or train()

    @property
    def teacher(self) -> nn.Module | None:
        return self._teacher

    def _apply(self, fn, *args, **kwargs):
        # .to(device), .cuda(), .double() ... move the teacher along with the student.
        super()._apply(fn, *args, **kwargs)
        if self._teacher is not None:
            self._teacher._apply(fn, *args, **kwargs)
        return self

    def train(self, mode: bool = True):
        super().train(mode)
        if self._teacher is not None:
            self._teacher.eval()  # always: its BatchNorm statistics and dropout stay as they were
        return self

    @torch.no_grad()
    def teacher_logits(self, x: torch.Tensor) -> torch.Tensor:
        if self._teacher is None:
            raise RuntimeError("DistillationModule: no teacher (give teacher=... to train with alpha > 0)")
        self._teacher.eval()
        return self._teacher(x)

    # ---- training -----------------------------------------------------------------------------------------

    def setup(self, stage: str) -> None:
        super().setup(stage)
        if stage == "fit" and self.hparams.cache_teacher:
            warn_if_xla(
                self,
                "cache_teacher=True looks up and fills the teacher-logit cache with data-dependent "
                "boolean indexing and a host-side `if missing.any()` every step; set cache_teacher=False "
                "on XLA (the rest of the module is XLA-ready)",
            )

    def on_fit_start(self) -> None:
        super().on_fit_start()
        if self.hparams.alpha > 0 and self._teacher is None:
            raise RuntimeError(
                "DistillationModule: alpha > 0 needs a teacher (teacher=<zoo name | checkpoint | module>)"
            )
        if not self.hparams.cache_teacher:
            return
        dm = self.trainer.datamodule
        if dm is None or not getattr(dm, "deterministic_train_transform", False):
            raise RuntimeError(
                "DistillationModule: cache_teacher=True needs a datamodule whose training inputs are the same every "
                "epoch (deterministic_train_transform=True, e.g. FashionMNISTDataModule with jitter=0): with "
                "augmentation the cached teacher logits would belong to other inputs. Set cache_teacher=False."
            )
        if not getattr(dm, "hparams", {}).get("return_index", False):
            raise RuntimeError(
                "DistillationModule: cache_teacher=True needs the index of each training item: set the datamodule's "
                "return_index=True (items (x, y, index))"
            )
        n = len(dm.splits["train"]) if hasattr(dm, "splits") else len(self.trainer.train_dataloader.dataset)
        self._cache = torch.zeros(n, self.num_classes, device=self.device)
        self._cached = torch.zeros(n, dtype=torch.bool, device=self.device)

    def _teacher_for(self, x: torch.Tensor, index: torch.Tensor | None) -> torch.Tensor:
        if self._cache is None:
            return self.teacher_logits(x)
        if index is None:
            raise RuntimeError("DistillationModule: cache_teacher=True but the batch has no index (x, y, index)")
        missing = ~self._cached[index]
        if missing.any():  # first sight of these items: ask the teacher, remember
            self._cache[index[missing]] = self.teacher_logits(x[missing]).to(self._cache.dtype)
            self._cached[index[missing]] = True
        return self._cache[index]

    def loss(self, batch) -> dict[str, torch.Tensor]:
        """``{"loss", "ce", "distill", "penalty", "accuracy", "logits", "y"}`` of a training batch ``(x, y)`` or
        ``(x, y, index)``: ``loss`` = :func:`distillation_loss` + the L1/L2 penalty."""
        x, y = batch[0], batch[1]
        index = batch[2] if isinstance(batch, (list, tuple)) and len(batch) > 2 else None
        logits = self.net(x)  # (B, C)
        hp = self.hparams
        teacher = self._teacher_for(x, index) if hp.alpha > 0 else None
        ce = F.cross_entropy(logits, y, label_smoothing=hp.label_smoothing)
        if teacher is None:
            distill = ce
        else:
            distill = distillation_loss(logits, teacher, y, hp.temperature, hp.alpha)
        penalty = self.penalty()
        accuracy = (logits.detach().argmax(dim=-1) == y).float().mean()
        return {
            "loss": distill + penalty,
            "ce": ce,
            "distill": distill,
            "penalty": penalty,
            "accuracy": accuracy,
            "logits": logits,
            "y": y,
        }

    def _log_train_extra(self, out: dict[str, torch.Tensor], n: int) -> None:
        self.train_distill(out["distill"].detach(), n)
        self.log("train/distill", self.train_distill, on_step=True, on_epoch=True, batch_size=n)

    def eval_logits(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x) + self.logit_bias

    def on_save_checkpoint(self, checkpoint: dict) -> None:
        # Belt and braces: nothing of the teacher may reach a checkpoint.
        assert not any(k.startswith("_teacher") for k in checkpoint.get("state_dict", {}))
        super().on_save_checkpoint(checkpoint)


# ------------------------------------------------------------------------------------------------ the bias, tuned


@torch.no_grad()
def tune_logit_bias(
    module: DistillationModule,
    datamodule,
    classes: list[int] | tuple[int, ...],
    amounts: torch.Tensor | None = None,
    apply: bool = True,
) -> dict[str, float]:
    """The amount added to the logits of ``classes`` (one amount, shared) that maximises top-1 accuracy on held-out
    data: the paper's bias correction for classes missing from the transfer set (+3.5 on the 3s, -7.6 on 7 and 8),
    which the paper chose on the test set. Here it is chosen on ``datamodule.tune_dataloader()`` (the held-out split
    of :class:`~reprozoo.datamodules.fashion_mnist.TransferSetMNISTDataModule`, every class in it) or, for a
    datamodule without one, ``val_dataloader()``; the test split is never read.

    ``amounts`` (default -15 to 15 in steps of 0.1) is searched exhaustively on logits computed once; among equally
    good amounts the one of least magnitude wins (no correction unless it helps). With ``apply`` the module's
    ``logit_bias`` of ``classes`` is set to it. Returns ``{"amount", "accuracy", "accuracy_without"}`` (accuracies
    on the tuning data, before and after).
    """
    if not classes or not all(isinstance(k, int) and 0 <= k < module.num_classes for k in classes):
        raise ValueError(
            f"tune_logit_bias: classes must be a non-empty list of classes in 0..{module.num_classes - 1}, "
            f"got {classes!r}"
        )
    loader_of = getattr(datamodule, "tune_dataloader", None) or datamodule.val_dataloader
    if amounts is None:
        amounts = torch.arange(-150, 151, dtype=torch.float64) / 10
    was_training = module.training
    module.eval()
    logits, labels = [], []
    for batch in loader_of():
        x, y = batch[0].to(module.device), batch[1]
        logits.append(module.net(x).double().cpu())
        labels.append(torch.as_tensor(y))
    module.train(was_training)
    if not logits:
        raise ValueError("tune_logit_bias: the tuning split is empty; give the datamodule a val_size > 0")
    z, y = torch.cat(logits), torch.cat(labels)  # (N, C), (N,)
    base = module.logit_bias.detach().double().cpu().clone()
    base[list(classes)] = 0.0  # the amount replaces, not adds to, a bias already set on these classes
    mask = torch.zeros(module.num_classes, dtype=torch.float64)
    mask[list(classes)] = 1.0
    z = z + base
    accuracy = torch.stack([((z + a * mask).argmax(dim=-1) == y).double().mean() for a in amounts.double()])  # (A,)
    best = accuracy.max()
    candidates = torch.nonzero(accuracy == best).flatten()
    pick = candidates[amounts.double()[candidates].abs().argmin()]
    amount = float(amounts[pick])
    without = float((z.argmax(dim=-1) == y).double().mean())
    if apply:
        module.logit_bias[list(classes)] = amount
    return {"amount": amount, "accuracy": float(best), "accuracy_without": without}
