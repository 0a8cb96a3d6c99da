"""Log the Frobenius norm of every parameter and of the whole model, so that weight growth (what L2 regularisation
and weight decay act on) can be watched during training of any LightningModule, with any logger or none."""

from __future__ import annotations

import math
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import lightning as L
import torch
from lightning.pytorch.utilities import rank_zero_only

from reprozoo._files import save_figure

_LOW_PRECISION = (torch.float16, torch.bfloat16)
_FOREACH = hasattr(torch, "_foreach_norm")  # torch's multi-tensor norm kernel, what clip_grad_norm_ runs on


def tensor_norms(tensors: list[torch.Tensor]) -> torch.Tensor:
    """The Frobenius (entry-wise L2) norm of each tensor, as one 1-d tensor on the device of the first one.

    No host synchronisation: the caller decides when to read the values back. Half-precision tensors are reduced to
    a float32 result, because a bfloat16/float16 norm loses digits and a float16 one overflows past 65504; other
    dtypes keep their own (float64 stays float64). Tensors of one device and dtype go through torch's multi-tensor
    norm (``torch._foreach_norm``: a few kernel launches for all of them on a GPU, one call on the CPU) when this
    torch has it, else one ``torch.linalg.vector_norm`` each."""
    groups: dict[tuple[torch.device, torch.dtype], list[int]] = {}
    dense = []
    for i, t in enumerate(tensors):
        if t.layout == torch.sparse_coo:  # sparse gradients (nn.Embedding(sparse=True))
            t = t.coalesce().values()
        dense.append(t)
        groups.setdefault((t.device, t.dtype), []).append(i)
    if len(groups) == 1:  # the common case: no reordering
        ((_, dtype),) = groups
        return torch.stack(_group_norms(dense, dtype))
    norms: list[torch.Tensor] = [None] * len(dense)  # type: ignore[list-item]
    for (_, dtype), indices in groups.items():
        for i, norm in zip(indices, _group_norms([dense[i] for i in indices], dtype)):
            norms[i] = norm
    device = norms[0].device
    # Model parallel: the scalars are gathered on one device, still without a sync; stack promotes to the widest dtype.
    return torch.stack([n.to(device) for n in norms])


def _group_norms(tensors: list[torch.Tensor], dtype: torch.dtype) -> list[torch.Tensor]:
    """The norms of tensors of one device and ``dtype``."""
    out_dtype = torch.float32 if dtype in _LOW_PRECISION else None
    if _FOREACH and not dtype.is_complex:
        return list(torch._foreach_norm(tensors, 2, dtype=out_dtype))
    return [torch.linalg.vector_norm(t, dtype=out_dtype) for t in tensors]


def _module_of(name: str) -> str:
    """The module that owns parameter ``name`` (``layer1.0.weight`` -> ``layer1.0``). A parameter of the root
    module keeps its own name: a module cannot have a parameter and a child of the same name, so no clash."""
    return name.rpartition(".")[0] or name


class _Layout:
    """How a vector of per-tensor norms becomes the logged values, worked out once per selection of tensors: the
    labels (per tensor or per module, then ``total``), the position of each tensor's group, and the logged keys."""

    def __init__(self, names: tuple[str, ...], group_by_module: bool):
        self.names = names
        keys = [_module_of(n) for n in names] if group_by_module else list(names)
        labels = list(dict.fromkeys(keys))
        position = {label: i for i, label in enumerate(labels)}
        self.index = None if len(labels) == len(names) else [position[k] for k in keys]
        self.labels = (*labels, "total")
        self._keys: dict[str, tuple[str, ...]] = {}

    def values(self, norms: list[float]) -> list[float]:
        """``[norm per label..., total]`` from the per-tensor norms: a sum of squares per group on the host (float64),
        which costs less than the device ops it replaces for any number of tensors a model has."""
        if self.index is None:
            return [*norms, math.sqrt(math.fsum(n * n for n in norms))]
        squares = [0.0] * (len(self.labels) - 1)
        for i, n in zip(self.index, norms):
            squares[i] += n * n
        return [*map(math.sqrt, squares), math.sqrt(math.fsum(squares))]

    def keys(self, prefix: str) -> tuple[str, ...]:
        if prefix not in self._keys:
            self._keys[prefix] = tuple(f"{prefix}/{label}" for label in self.labels)
        return self._keys[prefix]


