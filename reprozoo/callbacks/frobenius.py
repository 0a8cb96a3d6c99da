"""Log the Frobenius norm of every parameter and of the whole model, so that weight growth (what L2 regularisation
and weight decay act on) can be watched during training of any LightningModule, with any logger or none."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import lightning as L
import torch
from lightning.pytorch.utilities import rank_zero_only

from reprozoo._files import save_figure

_LOW_PRECISION = (torch.float16, torch.bfloat16)


def tensor_norms(tensors: list[torch.Tensor]) -> torch.Tensor:
    """The Frobenius (entry-wise L2) norm of each tensor, as one 1-d tensor on the device of the first one.

    No host synchronisation: the caller decides when to read the values back. Half-precision tensors are reduced to
    a float32 result, because a bfloat16/float16 norm loses digits and a float16 one overflows past 65504. One kernel
    launch per tensor (``torch.linalg.vector_norm``): torch's fused multi-tensor norm is a private API."""
    dense = [t.coalesce().values() if t.layout == torch.sparse_coo else t for t in tensors]  # sparse grads
    # Half-precision tensors get a float32 result, and the others keep their own dtype, also in a model that mixes them.
    by_dtype: dict[torch.dtype, list[int]] = {}
    for i, t in enumerate(dense):
        by_dtype.setdefault(t.dtype, []).append(i)
    norms: list[torch.Tensor | None] = [None] * len(dense)
    for dtype, indices in by_dtype.items():
        group = [dense[i] for i in indices]
        for i, norm in zip(indices, _group_norms(group, torch.float32 if dtype in _LOW_PRECISION else None)):
            norms[i] = norm
    device = norms[0].device
    if any(n.device != device for n in norms):  # model parallel: gather the scalars on one device, still no sync
        norms = [n.to(device) for n in norms]
    return torch.stack(norms)  # promotes to the widest dtype (float64 stays float64)


def _group_norms(tensors: list[torch.Tensor], out_dtype: torch.dtype | None) -> list[torch.Tensor]:
    """The norms of tensors of one dtype, as ``out_dtype`` (None: theirs)."""
    return [torch.linalg.vector_norm(t, dtype=out_dtype) for t in tensors]


def _module_of(name: str) -> str:
    """The module that owns parameter ``name`` (``layer1.0.weight`` -> ``layer1.0``). A parameter of the root
    module keeps its own name: a module cannot have a parameter and a child of the same name, so no clash."""
    return name.rpartition(".")[0] or name


