"""Engression's generator g(x, eps): an MLP fed with noise (Shen & Meinshausen 2024, the official ``StoNet``)."""

from __future__ import annotations

from typing import Literal

import torch
from torch import nn

from reprozoo._validate import check

NoiseType = Literal["normal", "uniform"]


def _draw_noise(n: int, dim: int, kind: NoiseType, scale: float, like: torch.Tensor) -> torch.Tensor:
    if kind == "normal":
        return torch.randn(n, dim, device=like.device, dtype=like.dtype) * scale
    # uniform on [-scale*sqrt(3), scale*sqrt(3)]: the same standard deviation as the normal choice
    return (torch.rand(n, dim, device=like.device, dtype=like.dtype) * 2 - 1) * (scale * 3**0.5)


class _NoisyLinear(nn.Module):
    """Linear (+ BatchNorm) whose input is ``[h, eps]`` with fresh noise, or just ``h`` when ``noise_dim == 0``."""

    def __init__(self, in_dim: int, out_dim: int, noise_dim: int, batch_norm: bool):
        super().__init__()
        self.noise_dim = noise_dim
        self.linear = nn.Linear(in_dim + noise_dim, out_dim)
        self.norm = nn.BatchNorm1d(out_dim) if batch_norm else nn.Identity()

    def forward(self, h: torch.Tensor, noise) -> torch.Tensor:
        if self.noise_dim:
            h = torch.cat([h, noise(h.shape[0], self.noise_dim, h)], dim=1)  # (N, in + noise)
        return self.norm(self.linear(h))


class _NoisyResidualBlock(nn.Module):
    """Two noisy linear layers with a skip connection: h + f(h), then ReLU (the official StoResBlock shape)."""

    def __init__(self, dim: int, noise_dim: int, batch_norm: bool):
        super().__init__()
        self.fc1 = _NoisyLinear(dim, dim, noise_dim, batch_norm)
        self.fc2 = _NoisyLinear(dim, dim, noise_dim, batch_norm)

    def forward(self, h: torch.Tensor, noise) -> torch.Tensor:
        return torch.relu(h + self.fc2(torch.relu(self.fc1(h, noise)), noise))


class StochasticMLP(nn.Module):
    """Generator ``g(x, eps)`` of engression: an MLP fed with noise (the official ``StoNet``).

    ``num_layer`` counts linear layers as the official code does: an input layer, ``num_layer - 2`` hidden layers,
    an output layer. With ``resblock=True`` the hidden layers are paired into residual blocks (``num_layer`` is
    rounded up to an even number). Noise of ``noise_dim`` dimensions is concatenated to the input of the first
    layer, and with ``noise_every_layer=True`` (default, as the official StoNet's ``noise_all_layer``) to the input
    of every hidden layer as well; with the default ``num_layer=2`` there is no hidden layer, so both choices build
    the same network. ``noise_dim=0`` gives a deterministic MLP; :meth:`without_noise` builds the L1/L2 baseline of
    a generator: the same layers and batch norm, minus the noise inputs.

    The defaults are those of the official ``engression()`` for a continuous response (2 layers, 100 hidden units,
    100 noise dimensions, batch norm, no residual blocks); ``tests/test_engression.py`` checks them against the
    installed package. Official versions up to 0.1.15 built hidden layers as ``[layer] * k``, one module repeated,
    so that they shared weights; later versions, and this class, give each hidden layer its own weights.
    """

    def __init__(
        self,
        in_dim: int = 1,
        out_dim: int = 1,
        *,
        hidden_dim: int = 100,
        num_layer: int = 2,
        noise_dim: int = 100,
        noise_type: NoiseType = "normal",
        noise_scale: float = 1.0,
        noise_every_layer: bool = True,
        resblock: bool = False,
        batch_norm: bool = True,
    ):
        super().__init__()
        for field, value in {"in_dim": in_dim, "out_dim": out_dim, "hidden_dim": hidden_dim}.items():
            check(isinstance(value, int) and value >= 1, "StochasticMLP", field, value, "an integer >= 1")
        check(num_layer >= 2, "StochasticMLP", "num_layer", num_layer, ">= 2 (input and output layer)")
        check(noise_dim >= 0, "StochasticMLP", "noise_dim", noise_dim, ">= 0")
        check(noise_type in ("normal", "uniform"), "StochasticMLP", "noise_type", noise_type, "'normal' or 'uniform'")
        check(noise_scale >= 0, "StochasticMLP", "noise_scale", noise_scale, ">= 0")
        self.config = dict(
            in_dim=in_dim,
            out_dim=out_dim,
            hidden_dim=hidden_dim,
            num_layer=num_layer,
            noise_dim=noise_dim,
            noise_type=noise_type,
            noise_scale=noise_scale,
            noise_every_layer=noise_every_layer,
            resblock=resblock,
            batch_norm=batch_norm,
        )  # the keyword arguments that build it again
        self.in_dim, self.out_dim, self.noise_dim = in_dim, out_dim, noise_dim
        self.noise_type, self.noise_scale = noise_type, noise_scale
        inner_noise = noise_dim if noise_every_layer else 0
        self.input_layer = _NoisyLinear(in_dim, hidden_dim, noise_dim, batch_norm)
        num_hidden = num_layer - 2
        if resblock:
            self.hidden = nn.ModuleList(
                _NoisyResidualBlock(hidden_dim, inner_noise, batch_norm) for _ in range((num_hidden + 1) // 2)
            )
        else:
            self.hidden = nn.ModuleList(
                _NoisyLinear(hidden_dim, hidden_dim, inner_noise, batch_norm) for _ in range(num_hidden)
            )
        self.resblock = resblock
        self.output_layer = nn.Linear(hidden_dim, out_dim)

    def without_noise(self) -> StochasticMLP:
        """A fresh deterministic twin: the same arguments with ``noise_dim=0`` (the like-for-like L1/L2 baseline:
        same widths, depth, residual blocks and batch norm, only the noise inputs gone)."""
        return StochasticMLP(**{**self.config, "noise_dim": 0})

    def _noise(self, n: int, dim: int, like: torch.Tensor) -> torch.Tensor:
        return _draw_noise(n, dim, self.noise_type, self.noise_scale, like)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.relu(self.input_layer(x, self._noise))  # (N, hidden)
        for layer in self.hidden:
            h = layer(h, self._noise) if self.resblock else torch.relu(layer(h, self._noise))
        return self.output_layer(h)  # (N, out_dim)
