"""The evaluation behind :class:`~reprozoo.callbacks.landscape.LossLandscape`: the random directions, the objective
run with logging and metrics held aside, and the grid of points evaluated in chunks under ``vmap`` or one at a time.

Private to the callback: its public names (``random_directions``) are re-exported by ``landscape``.
"""

from __future__ import annotations

import functools
import inspect
import logging
import math
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

        self._clean = False  # every metric holds its default state (none touched since the last reset)

    def reset(self) -> None:
        """Reset the metrics the objective touched since the last call (all of them the first time): a reset costs
        tens of microseconds per metric, paid once per grid point and batch."""
        for m, _ in self.saved:
            if not self._clean or m._update_count or m._computed is not None or m._forward_cache is not None:
                m.reset()
        self._clean = True

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

# The "auto" mode's probe may spend on the path it does not choose about this fraction of the grid's cost (estimated
# at the loop's speed); a grid that cannot afford vmap's first call (the test that vmap runs at all) is looped.
PROBE_BUDGET = 0.05


def reseeder(seed: int, device: torch.device) -> Callable[[], None]:
    """A function seeding the generators the objective draws from with ``seed``, as ``torch.manual_seed`` seeds
    them: the CPU generator, and every CUDA device's when the module is on one (other accelerators:
    ``torch.manual_seed`` itself). ``torch.manual_seed`` costs about 0.2 ms (it queues the seeding of every
    accelerator type), the forward of a small net; a generator's own ``manual_seed`` about a microsecond."""
    if device.type == "cpu":
        generators = [torch.default_generator]
    elif device.type == "cuda":
        generators = [torch.default_generator, *torch.cuda.default_generators]
    else:
        return functools.partial(torch.manual_seed, seed)

    def reseed() -> None:
        for g in generators:
            g.manual_seed(seed)

    return reseed


class PointWriter:
    """Writes grid points' weights into the module's parameters in place, for the loop.

    The base weights and the directions are flattened once per (device, dtype) of the parameters, so a point costs
    ``2 dim`` whole-buffer kernels (one fewer within a row of the plane) and one ``_foreach_copy_``, whatever the
    number of parameter tensors. The arithmetic is ``point_params``'s, operation for operation (``w = theta + s1 *
    d1``, then ``w = w + s2 * d2``, in the work dtype, rounded to the parameter's dtype once), so the loop evaluates
    the very weights vmap does, bit for bit. Holds ``2 + dim`` flat copies of the perturbed weights (base, directions, the point), plus one for ``dim=2``
    and one for half-precision parameters (their saved values)."""

    def __init__(self, live: Mapping[str, torch.Tensor], base: Mapping[str, torch.Tensor], directions: list):
        by_kind: dict[tuple[torch.device, torch.dtype], list[str]] = {}
        for name in base:
            by_kind.setdefault((live[name].device, live[name].dtype), []).append(name)
        self.groups = []
        self.coords = torch.zeros(0, len(directions), dtype=torch.float64)  # the chunk of place()
        for (device, dtype), names in by_kind.items():
            work = _work_dtype(dtype)
            theta = torch.cat([base[n].detach().reshape(-1).to(work) for n in names])
            point = torch.empty_like(theta)
            views = [v.view(live[n].shape) for v, n in zip(point.split([live[n].numel() for n in names]), names)]
            targets = [live[n] for n in names]
            if work == dtype:  # the base weights, bit for bit
                saved = [v.view(live[n].shape) for v, n in zip(theta.split([t.numel() for t in targets]), names)]
            else:
                saved = [t.detach().clone() for t in targets]
            self.groups.append(
                {
                    "device": device,
                    "work": work,
                    "theta": theta,
                    "directions": [torch.cat([d[n].reshape(-1).to(work) for n in names]) for d in directions],
                    "point": point,
                    "scratch": torch.empty_like(theta) if len(directions) > 1 else None,
                    "scratch_for": None,  # the coordinate along d2 whose s2 d2 the scratch holds
                    "views": views,
                    "targets": targets,
                    "saved": saved,
                }
            )

    def place(self, coords: torch.Tensor) -> list[torch.Tensor]:
        """The (P, dim) CPU float64 coordinates in each group's work dtype and device (cast on the CPU first: some
        accelerators have no float64); one small copy per chunk, as ``point_params`` makes."""
        self.coords = coords
        return [coords.to(g["work"]).to(g["device"]) for g in self.groups]

    def write(self, placed: list[torch.Tensor], i: int) -> None:
        """Write point ``i`` of ``placed`` (from :meth:`place`) into the parameters."""
        # s2 d2 is the same along a row of the plane (points are row-major over (y, x)): computed once per row.
        second = float(self.coords[i, 1]) if self.coords.shape[1] > 1 else None
        for g, scales in zip(self.groups, placed):
            point, d = g["point"], g["directions"]
            torch.mul(d[0], scales[i, 0], out=point)
            point.add_(g["theta"])  # theta + s1 d1, rounded as point_params rounds it (addition commutes exactly)
            if second is not None:
                if g["scratch_for"] != second:
                    torch.mul(d[1], scales[i, 1], out=g["scratch"])
                    g["scratch_for"] = second
                point.add_(g["scratch"])
            torch._foreach_copy_(g["targets"], g["views"])

    def restore(self) -> None:
        for g in self.groups:
            torch._foreach_copy_(g["targets"], g["saved"])


