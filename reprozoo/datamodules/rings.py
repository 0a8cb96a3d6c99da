"""The concentric-rings problem of Neighbourhood Components Analysis (Goldberger, Hinton, Roweis & Salakhutdinov,
NIPS 2004): classes on concentric rings in a plane, plus dimensions of high-variance Gaussian noise. The noise
dominates the variance, so PCA keeps it and loses the rings; a projection learned for kNN (NCA) drops it.

Generated locally (seeded), nothing to download.
"""

from __future__ import annotations

import math

import torch
from torch.utils.data import TensorDataset

from reprozoo.datamodules._base import _SplitsDataModule


def make_rings(
    n_per_class: int,
    num_classes: int = 5,
    noise_dims: int = 1,
    noise_std: float = 10.0,
    ring_width: float = 0.1,
    seed: int = 0,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(x (N, 2 + noise_dims), y (N,)): class c on the ring of radius c + 1 (angle uniform, radius jittered by
    N(0, ring_width^2)), then ``noise_dims`` coordinates of N(0, noise_std^2); classes interleaved."""
    g = torch.Generator().manual_seed(seed)
    y = torch.arange(num_classes).repeat(n_per_class)  # (N,)
    angle = torch.rand(len(y), generator=g) * 2 * math.pi
    radius = (y + 1).float() + ring_width * torch.randn(len(y), generator=g)
    plane = torch.stack([radius * angle.cos(), radius * angle.sin()], dim=1)  # (N, 2)
    noise = noise_std * torch.randn(len(y), noise_dims, generator=g)
    return torch.cat([plane, noise], dim=1), y


class ConcentricRingsDataModule(_SplitsDataModule):
    """Concentric rings (NCA paper, section 4): ``num_classes`` rings of radii 1, 2, ... in the first two coordinates
    and ``noise_dims`` coordinates of N(0, noise_std^2) noise. Train, val and test are drawn independently from
    seeds derived from ``seed``. Items are ``(x, y)`` with x of shape (2 + noise_dims,)."""

    def __init__(
        self,
        n_train_per_class: int = 100,
        n_val_per_class: int = 100,
        n_test_per_class: int = 200,
        num_classes: int = 5,
        noise_dims: int = 1,
        noise_std: float = 10.0,
        ring_width: float = 0.1,
        batch_size: int = 100,
        num_workers: int = 0,
        seed: int = 0,
    ):
        super().__init__()
        name = type(self).__name__
        for field, value in {
            "n_train_per_class": n_train_per_class,
            "n_val_per_class": n_val_per_class,
            "n_test_per_class": n_test_per_class,
            "batch_size": batch_size,
        }.items():
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name}: {field} must be an integer >= 1, got {value!r}")
        if num_classes < 2:
            raise ValueError(f"{name}: num_classes must be >= 2, got {num_classes!r}")
        if num_workers < 0:
            raise ValueError(f"{name}: num_workers must be >= 0, got {num_workers!r}")
        if noise_dims < 0:
            raise ValueError(f"{name}: noise_dims must be >= 0, got {noise_dims!r}")
        if not noise_std >= 0 or not ring_width >= 0:
            raise ValueError(f"{name}: noise_std and ring_width must be >= 0, got {noise_std!r}, {ring_width!r}")
        self.save_hyperparameters()
        self.num_classes = num_classes
        self.input_dim = 2 + noise_dims
        self.splits: dict[str, TensorDataset] = {}

    def setup(self, stage: str | None = None) -> None:
        if self.splits:
            return
        hp = self.hparams
        sizes = {"train": hp.n_train_per_class, "val": hp.n_val_per_class, "test": hp.n_test_per_class}
        for offset, (split, n) in enumerate(sizes.items()):
            x, y = make_rings(n, hp.num_classes, hp.noise_dims, hp.noise_std, hp.ring_width, seed=hp.seed * 3 + offset)
            self.splits[split] = TensorDataset(x, y)
