"""Checks every method shares: a finite training loss, and checkpoints that are complete and of the right class.

* :func:`check_finite_loss` is called by each ``training_step`` on the loss it is about to return (or, with manual
  optimisation, to back-propagate): a NaN or Inf stops training with :class:`FloatingPointError` naming the global
  step, epoch and batch, before a backward pass or optimizer step can use it. The exception leaves Lightning's fit
  loop before ``on_train_batch_end``, so no checkpoint is written for that step.
* :func:`check_checkpoint_file` tells a truncated or damaged checkpoint from a good one (a ``torch.save`` file is a
  zip archive with a CRC-32 per member, which ``torch.load`` itself does not verify).
* :class:`CheckpointGuard`, a mixin of every method's LightningModule, records the writing class in each checkpoint
  (``checkpoint["reprozoo_module"]``) and refuses to load a checkpoint written by another class, naming both.
"""

from __future__ import annotations

import contextvars
import importlib
import os
import sys
import zipfile
import zlib
from pathlib import Path
from typing import Any

import torch

from reprozoo._xla import attached_trainer, on_xla

__all__ = [
    "CheckpointError",
    "CheckpointGuard",
    "check_checkpoint_class",
    "check_checkpoint_file",
    "check_finite_loss",
    "class_path",
    "peek_checkpoint",
]

RECORD_KEY = "reprozoo_module"  # the class path of the module that wrote a checkpoint
_LOADING: contextvars.ContextVar[str | None] = contextvars.ContextVar("reprozoo_loading_checkpoint", default=None)


class CheckpointError(ValueError):
    """A checkpoint file is truncated, damaged, or was written by another module class."""


def class_path(cls: type) -> str:
    return f"{cls.__module__}.{cls.__qualname__}"


# Modules that moved when methods and networks got folders of their own (issue 15). Checkpoints and zoo files written
# before name the old paths; the zoo's files were converted once, and class paths read from a file go through
# current_class_path, so that older files of users still load.
MOVED = {
    "reprozoo.zoo.classifier.": "reprozoo.methods.classifier.",
    "reprozoo.zoo.distillation.": "reprozoo.methods.distillation.",
    "reprozoo.zoo.engression.": "reprozoo.methods.engression.",
    "reprozoo.zoo.nca.": "reprozoo.methods.nca.",
    "reprozoo.zoo.tent.": "reprozoo.methods.tent.",
    "reprozoo.zoo.trm.TRMConfig": "reprozoo.nets.trm.TRMConfig",
    "reprozoo.zoo.trm.TinyRecursiveNetwork": "reprozoo.nets.trm.TinyRecursiveNetwork",
    "reprozoo.zoo.trm.": "reprozoo.methods.trm.",
    "reprozoo.zoo.nets.": "reprozoo.nets.",
    "reprozoo.zoo.networks.": "reprozoo.nets.stochastic_mlp.",
    "reprozoo.zoo.wide_resnet.": "reprozoo.nets.wide_resnet.",
}


def current_class_path(path: str) -> str:
    """``path`` as it is imported today (see :data:`MOVED`)."""
    for old, new in MOVED.items():
        if path.startswith(old):
            return new + path[len(old) :]
    return path


# TRMModule took its network's arguments itself until issue 15; now they are those of its `net`.
_TRM_NET_ARGS = (
    "vocab_size",
    "seq_len",
    "hidden_size",
    "num_layers",
    "expansion",
    "mixer",
    "num_heads",
    "puzzle_emb_len",
    "puzzle_emb_ndim",
    "num_puzzle_identifiers",
)


# Likewise EngressionRegressor's generator (its L1/L2 baselines built it without noise whatever noise_dim said).
_ENGRESSION_NET_ARGS = (
    "in_dim",
    "out_dim",
    "hidden_dim",
    "num_layer",
    "noise_dim",
    "noise_type",
    "noise_scale",
    "noise_every_layer",
    "resblock",
    "batch_norm",
)


def current_hparams(class_path: str, hparams: dict) -> dict:
    """Hyperparameters written before the layout of issue 15, as the classes take them today: class paths made
    current, and the network arguments of a TRMModule or an EngressionRegressor moved into its network's."""
    hparams = current_class_paths(dict(hparams))
    cls = current_class_path(class_path)
    if cls == "reprozoo.methods.trm.TRMModule" and "net" not in hparams:
        init_args = {key: hparams.pop(key) for key in _TRM_NET_ARGS if key in hparams}
        init_args |= {"rope_theta": 10000.0, "norm_eps": 1e-05}  # fixed in TRMModule until then
        hparams["net"] = {"class_path": "reprozoo.nets.TinyRecursiveNetwork", "init_args": init_args}
    if cls == "reprozoo.methods.engression.EngressionRegressor" and "generator" not in hparams:
        init_args = {key: hparams.pop(key) for key in _ENGRESSION_NET_ARGS if key in hparams}
        if hparams.get("loss", "energy") != "energy":
            init_args["noise_dim"] = 0
        init_args.setdefault("noise_every_layer", False)  # the default until issue 18 (now the official True)
        hparams["generator"] = {"class_path": "reprozoo.nets.StochasticMLP", "init_args": init_args}
    return hparams


