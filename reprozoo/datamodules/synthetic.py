"""The synthetic regression problems of the engression paper (Shen & Meinshausen, Figure 4).

Four monotone functions, each observed with Gaussian (or uniform) noise either *before* the function
(pre-additive, ``Y = g(X + eps)``, the model engression is built for) or *after* it (post-additive,
``Y = g(X) + eps``). x is uniform on a bounded training support; the test split is a grid that extends beyond it,
so that extrapolation can be measured. Function definitions and defaults (support [0, 2], N(0, 1) noise,
n = 10,000, test grid on [0, 4]) follow the official package's simulator and example.
"""

from __future__ import annotations

import math
from typing import Literal

import torch
from torch.utils.data import TensorDataset

from reprozoo.datamodules._base import _SplitsDataModule

FunctionName = Literal["softplus", "square", "cubic", "log"]


def _log_fn(x: torch.Tensor) -> torch.Tensor:
    # linear with slope 1/3 up to 2, then log(1 + x); the two pieces meet at log 3
    return torch.where(x <= 2, x / 3 + math.log(3) - 2 / 3, torch.log1p(x.clamp_min(2)))


TRUE_FUNCTIONS = {
    "softplus": torch.nn.functional.softplus,
    "square": lambda x: torch.relu(x).pow(2) / 2,
    "cubic": lambda x: x.pow(3) / 3,
    "log": _log_fn,
}


class SyntheticRegressionDataModule(_SplitsDataModule):
    """Seeded data from one of the paper's functions; train/val on the support, test on a wider grid.

    Args:
        function: ``softplus``, ``square`` (relu(x)^2/2), ``cubic`` (x^3/3) or ``log``.
        noise: ``pre`` (Y = g(X + eps)) or ``post`` (Y = g(X) + eps).
        noise_std: standard deviation of eps.
        noise_dist: ``gaussian`` or ``uniform`` (scaled to the same std).
        train_support: x ~ Uniform(train_support) for the train and val splits.
        test_range: the test grid's range; points outside ``train_support`` measure extrapolation.
        n_train, n_val, n_test: sizes; the test split is an evenly spaced grid of ``n_test`` points.
        batch_size: for all loaders.
        seed: one seed for all three splits (each split draws from its own generator).
    """

    def __init__(
        self,
        function: FunctionName = "softplus",
        noise: Literal["pre", "post"] = "pre",
        noise_std: float = 1.0,
        noise_dist: Literal["gaussian", "uniform"] = "gaussian",
        train_support: tuple[float, float] = (0.0, 2.0),
        test_range: tuple[float, float] = (0.0, 4.0),
        n_train: int = 10_000,
        n_val: int = 1_000,
        n_test: int = 1_000,
        batch_size: int = 1_000,
        seed: int = 0,
        num_workers: int = 0,
    ):
        super().__init__()
        if function not in TRUE_FUNCTIONS:
            raise ValueError(
                f"SyntheticRegressionDataModule: function must be one of {sorted(TRUE_FUNCTIONS)}, got {function!r}"
            )
        for field, (lo, hi) in {"train_support": train_support, "test_range": test_range}.items():
            if not lo < hi:
                raise ValueError(
                    f"SyntheticRegressionDataModule: {field} must be (low, high) with low < high, got {(lo, hi)}"
                )
        for field, value in {"n_train": n_train, "n_val": n_val, "n_test": n_test, "batch_size": batch_size}.items():
            if value < 1:
                raise ValueError(f"SyntheticRegressionDataModule: {field} must be >= 1, got {value}")
        if noise not in ("pre", "post"):
            raise ValueError(f"SyntheticRegressionDataModule: noise must be 'pre' or 'post', got {noise!r}")
        if noise_dist not in ("gaussian", "uniform"):
            raise ValueError(
                f"SyntheticRegressionDataModule: noise_dist must be 'gaussian' or 'uniform', got {noise_dist!r}"
            )
        if num_workers < 0:
            raise ValueError(f"SyntheticRegressionDataModule: num_workers must be >= 0, got {num_workers}")
        if noise_std < 0:
            raise ValueError(f"SyntheticRegressionDataModule: noise_std must be >= 0, got {noise_std}")
        self.save_hyperparameters()
        self.g = TRUE_FUNCTIONS[function]
        self.splits: dict[str, TensorDataset] = {}

    # ------------------------------------------------------------------------------------ the data model

    def _noise(self, n: int, gen: torch.Generator) -> torch.Tensor:
        std = self.hparams.noise_std
        if self.hparams.noise_dist == "gaussian":
            return torch.randn(n, 1, generator=gen) * std
        return (torch.rand(n, 1, generator=gen) - 0.5) * std * math.sqrt(12)

    def draw_y(self, x: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
        """One draw of Y | X = x for each row of x (N, 1)."""
        eps = self._noise(len(x), gen)
        return self.g(x + eps) if self.hparams.noise == "pre" else self.g(x) + eps

    def true_quantile(self, x: torch.Tensor, q: float) -> torch.Tensor:
        """The q-quantile of Y | X = x. All four functions are non-decreasing, so for pre-additive noise the
        quantile of g(x + eps) is g(x + quantile of eps)."""
        std = self.hparams.noise_std
        if self.hparams.noise_dist == "gaussian":
            z = std * math.sqrt(2) * torch.erfinv(torch.tensor(2 * q - 1)).item()
        else:
            z = (q - 0.5) * std * math.sqrt(12)
        return self.g(x + z) if self.hparams.noise == "pre" else self.g(x) + z

    def true_median(self, x: torch.Tensor) -> torch.Tensor:
        return self.true_quantile(x, 0.5)

    def in_support(self, x: torch.Tensor) -> torch.Tensor:
        lo, hi = self.hparams.train_support
        return (x >= lo) & (x <= hi)

    # ------------------------------------------------------------------------------------ Lightning hooks

    def setup(self, stage: str | None = None) -> None:
        if self.splits:
            return
        hp = self.hparams
        lo, hi = hp.train_support
        for offset, (split, n) in enumerate((("train", hp.n_train), ("val", hp.n_val))):
            gen = torch.Generator().manual_seed(hp.seed * 1000 + offset)
            x = torch.rand(n, 1, generator=gen) * (hi - lo) + lo  # (n, 1)
            self.splits[split] = TensorDataset(x, self.draw_y(x, gen))
        gen = torch.Generator().manual_seed(hp.seed * 1000 + 2)
        grid = torch.linspace(*hp.test_range, hp.n_test).unsqueeze(1)  # (n_test, 1)
        self.splits["test"] = TensorDataset(grid, self.draw_y(grid, gen))