class FrobeniusNormMonitor(L.Callback):
    """Log the Frobenius norm ``||W||_F = sqrt(sum_ij W_ij^2)`` of every parameter tensor and of the whole model
    (``total``: the square root of the sum of squares of all entries, i.e. the norm of all parameters flattened into
    one vector) as ``frobenius_norm/<name>`` and ``frobenius_norm/total``.

    It makes no assumption about the LightningModule: it reads ``pl_module.named_parameters()``, which yields a
    parameter shared under several names (tied weights) once, under its first name, so a shared tensor counts once
    in the total. Buffers (BatchNorm running statistics) are not parameters and are not included. Frozen parameters
    (``requires_grad=False``) are included unless ``trainable_only=True``; the selection is made at each
    measurement, so unfreezing during training shows up. Integer parameters are skipped. Any dtype works: float64
    norms are float64, bfloat16/float16 ones are accumulated in float32.

    Values are written straight to every logger of the trainer (``logger.log_metrics(values, step=global_step)``,
    on rank zero), not through ``pl_module.log``: Lightning's per-key bookkeeping would cost more than the
    measurement, and it would repeat step values at later logging steps. They are also kept in :attr:`history` (a
    list of ``{"step", "epoch", "norms"[, "grad_norms"]}`` dicts), saved in checkpoints, so a run without a
    logger, or a resumed one, still has the full record. They do not appear in ``trainer.callback_metrics``.

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
            the tutorial's before/after comparison; kept in :attr:`initial`, not logged), save it as ``<log_dir or default_root_dir>/frobenius_norm/norms_epoch<k>.png`` and send it to every
            logger whose ``experiment`` has ``add_figure`` (TensorBoard).
        log_scale: a logarithmic y axis for that figure (norms of biases and weights differ by decades).

    Cost: one norm kernel per tensor, a few vector ops and ONE device-to-host copy per measurement; nothing is
    modified (see ``benchmarks/frobenius_overhead.py``). Under sharded strategies (FSDP, DeepSpeed stage 3) each
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
        self.history: list[dict[str, Any]] = []
        self.initial: dict[str, Any] | None = None  # the norms before the first step (a run from step 0)
        self._pending_grad: tuple[int, list[str], torch.Tensor] | None = None  # (step it leads to, labels, norms)
        self._last_step: int | None = None
        self._last_epoch: int | None = None
        self._groups: tuple[tuple[str, ...], torch.device, list[str], torch.Tensor] | None = None

    @property
    def state_key(self) -> str:
        # Two monitors with different selections can run side by side and keep separate histories in a checkpoint.
        return self._generate_state_key(
            every_n_steps=self.every_n_steps,
            trainable_only=self.trainable_only,
            group_by_module=self.group_by_module,
            log_grad_norm=self.log_grad_norm,
        )

    # ---- measuring -------------------------------------------------------------------------------------------

    def _reduce(self, names: list[str], norms: torch.Tensor) -> tuple[list[str], torch.Tensor]:
        """Labels and ``[norm per entry..., total]`` on the device, from the per-tensor norms."""
        squares = norms.square()
        total = squares.sum().sqrt().view(1)
        if not self.group_by_module:
            return names, torch.cat([norms, total])
        keys = tuple(_module_of(n) for n in names)
        # The index tensor is cached: building it each time would be a host-to-device copy per measurement.
        if self._groups is None or self._groups[0] != keys or self._groups[1] != norms.device:
            labels = list(dict.fromkeys(keys))
            position = {label: i for i, label in enumerate(labels)}
            index = torch.tensor([position[k] for k in keys], device=norms.device)
            self._groups = (keys, norms.device, labels, index)
        _, _, labels, index = self._groups
        groups = torch.zeros(len(labels), dtype=squares.dtype, device=squares.device).index_add_(0, index, squares)
        return labels, torch.cat([groups.sqrt(), total])

    def _measure(self, named: list[tuple[str, torch.Tensor]]) -> tuple[list[str], torch.Tensor] | None:
        if not named:
            return None
        with torch.no_grad():
            names = [n for n, _ in named]
            return self._reduce(names, tensor_norms([t.detach() for _, t in named]))

    def _parameters(self, pl_module: L.LightningModule) -> list[tuple[str, torch.Tensor]]:
        # named_parameters() removes duplicates: a tied/shared tensor appears once, under its first name. Integer
        # parameters (frozen lookup tables, counters) are no weights to watch, and torch has no norm of them.
        return [
            (n, p)
            for n, p in pl_module.named_parameters()
            if (p.is_floating_point() or p.is_complex()) and (p.requires_grad or not self.trainable_only)
        ]

    def _gradients(self, pl_module: L.LightningModule) -> list[tuple[str, torch.Tensor]]:
        return [(n, p.grad) for n, p in self._parameters(pl_module) if p.grad is not None]

    def _record(self, trainer: L.Trainer, pl_module: L.LightningModule, on_step: bool) -> None:
        """Measure the weights (plus the pending gradient norms), read everything back in one copy, log and store."""
        step = trainer.global_step
        weights = self._measure(self._parameters(pl_module))
        if weights is None:
            return
        parts = [("frobenius_norm", *weights)]
        pending, self._pending_grad = self._pending_grad, None
        if pending is not None and (on_step is False or pending[0] == step):
            parts.append(("frobenius_norm_grad", pending[1], pending[2]))
        device = weights[1].device
        values = torch.cat([vec.to(device) for _, _, vec in parts]).cpu()  # the one host sync
        floats = values.tolist()
        entry: dict[str, Any] = {"step": step, "epoch": trainer.current_epoch}
        metrics: dict[str, float] = {}
        start = 0
        for prefix, labels, _vec in parts:
            keys = [*labels, "total"]
            values_of_part = dict(zip(keys, floats[start : start + len(keys)]))
            entry["norms" if prefix == "frobenius_norm" else "grad_norms"] = values_of_part
            metrics.update({f"{prefix}/{k}": v for k, v in values_of_part.items()})
            start += len(keys)
        self.history.append(entry)
        self._log(trainer, metrics, step)

    @rank_zero_only
    def _log(self, trainer: L.Trainer, metrics: dict[str, float], step: int) -> None:
        # Every rank holds identical parameters (and all-reduced gradients) under DDP: rank zero speaks for all.
        for logger in trainer.loggers:
            logger.log_metrics(metrics, step=step)

    # ---- hooks ---------------------------------------------------------------------------------------------

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._last_step = trainer.global_step  # a batch that does not step (gradient accumulation) logs nothing
        self._pending_grad = None
        if trainer.global_step == 0 and self.plot:
            measured = self._measure(self._parameters(pl_module))
            if measured is not None:
                labels, vec = measured
                self.initial = {"step": 0, "epoch": 0, "norms": dict(zip([*labels, "total"], vec.tolist()))}

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
        return {"history": [dict(e) for e in self.history], "initial": self.initial}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.history = [dict(e) for e in state_dict.get("history", [])]
        self.initial = state_dict.get("initial")

    # ---- figure --------------------------------------------------------------------------------------------

    def _final_entry(self, trainer: L.Trainer, pl_module: L.LightningModule) -> dict[str, Any] | None:
        """The last recorded norms if they are those of the final weights, otherwise a fresh (unlogged) measurement."""
        if self.history and self.history[-1]["step"] == trainer.global_step:
            return self.history[-1]
        measured = self._measure(self._parameters(pl_module))
        if measured is None:
            return None
        labels, vec = measured
        epoch = self._last_epoch if self._last_epoch is not None else trainer.current_epoch
        return {"step": trainer.global_step, "epoch": epoch, "norms": dict(zip([*labels, "total"], vec.tolist()))}

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
