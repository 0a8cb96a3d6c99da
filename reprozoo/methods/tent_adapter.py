"""TENT as the official code has it (DequanWang/tent ``tent.py``, ``norm.py``): :class:`TentAdapter`, an ``nn.Module``
around any classifier that normalises with each test batch's statistics and, in ``tent`` mode, takes one entropy-
minimisation step on the normalisation layers' affine parameters per batch. :class:`~reprozoo.methods.TentModule`
runs it in Lightning's test loop; the method, its choices and its deviations are described there."""

from __future__ import annotations

import copy
import logging
import warnings
from collections.abc import Sequence
from typing import Literal

import torch
from torch import nn

from reprozoo._validate import check

__all__ = ["MODES", "TentAdapter", "collect_norm_params", "softmax_entropy"]

log = logging.getLogger(__name__)

MODES = ("tent", "norm", "source")
_OPTIMIZERS = ("adam", "sgd")
_TRAIN_MODES = ("all", "norm")
_BATCH_NORM = (  # every BatchNorm of torch.nn (their common base class is private)
    nn.BatchNorm1d,
    nn.BatchNorm2d,
    nn.BatchNorm3d,
    nn.SyncBatchNorm,
    nn.LazyBatchNorm1d,
    nn.LazyBatchNorm2d,
    nn.LazyBatchNorm3d,
)
_FALLBACK_NORMS = (nn.GroupNorm, nn.LayerNorm)


def softmax_entropy(logits: torch.Tensor) -> torch.Tensor:
    """Shannon entropy (nats) of ``softmax(logits)`` per row: (B, C) -> (B,). TENT minimises its batch mean."""
    return -(logits.softmax(1) * logits.log_softmax(1)).sum(1)


def _batch_norms(model: nn.Module) -> list[nn.Module]:
    return [m for m in model.modules() if isinstance(m, _BATCH_NORM)]


def collect_norm_params(model: nn.Module) -> tuple[list[nn.Parameter], list[str]]:
    """The parameters TENT adapts and their names: the affine scale (``weight``) and shift (``bias``) of every
    BatchNorm layer (official ``collect_params``); for a model without BatchNorm, those of its GroupNorm and
    LayerNorm layers instead (an extension). Layers without affine parameters contribute nothing."""
    has_bn = bool(_batch_norms(model))
    kinds = _BATCH_NORM if has_bn else _FALLBACK_NORMS
    params: list[nn.Parameter] = []
    names: list[str] = []
    seen: set[int] = set()
    for module_name, module in model.named_modules():
        if not isinstance(module, kinds):
            continue
        for param_name in ("weight", "bias"):  # weight is the scale, bias the shift
            p = getattr(module, param_name, None)
            if isinstance(p, nn.Parameter) and id(p) not in seen:
                seen.add(id(p))
                params.append(p)
                names.append(f"{module_name}.{param_name}" if module_name else param_name)
    return params, names


def _use_batch_statistics(model: nn.Module) -> None:
    """Official ``configure_model``: BatchNorm normalises with the batch's statistics in train *and* eval mode and
    keeps no running averages."""
    for bn in _batch_norms(model):
        bn.track_running_stats = False
        bn.running_mean = None
        bn.running_var = None


# ----------------------------------------------------------------------------------------------------- the method


