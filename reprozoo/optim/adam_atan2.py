"""AdamATan2 (Everett et al. 2024, "Scaling Exponents Across Parameterizations and Optimizers"), as the optimizer
the official TinyRecursiveModels code trains with (the ``adam-atan2`` package, 0.0.3): Adam whose update is
``atan2(m_hat, sqrt(v_hat))`` instead of ``m_hat / (sqrt(v_hat) + eps)``, so there is no epsilon to tune and every
coordinate moves by at most ``lr * pi / 2``. Per step, with decoupled weight decay applied first:

    p <- p * (1 - lr * weight_decay)
    m <- beta1 * m + (1 - beta1) * g;   v <- beta2 * v + (1 - beta2) * g^2
    p <- p - lr / (1 - beta1^t) * atan2(m, sqrt(v) / sqrt(1 - beta2^t))

(the package's CUDA kernel, written here with public torch ops; no scale factors a, b)."""

from __future__ import annotations

from collections.abc import Iterable

import torch

from reprozoo._validate import check
from reprozoo.optim.sign_sgd import _ParamwiseOptimizer, _sign_sgd_update


class AdamATan2(_ParamwiseOptimizer):
    _extra_defaults: dict = {}

    def __init__(
        self,
        params: Iterable,
        lr: float = 1e-3,
        betas: tuple[float, float] = (0.9, 0.999),
        weight_decay: float = 1e-2,
    ):
        name = type(self).__name__
        check(lr >= 0, name, "lr", lr, ">= 0")
        check(len(betas) == 2 and all(0 <= b < 1 for b in betas), name, "betas", betas, "two numbers in [0, 1)")
        check(weight_decay >= 0, name, "weight_decay", weight_decay, ">= 0")
        super().__init__(params, dict(lr=lr, betas=tuple(betas), weight_decay=weight_decay, **self._extra_defaults))

    def _update(self, p: torch.Tensor, group: dict) -> None:
        _adam_atan2_update(p, self.state[p], group["lr"], group["betas"], group["weight_decay"])


def _adam_atan2_update(p: torch.Tensor, state: dict, lr: float, betas: tuple[float, float], weight_decay: float):
    """One AdamATan2 step of ``p`` in place (``state``: its step count and moments, created on the first call)."""
    beta1, beta2 = betas
    if not state:
        state["step"] = 0
        state["exp_avg"] = torch.zeros_like(p)
        state["exp_avg_sq"] = torch.zeros_like(p)
    state["step"] += 1
    t = state["step"]
    m, v = state["exp_avg"], state["exp_avg_sq"]
    p.mul_(1 - lr * weight_decay)
    m.lerp_(p.grad, 1 - beta1)
    v.lerp_(p.grad.square(), 1 - beta2)
    denom = v.sqrt() / (1 - beta2**t) ** 0.5
    p.add_(torch.atan2(m, denom), alpha=-lr / (1 - beta1**t))


class AdamATan2SignSGD(AdamATan2):
    """The official TRM pair as one optimizer: AdamATan2 for every param group, except the groups with
    ``sign_sgd=True`` (the puzzle embedding's), which take :class:`~reprozoo.optim.SignSGD`'s update. One optimizer,
    so that Lightning counts one optimizer step per step (it counts each optimizer's ``step``) and one scheduler
    drives both learning rates."""

    _extra_defaults = {"sign_sgd": False}

    def _update(self, p: torch.Tensor, group: dict) -> None:
        if group["sign_sgd"]:
            _sign_sgd_update(p, group["lr"], group["weight_decay"])
        else:
            super()._update(p, group)
