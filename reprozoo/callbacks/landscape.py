"""Loss-landscape plots of any LightningModule: the loss on a line or a plane through the current weights along
random, filter-normalised directions (Li, Xu, Taylor, Studer, Goldstein, "Visualizing the Loss Landscape of Neural
Nets", NeurIPS 2018), evaluated many grid points at a time.

The classic tools set the weights of one grid point, run a full pass over the data, restore and repeat. Here each
data batch is loaded once, and chunks of grid points share one forward through ``torch.func.vmap`` over
``torch.func.functional_call``: the weights ``theta + a * d1 + b * d2`` of every point in the chunk are built
inside the vmap without writing the module's parameters; the one-at-a-time loop writes each point's weights in
place and copies the saved ones back. Under DDP the points are split across ranks.
"""

from __future__ import annotations

import functools
import inspect
import io
import logging
import math
import re
import time
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Literal

import lightning as L
import numpy as np
import torch
from lightning.pytorch.utilities import rank_zero_only
from lightning.pytorch.utilities.data import extract_batch_size
from lightning.pytorch.utilities.seed import isolate_rng
from lightning.pytorch.utilities.signature_utils import is_param_in_hook_signature
from torch import nn
from torch.func import functional_call, vmap
from torch.utils.data import DataLoader, IterableDataset

from reprozoo._files import save_figure, write_atomic

log = logging.getLogger(__name__)

Normalization = Literal["filter", "layer", "model", "none"]


# ------------------------------------------------------------------------------------------------- directions


def random_directions(
    params: Mapping[str, torch.Tensor],
    *,
    num: int = 2,
    normalization: Normalization = "filter",
    ignore: Literal["biasbn"] | None = "biasbn",
    seed: int = 0,
) -> list[dict[str, torch.Tensor]]:
    """``num`` Gaussian directions in parameter space, each a ``{name: tensor}`` like ``params``.

    The draws come from a CPU generator seeded with ``seed`` in the order of ``params``, so the same seed gives the
    same raw directions on every call, machine and device; only the normalisation follows the current weights:

    * ``filter`` (Li et al.): each filter of a weight (each slice along dim 0: a conv filter, a row of a linear
      layer) is scaled to the norm of the matching filter of the weight;
    * ``layer``: each tensor is scaled to the norm of its weight; ``model``: the whole direction to the norm of all
      the weights; ``none``: raw N(0, 1) draws.

    Tensors of dimension <= 1 (biases, norm-layer scales and shifts) get a zero direction with
    ``ignore="biasbn"`` (the paper's default); otherwise, under ``filter`` normalisation, the direction is the
    weight itself, as the paper's code does (a 1-d tensor has no filters to normalise).
    """
    if normalization not in ("filter", "layer", "model", "none"):
        raise ValueError(f"normalization must be 'filter', 'layer', 'model' or 'none', got {normalization!r}")
    if ignore not in ("biasbn", None):
        raise ValueError(f"ignore must be 'biasbn' or None, got {ignore!r}")
    generator = torch.Generator().manual_seed(seed)
    directions = []
    for _ in range(num):
        d = {}
        for name, w in params.items():
            # Normalised in float32 at least: bfloat16/float16 norms and products lose digits (and float16 norms
            # overflow); the direction is rounded to the weight's dtype once, at the end.
            w = w.detach().to(_work_dtype(w.dtype))
            raw = torch.randn(w.shape, generator=generator, dtype=torch.float32).to(device=w.device, dtype=w.dtype)
            if w.dim() <= 1 and ignore == "biasbn":
                raw.zero_()
            elif w.dim() <= 1 and normalization == "filter":
                raw = w.clone()
            elif normalization == "filter":
                dims = tuple(range(1, w.dim()))
                w_norm = torch.linalg.vector_norm(w, dim=dims, keepdim=True)
                raw = raw * (w_norm / (torch.linalg.vector_norm(raw, dim=dims, keepdim=True) + 1e-10))
            elif normalization == "layer":
                raw = raw * (w.norm() / (raw.norm() + 1e-10))
            d[name] = raw
        if normalization == "model":
            w_norm = torch.sqrt(sum(w.detach().float().square().sum() for w in params.values()))
            d_norm = torch.sqrt(sum(v.float().square().sum() for v in d.values()))
            d = {n: v * (w_norm / (d_norm + 1e-10)).to(v.dtype) for n, v in d.items()}
        directions.append({n: v.to(params[n].dtype) for n, v in d.items()})
    return directions