class _History(Sequence):
    """The measurements, one ``{"step", "epoch", "norms"[, "grad_norms"]}`` dict each, stored compactly: a row of
    floats per measurement plus its labels, shared by all rows with the same selection (a dict of a few hundred
    keys per step would grow by megabytes an hour when logging every step). Dicts are built when read."""

    def __init__(self) -> None:
        self._labels: list[tuple[str, ...]] = []  # distinct label tuples
        self._label_ids: dict[tuple[str, ...], int] = {}
        self._rows: list[tuple[int, int, int, list[float], int | None, list[float] | None]] = []

    def _label_id(self, labels: tuple[str, ...]) -> int:
        if labels not in self._label_ids:
            self._label_ids[labels] = len(self._labels)
            self._labels.append(labels)
        return self._label_ids[labels]

    def append(self, step: int, epoch: int, labels, values, grad_labels=None, grad_values=None) -> None:
        grad_id = None if grad_labels is None else self._label_id(grad_labels)
        self._rows.append((step, epoch, self._label_id(labels), values, grad_id, grad_values))

    def _entry(self, row) -> dict[str, Any]:
        step, epoch, label_id, values, grad_id, grad_values = row
        entry = {"step": step, "epoch": epoch, "norms": dict(zip(self._labels[label_id], values))}
        if grad_id is not None:
            entry["grad_norms"] = dict(zip(self._labels[grad_id], grad_values))
        return entry

    def __len__(self) -> int:
        return len(self._rows)

    def __getitem__(self, i):
        if isinstance(i, slice):
            return [self._entry(r) for r in self._rows[i]]
        return self._entry(self._rows[i])

    def __iter__(self) -> Iterator[dict[str, Any]]:
        return (self._entry(r) for r in self._rows)

    def __eq__(self, other) -> bool:
        return isinstance(other, Sequence) and len(self) == len(other) and all(a == b for a, b in zip(self, other))

    def __repr__(self) -> str:
        return f"_History({len(self)} measurements)"

    def state_dict(self) -> dict[str, Any]:
        return {"labels": [list(labels) for labels in self._labels], "rows": [list(r) for r in self._rows]}

    @classmethod
    def from_state(cls, state: dict[str, Any] | list[dict[str, Any]]) -> _History:
        """From :meth:`state_dict`, or from the list of dicts that checkpoints written before the compact form hold."""
        history = cls()
        if isinstance(state, dict):
            history._labels = [tuple(labels) for labels in state["labels"]]
            history._label_ids = {labels: i for i, labels in enumerate(history._labels)}
            history._rows = [tuple(r) for r in state["rows"]]
            return history
        for entry in state:
            grads = entry.get("grad_norms")
            history.append(
                entry["step"],
                entry["epoch"],
                tuple(entry["norms"]),
                list(entry["norms"].values()),
                None if grads is None else tuple(grads),
                None if grads is None else list(grads.values()),
            )
        return history


