"""The sign-SGD with decoupled weight decay that the official TinyRecursiveModels code trains its sparse
puzzle-identifier embedding with (``CastedSparseEmbeddingSignSGD_Distributed``): for every row of the embedding that
the batch used, ``row <- row * (1 - lr * weight_decay) - lr * sign(grad)``; rows the batch did not use are left as
they are (no decay either). Here the embedding is a dense ``nn.Embedding``, whose unused rows get an all-zero
gradient: a row counts as used when its gradient is not all zero. Under DDP the gradient is the mean over the
processes, whose sign is that of the official sum."""

from __future__ import annotations

from collections.abc import Iterable

import torch

from reprozoo._validate import check


class _ParamwiseOptimizer(torch.optim.Optimizer):
    """An optimizer whose step updates each parameter that has a gradient on its own: ``_update(p, group)``."""

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is not None:
                    self._update(p, group)
        return loss

    def _update(self, p: torch.Tensor, group: dict) -> None:
        raise NotImplementedError


class SignSGD(_ParamwiseOptimizer):
    def __init__(self, params: Iterable, lr: float = 1e-3, weight_decay: float = 1e-2):
        check(lr >= 0, "SignSGD", "lr", lr, ">= 0")
        check(weight_decay >= 0, "SignSGD", "weight_decay", weight_decay, ">= 0")
        super().__init__(params, dict(lr=lr, weight_decay=weight_decay))

    def _update(self, p: torch.Tensor, group: dict) -> None:
        _sign_sgd_update(p, group["lr"], group["weight_decay"])


def _sign_sgd_update(p: torch.Tensor, lr: float, weight_decay: float) -> None:
    """One sign-SGD step of the rows of ``p`` that have a gradient (not all zero), in place."""
    grad = p.grad
    used = grad.reshape(grad.shape[0], -1).ne(0).any(dim=1)  # (rows,)
    shape = (-1,) + (1,) * (p.dim() - 1)
    decayed = p * (1 - lr * weight_decay) - lr * torch.sign(grad)
    p.copy_(torch.where(used.view(shape), decayed, p))
