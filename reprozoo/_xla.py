"""Which methods run on XLA devices (TPUs, ``--trainer.accelerator tpu``), and the start-up warning of those that
do not run well there.

XLA traces each step into a graph and compiles it for its static shapes. What breaks that: reading a device value
on the host (``bool(t)``, ``.item()``, ``if t.any():``), which forces the graph to run mid-step; shapes that depend
on the data (boolean-mask indexing); ``float64``, which TPUs emulate slowly; and optimizer steps taken outside the
training loop, which Lightning's XLA strategy does not mark as step boundaries. Nothing here has been run on a TPU.

* XLA-ready (static shapes, no host reads in a step): :class:`~reprozoo.methods.classifier.ClassifierModule`,
  :class:`~reprozoo.methods.engression.EngressionRegressor`, :class:`~reprozoo.methods.distillation.DistillationModule`
  with ``cache_teacher=False``; ``TentModule`` in ``source`` and ``norm`` mode.
* Warned at start-up (:func:`warn_if_xla`, from each module's ``setup``): :class:`~reprozoo.methods.trm.TRMModule`,
  :class:`~reprozoo.methods.nca.NCAModule`, ``DistillationModule(cache_teacher=True)``, ``TentModule(mode="tent")``.
"""

from __future__ import annotations

import lightning as L
from lightning.pytorch.accelerators import XLAAccelerator
from lightning.pytorch.utilities import rank_zero_warn

__all__ = ["attached_trainer", "on_xla", "warn_if_xla"]


def attached_trainer(module: L.LightningModule) -> L.Trainer | None:
    """The Trainer that runs ``module``; None when it is not attached to one (or is run by Fabric)."""
    try:
        trainer = module.trainer  # raises RuntimeError when not attached
    except RuntimeError:
        return None
    return trainer if isinstance(trainer, L.Trainer) else None


def on_xla(trainer) -> bool:
    """Whether ``trainer`` runs on an XLA device (TPU)."""
    return isinstance(getattr(trainer, "accelerator", None), XLAAccelerator)


def warn_if_xla(module, reason: str) -> bool:
    """Warn once (rank zero) that ``module`` is not XLA-ready, and why, when its trainer runs on XLA. Returns
    whether it warned."""
    trainer = attached_trainer(module)
    if trainer is None or not on_xla(trainer):
        return False
    rank_zero_warn(
        f"{type(module).__name__} is not XLA-ready: {reason}. It runs on CPUs and GPUs; on a TPU expect it to "
        "recompile often and run far slower than the same model on a GPU, if it runs at all "
        "(see configs/trainer/tpu.yaml for the methods that are XLA-ready)."
    )
    return True