def _spans(start: int, stop: int, size: int) -> list[tuple[int, int]]:
    return [(i, min(i + size, stop)) for i in range(start, stop, size)]


def evaluate_grid(callback, trainer, objective, params, buffers, directions, coords, batches, captured, metrics):
    """(loss (P,), accuracy (P,) or NaNs), float64 on the CPU, for this rank's grid points, averaged over the
    batches. ``callback`` is the :class:`~reprozoo.callbacks.landscape.LossLandscape` (its settings; it records
    ``used_mode`` and, for ``"auto"``, ``timings``)."""
    sizes = torch.tensor([float(extract_batch_size(b)) for b in batches], dtype=torch.float64)
    weights = sizes / sizes.sum()
    loss = torch.zeros(len(coords), dtype=torch.float64)
    acc = torch.zeros(len(coords), dtype=torch.float64)
    names = list(params)
    reseed = reseeder(callback.seed, next(iter(params.values())).device)

    def point_params(base: Mapping[str, torch.Tensor], c: torch.Tensor) -> Iterator[tuple[str, torch.Tensor]]:
        """``(name, base + c[:, 0] d1 (+ c[:, 1] d2))`` per parameter, stacked (P, ...), for CPU float64
        coordinates ``c`` of shape (P, dim): the weights of vmap's points (:class:`PointWriter` does the same
        arithmetic for the loop)."""
        placed = {}  # the coordinates per (device, dtype): one small copy each, not one per parameter
        for name in names:
            theta = base[name]
            work = _work_dtype(theta.dtype)  # half-precision arithmetic would round a * d before adding it
            key = (theta.device, work)
            if key not in placed:  # cast on the CPU first: some accelerators have no float64
                placed[key] = c.to(work).to(theta.device)
            w = theta.to(work)
            for k in range(callback.dim):
                scale = placed[key][..., k].reshape(c.shape[:-1] + (1,) * theta.dim())  # (P, 1, ..., 1)
                w = w + scale * directions[k][name].to(work)
            yield name, w.to(theta.dtype)

    def evaluate(point: dict[str, torch.Tensor], batch) -> tuple[torch.Tensor, torch.Tensor]:
        captured.values.clear()
        reseed()  # common random numbers: the same noise at every point
        return _unpack(functional_call(objective, {**buffers, **point}, (batch,)), captured, callback.accuracy_key)

    # Both return (values, accuracies), each (len(chunk), len(batches)) in float64 on the CPU; the weights of a
    # point are built once for all batches, and every (point, batch) is evaluated on its own, so a chunk's values
    # on some batches do not depend on which other batches are evaluated in the same call.
    def run_vmap(chunk: torch.Tensor, batches: list) -> tuple[torch.Tensor, torch.Tensor]:
        stacked = {"module." + name: w for name, w in point_params(params, chunk)}  # {name: (P, ...)}
        columns = []
        for batch in batches:
            metrics.reset()
            columns.append(vmap(functools.partial(evaluate, batch=batch), randomness="same")(stacked))
        return _on_cpu(torch.stack([v for v, _ in columns], 1)), _on_cpu(torch.stack([a for _, a in columns], 1))

    live = dict(objective.module.named_parameters())
    live_buffers = dict(objective.module.named_buffers())
    writer: PointWriter | None = None  # built on the loop's first call, from the weights as they are then

    def run_loop(chunk: torch.Tensor, batches: list) -> tuple[torch.Tensor, torch.Tensor]:
        # One point at a time, the classic way: the point's weights are written into the parameters in place (no
        # reparametrisation per call) and the saved values copied back at the end, bit for bit, also when the
        # objective raises. compute() restores the buffers.
        nonlocal writer
        if writer is None:
            writer = PointWriter(live, params, directions)
        values, accs = [], []
        try:
            for n, b in buffers.items():  # DDP: rank zero's buffers (see compute)
                live_buffers[n[len("module.") :]].copy_(b)
            placed = writer.place(chunk)
            for i in range(len(chunk)):
                writer.write(placed, i)
                for batch in batches:
                    metrics.reset()  # a metric logged by the objective then holds this point's batch only
                    captured.values.clear()
                    reseed()
                    value, accuracy = _unpack(objective(batch), captured, callback.accuracy_key)
                    values.append(value)
                    accs.append(accuracy)
        finally:
            writer.restore()
        shape = (len(chunk), len(batches))
        return _on_cpu(torch.stack(values)).reshape(shape), _on_cpu(torch.stack(accs)).reshape(shape)

    if not len(coords):  # more ranks than grid points
        return loss, acc
    with trainer.precision_plugin.forward_context():
        name = type(objective.module).__name__
        mode, spans, done = choose_mode(callback, run_vmap, run_loop, coords, batches, name)
        run = run_vmap if mode == "vmap" else run_loop
        bar = progress_bar(callback, trainer, len(coords) * len(batches))
        try:
            for start, stop in spans:
                chunk = coords[start:stop]
                if (start, stop) in done:  # the probe's points, evaluated on the first batch by the chosen path
                    values, accs = done[(start, stop)]
                    if len(batches) > 1:
                        more = run(chunk, batches[1:])
                        values, accs = torch.cat([values, more[0]], 1), torch.cat([accs, more[1]], 1)
                else:
                    values, accs = run(chunk, batches)  # (n, B) each
                loss[start:stop] = values @ weights
                acc[start:stop] = accs @ weights
                bar.update(len(chunk) * len(batches))
        finally:
            bar.close()
    callback.used_mode = mode
    return loss, acc