def _work_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype to do arithmetic on weights of ``dtype`` in: float32 for half precision, else ``dtype`` itself."""
    return torch.promote_types(dtype, torch.float32)


# ------------------------------------------------------------------------------------------------- objective


class _Objective(nn.Module):
    """``forward(batch) = fn(module, batch)``: gives ``functional_call`` a forward that runs the user's loss, so
    every method of the LightningModule called inside it (``loss``, ``training_step``, ``forward``) sees the
    swapped-in parameters."""

    def __init__(self, module: nn.Module, fn: Callable[[nn.Module, Any], Any]):
        super().__init__()
        self.module = module
        self.fn = fn

    def forward(self, batch):
        return self.fn(self.module, batch)


def _call_loss_method(module, batch):
    return module.loss(batch)


def _call_training_step(module, batch):
    return module.training_step(batch, 0)


def _call_training_step_without_index(module, batch):
    return module.training_step(batch)


class _Captured:
    """What the objective logged through ``self.log``/``self.log_dict`` while logging was suppressed."""

    def __init__(self):
        self.values: dict[str, Any] = {}

    def log(self, name, value, *args, **kwargs):
        self.values[name] = value

    def log_dict(self, dictionary, *args, **kwargs):
        self.values.update(dictionary)


@contextmanager
def _suppressed_logging(module: L.LightningModule, captured: _Captured):
    """Route ``module.log``/``log_dict`` to ``captured`` (instance attributes shadow the methods), so the objective
    reaches neither the loggers nor ``trainer.callback_metrics``."""
    module.log = captured.log
    module.log_dict = captured.log_dict
    try:
        yield
    finally:
        del module.log
        del module.log_dict


class _MetricStates:
    """Snapshot of the torchmetrics objects of a module: a ``training_step`` updates them, and the landscape must
    not leak into the epoch's metrics (nor leave vmap's batched tensors in their caches). ``reset`` before each
    evaluation makes a logged Metric's ``compute()`` the value of that one batch."""

    def __init__(self, module: nn.Module):
        from torchmetrics import Metric

        self.saved = []
        for m in module.modules():
            if isinstance(m, Metric):
                attributes = dict(m.__dict__)  # states, update count, forward and compute caches, sync flags
                for k, v in m.metric_state.items():  # states may be updated in place: copy them
                    attributes[k] = [t.clone() for t in v] if isinstance(v, list) else v.clone()
                self.saved.append((m, attributes))

    def reset(self) -> None:
        for m, _ in self.saved:
            m.reset()

    def restore(self) -> None:
        for m, attributes in self.saved:
            for k in set(m.__dict__) - set(attributes):
                del m.__dict__[k]
            m.__dict__.update(attributes)


def _unpack(output: Any, captured: _Captured, accuracy_key: re.Pattern) -> tuple[torch.Tensor, torch.Tensor]:
    """(loss, accuracy) from what the objective returned and logged: scalars of one dtype (the loss's, at least
    float32) on the loss's device, the accuracy NaN when there is none. Both evaluation modes go through here, so
    their values stack whatever the module's dtype, precision plugin or default dtype; float64 comes later, on the
    CPU (some accelerators have no float64)."""
    accuracy = None
    if isinstance(output, Mapping):
        if "loss" not in output:
            raise ValueError(f"LossLandscape: the objective returned a mapping without a 'loss' key: {list(output)}")
        accuracy = output.get("accuracy", output.get("acc"))
        output = output["loss"]
    if not isinstance(output, torch.Tensor) or output.numel() != 1:
        raise ValueError(
            "LossLandscape: the objective must return a scalar loss tensor (or a mapping with 'loss'), got "
            f"{type(output).__name__}{tuple(output.shape) if isinstance(output, torch.Tensor) else ''}"
        )
    if accuracy is None:
        for name, value in captured.values.items():
            if accuracy_key.search(name):
                accuracy = value
                break
    if accuracy is not None and hasattr(accuracy, "compute") and not isinstance(accuracy, torch.Tensor):
        accuracy = accuracy.compute()  # a torchmetrics object logged by the step: reset just before, so this batch
    loss = output.reshape(()).to(_work_dtype(output.dtype))
    if isinstance(accuracy, torch.Tensor):
        accuracy = accuracy.reshape(()).to(device=loss.device, dtype=loss.dtype)
    else:  # an explicit dtype: a Python number would take the default one, bfloat16 under "bf16-true"
        accuracy = torch.tensor(
            float("nan") if accuracy is None else float(accuracy), dtype=loss.dtype, device=loss.device
        )
    return loss, accuracy


def _on_cpu(values: torch.Tensor) -> torch.Tensor:
    """float64 on the CPU, where the grids are accumulated (the copy also waits for an accelerator to finish)."""
    return values.cpu().to(torch.float64)


# ------------------------------------------------------------------------------------------------- the callback