def current_class_paths(value: Any) -> Any:
    """A copy of hyperparameters (dicts, lists) with every ``class_path`` / ``_class_path`` value made current."""
    if isinstance(value, dict):
        return {
            k: current_class_path(v)
            if k in ("class_path", "_class_path") and isinstance(v, str)
            else current_class_paths(v)
            for k, v in value.items()
        }
    if isinstance(value, (list, tuple)):
        return type(value)(current_class_paths(v) for v in value)
    return value


# ----------------------------------------------------------------------------------------------- finite loss


def check_finite_loss(module, loss: torch.Tensor, batch_idx: int, where: str = "") -> None:
    """FloatingPointError unless ``loss`` is finite (on every process: under DDP all ranks stop together).

    Call it before ``backward`` / returning the loss from ``training_step``. ``where`` adds detail to the message
    (e.g. ``", supervision step 3 of 16"``). It reads one flag on the host per call (a device sync on GPUs); on XLA
    devices it does nothing, since a host read would cut the traced step graph (see :mod:`reprozoo._xla`)."""
    trainer = attached_trainer(module)
    if trainer is not None and on_xla(trainer):
        return
    bad = not bool(torch.isfinite(loss.detach()).all())
    if trainer is not None and trainer.world_size > 1:
        bad = trainer.strategy.reduce_boolean_decision(bad, all=False)  # any rank non-finite: every rank stops
    if not bad:
        return
    value = loss.detach().float().cpu()
    if value.numel() == 1:
        shown = f"{value.item()}"
    else:
        shown = f"{int(value.isnan().sum())} NaN and {int(value.isinf().sum())} Inf values"
    where_here = "" if torch.isfinite(value).all() else f" ({shown} on this process)"
    step, epoch = module.global_step, module.current_epoch
    raise FloatingPointError(
        f"{type(module).__name__}: the training loss is not finite{where_here} at global step {step} "
        f"(epoch {epoch}, batch {batch_idx}{where}). Training stopped before any optimizer step used it: the weights "
        f"are those after step {step} and no checkpoint was written for this batch. Common causes: a learning rate "
        "that is too high, NaN or Inf in the inputs or targets, or a numerically unstable setting; lower the "
        "learning rate, check the data, or try --trainer.gradient_clip_val."
    )


# ----------------------------------------------------------------------------------------------- checkpoint files


def check_checkpoint_file(path: str | os.PathLike) -> None:
    """CheckpointError naming ``path`` unless it is a complete ``torch.save`` archive whose CRCs match (a legacy,
    non-zip torch pickle is let through: it carries no checksums). FileNotFoundError if there is no such file."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint {path} does not exist")
    with open(path, "rb") as fh:
        head = fh.read(4)
    if head[:2] != b"PK":
        if head[:1] == b"\x80":  # a pickle: torch.save(..., _use_new_zipfile_serialization=False)
            return
        what = "is empty" if not head else "does not start like a torch.save file (a zip archive)"
        raise CheckpointError(f"checkpoint {path} {what}: it is not a PyTorch checkpoint and was not loaded")
    try:
        with zipfile.ZipFile(path) as archive:
            names = archive.namelist()
            damaged = archive.testzip()  # reads every member and compares its CRC-32
    except (zipfile.BadZipFile, EOFError, OSError, zlib.error, ValueError) as err:
        raise CheckpointError(
            f"checkpoint {path} is truncated or corrupt ({type(err).__name__}: {err}): not a complete torch.save "
            "archive, so it was not loaded. Was it copied or written only partly (e.g. a run killed while saving)? "
            "Use another checkpoint of the run."
        ) from err
    if damaged is not None:
        raise CheckpointError(
            f"checkpoint {path} is corrupt: the CRC-32 of its member {damaged!r} does not match, so the file changed "
            "after it was written (damaged on disk or in transfer, or edited); it was not loaded"
        )
    if not any(n == "data.pkl" or n.endswith("/data.pkl") for n in names):
        raise CheckpointError(
            f"checkpoint {path} is a zip archive but not a torch.save file (no data.pkl); it was not loaded"
        )


# ----------------------------------------------------------------------------------------------- checkpoint class


def _writer(checkpoint: dict) -> str | None:
    """The class path of the module that wrote ``checkpoint``: our record, else LightningCLI's ``_class_path``."""
    recorded = checkpoint.get(RECORD_KEY)
    if isinstance(recorded, str):
        return current_class_path(recorded)
    hparams = checkpoint.get("hyper_parameters") or {}
    found = hparams.get("_class_path") if hasattr(hparams, "get") else None
    return current_class_path(found) if isinstance(found, str) else None


