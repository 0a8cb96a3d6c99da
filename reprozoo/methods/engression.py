"""Engression: distributional regression with a generative model trained on the energy score.

Shen & Meinshausen, "Engression: Extrapolation through the Lens of Distributional Regression" (JRSSB 2024),
and the official ``engression`` package (xwshen51/engression).

A generator ``g(x, eps)`` maps covariates and noise to a sample of ``Y | X = x``. It is trained by minimising the
(negative) energy score, estimated with ``m`` samples per ``x``:

    L = mean_j ||s_j - y||^beta  -  1 / (2 m (m-1)) * sum_{j != k} ||s_j - s_k||^beta

which is a strictly proper scoring rule for beta in (0, 2): its minimiser is the true conditional distribution.
For pre-additive noise models ``Y = g*(X + eps)`` this also pins ``g`` down *outside* the training support, which
is the paper's extrapolation result; the L1/L2 baselines (``loss="l1" | "l2"``, a deterministic network) are not.

Distributed and XLA: validation and test scores are torchmetrics (exact under DDP, with a dataset size divisible
by the number of processes: DistributedSampler pads with repeats otherwise); the standardisation statistics are
summed over all processes. XLA-ready (static shapes, no host reads in a step; not run on a TPU here).
"""

from __future__ import annotations

import contextlib
import numbers
import warnings
from collections.abc import Sequence
from typing import Literal

import lightning as L
import torch
import torchmetrics
from torch import nn
from torchmetrics import MeanAbsoluteError, MeanMetric
from torchmetrics.regression import ContinuousRankedProbabilityScore

from reprozoo._checks import CheckpointGuard, check_finite_loss
from reprozoo._validate import check
from reprozoo.nets import StochasticMLP, net_from, net_record
from reprozoo.zoo.registry import load_model, load_pretrained_into

__all__ = ["EngressionRegressor", "energy_score"]


# ------------------------------------------------------------------------------------------------------- the loss