class LossLandscape(L.Callback):
    """Random-direction loss landscapes (Li et al. 2018) of any LightningModule, with any logger or none.

    **What is plotted.** ``L(theta + a * d1 [+ b * d2])`` for ``a, b`` on ``resolution`` points over
    ``[-span, span]``, where ``theta`` are the current (trainable, by default) parameters and ``d1``, ``d2`` are
    seeded Gaussian directions normalised as :func:`random_directions` says. The module is put in eval mode for it
    (BatchNorm uses its running statistics, dropout is off) and every module's train/eval flag is restored after;
    the weights are unchanged bit for bit afterwards (vmap swaps the points' weights in with ``functional_call``; the
    loop writes them in place and copies the saved values back, also when the objective raises), and so are the
    buffers. The global RNG state (CPU and current CUDA device) is restored too, so adding the callback does not
    change training; the objective is run under a fixed seed, so a stochastic loss uses the same noise at every
    grid point (common random numbers). Parameters may be of any floating dtype (float32, float64, bfloat16,
    float16, mixed): a point's weights are computed in float32 at least and rounded to each parameter's dtype once,
    and the surface is accumulated in float64.

    **The loss**, in this order:

    1. ``loss_fn(pl_module, batch)`` when given;
    2. otherwise ``pl_module.loss(batch)`` when the module defines a ``loss`` method;
    3. otherwise the loss returned by ``pl_module.training_step(batch, 0)`` (``training_step(batch)`` when it
       takes no ``batch_idx``; a tensor, or a mapping with ``"loss"``, as Lightning accepts); not available with
       manual optimisation, whose step updates weights, nor with a ``dataloader_iter`` step.

    Logging is suppressed while it runs (``self.log``/``self.log_dict`` reach no logger), and the module's
    torchmetrics objects are restored afterwards. A mapping returned by the objective may hold ``"accuracy"``;
    otherwise the first logged value whose name matches ``accuracy_key`` (default: contains ``acc``) is the
    accuracy (a logged torchmetrics object is computed on that one batch). Values over batches are averaged
    weighted by batch size.

    **Data.** The first ``num_batches`` batches of the train (``dataloader="train"``) or first val loader, read in
    dataset order with the loader's batch size and collate function (no shuffling, no distributed sampler, so every
    rank and every epoch sees the same examples). They are read once, on the first call, and kept in memory, so a
    random augmentation is drawn once too. As in Lightning's training loop, the trainer's precision plugin converts
    them (``"64-true"``, ``"bf16-true"``: floating inputs to the module's dtype) and the module's batch-transfer
    hooks move them to its device.

    **Evaluation.** ``mode="vmap"`` evaluates chunks of ``chunk_size`` grid points per forward; ``"loop"`` one
    point at a time (still reading each batch once). ``"auto"`` (default) falls back to the loop, with a warning
    saying why, when the module cannot be vmapped (data-dependent control flow, ``.item()`` calls, ...), and
    otherwise times both on the first chunk and keeps the faster (:attr:`timings`, logged): batching pays on
    accelerators and for small, overhead-bound models, while on a CPU a compute-bound convolution runs slower
    batched (see ``benchmarks/landscape_speed.py``). Under DDP the grid points are split across ranks and
    gathered; every rank returns the full surface, rank zero writes the files.

    **When and what.** At the end of training (``on_fit_end=True``) and every ``every_n_epochs`` training epochs,
    :meth:`compute` runs; its result is saved as ``<log_dir>/loss_landscape/epoch_<k>.npz`` (``x``, ``y`` for 2-d,
    ``loss`` of shape ``(len(y), len(x))`` with ``loss[i, j]`` at ``(x[j], y[i])`` or ``(len(x),)`` for 1-d,
    ``accuracy`` when there is one, and with ``save_directions=True`` the flattened ``directions`` of shape
    ``(dim, n)`` plus ``parameter_names`` and ``parameter_numels``), with a contour and a 3-D surface PNG (a line
    plot for 1-d) next to it, sent to every logger that takes figures (TensorBoard). ``<log_dir>`` is the first
    logger's directory or ``trainer.default_root_dir``. :attr:`history` (epoch, step, centre loss, file) is saved
    in checkpoints.

    Args:
        dim: 1 (a line) or 2 (a plane).
        resolution: grid points per axis (odd, so that the current weights are a grid point).
        span: the grid covers ``[-span, span]`` along each direction.
        normalization: ``filter`` (default), ``layer``, ``model`` or ``none``.
        ignore: ``"biasbn"`` (default) leaves parameters of dimension <= 1 in place; None perturbs them too.
        trainable_only: perturb only parameters with ``requires_grad`` (frozen ones stay at their value).
        seed: of the directions and of the objective's randomness.
        num_batches: batches of the loader to evaluate on.
        dataloader: ``"train"`` or ``"val"``.
        every_n_epochs: also compute after every N-th training epoch; None = only at the end.
        on_fit_end: compute once when training ends.
        chunk_size: grid points per vmapped forward (memory grows with it).
        mode: ``"auto"``, ``"vmap"`` or ``"loop"`` (see Evaluation).
        loss_fn: ``loss_fn(pl_module, batch) -> loss`` (or a mapping with ``"loss"``, ``"accuracy"``).
        accuracy_key: regular expression for the logged name that is the accuracy.
        save_directions: store the directions in the ``.npz`` (as large as the model, once per direction).
        plot: write the PNG figures (and send them to TensorBoard).
        progress: show a progress bar over the grid chunks (rank zero).
    """

    def __init__(
        self,
        dim: int = 2,
        resolution: int = 21,
        span: float = 1.0,
        normalization: Normalization = "filter",
        ignore: Literal["biasbn"] | None = "biasbn",
        trainable_only: bool = True,
        seed: int = 0,
        num_batches: int = 1,
        dataloader: Literal["train", "val"] = "train",
        every_n_epochs: int | None = None,
        on_fit_end: bool = True,
        chunk_size: int = 32,
        mode: Literal["auto", "vmap", "loop"] = "auto",
        loss_fn: Callable[[L.LightningModule, Any], Any] | None = None,
        accuracy_key: str = "acc",
        save_directions: bool = False,
        plot: bool = True,
        progress: bool = True,
    ):
        def positive_int(field: str, value) -> None:
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"LossLandscape: {field} must be an integer >= 1, got {value!r}")

        if dim not in (1, 2):
            raise ValueError(f"LossLandscape: dim must be 1 or 2, got {dim!r}")
        positive_int("resolution", resolution)
        if resolution % 2 == 0:
            raise ValueError(
                f"LossLandscape: resolution must be odd so the current weights are on the grid, got {resolution}"
            )
        if not (isinstance(span, (int, float)) and math.isfinite(span) and span > 0):
            raise ValueError(f"LossLandscape: span must be a positive number, got {span!r}")
        positive_int("num_batches", num_batches)
        positive_int("chunk_size", chunk_size)
        if every_n_epochs is not None:
            positive_int("every_n_epochs", every_n_epochs)
        if dataloader not in ("train", "val"):
            raise ValueError(f"LossLandscape: dataloader must be 'train' or 'val', got {dataloader!r}")
        if mode not in ("auto", "vmap", "loop"):
            raise ValueError(f"LossLandscape: mode must be 'auto', 'vmap' or 'loop', got {mode!r}")
        if normalization not in ("filter", "layer", "model", "none"):
            raise ValueError(
                f"LossLandscape: normalization must be 'filter', 'layer', 'model' or 'none', got {normalization!r}"
            )
        if ignore not in ("biasbn", None):
            raise ValueError(f"LossLandscape: ignore must be 'biasbn' or None, got {ignore!r}")
        if loss_fn is not None and not callable(loss_fn):
            raise ValueError(f"LossLandscape: loss_fn must be callable, got {loss_fn!r}")
        self.dim, self.resolution, self.span = dim, resolution, float(span)
        self.normalization, self.ignore, self.trainable_only, self.seed = normalization, ignore, trainable_only, seed
        self.num_batches, self.dataloader = num_batches, dataloader
        self.every_n_epochs, self.compute_on_fit_end = every_n_epochs, on_fit_end
        self.chunk_size, self.mode, self.loss_fn = chunk_size, mode, loss_fn
        self.accuracy_key = re.compile(accuracy_key)
        self.save_directions, self.plot, self.progress = save_directions, plot, progress
        self.history: list[dict[str, Any]] = []
        self.last_result: dict[str, Any] | None = None
        self.used_mode: str | None = None  # "vmap" or "loop": what the last compute() ran
        self.timings: dict[str, float] | None = None  # the "auto" mode's measurement, when it made one
        self._batches: list[Any] | None = None
        self._last_epoch = 0
        self._fallback_warned = False

    @property
    def state_key(self) -> str:
        return self._generate_state_key(dim=self.dim, seed=self.seed, dataloader=self.dataloader)

    # ---- the grid -------------------------------------------------------------------------------------------

    def axes(self) -> np.ndarray:
        return np.linspace(-self.span, self.span, self.resolution)

    def _coordinates(self) -> torch.Tensor:
        """(P, dim) coordinates of the grid points; for 2-d row-major over (y, x), so ``loss.reshape(ny, nx)``."""
        a = torch.as_tensor(self.axes(), dtype=torch.float64)
        if self.dim == 1:
            return a[:, None]
        yy, xx = torch.meshgrid(a, a, indexing="ij")
        return torch.stack([xx.reshape(-1), yy.reshape(-1)], dim=1)

    def _parameters(self, pl_module: nn.Module) -> dict[str, torch.Tensor]:
        # named_parameters() yields a shared tensor once; functional_call(tie_weights=True) swaps all its names.
        # Integer parameters (frozen lookup tables, counters) have no direction to move along.
        return {
            n: p
            for n, p in pl_module.named_parameters()
            if p.is_floating_point() and (p.requires_grad or not self.trainable_only)
        }

    # ---- data -----------------------------------------------------------------------------------------------

    def _source_loader(self, trainer: L.Trainer) -> DataLoader:
        if self.dataloader == "train":
            loader = trainer.train_dataloader
            if loader is None and trainer.datamodule is not None:
                loader = trainer.datamodule.train_dataloader()
        else:
            loader = trainer.val_dataloaders
            if loader is None and trainer.datamodule is not None:
                loader = trainer.datamodule.val_dataloader()
        if isinstance(loader, (list, tuple)):
            loader = loader[0] if loader else None
        if isinstance(loader, Mapping):
            loader = next(iter(loader.values()), None)
        if loader is None:
            raise RuntimeError(f"LossLandscape: the trainer has no {self.dataloader} dataloader to evaluate on")
        return loader

    def _fixed_batches(self, trainer: L.Trainer, loader: DataLoader | None = None) -> list[Any]:
        if loader is None and self._batches is not None:
            return self._batches
        loader = loader if loader is not None else self._source_loader(trainer)
        # a loader made with a batch_sampler has batch_size None
        batch_size = getattr(loader, "batch_size", None) or getattr(
            getattr(loader, "batch_sampler", None), "batch_size", None
        )
        if isinstance(loader, DataLoader) and not isinstance(loader.dataset, IterableDataset) and batch_size:
            # Dataset order, no sampler: the same examples on every rank and at every epoch.
            loader = DataLoader(loader.dataset, batch_size=batch_size, shuffle=False, collate_fn=loader.collate_fn)
        batches = []
        for batch in loader:
            batches.append(batch)
            if len(batches) == self.num_batches:
                break
        if not batches:
            raise RuntimeError(f"LossLandscape: the {self.dataloader} dataloader is empty")
        self._batches = batches
        return batches

    @staticmethod
    def _to_device(trainer: L.Trainer, pl_module: L.LightningModule, batch: Any) -> Any:
        # As Lightning's training loop does: the precision plugin first ("64-true" and "bf16-true" cast the floating
        # inputs to the module's dtype), then the module's transfer hooks.
        batch = trainer.precision_plugin.convert_input(batch)
        batch = pl_module.on_before_batch_transfer(batch, 0)
        batch = pl_module.transfer_batch_to_device(batch, pl_module.device, 0)
        return pl_module.on_after_batch_transfer(batch, 0)

    # ---- evaluation -----------------------------------------------------------------------------------------

    def _objective_fn(self, pl_module: L.LightningModule) -> Callable:
        if self.loss_fn is not None:
            return self.loss_fn
        if inspect.ismethod(getattr(pl_module, "loss", None)):  # a method, not e.g. an nn.CrossEntropyLoss attribute
            return _call_loss_method
        if not pl_module.automatic_optimization:
            raise RuntimeError(
                f"LossLandscape: {type(pl_module).__name__} uses manual optimisation, so its training_step updates the "
                "weights; give the callback a loss_fn(pl_module, batch) or define a loss(batch) method on the module"
            )
        step = pl_module.training_step
        if is_param_in_hook_signature(step, "dataloader_iter", explicit=True):
            raise RuntimeError(
                f"LossLandscape: {type(pl_module).__name__}.training_step takes a dataloader_iter, not a batch; give the "
                "callback a loss_fn(pl_module, batch) or define a loss(batch) method on the module"
            )
        # Lightning passes batch_idx only to a training_step that takes it; so does the callback.
        if is_param_in_hook_signature(step, "batch_idx", min_args=2):
            return _call_training_step
        return _call_training_step_without_index

    def compute(
        self, trainer: L.Trainer, pl_module: L.LightningModule, dataloader: DataLoader | None = None
    ) -> dict[str, Any]:
        """Evaluate one landscape now and return it: ``{"x", ["y"], "loss", ["accuracy"], "directions",
        "parameter_names", "mode", "seconds"}`` (numpy arrays; ``directions`` a list of ``{name: tensor}`` on
        the CPU). Every rank must call it under DDP (it gathers). ``dataloader`` evaluates on that loader's first
        ``num_batches`` batches instead of the trainer's (e.g. with a trainer that is not fitting).

        Under DDP each rank evaluates its share of the points with its own parameters (identical on all ranks)
        and rank zero's buffers (BatchNorm running statistics can differ between ranks after the last step),
        so the surface is the one rank zero's model has."""
        start = time.perf_counter()
        params = {n: p.detach() for n, p in self._parameters(pl_module).items()}
        if not params:
            raise RuntimeError("LossLandscape: the module has no parameters to perturb (all frozen?)")
        directions = random_directions(
            params, num=self.dim, normalization=self.normalization, ignore=self.ignore, seed=self.seed
        )
        coords = self._coordinates()  # (P, dim) float64
        world, rank = trainer.world_size, trainer.global_rank
        per_rank = math.ceil(len(coords) / world)
        mine = coords[rank * per_rank : (rank + 1) * per_rank]

        buffers = {}
        if world > 1:  # rank zero's buffers, passed in (not written): see the docstring
            named = dict(pl_module.named_buffers())
            src = trainer.strategy.broadcast({n: b.cpu() for n, b in named.items()}, src=0)
            buffers = {"module." + n: src[n].to(named[n].device) for n in named}
        objective = _Objective(pl_module, self._objective_fn(pl_module))
        captured = _Captured()
        metrics = _MetricStates(pl_module)
        modes = {m: m.training for m in pl_module.modules()}
        # The loop writes rank zero's buffers under DDP, and a module may update a buffer in eval mode too (a
        # counter, a cache): all of them are put back as they were.
        saved_buffers = [(m, n, b, b.clone()) for m in pl_module.modules() for n, b in m.named_buffers(recurse=False)]
        cuda = pl_module.device.type == "cuda"
        try:
            with isolate_rng(include_cuda=cuda), torch.no_grad(), _suppressed_logging(pl_module, captured):
                pl_module.eval()
                batches = [self._to_device(trainer, pl_module, b) for b in self._fixed_batches(trainer, dataloader)]
                loss, acc = self._evaluate(
                    trainer, objective, params, buffers, directions, mine, batches, captured, metrics
                )
        finally:
            for m, training in modes.items():
                m.training = training
            metrics.restore()
            with torch.no_grad():
                for m, n, b, value in saved_buffers:
                    if getattr(m, n) is not b:
                        setattr(m, n, b)
                    if not torch.equal(b, value):
                        b.copy_(value)

        # Pad to the same length on every rank, gather, drop the padding.
        loss = torch.nn.functional.pad(loss, (0, per_rank - len(loss)), value=float("nan"))
        acc = torch.nn.functional.pad(acc, (0, per_rank - len(acc)), value=float("nan"))
        both = torch.stack([loss, acc])  # float64 on the CPU
        if world > 1:
            both = trainer.strategy.all_gather(both.to(pl_module.device))  # (world, 2, per_rank)
            both = both.permute(1, 0, 2).reshape(2, -1).cpu()
        both = both[:, : len(coords)].numpy()
        shape = (self.resolution,) * self.dim
        result: dict[str, Any] = {"x": self.axes(), "loss": both[0].reshape(shape)}
        if self.dim == 2:
            result["y"] = self.axes()
        if not np.isnan(both[1]).all():
            result["accuracy"] = both[1].reshape(shape)
        result["directions"] = [{n: t.cpu() for n, t in d.items()} for d in directions]
        result["parameter_names"] = list(params)
        result["mode"] = self.used_mode
        result["seconds"] = time.perf_counter() - start
        self.last_result = result
        return result

    def _evaluate(self, trainer, objective, params, buffers, directions, coords, batches, captured, metrics):
        """(loss (P,), accuracy (P,) or NaNs), float64 on the CPU, for this rank's grid points, averaged over the
        batches."""
        sizes = torch.tensor([float(extract_batch_size(b)) for b in batches], dtype=torch.float64)
        weights = sizes / sizes.sum()
        loss = torch.zeros(len(coords), dtype=torch.float64)
        acc = torch.zeros(len(coords), dtype=torch.float64)
        names = list(params)

        def point_params(base: Mapping[str, torch.Tensor], c: torch.Tensor) -> Iterator[tuple[str, torch.Tensor]]:
            """``(name, base + c[0] d1 (+ c[1] d2))`` per parameter, for CPU float64 coordinates ``c`` of shape
            (dim,), or (P, dim) -> stacked (P, ...). Both modes build a point's weights here, so they evaluate the
            very same weights; one parameter at a time, so the loop holds one extra tensor, not a model copy."""
            placed = {}  # the coordinates per (device, dtype): one small copy each, not one per parameter
            for name in names:
                theta = base[name]
                work = _work_dtype(theta.dtype)  # half-precision arithmetic would round a * d before adding it
                key = (theta.device, work)
                if key not in placed:  # cast on the CPU first: some accelerators have no float64
                    placed[key] = c.to(work).to(theta.device)
                w = theta.to(work)
                for k in range(self.dim):
                    scale = placed[key][..., k].reshape(c.shape[:-1] + (1,) * theta.dim())  # () or (P, 1, ..., 1)
                    w = w + scale * directions[k][name].to(work)
                yield name, w.to(theta.dtype)

        def evaluate(point: dict[str, torch.Tensor], batch) -> tuple[torch.Tensor, torch.Tensor]:
            captured.values.clear()
            torch.manual_seed(self.seed)  # common random numbers: the same noise at every point
            return _unpack(functional_call(objective, {**buffers, **point}, (batch,)), captured, self.accuracy_key)

        # Both return (values, accuracies), each (len(chunk), len(batches)) in float64 on the CPU; the weights of a
        # point are built once for all batches.
        def run_vmap(chunk: torch.Tensor, batches: list) -> tuple[torch.Tensor, torch.Tensor]:
            stacked = {"module." + name: w for name, w in point_params(params, chunk)}  # {name: (P, ...)}
            columns = []
            for batch in batches:
                metrics.reset()
                columns.append(vmap(functools.partial(evaluate, batch=batch), randomness="same")(stacked))
            return _on_cpu(torch.stack([v for v, _ in columns], 1)), _on_cpu(torch.stack([a for _, a in columns], 1))

        live = dict(objective.module.named_parameters())
        live_buffers = dict(objective.module.named_buffers())

        def run_loop(chunk: torch.Tensor, batches: list) -> tuple[torch.Tensor, torch.Tensor]:
            # One point at a time, the classic way: the point's weights are written into the parameters in place (no
            # reparametrisation per call) and the saved values copied back at the end, bit for bit. compute()
            # restores the buffers.
            theta = {name: params[name].clone() for name in names}  # params are views of the live parameters
            values, accs = [], []
            try:
                for n, b in buffers.items():  # DDP: rank zero's buffers (see compute)
                    live_buffers[n[len("module.") :]].copy_(b)
                for c in chunk:
                    for name, w in point_params(theta, c):
                        live[name].copy_(w)
                    for batch in batches:
                        metrics.reset()  # a metric logged by the objective then holds this point's batch only
                        captured.values.clear()
                        torch.manual_seed(self.seed)
                        value, accuracy = _unpack(objective(batch), captured, self.accuracy_key)
                        values.append(value)
                        accs.append(accuracy)
            finally:
                for name in names:
                    live[name].copy_(theta[name])
            shape = (len(chunk), len(batches))
            return _on_cpu(torch.stack(values)).reshape(shape), _on_cpu(torch.stack(accs)).reshape(shape)

        chunks = [coords[i : i + self.chunk_size] for i in range(0, len(coords), self.chunk_size)]
        if not chunks:  # more ranks than grid points
            return loss, acc
        with trainer.precision_plugin.forward_context():
            name = type(objective.module).__name__
            mode = self._choose_mode(run_vmap, run_loop, chunks[0], batches[0], metrics, name)
            run = run_vmap if mode == "vmap" else run_loop
            bar = self._progress_bar(trainer, len(coords) * len(batches))
            try:
                position = 0
                for chunk in chunks:
                    values, accs = run(chunk, batches)  # (n, B) each
                    loss[position : position + len(chunk)] = values @ weights
                    acc[position : position + len(chunk)] = accs @ weights
                    bar.update(len(chunk) * len(batches))
                    position += len(chunk)
            finally:
                bar.close()
        self.used_mode = mode
        return loss, acc

    def _choose_mode(self, run_vmap, run_loop, chunk, batch, metrics: _MetricStates, name: str) -> str:
        """``mode`` itself, or for ``"auto"``: ``"loop"`` when vmap cannot run the objective (logged as a warning),
        else whichever of the two is faster per grid point on this module, device and batch, timed on up to 8 points
        of the first chunk (a warm-up call, then one timed call each; the loop on at most 4 points). Batching grid points pays on
        accelerators and for small, overhead-bound models; on a CPU, a compute-bound convolution runs slower
        batched (vmap turns it into a grouped convolution), so there the loop can win."""
        if self.mode != "auto":
            return self.mode
        self.timings = None
        chunk = chunk[:8]  # a probe: enough points to see vmap's per-point cost, little work wasted on a small grid
        try:
            metrics.reset()
            run_vmap(chunk, [batch])  # warm-up, and the test that vmap can run it at all
        except Exception as err:  # noqa: BLE001 - any failure of vmap's transforms means: loop instead
            message = str(err).splitlines()[0] if str(err) else ""
            # Once a warning, then information: the same fallback at every epoch tells the user nothing new.
            log.log(
                logging.INFO if self._fallback_warned else logging.WARNING,
                "LossLandscape: %s cannot be evaluated with vmap (%s: %s); evaluating the grid points one at a time "
                "(same values, slower on accelerators; pass mode='loop' to skip this check)",
                name,
                type(err).__name__,
                message,
            )
            self._fallback_warned = True
            return "loop"
        if len(chunk) < 2:
            return "vmap"

        def per_point(fn, points) -> float:
            metrics.reset()
            start = time.perf_counter()
            fn(points, [batch])  # returns CPU values: an accelerator has finished
            return (time.perf_counter() - start) / len(points)

        vmap_s = per_point(run_vmap, chunk)
        few = chunk[: min(4, len(chunk))]
        per_point(run_loop, few[:1])  # warm-up
        loop_s = per_point(run_loop, few)
        self.timings = {"vmap_ms_per_point": 1000 * vmap_s, "loop_ms_per_point": 1000 * loop_s}
        mode = "vmap" if vmap_s <= loop_s else "loop"
        log.info(
            "LossLandscape: %s per grid point and batch: vmap %.2f ms, loop %.2f ms; using %s",
            name,
            1000 * vmap_s,
            1000 * loop_s,
            mode,
        )
        return mode

    def _progress_bar(self, trainer: L.Trainer, total: int):
        from tqdm.auto import tqdm

        show = self.progress and trainer.is_global_zero and trainer.progress_bar_callback is not None
        return tqdm(total=total, desc="loss landscape", leave=False, disable=not show, dynamic_ncols=True)

    # ---- hooks ----------------------------------------------------------------------------------------------

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        self._last_epoch = trainer.current_epoch

    def on_train_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if self.every_n_epochs and (trainer.current_epoch + 1) % self.every_n_epochs == 0:
            self._run(trainer, pl_module, trainer.current_epoch)

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        # on_train_end, not on_fit_end: the strategy (DDP process group, device placement) is still up here.
        if not self.compute_on_fit_end:
            return
        if self.history and self.history[-1]["step"] == trainer.global_step:
            return  # the last epoch's landscape is already the final one
        self._run(trainer, pl_module, self._last_epoch)

    def _run(self, trainer: L.Trainer, pl_module: L.LightningModule, epoch: int) -> None:
        result = self.compute(trainer, pl_module)
        # log_dir can broadcast from rank zero: read it on every rank, outside the rank-zero-only functions.
        root = Path(self._log_dir(trainer)) / "loss_landscape"
        path = root / f"epoch_{epoch}.npz"
        centre = result["loss"][(self.resolution // 2,) * self.dim]
        self.history.append(
            {"epoch": epoch, "step": trainer.global_step, "center_loss": float(centre), "file": str(path)}
        )
        self._save(trainer, result, path, epoch)

    @staticmethod
    def _log_dir(trainer: L.Trainer) -> str:
        return trainer.log_dir or trainer.default_root_dir

    # ---- output ---------------------------------------------------------------------------------------------

    @rank_zero_only
    def _save(self, trainer: L.Trainer, result: dict[str, Any], path: Path, epoch: int) -> None:
        # Serialised in memory, then written atomically: a run killed mid-write leaves no half file to load.
        arrays = {k: result[k] for k in ("x", "y", "loss", "accuracy") if k in result}
        if self.save_directions:
            names = result["parameter_names"]
            arrays["directions"] = np.stack(
                [torch.cat([d[n].reshape(-1).float() for n in names]).numpy() for d in result["directions"]]
            )
            arrays["parameter_names"] = np.array(names)
            arrays["parameter_numels"] = np.array([result["directions"][0][n].numel() for n in names])
        buffer = io.BytesIO()
        np.savez(buffer, **arrays)
        write_atomic(path, buffer.getvalue())
        log.info("LossLandscape: %s (%s, %.1f s)", path, result["mode"], result["seconds"])
        if not self.plot:
            return
        figures = self.figures(result, title=f"epoch {epoch}, step {trainer.global_step}")
        for kind, fig in figures.items():
            save_figure(fig, path.with_name(f"{path.stem}_{kind}.png"))
            for logger in trainer.loggers:
                experiment = getattr(logger, "experiment", None)
                if hasattr(experiment, "add_figure"):
                    experiment.add_figure(f"loss_landscape/{kind}", fig, global_step=trainer.global_step)

    def figures(self, result: dict[str, Any], title: str = "") -> dict[str, Any]:
        """Matplotlib figures (Agg canvas, outside pyplot) of a :meth:`compute` result: ``{"line"}`` for 1-d,
        ``{"contour", "surface"}`` for 2-d."""
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure

        x, z = result["x"], result["loss"]
        if self.dim == 1:
            fig = Figure(figsize=(6, 4), layout="constrained")
            FigureCanvasAgg(fig)
            ax = fig.add_subplot()
            ax.plot(x, z, color="tab:blue", label="loss")
            ax.set_xlabel("step along direction 1")
            ax.set_ylabel("loss")
            if "accuracy" in result:
                ax2 = ax.twinx()
                ax2.plot(x, result["accuracy"], color="tab:orange", label="accuracy")
                ax2.set_ylabel("accuracy")
            ax.set_title(f"Loss along a random direction ({title})")
            return {"line": fig}
        X, Y = np.meshgrid(x, result["y"])
        contour = Figure(figsize=(5.5, 5), layout="constrained")
        FigureCanvasAgg(contour)
        ax = contour.add_subplot()
        finite = z[np.isfinite(z)]
        levels = np.linspace(finite.min(), finite.max(), 30) if finite.size and finite.max() > finite.min() else 10
        cs = ax.contour(X, Y, z, levels=levels, cmap="viridis")
        ax.clabel(cs, inline=True, fontsize=6, fmt="%.2g")
        ax.plot([0], [0], "r+", markersize=10)
        ax.set_xlabel("direction 1")
        ax.set_ylabel("direction 2")
        ax.set_title(f"Loss contours ({title})")
        surface = Figure(figsize=(6, 5), layout="constrained")
        FigureCanvasAgg(surface)
        ax3 = surface.add_subplot(projection="3d")
        ax3.plot_surface(X, Y, z, cmap="viridis", linewidth=0, antialiased=True)
        ax3.set_xlabel("direction 1")
        ax3.set_ylabel("direction 2")
        ax3.set_zlabel("loss")
        ax3.set_title(f"Loss surface ({title})")
        return {"contour": contour, "surface": surface}

    # ---- state ----------------------------------------------------------------------------------------------

    def state_dict(self) -> dict[str, Any]:
        return {"history": [dict(h) for h in self.history]}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.history = [dict(h) for h in state_dict.get("history", [])]


def load_landscape(path: str | Path) -> dict[str, Any]:
    """Read an ``epoch_<k>.npz`` written by :class:`LossLandscape`; with saved directions, ``directions`` is a list
    of ``{parameter name: flat float32 tensor}`` (reshape to the parameter's shape)."""
    with np.load(path, allow_pickle=False) as data:
        out = {k: data[k] for k in data.files}
    if "directions" in out:
        names = [str(n) for n in out.pop("parameter_names")]
        numels = out.pop("parameter_numels").tolist()
        out["directions"] = [dict(zip(names, torch.from_numpy(row).split(numels))) for row in out["directions"]]
        out["parameter_names"] = names
    return out