def _accepts(cls: type, writer: str) -> bool:
    """Whether a module of class ``cls`` may load a checkpoint written by the class ``writer``: the same class
    (under any name it is imported as, or the same name if it has moved since); and for a class defined outside
    reprozoo, also one of its base classes (a user's subclass continuing from our method's checkpoint). Nothing
    is imported: a checkpoint never runs code here."""
    if writer == class_path(cls):
        return True
    module_name, _, name = writer.rpartition(".")
    target = getattr(sys.modules.get(module_name), name, None)
    if isinstance(target, type):
        return target is cls or (issubclass(cls, target) and not cls.__module__.startswith("reprozoo."))
    return name == cls.__qualname__


def _parts(keys) -> list[str]:
    return sorted({k.split(".", 1)[0] for k in keys})


def _mismatch(cls: type, writer: str, source: str) -> CheckpointError:
    return CheckpointError(
        f"{source} was written by {writer}, but {cls.__name__} ({class_path(cls)}) was expected: a checkpoint "
        f"only loads into the method that wrote it. Use that method's config / class, or a checkpoint of "
        f"{cls.__name__}."
    )


def peek_checkpoint(path: str | os.PathLike) -> dict | None:
    """A checkpoint file's dict, read with ``weights_only=True`` (no code runs) and memory-mapped (its tensors stay
    on disk): for its epoch, step and hyperparameters. None when it does not load that way."""
    try:
        checkpoint = torch.load(path, map_location="cpu", mmap=True, weights_only=True)
    except Exception:  # noqa: BLE001 - e.g. objects outside the weights_only allowlist, a legacy pickle
        return None
    return checkpoint if isinstance(checkpoint, dict) else None


def check_checkpoint_class(path: str | os.PathLike, expected: type | str) -> None:
    """CheckpointError if the checkpoint file ``path`` names its writer and that is not ``expected`` (a class or
    its class path, e.g. the ``model.class_path`` of a CLI config); nothing is said when it names none."""
    if isinstance(expected, str):
        module_name, _, name = expected.rpartition(".")
        try:
            expected = getattr(importlib.import_module(module_name), name)
        except (ImportError, AttributeError, ValueError):
            return  # not ours to judge: instantiating the config reports it
    checkpoint = peek_checkpoint(path)
    writer = _writer(checkpoint) if checkpoint is not None else None
    if writer is not None and not _accepts(expected, writer):
        raise _mismatch(expected, writer, f"checkpoint {path}")
    hparams = (checkpoint or {}).get("hyper_parameters")
    if writer is not None and isinstance(hparams, dict) and current_hparams(writer, hparams) != hparams:
        raise CheckpointError(
            f"checkpoint {path} was written before reprozoo moved its methods and networks into folders of their "
            f"own (see CHANGELOG.md); convert it once with `python cli.py zoo upgrade {path}`"
        )


class CheckpointGuard:
    """Mixin for a LightningModule (put it before ``L.LightningModule``): checkpoints name their writer's class,
    and a checkpoint of another class is refused with a :class:`CheckpointError` naming both, in
    ``load_from_checkpoint`` and in ``trainer.fit/validate/test/predict(ckpt_path=...)``.

    Checkpoints without the record (older ones, or written by plain Lightning) are recognised by LightningCLI's
    ``_class_path``, else compared by the top-level parts of their ``state_dict``. Subclasses that override
    ``on_save_checkpoint`` / ``on_load_checkpoint`` must call ``super()``."""

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        checkpoint[RECORD_KEY] = class_path(type(self))
        super().on_save_checkpoint(checkpoint)

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        cls = type(self)
        writer = _writer(checkpoint)
        path = _LOADING.get() or getattr(attached_trainer(self), "ckpt_path", None)  # the trainer's restore
        source = f"checkpoint {path}" if path else "the checkpoint"
        if writer is not None:
            if not _accepts(cls, writer):
                raise _mismatch(cls, writer, source)
        elif self.strict_loading and "state_dict" in checkpoint:
            got, want = _parts(checkpoint["state_dict"]), _parts(self.state_dict())
            if got != want:
                raise CheckpointError(
                    f"{source} does not name the class that wrote it, and its weights do not fit {cls.__name__}: "
                    f"they have the parts {got}, {cls.__name__} has {want}. It was probably written by another method "
                    "(or another architecture); load it with the class that wrote it."
                )
        super().on_load_checkpoint(checkpoint)

    @classmethod
    def load_from_checkpoint(cls, checkpoint_path, *args, **kwargs):
        """Lightning's ``load_from_checkpoint``, after checking that a local file is complete
        (:func:`check_checkpoint_file`); a checkpoint of another class fails with a :class:`CheckpointError`
        naming the class that wrote it and ``cls``."""
        local = isinstance(checkpoint_path, (str, os.PathLike)) and Path(checkpoint_path).is_file()
        if local:
            check_checkpoint_file(checkpoint_path)
            # Before cls is built from another class's hyperparameters (which fails in unrelated ways, or builds
            # a default model of the wrong kind first).
            check_checkpoint_class(checkpoint_path, cls)
        token = _LOADING.set(str(checkpoint_path) if local else None)
        try:
            return super().load_from_checkpoint(checkpoint_path, *args, **kwargs)
        finally:
            _LOADING.reset(token)
