"""The evaluation behind :class:`~reprozoo.callbacks.landscape.LossLandscape`: the random directions, the objective
run with logging and metrics held aside, and the grid of points evaluated in chunks under ``vmap`` or one at a time.

Private to the callback: its public names (``random_directions``) are re-exported by ``landscape``.
"""

from __future__ import annotations

import functools
import inspect
import logging
import re
import time
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from typing import Any, Literal

import lightning as L
import torch
from lightning.pytorch.utilities.data import extract_batch_size
from lightning.pytorch.utilities.signature_utils import is_param_in_hook_signature
from torch import nn
from torch.func import functional_call, vmap

# The callback's logger: its messages (the vmap fallback, the timings) keep the name users and tests filter on.
log = logging.getLogger("reprozoo.callbacks.landscape")

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


class Objective(nn.Module):
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


def objective_fn(loss_fn: Callable | None, pl_module: L.LightningModule) -> Callable:
    """The loss to evaluate: ``loss_fn``, else the module's ``loss`` method, else its ``training_step`` (see
    :class:`~reprozoo.callbacks.landscape.LossLandscape`)."""
    if loss_fn is not None:
        return loss_fn
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


class Captured:
    """What the objective logged through ``self.log``/``self.log_dict`` while logging was suppressed."""

    def __init__(self):
        self.values: dict[str, Any] = {}

    def log(self, name, value, *args, **kwargs):
        self.values[name] = value

    def log_dict(self, dictionary, *args, **kwargs):
        self.values.update(dictionary)


@contextmanager
def suppressed_logging(module: L.LightningModule, captured: Captured):
    """Route ``module.log``/``log_dict`` to ``captured`` (instance attributes shadow the methods), so the objective
    reaches neither the loggers nor ``trainer.callback_metrics``."""
    module.log = captured.log
    module.log_dict = captured.log_dict
    try:
        yield
    finally:
        del module.log
        del module.log_dict


class MetricStates:
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


def _unpack(output: Any, captured: Captured, accuracy_key: re.Pattern) -> tuple[torch.Tensor, torch.Tensor]:
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


# ------------------------------------------------------------------------------------------------- the grid


def evaluate_grid(callback, trainer, objective, params, buffers, directions, coords, batches, captured, metrics):
    """(loss (P,), accuracy (P,) or NaNs), float64 on the CPU, for this rank's grid points, averaged over the
    batches. ``callback`` is the :class:`~reprozoo.callbacks.landscape.LossLandscape` (its settings; it records
    ``used_mode``)."""
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
            for k in range(callback.dim):
                scale = placed[key][..., k].reshape(c.shape[:-1] + (1,) * theta.dim())  # () or (P, 1, ..., 1)
                w = w + scale * directions[k][name].to(work)
            yield name, w.to(theta.dtype)

    def evaluate(point: dict[str, torch.Tensor], batch) -> tuple[torch.Tensor, torch.Tensor]:
        captured.values.clear()
        torch.manual_seed(callback.seed)  # common random numbers: the same noise at every point
        return _unpack(functional_call(objective, {**buffers, **point}, (batch,)), captured, callback.accuracy_key)

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
                    torch.manual_seed(callback.seed)
                    value, accuracy = _unpack(objective(batch), captured, callback.accuracy_key)
                    values.append(value)
                    accs.append(accuracy)
        finally:
            for name in names:
                live[name].copy_(theta[name])
        shape = (len(chunk), len(batches))
        return _on_cpu(torch.stack(values)).reshape(shape), _on_cpu(torch.stack(accs)).reshape(shape)

    chunks = [coords[i : i + callback.chunk_size] for i in range(0, len(coords), callback.chunk_size)]
    if not chunks:  # more ranks than grid points
        return loss, acc
    with trainer.precision_plugin.forward_context():
        name = type(objective.module).__name__
        mode = choose_mode(callback, run_vmap, run_loop, chunks[0], batches[0], metrics, name)
        run = run_vmap if mode == "vmap" else run_loop
        bar = progress_bar(callback, trainer, len(coords) * len(batches))
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
    callback.used_mode = mode
    return loss, acc


def choose_mode(callback, run_vmap, run_loop, chunk, batch, metrics: MetricStates, name: str) -> str:
    """``callback.mode`` itself, or for ``"auto"``: ``"loop"`` when vmap cannot run the objective (logged as a warning),
    else whichever of the two is faster per grid point on this module, device and batch, timed on up to 8 points
    of the first chunk (a warm-up call, then one timed call each; the loop on at most 4 points). Batching grid points pays on
    accelerators and for small, overhead-bound models; on a CPU, a compute-bound convolution runs slower
    batched (vmap turns it into a grouped convolution), so there the loop can win."""
    if callback.mode != "auto":
        return callback.mode
    if callback.used_mode is not None:
        # Decided once: later surfaces (other epochs, compute() on demand) are evaluated the same way, so they agree
        # to the bit where the weights do (the two modes sum in different orders), and the probe is not paid again.
        return callback.used_mode
    callback.timings = None
    chunk = chunk[:8]  # a probe: enough points to see vmap's per-point cost, little work wasted on a small grid
    try:
        metrics.reset()
        run_vmap(chunk, [batch])  # warm-up, and the test that vmap can run it at all
    except Exception as err:  # noqa: BLE001 - any failure of vmap's transforms means: loop instead
        message = str(err).splitlines()[0] if str(err) else ""
        # Once a warning, then information: the same fallback at every epoch tells the user nothing new.
        log.log(
            logging.INFO if callback._fallback_warned else logging.WARNING,
            "LossLandscape: %s cannot be evaluated with vmap (%s: %s); evaluating the grid points one at a time "
            "(same values, slower on accelerators; pass mode='loop' to skip this check)",
            name,
            type(err).__name__,
            message,
        )
        callback._fallback_warned = True
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
    callback.timings = {"vmap_ms_per_point": 1000 * vmap_s, "loop_ms_per_point": 1000 * loop_s}
    mode = "vmap" if vmap_s <= loop_s else "loop"
    log.info(
        "LossLandscape: %s per grid point and batch: vmap %.2f ms, loop %.2f ms; using %s",
        name,
        1000 * vmap_s,
        1000 * loop_s,
        mode,
    )
    return mode


def progress_bar(callback, trainer: L.Trainer, total: int):
    """A bar over the grid points times batches, shown on rank zero when the callback and the trainer show bars."""
    from tqdm.auto import tqdm

    show = callback.progress and trainer.is_global_zero and trainer.progress_bar_callback is not None
    return tqdm(total=total, desc="loss landscape", leave=False, disable=not show, dynamic_ncols=True)