def _energy_terms(y: torch.Tensor, samples: torch.Tensor, beta: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-observation terms of the energy score.

    y: (B, d), samples: (B, m, d) -> fit (B,) = mean_j ||s_j - y||^beta,
    spread (B,) = mean over j != k of ||s_j - s_k||^beta (the unbiased pairwise estimate).
    """
    fit = (samples - y.unsqueeze(1)).norm(dim=-1).pow(beta).mean(dim=1)  # (B,)
    m = samples.shape[1]
    if m < 2:
        return fit, torch.zeros_like(fit)
    # Exact (non-matmul) distances, and the zero diagonal dropped *before* the power: d/dx x^beta is infinite at 0.
    dist = torch.cdist(samples, samples, compute_mode="donot_use_mm_for_euclid_dist")  # (B, m, m)
    # The off-diagonal entries in row-major order by slicing, not a boolean mask: static shapes (XLA-friendly).
    off_diagonal = dist.flatten(1)[:, 1:].reshape(-1, m - 1, m + 1)[:, :, :m].flatten(1)  # (B, m (m - 1))
    spread = off_diagonal.pow(beta).mean(dim=1)  # (B,)
    return fit, spread


def energy_score(y: torch.Tensor, samples: torch.Tensor, beta: float = 1.0) -> torch.Tensor:
    """Energy score of ``samples`` (B, m, d) for observations ``y`` (B, d), averaged over B (lower is better).

    ``mean_j ||s_j - y||^beta - 1/(2 m (m-1)) sum_{j != k} ||s_j - s_k||^beta``. With d = 1 and beta = 1 it is an
    unbiased estimate of the CRPS of the sampled distribution.
    """
    if y.dim() != 2 or samples.dim() != 3 or samples.shape[0] != y.shape[0] or samples.shape[2] != y.shape[1]:
        raise ValueError(
            f"energy_score expects y (B, d) and samples (B, m, d), got {tuple(y.shape)}, {tuple(samples.shape)}"
        )
    if not 0 < beta <= 2:
        raise ValueError(f"energy_score: beta must be in (0, 2], got {beta}")
    fit, spread = _energy_terms(y, samples, beta)
    return (fit - spread / 2).mean()


# ------------------------------------------------------------------------------------------------------- metrics


class _DistributionMetrics(nn.Module):
    """Scores of a sampled predictive distribution, accumulated with torchmetrics (correct under DDP)."""

    def __init__(self, out_dim: int, quantiles: Sequence[float], interval: float, beta: float):
        super().__init__()
        self.quantiles, self.interval, self.beta = list(quantiles), interval, beta
        self.energy_score = MeanMetric()
        self.median_mae = MeanAbsoluteError()
        self.crps = ContinuousRankedProbabilityScore() if out_dim == 1 else None
        self.pinball = nn.ModuleList(MeanMetric() for _ in self.quantiles)
        self.coverage = MeanMetric()

    @torch.no_grad()
    def update(self, samples: torch.Tensor, y: torch.Tensor) -> None:  # samples (B, m, d), y (B, d)
        fit, spread = _energy_terms(y, samples, self.beta)
        self.energy_score.update(fit - spread / 2)
        self.median_mae.update(samples.median(dim=1).values, y)
        if self.crps is not None:
            self.crps.update(samples[..., 0], y[:, 0])
        levels = torch.tensor(self.quantiles, device=samples.device, dtype=samples.dtype)
        q = samples.quantile(levels, dim=1)  # (Q, B, d)
        for metric, level, q_hat in zip(self.pinball, self.quantiles, q):
            diff = y - q_hat
            metric.update(torch.maximum(level * diff, (level - 1) * diff).mean(dim=1))
        tail = (1 - self.interval) / 2
        bounds = samples.quantile(torch.tensor([tail, 1 - tail], device=samples.device, dtype=samples.dtype), dim=1)
        inside = ((y >= bounds[0]) & (y <= bounds[1])).float().mean(dim=1)
        self.coverage.update(inside)

    def by_name(self, prefix: str) -> dict[str, torchmetrics.Metric]:
        """The metric objects under their logged names; Lightning computes, syncs and resets them per epoch."""
        out = {f"{prefix}/energy_score": self.energy_score, f"{prefix}/median_mae": self.median_mae}
        if self.crps is not None:
            out[f"{prefix}/crps"] = self.crps
        for metric, level in zip(self.pinball, self.quantiles):
            out[f"{prefix}/pinball_q{level:g}"] = metric
        out[f"{prefix}/coverage{round(self.interval * 100)}"] = self.coverage
        return out


# ------------------------------------------------------------------------------------------------------- the module


class EngressionRegressor(CheckpointGuard, L.LightningModule):
    """Engression (``loss="energy"``) and its L1/L2 regression baselines in one LightningModule.

    Args:
        generator: the network g(x, eps), a :class:`~reprozoo.nets.StochasticMLP` (in a config: ``class_path:
            reprozoo.nets.StochasticMLP`` plus ``init_args``); its ``in_dim`` is the dimension of x (of the backbone's
            features in head mode), its ``out_dim`` that of y. Default: the official package's (x and y of dimension 1,
            2 layers, 100 hidden units, 100 normal noise dimensions fed to every layer, BatchNorm). Its arguments are
            recorded in the hyperparameters, so ``load_from_checkpoint(path)`` rebuilds it however it was given.
        loss: ``"energy"`` (engression), or ``"l1"`` / ``"l2"`` regression with the same network minus its noise
            (a generator with ``noise_dim=0``: ``generator.without_noise()`` of the engression generator).
        beta: exponent of the energy score, in (0, 2) for a strictly proper score.
        m: samples per x in training (the official code draws 2).
        eval_samples: samples per x for validation, test and prediction.
        quantiles: levels of the pinball losses reported in validation and test.
        interval: central interval whose coverage is reported (0.8 -> from the 10 % to the 90 % quantile).
        standardize: standardise x and y with the training set's mean and std (stored as buffers, so
            checkpoints and zoo files carry them); the official package does the same.
        lr, weight_decay: Adam. The official package's default learning rate is 1e-4 (the default here); its
            README example uses 1e-2 with batches of 1,000 for 500 epochs (the package's default number of epochs),
            as the configs do.
        backbone: head mode: a frozen feature extractor in front of the generator, given as an ``nn.Module``
            (config: ``class_path``) or a zoo name. Its ``forward_features`` is used when it has one.
        freeze_backbone: keep the backbone frozen and in eval mode (default); False fine-tunes it too.
        weights: zoo entry to initialise from (``fit --model.weights NAME`` fine-tunes it).
    """

    def __init__(
        self,
        generator: StochasticMLP | None = None,
        *,
        loss: Literal["energy", "l1", "l2"] = "energy",
        beta: float = 1.0,
        m: int = 2,
        eval_samples: int = 100,
        quantiles: Sequence[float] = (0.1, 0.5, 0.9),
        interval: float = 0.8,
        standardize: bool = True,
        lr: float = 1e-4,
        weight_decay: float = 0.0,
        backbone: nn.Module | str | None = None,
        freeze_backbone: bool = True,
        weights: str | None = None,
    ):
        super().__init__()
        generator = net_from(generator, StochasticMLP, "EngressionRegressor", "generator")
        check(loss in ("energy", "l1", "l2"), "EngressionRegressor", "loss", loss, "'energy', 'l1' or 'l2'")
        check(
            loss == "energy" or generator.noise_dim == 0,
            "EngressionRegressor",
            "generator.noise_dim",
            generator.noise_dim,
            f"0 for loss={loss!r}, a deterministic regression",
        )
        check(weight_decay >= 0, "EngressionRegressor", "weight_decay", weight_decay, ">= 0")
        check(
            0 < beta < 2,
            "EngressionRegressor",
            "beta",
            beta,
            "in (0, 2) (the energy score is strictly proper only there)",
        )
        check(
            loss != "energy" or m >= 2,
            "EngressionRegressor",
            "m",
            m,
            ">= 2 for the energy loss (the pairwise term needs two samples)",
        )
        check(eval_samples >= 2, "EngressionRegressor", "eval_samples", eval_samples, ">= 2")
        check(all(0 < q < 1 for q in quantiles), "EngressionRegressor", "quantiles", list(quantiles), "all in (0, 1)")
        check(0 < interval < 1, "EngressionRegressor", "interval", interval, "in (0, 1)")
        check(lr > 0, "EngressionRegressor", "lr", lr, "> 0")
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=".*is an instance of `nn.Module`")
            self.save_hyperparameters(ignore=["generator"])
        self.hparams["generator"] = net_record(generator)  # rebuilt from here however it was given
        if isinstance(self.hparams.get("backbone"), nn.Module):
            # Given as a Python object (not a class_path config or zoo name): it cannot be rebuilt from the
            # hyperparameters: pass it again to load_from_checkpoint(backbone=...). zoo export fails on its weights.
            self.hparams["backbone"] = None

        self.backbone = load_model(backbone) if isinstance(backbone, str) else backbone
        if self.backbone is not None and freeze_backbone:
            self.backbone.requires_grad_(False).eval()
        self.generator = generator
        in_dim, out_dim = generator.in_dim, generator.out_dim
        # Standardisation statistics, measured on the training data at the start of the first fit.
        self.register_buffer("x_loc", torch.zeros(in_dim))
        self.register_buffer("x_scale", torch.ones(in_dim))
        self.register_buffer("y_loc", torch.zeros(out_dim))
        self.register_buffer("y_scale", torch.ones(out_dim))
        self.register_buffer("stats_ready", torch.tensor(not standardize))
        # The two terms of the energy loss, as epoch means: logging them per step would cost more than the step of a
        # small generator (Lightning's bookkeeping per key), and their balance is read across an epoch anyway.
        self.train_fit, self.train_spread = MeanMetric(), MeanMetric()
        self.val_metrics = _DistributionMetrics(out_dim, quantiles, interval, beta)
        self.test_metrics = _DistributionMetrics(out_dim, quantiles, interval, beta)
        if weights:
            load_pretrained_into(self, weights)

    # --------------------------------------------------------------------------------------- sampling

    def train(self, mode: bool = True):
        super().train(mode)
        if self.backbone is not None and self.hparams.freeze_backbone:
            self.backbone.eval()  # a frozen backbone keeps its BatchNorm statistics and dropout off
        return self

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """Standardised generator input: ``x`` itself, or the backbone's features in head mode. (B, in_dim)"""
        if self.backbone is not None:
            extract = getattr(self.backbone, "forward_features", self.backbone)
            with torch.set_grad_enabled(torch.is_grad_enabled() and not self.hparams.freeze_backbone):
                x = extract(x)
            x = x.flatten(1)
        if x.dim() == 1:
            x = x.unsqueeze(1)
        if x.shape[1] != self.generator.in_dim:
            raise ValueError(
                f"EngressionRegressor: got inputs (features) of dimension {x.shape[1]}, in_dim is {self.generator.in_dim}"
            )
        return (x - self.x_loc) / self.x_scale

    def _sample_standardized(self, features: torch.Tensor, num_samples: int) -> torch.Tensor:
        b = features.shape[0]
        repeated = features.unsqueeze(1).expand(b, num_samples, -1).reshape(b * num_samples, -1)  # (B*m, D)
        return self.generator(repeated).view(b, num_samples, -1)  # (B, m, d)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """One sample of Y | x per row, on the original scale. (B, d)"""
        return self.sample(x, 1)[:, 0]

    def sample(self, x: torch.Tensor, num_samples: int | None = None, *, seed: int | None = None) -> torch.Tensor:
        """``num_samples`` (default ``eval_samples``) draws of Y | x on the original scale. (B, m, d)

        ``seed``: draw the noise from a generator seeded with it, so that the same call gives the same samples; the
        global random state is left as it was (the next unseeded draw is the one it would have been anyway). On
        CPU and CUDA. ``None`` (default) draws from the global random state, as training does."""
        num_samples = self.hparams.eval_samples if num_samples is None else num_samples
        if isinstance(num_samples, bool) or not isinstance(num_samples, numbers.Integral) or num_samples < 1:
            raise ValueError(f"EngressionRegressor: num_samples must be an integer >= 1, got {num_samples!r}")
        features = self.features(x)
        with _seeded(seed, features.device):
            samples = self._sample_standardized(features, int(num_samples))  # (B, m, d), standardised
        return samples * self.y_scale + self.y_loc

    @torch.no_grad()
    def predict_mean(self, x: torch.Tensor, num_samples: int | None = None, *, seed: int | None = None) -> torch.Tensor:
        """Mean of ``num_samples`` draws of Y | x (``seed``: see :meth:`sample`). (B, d)"""
        return self.sample(x, num_samples, seed=seed).mean(dim=1)

    @torch.no_grad()
    def predict_median(
        self, x: torch.Tensor, num_samples: int | None = None, *, seed: int | None = None
    ) -> torch.Tensor:
        """Median of ``num_samples`` draws of Y | x (``seed``: see :meth:`sample`). (B, d)"""
        return self.sample(x, num_samples, seed=seed).median(dim=1).values

    @torch.no_grad()
    def predict_quantiles(
        self, x: torch.Tensor, q: Sequence[float], num_samples: int | None = None, *, seed: int | None = None
    ) -> torch.Tensor:
        """Quantiles at levels ``q`` (each in (0, 1)) of ``num_samples`` draws of Y | x (``seed``: see
        :meth:`sample`). (B, len(q), d)"""
        levels = _quantile_levels(q)  # checked before any sampling
        samples = self.sample(x, num_samples, seed=seed)  # (B, m, d)
        levels = torch.as_tensor(levels, dtype=samples.dtype, device=samples.device)
        return samples.quantile(levels, dim=1).movedim(0, 1)  # (Q, B, d) -> (B, Q, d)

    # --------------------------------------------------------------------------------------- standardisation

    def on_train_start(self) -> None:
        # The first hook that sees the training loader (the sanity check, before it, runs with the identity
        # standardisation: its numbers are never logged).
        if bool(self.stats_ready):
            return  # resumed, fine-tuned from the zoo, or standardize=False
        loader = self.trainer.train_dataloader
        d_in, d_out = self.generator.in_dim, self.generator.out_dim
        # float64 sums: the stats of 1e6 rows must not drift; fork_rng keeps the shuffling order of epoch 0 intact.
        sums = torch.zeros(2 * (d_in + d_out) + 1, dtype=torch.float64, device=self.device)
        with torch.random.fork_rng(devices=[]), torch.no_grad():
            for batch in loader:
                x, y = self._split(batch)
                x = self.transfer_batch_to_device(x, self.device, 0)
                y = self.transfer_batch_to_device(y, self.device, 0).reshape(len(y), -1).double()
                f = self._raw_features(x).double()
                sums += torch.cat([f.sum(0), f.pow(2).sum(0), y.sum(0), y.pow(2).sum(0), f.new_tensor([len(y)])])
        sums = self.trainer.strategy.reduce(sums, reduce_op="sum")
        n = sums[-1]
        if n < 2:
            raise RuntimeError("EngressionRegressor: need at least 2 training rows to standardise x and y")
        fx, fx2, y1, y2 = sums[:-1].split([d_in, d_in, d_out, d_out])

        def _loc_scale(s1, s2):
            mean = s1 / n
            std = ((s2 / n - mean**2).clamp_min(0) * n / (n - 1)).sqrt()
            return mean.float(), torch.where(std > 1e-12, std, torch.ones_like(std)).float()  # constant columns stay

        self.x_loc.copy_(_loc_scale(fx, fx2)[0]), self.x_scale.copy_(_loc_scale(fx, fx2)[1])
        self.y_loc.copy_(_loc_scale(y1, y2)[0]), self.y_scale.copy_(_loc_scale(y1, y2)[1])
        self.stats_ready.fill_(True)

    def _raw_features(self, x: torch.Tensor) -> torch.Tensor:
        if self.backbone is not None:
            x = getattr(self.backbone, "forward_features", self.backbone)(x).flatten(1)
        return x.unsqueeze(1) if x.dim() == 1 else x

    @staticmethod
    def _split(batch) -> tuple[torch.Tensor, torch.Tensor]:
        if isinstance(batch, dict):
            return batch["x"], batch["y"]
        x, y = batch[0], batch[1]
        return x, y

    # --------------------------------------------------------------------------------------- steps

    def training_step(self, batch, batch_idx: int) -> torch.Tensor:
        x, y = self._split(batch)
        f = self.features(x)
        y = (y.reshape(len(y), -1) - self.y_loc) / self.y_scale  # (B, d) standardised
        if self.hparams.loss == "energy":
            fit, spread = _energy_terms(y, self._sample_standardized(f, self.hparams.m), self.hparams.beta)
            fit, spread = fit.mean(), spread.mean()
            loss = fit - spread / 2
            # The two terms should end up about equal; a gap means under- or over-dispersed samples.
            self.train_fit.update(fit.detach(), len(y))
            self.train_spread.update(spread.detach(), len(y))
        else:
            pred = self.generator(f)  # (B, d)
            loss = (pred - y).abs().mean() if self.hparams.loss == "l1" else (pred - y).pow(2).mean()
        check_finite_loss(self, loss, batch_idx)
        self.log("train/loss", loss, prog_bar=True, batch_size=len(y))
        return loss

    def on_train_epoch_end(self) -> None:
        if self.hparams.loss == "energy":
            self.log_dict({"train/loss_fit": self.train_fit, "train/loss_spread": self.train_spread})

    def _eval_step(self, batch, metrics: _DistributionMetrics, prefix: str) -> None:
        x, y = self._split(batch)
        metrics.update(self.sample(x), y.reshape(len(y), -1))
        logged = metrics.by_name(prefix)
        self.log(f"{prefix}/energy_score", logged.pop(f"{prefix}/energy_score"), prog_bar=True, batch_size=len(y))
        self.log_dict(logged, batch_size=len(y))

    def validation_step(self, batch, batch_idx: int) -> None:
        self._eval_step(batch, self.val_metrics, "val")

    def test_step(self, batch, batch_idx: int) -> None:
        self._eval_step(batch, self.test_metrics, "test")

    def predict_step(self, batch, batch_idx: int, dataloader_idx: int = 0) -> torch.Tensor:
        x = batch if isinstance(batch, torch.Tensor) else self._split(batch)[0] if isinstance(batch, dict) else batch[0]
        return self.sample(x)  # (B, eval_samples, d), original scale

    def configure_optimizers(self):
        params = [p for p in self.parameters() if p.requires_grad]
        return torch.optim.Adam(params, lr=self.hparams.lr, weight_decay=self.hparams.weight_decay)


def _quantile_levels(q: Sequence[float]) -> list[float]:
    """``q`` (a list, tuple, tensor or array of levels) as a list of floats, each finite and strictly inside (0, 1);
    the first that is not raises a ValueError naming it (a TypeError for what is no number or no sequence)."""
    where = "EngressionRegressor.predict_quantiles"
    if isinstance(q, (str, bytes, numbers.Number)) or not hasattr(q, "__iter__"):
        raise TypeError(f"{where}: q must be a sequence of levels in (0, 1), e.g. [0.5], got {q!r}")
    levels = q.tolist() if hasattr(q, "tolist") else list(q)  # tensors and arrays as Python numbers
    if not levels:
        raise ValueError(f"{where}: q is empty; give levels in (0, 1), e.g. [0.1, 0.5, 0.9]")
    for level in levels:
        if isinstance(level, bool) or not isinstance(level, numbers.Real):
            raise TypeError(f"{where}: quantile level {level!r} is not a number")
        # `not 0 < level < 1` is also true for NaN (it compares false with everything) and for +-inf
        if not 0 < level < 1:
            raise ValueError(
                f"{where}: quantile level {level!r} is not in (0, 1); levels are probabilities, e.g. 0.5 for the "
                "median (0.9, not 90)"
            )
    return [float(level) for level in levels]


@contextlib.contextmanager
def _seeded(seed: int | None, device: torch.device):
    """Draws inside come from the default generator of ``device`` seeded with ``seed``; its state before is restored
    afterwards (``fork_rng``), so the global random stream goes on as if nothing had been drawn. None: no change."""
    if seed is None:
        yield
        return
    if isinstance(seed, bool) or not isinstance(seed, numbers.Integral):
        raise TypeError(f"EngressionRegressor: seed must be an integer or None, got {seed!r}")
    seed = int(seed)
    if device.type == "cpu":
        with torch.random.fork_rng(devices=[]):
            torch.default_generator.manual_seed(seed)
            yield
    elif device.type == "cuda":
        index = device.index if device.index is not None else torch.cuda.current_device()
        # Only this device's generator is seeded and restored (fork_rng over all devices would touch every GPU).
        with torch.random.fork_rng(devices=[index]):
            torch.cuda.default_generators[index].manual_seed(seed)
            yield
    else:
        raise ValueError(f"EngressionRegressor: seed= is supported on CPU and CUDA, this model is on {device.type}")