class FrobeniusNormMonitor(L.Callback):
    """Log the Frobenius norm ``||W||_F = sqrt(sum_ij W_ij^2)`` of every parameter tensor and of the whole model
    (``total``: the square root of the sum of squares of all entries, i.e. the norm of all parameters flattened into
    one vector) as ``frobenius_norm/<name>`` and ``frobenius_norm/total``.

    It makes no assumption about the LightningModule: it reads ``pl_module.named_parameters()``, which yields a
    parameter shared under several names (tied weights) once, under its first name, so a shared tensor counts once
    in the total. Buffers (BatchNorm running statistics) are not parameters and are not included. Frozen parameters
    (``requires_grad=False``) are included unless ``trainable_only=True``; ``requires_grad`` is read at each
    measurement, so unfreezing during training shows up, and the parameters themselves at the start of ``fit`` and
    of each epoch (a module added mid-epoch is measured from the next one). Integer parameters are skipped. Any dtype works: float64
    norms are float64, bfloat16/float16 ones are accumulated in float32.

    Values are written straight to every logger of the trainer (``logger.log_metrics(values, step=global_step)``,
    on rank zero), not through ``pl_module.log``: Lightning's per-key bookkeeping would cost more than the
    measurement, and it would repeat step values at later logging steps. They are also kept in :attr:`history` (a
    sequence of ``{"step", "epoch", "norms"[, "grad_norms"]}`` dicts, stored as rows of floats and built when read),
    saved in checkpoints, so a run without a logger, or a resumed one, still has the full record. They do not appear in ``trainer.callback_metrics``.

    Args:
        every_n_steps: measure every N optimizer steps (at the end of the batch whose step made ``global_step`` a
            multiple of N) instead of at each training epoch end; logged at step ``global_step``.
        trainable_only: only parameters with ``requires_grad``.
        group_by_module: one norm per module instead of per parameter: the parameters a module owns directly
            (``layer1.0`` for ``layer1.0.weight`` and ``layer1.0.bias``) combined as ``sqrt(sum of squares)``. A
            parameter of the root module is its own group, under its own name.
        log_grad_norm: also ``frobenius_norm_grad/<name>`` and ``frobenius_norm_grad/total``, from ``.grad`` in
            ``on_before_optimizer_step`` (after backward and gradient accumulation, before clipping and the step);
            parameters without a gradient are skipped. In epoch mode the gradient of the last step of the epoch.
        plot: at the end of ``fit``, draw one bar per parameter (or module) with the total as a horizontal line
            (next to it, a lighter bar with the norm at the start of training, when the run started from step 0:
            the tutorial's before/after comparison; kept in :attr:`initial`, not logged), save it as
            ``<log_dir or default_root_dir>/frobenius_norm/norms_epoch<k>.png`` and send it to every logger whose
            ``experiment`` has ``add_figure`` (TensorBoard).
        log_scale: a logarithmic y axis for that figure (norms of biases and weights differ by decades).

    Cost per measurement: torch's multi-tensor norm over the parameters (one pass over the weights, the
    unavoidable work), ONE device-to-host copy of the per-tensor norms, then the totals and module groups as sums
    of squares on the host and one ``log_metrics`` call per logger; nothing is modified. About 1 % of a training step
    of a 1M-parameter MLP on a 2-core CPU when measuring every step (``benchmarks/frobenius_overhead.py``). Under sharded strategies (FSDP, DeepSpeed stage 3) each
    rank measures its own shard.
    A parameter or module literally named ``total`` would be shadowed by the total.
    """

    def __init__(
        self,
        every_n_steps: int | None = None,
        trainable_only: bool = False,
        group_by_module: bool = False,
        log_grad_norm: bool = False,
        plot: bool = True,
        log_scale: bool = False,
    ):
        if every_n_steps is not None and (
            isinstance(every_n_steps, bool) or not isinstance(every_n_steps, int) or every_n_steps < 1
        ):
            raise ValueError(
                f"FrobeniusNormMonitor: every_n_steps must be None or an integer >= 1, got {every_n_steps!r}"
            )
        self.every_n_steps = every_n_steps
        self.trainable_only = trainable_only
        self.group_by_module = group_by_module
        self.log_grad_norm = log_grad_norm
        self.plot = plot
        self.log_scale = log_scale
        self.history = _History()
        self.initial: dict[str, Any] | None = None  # the norms before the first step (a run from step 0)
        self._pending_grad: tuple[int, _Layout, torch.Tensor] | None = None  # (step it leads to, layout, norms)
        self._last_step: int | None = None
        self._last_epoch: int | None = None
        self._layouts: dict[tuple[str, ...], _Layout] = {}
        self._state_key: tuple[tuple, str] | None = None
        self._named: list[tuple[str, torch.Tensor]] | None = None  # the model's parameters, read once per epoch

    @property
    def state_key(self) -> str:
        # Two monitors with different selections can run side by side and keep separate histories in a checkpoint.
        # Lightning reads the key at every hook call (to name the profiler's section): built once per setting.
        settings = (self.every_n_steps, self.trainable_only, self.group_by_module, self.log_grad_norm)
        if self._state_key is None or self._state_key[0] != settings:
            key = self._generate_state_key(
                **dict(zip(("every_n_steps", "trainable_only", "group_by_module", "log_grad_norm"), settings))
            )
            self._state_key = (settings, key)
        return self._state_key[1]

    # ---- measuring -------------------------------------------------------------------------------------------

    def _layout(self, names: tuple[str, ...]) -> _Layout:
        layout = self._layouts.get(names)
        if layout is None:
            layout = self._layouts[names] = _Layout(names, self.group_by_module)
        return layout

    def _measure(self, named: list[tuple[str, torch.Tensor]]) -> tuple[_Layout, torch.Tensor] | None:
        """The layout of ``named`` and the per-tensor norms, still on the device."""
        if not named:
            return None
        with torch.no_grad():
            return self._layout(tuple(n for n, _ in named)), tensor_norms([t for _, t in named])

    def _read_parameters(self, pl_module: L.LightningModule) -> None:
        # named_parameters() removes duplicates: a tied/shared tensor appears once, under its first name. Integer
        # parameters (frozen lookup tables, counters) are no weights to watch, and torch has no norm of them. Read
        # at the start of fit and of each epoch, not at each measurement: walking the module tree costs more than
        # the norms of a small model.
        self._named = [(n, p) for n, p in pl_module.named_parameters() if p.is_floating_point() or p.is_complex()]

    def _parameters(self, pl_module: L.LightningModule) -> list[tuple[str, torch.Tensor]]:
        if self._named is None:
            self._read_parameters(pl_module)
        if not self.trainable_only:
            return self._named
        return [(n, p) for n, p in self._named if p.requires_grad]  # checked each time: unfreezing shows up

    def _gradients(self, pl_module: L.LightningModule) -> list[tuple[str, torch.Tensor]]:
        return [(n, p.grad) for n, p in self._parameters(pl_module) if p.grad is not None]

    def _record(self, trainer: L.Trainer, pl_module: L.LightningModule, on_step: bool) -> None:
        """Measure the weights (plus the pending gradient norms), read everything back in one copy, log and store."""
        step = trainer.global_step
        weights = self._measure(self._parameters(pl_module))
        if weights is None:
            return
        layout, vec = weights
        pending, self._pending_grad = self._pending_grad, None
        if pending is not None and (on_step is False or pending[0] == step):
            grad_layout, grad_vec = pending[1], pending[2]
            floats = torch.cat([vec, grad_vec.to(vec.device)]).tolist()  # the one host sync
            values, grad_values = layout.values(floats[: len(vec)]), grad_layout.values(floats[len(vec) :])
        else:
            grad_layout = grad_values = None
            values = layout.values(vec.tolist())  # the one host sync
        self.history.append(
            step, trainer.current_epoch, layout.labels, values, grad_layout and grad_layout.labels, grad_values
        )
        if trainer.loggers:  # no dict of keys to build for a run without a logger
            metrics = dict(zip(layout.keys("frobenius_norm"), values))
            if grad_layout is not None:
                metrics.update(zip(grad_layout.keys("frobenius_norm_grad"), grad_values))
            self._log(trainer, metrics, step)

    def _norms_now(self, pl_module: L.LightningModule) -> dict[str, float] | None:
        """The norms of the weights now, as ``{label: value}``, outside the logged history."""
        measured = self._measure(self._parameters(pl_module))
        if measured is None:
            return None
        layout, vec = measured
        return dict(zip(layout.labels, layout.values(vec.tolist())))

    @rank_zero_only
    def _log(self, trainer: L.Trainer, metrics: dict[str, float], step: int) -> None:
        # Every rank holds identical parameters (and all-reduced gradients) under DDP: rank zero speaks for all.
        for logger in trainer.loggers:
            logger.log_metrics(metrics, step=step)

    # ---- hooks ---------------------------------------------------------------------------------------------

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._last_step = trainer.global_step  # a batch that does not step (gradient accumulation) logs nothing
        self._pending_grad = None
        self._read_parameters(pl_module)
        if trainer.global_step == 0 and self.plot:
            norms = self._norms_now(pl_module)
            if norms is not None:
                self.initial = {"step": 0, "epoch": 0, "norms": norms}

    def on_train_epoch_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._read_parameters(pl_module)  # a module added or replaced between epochs is measured from then on

    def on_before_optimizer_step(self, trainer: L.Trainer, pl_module: L.LightningModule, optimizer) -> None:
        if not self.log_grad_norm:
            return
        target = trainer.global_step + 1  # the step this update leads to
        if self.every_n_steps is not None and target % self.every_n_steps:
            return
        # Kept on the device; read back together with the weight norms at the end of the batch or epoch.
        measured = self._measure(self._gradients(pl_module))
        self._pending_grad = None if measured is None else (target, *measured)

    def on_train_batch_end(
        self, trainer: L.Trainer, pl_module: L.LightningModule, outputs, batch, batch_idx: int
    ) -> None:
        self._last_epoch = trainer.current_epoch
        step = trainer.global_step
        if self.every_n_steps is None or step == self._last_step or step % self.every_n_steps:
            return
        self._last_step = step
        self._record(trainer, pl_module, on_step=True)

    def on_train_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if self.every_n_steps is None:
            self._record(trainer, pl_module, on_step=False)

    def on_fit_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if not self.plot:
            return
        entry = self._final_entry(trainer, pl_module)
        # trainer.log_dir broadcasts from rank zero: it must be read on every rank, outside the rank-zero function.
        root = trainer.log_dir or trainer.default_root_dir
        if entry is not None:
            self._save_figure(trainer, entry, root)

    # ---- state ---------------------------------------------------------------------------------------------

    def state_dict(self) -> dict[str, Any]:
        return {"history": self.history.state_dict(), "initial": self.initial}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.history = _History.from_state(state_dict.get("history", []))
        self.initial = state_dict.get("initial")

    # ---- figure --------------------------------------------------------------------------------------------

    def _final_entry(self, trainer: L.Trainer, pl_module: L.LightningModule) -> dict[str, Any] | None:
        """The last recorded norms if they are those of the final weights, otherwise a fresh (unlogged) measurement."""
        if self.history and self.history[-1]["step"] == trainer.global_step:
            return self.history[-1]
        norms = self._norms_now(pl_module)
        if norms is None:
            return None
        epoch = self._last_epoch if self._last_epoch is not None else trainer.current_epoch
        return {"step": trainer.global_step, "epoch": epoch, "norms": norms}

    def figure(self, entry: dict[str, Any], initial: dict[str, Any] | None = None):
        """The tutorial's "weight size" plot of one :attr:`history` entry: a bar per parameter (or module) and the
        total as a horizontal line; with ``initial`` (default: :attr:`initial`, when its labels match), the norms
        at the start of training as lighter bars beside them. A ``matplotlib.figure.Figure`` on the Agg canvas,
        outside pyplot, so it neither needs a display nor changes the user's backend."""
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure

        norms = dict(entry["norms"])
        total = norms.pop("total")
        initial = self.initial if initial is None else initial
        before = dict(initial["norms"]) if initial is not None and initial is not entry else None
        if before is not None and set(before) != set(norms) | {"total"}:
            before = None  # another selection of parameters (e.g. unfrozen since): nothing to compare bar by bar
        width = min(60.0, max(6.0, (0.45 if before else 0.3) * len(norms) + 2.0))
        fig = Figure(figsize=(width, 4.5), layout="constrained")
        FigureCanvasAgg(fig)
        ax = fig.add_subplot()
        positions = list(range(len(norms)))
        if before is not None:
            ax.bar(
                [p - 0.2 for p in positions],
                [before[k] for k in norms],
                width=0.4,
                color="tab:blue",
                alpha=0.35,
                label="start of training",
            )
            ax.bar([p + 0.2 for p in positions], list(norms.values()), width=0.4, color="tab:blue", label="end")
            ax.axhline(
                before["total"],
                color="tab:red",
                linestyle=":",
                alpha=0.5,
                label=f"total at start = {before['total']:.4g}",
            )
        else:
            ax.bar(positions, list(norms.values()), color="tab:blue")
        ax.axhline(total, color="tab:red", linestyle="--", label=f"total = {total:.4g}")
        ax.set_xticks(positions, list(norms), rotation=90, fontsize=7)
        if self.log_scale:
            ax.set_yscale("log")
        ax.set_ylabel("Frobenius norm")
        kind = "module" if self.group_by_module else "parameter"
        ax.set_title(f"Frobenius norm per {kind} (epoch {entry['epoch']}, step {entry['step']})")
        ax.legend(loc="best")
        return fig

    @rank_zero_only
    def _save_figure(self, trainer: L.Trainer, entry: dict[str, Any], root: str) -> None:
        fig = self.figure(entry)
        path = Path(root) / "frobenius_norm" / f"norms_epoch{entry['epoch']}.png"
        # Rendered in memory, then written atomically: a run killed mid-write leaves no half PNG.
        save_figure(fig, path)
        for logger in trainer.loggers:
            experiment = getattr(logger, "experiment", None)
            if hasattr(experiment, "add_figure"):  # TensorBoard's SummaryWriter (or tensorboardX)
                experiment.add_figure("frobenius_norm", fig, global_step=trainer.global_step)
