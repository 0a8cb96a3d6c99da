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

import io
import logging
import math
import re
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any, Literal

import lightning as L
import numpy as np
import torch
from lightning.pytorch.utilities import rank_zero_only
from lightning.pytorch.utilities.seed import isolate_rng
from torch import nn
from torch.utils.data import DataLoader, IterableDataset

from reprozoo._files import save_figure, write_atomic
from reprozoo.callbacks._landscape_eval import (
    Captured,
    MetricStates,
    Normalization,
    Objective,
    evaluate_grid,
    objective_fn,
    random_directions,
    suppressed_logging,
)
from reprozoo.callbacks._landscape_plot import landscape_figures

log = logging.getLogger(__name__)


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
    point at a time (still reading each batch once), writing each point's weights into the parameters with a few
    whole-buffer kernels (the base weights and directions are flattened once per compute, per device and dtype);
    both build a point's weights with the same float operations, so they evaluate the same weights bit for bit.
    ``"auto"`` (default) falls back to the loop, with a warning saying why, when the module cannot be vmapped
    (data-dependent control flow, ``.item()`` calls, ...), and otherwise times both on the first batch of its first
    compute and keeps the faster for every later compute (:attr:`timings`, logged; later surfaces are evaluated
    alike, bit for bit comparable): the loop on three grid points, then vmap on chunks of 1, 2, 4, ... points, grown
    while vmap is faster (its chunk size then the fastest measured, at most ``chunk_size``) or while vmap's probe
    stays within 5 % of the grid's cost; the probe's values on the chosen path are kept, so deciding costs only the
    other path's probe. A grid of fewer than 40 points x batches is evaluated with the loop without probing vmap.
    Batching pays on accelerators and for small, overhead-bound models, while on a CPU a compute-bound convolution
    runs slower batched (see ``benchmarks/landscape_speed.py``). Under DDP the grid points are split across ranks
    and gathered; every rank returns the full surface, rank zero writes the files.

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
        chunk_size: grid points per vmapped forward (memory grows with it); ``"auto"`` may choose fewer.
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
        # The "auto" mode's measurement, when it made one: vmap_ms_per_point and loop_ms_per_point (per point and
        # batch; vmap's at the chunk size it chose), vmap_chunk_size, probe_seconds (the whole probe) and
        # wasted_seconds (the probe on the path not chosen, whose values are not used).
        self.timings: dict[str, float] | None = None
        # "auto" choosing vmap: the chunk boundaries of its probe and the chunk size it measured best, kept after it
        self._vmap_bounds: list[int] | None = None
        self._vmap_chunk = chunk_size
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
        objective = Objective(pl_module, objective_fn(self.loss_fn, pl_module))
        captured = Captured()
        metrics = MetricStates(pl_module)
        modes = {m: m.training for m in pl_module.modules()}
        # The loop writes rank zero's buffers under DDP, and a module may update a buffer in eval mode too (a
        # counter, a cache): all of them are put back as they were.
        saved_buffers = [(m, n, b, b.clone()) for m in pl_module.modules() for n, b in m.named_buffers(recurse=False)]
        cuda = pl_module.device.type == "cuda"
        try:
            with isolate_rng(include_cuda=cuda), torch.no_grad(), suppressed_logging(pl_module, captured):
                pl_module.eval()
                batches = [self._to_device(trainer, pl_module, b) for b in self._fixed_batches(trainer, dataloader)]
                loss, acc = evaluate_grid(
                    self, trainer, objective, params, buffers, directions, mine, batches, captured, metrics
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
        return landscape_figures(result, self.dim, title)

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


__all__ = ["LossLandscape", "load_landscape", "random_directions"]