def choose_mode(callback, run_vmap, run_loop, coords: torch.Tensor, batches: list, name: str):
    """``(mode, spans, done)``: the mode to evaluate the grid with, its chunks as ``(start, stop)`` point ranges,
    and the values the probe already has on the first batch, ``{(start, stop): (values, accuracies)}``.

    ``callback.mode`` itself, or for ``"auto"``: ``"loop"`` when vmap cannot run the objective (logged as a
    warning), else whichever of the two is faster per grid point on this module, device and batch. Batching grid
    points pays on accelerators and for small, overhead-bound models; on a CPU, a compute-bound convolution runs
    slower batched (vmap turns it into a grouped convolution), so there the loop can win.

    The probe, on the first batch: the loop on the first three grid points (the first warms up, the faster of the
    other two is kept), then vmap on the next points in chunks of 1 (a warm-up, and the test that vmap runs at all), 2, 4, ...
    up to ``chunk_size``. While vmap is slower per point than the loop, the doubling stops when vmap's marginal cost
    per point is already the loop's, or when the next chunk, at twice its cost at the current chunk's speed, could
    take vmap's probe over ``PROBE_BUDGET`` (5 %) of the grid's cost at the loop's speed; the per-point time at ``chunk_size`` is then extrapolated linearly from the
    last two chunks. Once vmap is faster, its probe is not lost, so the doubling goes on while a larger chunk is
    faster per point, and the grid is evaluated in chunks of the fastest size measured (at most ``chunk_size``).
    The chosen path's probe values are kept (not evaluated again), so only the other path's probe is lost; vmap's
    chunks keep the probe's boundaries at every later compute, so surfaces of two epochs agree to the bit where the
    weights do. A grid of fewer than 40 points times batches cannot afford vmap's first point within the budget: it
    is evaluated with the loop, without a probe of vmap."""
    n, size = len(coords), callback.chunk_size
    if callback.mode == "auto" and callback.used_mode is not None:
        # Decided once: later surfaces (other epochs, compute() on demand) are evaluated the same way, and the probe
        # is not paid again.
        bounds = callback._vmap_bounds if callback.used_mode == "vmap" else None
        if bounds and bounds[-1] <= n:
            return "vmap", list(zip(bounds[:-1], bounds[1:])) + _spans(bounds[-1], n, callback._vmap_chunk), {}
        return callback.used_mode, _spans(0, n, size), {}
    if callback.mode != "auto":
        return callback.mode, _spans(0, n, size), {}
    callback.timings, callback._vmap_bounds, callback._vmap_chunk = None, None, size
    first = batches[:1]
    probe_start = time.perf_counter()

    def timed(fn, start: int, stop: int):
        begin = time.perf_counter()
        out = fn(coords[start:stop], first)  # CPU values: an accelerator has finished
        return time.perf_counter() - begin, out

    # The loop: its values are the same whatever the chunks, so its probe is one span of the grid; the fastest of
    # two timed points, so that one point slowed down by another process does not decide.
    looped = min(3, n)
    outs, loop_s = [], math.inf
    for i in range(looped):
        seconds, out = timed(run_loop, i, i + 1)
        outs.append(out)
        loop_s = min(loop_s, seconds) if i else loop_s  # the first point warms up
    loop_done = {(0, looped): (torch.cat([v for v, _ in outs]), torch.cat([a for _, a in outs]))}
    loop_spans = [(0, looped)] + _spans(looped, n, size)
    if n <= looped:  # nothing left to compare vmap on, and every point is evaluated
        return "loop", loop_spans, loop_done
    budget = PROBE_BUDGET * n * len(batches) * loop_s
    if budget < 2 * loop_s:  # too small a grid to afford vmap's first point (about one or two of the loop's)
        return "loop", loop_spans, loop_done
    bounds, vmap_done, spent, timed_calls = [0, looped], {}, 0.0, []
    best_s, best_k = math.inf, size  # the fastest chunk measured, per point
    k = 1
    while True:
        start = bounds[-1]
        stop = min(start + k, n)
        try:
            seconds, out = timed(run_vmap, start, stop)
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
            return "loop", loop_spans, loop_done
        spent += seconds
        vmap_done[(start, stop)] = out
        bounds.append(stop)
        per_point = seconds / (stop - start)
        following = min(2 * k, size, n - stop)
        if k == 1:  # the chunk of one point warms up: not timed
            vmap_s, slope = per_point, 0.0
        else:
            timed_calls.append((stop - start, seconds))
            if per_point <= best_s:
                best_s, best_k = per_point, stop - start
            elif best_s <= loop_s:
                break  # vmap wins and a larger chunk did not pay: the best chunk measured is kept
            vmap_s, slope = best_s, 0.0
            if len(timed_calls) >= 2:  # the per-point time at a full chunk, from the last two: seconds = a + b k
                (k0, s0), (k1, s1) = timed_calls[-2:]
                slope = max((s1 - s0) / (k1 - k0), 0.0)
                vmap_s = min(best_s, max(slope, (s1 - slope * k1) / min(size, n) + slope))
        if best_s <= loop_s:  # vmap wins: its probe is kept, so larger chunks are tried for free while they pay
            if stop - start >= size or following <= 0:
                break
        elif (
            (vmap_s <= loop_s and k > 1)  # an extrapolated win: full chunks, not measured
            or stop - start >= size
            or following <= 0
            or slope >= loop_s  # vmap's marginal cost per point is already the loop's: no chunk can win
            # at twice its cost at this chunk's speed: a larger chunk can cost more per point (with one point, vmap
            # runs plain kernels; with more, batched ones that can be slower, e.g. grouped convolutions on a CPU)
            or spent + 2 * following * per_point > budget
        ):
            break
        k = following
    if best_s <= loop_s:  # a measured win: the time of the chunk size chosen, not an extrapolation
        vmap_s = best_s
    mode = "vmap" if vmap_s <= loop_s else "loop"
    chunk = best_k if best_s <= loop_s else size
    probe_s = time.perf_counter() - probe_start
    callback.timings = {
        "vmap_ms_per_point": 1000 * vmap_s,
        "loop_ms_per_point": 1000 * loop_s,
        "vmap_chunk_size": chunk,
        "probe_seconds": probe_s,
        "wasted_seconds": spent if mode == "loop" else probe_s - spent,
    }
    log.info(
        "LossLandscape: %s per grid point and batch: vmap %.2f ms (chunks of %d), loop %.2f ms; using %s (probe "
        "%.2f s on %d points, %.2f s of it not reused)",
        name,
        1000 * vmap_s,
        chunk,
        1000 * loop_s,
        mode,
        probe_s,
        bounds[-1],
        callback.timings["wasted_seconds"],
    )
    if mode == "loop":
        return "loop", loop_spans, loop_done
    callback._vmap_bounds, callback._vmap_chunk = bounds, chunk
    return "vmap", list(zip(bounds[:-1], bounds[1:])) + _spans(bounds[-1], n, chunk), vmap_done


def progress_bar(callback, trainer: L.Trainer, total: int):
    """A bar over the grid points times batches, shown on rank zero when the callback and the trainer show bars."""
    from tqdm.auto import tqdm

    show = callback.progress and trainer.is_global_zero and trainer.progress_bar_callback is not None
    return tqdm(total=total, desc="loss landscape", leave=False, disable=not show, dynamic_ncols=True)