class TentAdapter(nn.Module):
    """A classifier that adapts itself on every batch it sees (``mode="tent"``), or one of the paper's baselines.

    ``adapter(x)`` returns (B, C) logits. In ``tent`` mode, for each of ``steps`` repeats: forward ``x``, minimise
    the mean softmax entropy of those logits by one optimizer step on the normalisation layers' affine parameters,
    and return the logits of the last forward pass, computed *before* its update (detached). Gradients are enabled
    inside even when the caller runs under ``torch.no_grad()`` or ``torch.inference_mode()`` (Lightning's
    evaluation loops): the pass runs with ``torch.inference_mode(False)`` and ``torch.enable_grad()``, on a normal
    copy of an inference-mode input.

    The model is configured **in place**, as the official ``configure_model`` does (pass a ``copy.deepcopy`` to
    keep the original):

    * ``tent``: all parameters frozen except the BatchNorm weights and biases (see :func:`collect_norm_params`);
      BatchNorm running statistics dropped (``track_running_stats=False``, ``running_mean = running_var = None``),
      so batch statistics are used; the model in train mode (``train_mode="all"``, official; dropout active) or
      only its normalisation layers (``train_mode="norm"``).
    * ``norm``: BatchNorm running statistics dropped likewise, BatchNorm layers in train mode, the rest in eval
      mode (official ``Norm``); nothing is optimised and ``requires_grad`` is left alone.
    * ``source``: the model unchanged, in eval mode.

    ``.train()`` / ``.eval()`` on the adapter (Lightning calls ``eval()`` before testing) do not change these modes.

    The optimizer (over the adapted parameters only) and a copy of the model's and optimizer's states are made at
    construction; :meth:`reset` restores both (official ``copy_model_and_optimizer`` / ``load_model_and_optimizer``).
    ``episodic=True`` resets before every batch, so each batch is adapted to from the source weights alone.

    Args:
        model: any classifier ``nn.Module`` returning (B, C) logits.
        mode: ``"tent"``, ``"norm"`` or ``"source"``.
        lr: learning rate (official CIFAR-10-C: 1e-3).
        steps: optimizer steps per batch (official: 1).
        episodic: reset to the source state before every batch.
        optimizer: ``"adam"`` (official; ``betas``, ``weight_decay``) or ``"sgd"`` (``momentum``, ``nesterov``,
            ``weight_decay``; the official SGD has dampening 0 and Nesterov momentum).
        train_mode: ``"all"`` (official) or ``"norm"``, see above; ``tent`` mode only.
        channels_last: convert the model's 4-d weights and every 4-d input to the channels-last memory format
            (speed; see docs/tent.md, "Speed"). The convolutions and BatchNorm then sum in another order, so the
            logits are close to, not bitwise equal to, those of the default layout (after a few Adam steps, whose
            first updates are nearly ``lr * sign(gradient)``, differences of about 1e-2 in the logits).
        compile: ``torch.compile`` the model (in place, ``model.compile()``): the first batches pay the compilation
            (tens of seconds on a CPU), later ones run fused kernels; the logits are close to, not equal to, the
            eager ones, as with ``channels_last``.
    """

    def __init__(
        self,
        model: nn.Module,
        mode: Literal["tent", "norm", "source"] = "tent",
        lr: float = 1e-3,
        steps: int = 1,
        episodic: bool = False,
        optimizer: Literal["adam", "sgd"] = "adam",
        momentum: float = 0.9,
        betas: Sequence[float] = (0.9, 0.999),
        weight_decay: float = 0.0,
        nesterov: bool = True,
        train_mode: Literal["all", "norm"] = "all",
        channels_last: bool = False,
        compile: bool = False,
    ):
        super().__init__()
        owner = "TentAdapter"
        check(isinstance(model, nn.Module), owner, "model", type(model).__name__, "an nn.Module")
        check(mode in MODES, owner, "mode", mode, f"one of {', '.join(MODES)}")
        check(lr > 0, owner, "lr", lr, "> 0")
        check(isinstance(steps, int) and steps >= 1, owner, "steps", steps, "an integer >= 1")
        check(optimizer in _OPTIMIZERS, owner, "optimizer", optimizer, "'adam' or 'sgd'")
        check(0 <= momentum < 1, owner, "momentum", momentum, "in [0, 1)")
        betas = tuple(float(b) for b in betas)
        check(len(betas) == 2 and all(0 <= b < 1 for b in betas), owner, "betas", betas, "two numbers in [0, 1)")
        check(weight_decay >= 0, owner, "weight_decay", weight_decay, ">= 0")
        check(
            not (optimizer == "sgd" and nesterov and momentum == 0),
            owner,
            "nesterov",
            nesterov,
            "False when optimizer='sgd' has momentum 0",
        )
        check(train_mode in _TRAIN_MODES, owner, "train_mode", train_mode, "'all' or 'norm'")
        check(isinstance(channels_last, bool), owner, "channels_last", channels_last, "True or False")
        check(isinstance(compile, bool), owner, "compile", compile, "True or False")
        if channels_last:
            model.to(memory_format=torch.channels_last)  # in place; before the source state is saved
        self.model = model
        self.channels_last = channels_last
        self.mode, self.steps, self.episodic, self.train_mode = mode, steps, bool(episodic), train_mode
        self.adapted_names: list[str] = []
        self.optimizer: torch.optim.Optimizer | None = None
        self._source_state: dict[str, torch.Tensor] | None = None
        self._optimizer_state: dict | None = None
        self.last_loss: torch.Tensor | None = None  # mean entropy of the last adapted batch, before its update

        has_bn = bool(_batch_norms(model))
        if mode == "norm":
            if not has_bn:
                warnings.warn(
                    f"{owner}: mode='norm' on a model without BatchNorm changes nothing: its predictions "
                    "are the source model's",
                    stacklevel=2,
                )
            _use_batch_statistics(model)
        elif mode == "tent":
            params, names = collect_norm_params(model)
            check(
                bool(params),
                owner,
                "model",
                type(model).__name__,
                "a model with BatchNorm (or GroupNorm / LayerNorm) affine parameters to adapt",
            )
            if not has_bn:
                warnings.warn(
                    f"{owner}: the model has no BatchNorm; adapting the affine parameters of its GroupNorm / LayerNorm "
                    f"layers instead ({len(names)} tensors), an extension beyond the paper",
                    stacklevel=2,
                )
            model.requires_grad_(False)
            for p in params:
                p.requires_grad_(True)
            _use_batch_statistics(model)
            if optimizer == "adam":
                self.optimizer = torch.optim.Adam(params, lr=lr, betas=betas, weight_decay=weight_decay)
            else:
                self.optimizer = torch.optim.SGD(
                    params,
                    lr=lr,
                    momentum=momentum,
                    dampening=0.0,
                    weight_decay=weight_decay,
                    nesterov=nesterov and momentum > 0,
                )
            self.adapted_names = names
            log.info(
                "TENT adapts %d parameter tensors (%d values): %s",
                len(params),
                sum(p.numel() for p in params),
                ", ".join(names),
            )
            self._source_state = {k: v.detach().clone() for k, v in model.state_dict().items()}
            self._optimizer_state = copy.deepcopy(self.optimizer.state_dict())
        self._apply_modes()
        if compile:
            model.compile()  # the module stays itself: state dict, reset and optimizer are unchanged

    # ---- modes ----------------------------------------------------------------------------------------------

    def _apply_modes(self) -> None:
        if self.mode == "tent" and self.train_mode == "all":
            self.model.train()  # official: the whole model, dropout included
            return
        self.model.eval()
        if self.mode == "source":
            return
        norm_kinds = _BATCH_NORM if self.mode == "norm" or _batch_norms(self.model) else _FALLBACK_NORMS
        for module in self.model.modules():
            if isinstance(module, norm_kinds):
                module.train()

    def train(self, mode: bool = True) -> TentAdapter:
        """Keeps the modes ``mode=...`` configured (see the class docstring); only the adapter's own flag changes."""
        self.training = mode
        self._apply_modes()
        return self

    # ---- adaptation -----------------------------------------------------------------------------------------

    @property
    def adapted_parameters(self) -> list[nn.Parameter]:
        """The parameters the optimizer updates (empty unless ``mode="tent"``)."""
        return [] if self.optimizer is None else [p for g in self.optimizer.param_groups for p in g["params"]]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.channels_last and x.dim() == 4:
            x = x.contiguous(memory_format=torch.channels_last)
        if self.mode != "tent":
            return self.model(x)
        if self.episodic:
            self.reset()
        with torch.inference_mode(False), torch.enable_grad():
            if x.is_inference():
                x = x.clone()  # an inference tensor cannot be saved for backward
            for _ in range(self.steps):
                outputs = self._forward_and_adapt(x)
        return outputs

    def _forward_and_adapt(self, x: torch.Tensor) -> torch.Tensor:
        outputs = self.model(x)  # (B, C)
        loss = softmax_entropy(outputs).mean(0)
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.last_loss = loss.detach()
        return outputs.detach()

    def reset(self) -> None:
        """Restore the model and optimizer states saved at construction (no-op outside ``tent`` mode, where
        nothing changes)."""
        if self._source_state is None:
            return
        with torch.inference_mode(False), torch.no_grad():  # also from Lightning hooks run under inference mode
            self.model.load_state_dict(self._source_state, strict=True)
            self.optimizer.load_state_dict(copy.deepcopy(self._optimizer_state))

    def extra_repr(self) -> str:
        text = f"mode={self.mode!r}"
        if self.mode == "tent":
            text += f", steps={self.steps}, episodic={self.episodic}, train_mode={self.train_mode!r}"
        return text
