"""Random number generator states in checkpoints, so that a resumed run draws what the uninterrupted run drew."""

from __future__ import annotations

import random
from typing import Any

import lightning as L
import numpy as np
import torch
import torch.distributed as dist
from lightning.pytorch.utilities import rank_zero_warn


def _rng_states() -> dict[str, Any]:
    # only tensors and plain Python values: checkpoints load with torch.load(weights_only=True)
    _, key, pos, has_gauss, gauss = np.random.get_state()
    numpy = {
        "key": torch.from_numpy(key.astype(np.int64)),
        "pos": int(pos),
        "has_gauss": int(has_gauss),
        "gauss": float(gauss),
    }
    states = {"python": random.getstate(), "numpy": numpy, "torch": torch.get_rng_state()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        states["cuda"] = torch.cuda.get_rng_state_all()
    return states


def _set_rng_states(states: dict[str, Any]) -> None:
    random.setstate(states["python"])
    numpy = states["numpy"]
    np.random.set_state(
        ("MT19937", numpy["key"].numpy().astype(np.uint32), numpy["pos"], numpy["has_gauss"], numpy["gauss"])
    )
    torch.set_rng_state(states["torch"])
    if "cuda" in states and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(states["cuda"])


class RNGStateCheckpoint(L.Callback):
    """Saves the Python, NumPy, torch and CUDA generator states of every process in each checkpoint and restores
    them when training resumes from it.

    Lightning restores weights, optimisers, schedulers, loops and callback state, but not the global generators:
    a resumed run draws other dropout masks, noise samples or random depths than the run it continues. With this
    callback, a loader that resumes mid-epoch (``reprozoo.datamodules.ResumableDataLoader``) and deterministic
    kernels, training N steps straight and N/2 + resume give identical weights.

    The states are gathered from all ranks (each rank gets its own back); a checkpoint from a run with another number
    of processes gives every rank rank zero's states, with a warning. Restored at ``on_train_start``, after anything
    Lightning runs between loading the checkpoint and the first training batch. Works with any LightningModule.
    """

    def __init__(self) -> None:
        self._pending: list[dict[str, Any]] | None = None

    def state_dict(self) -> dict[str, Any]:
        states = _rng_states()
        if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
            # every rank takes part: Lightning builds the checkpoint dict on all ranks and rank zero writes it
            gathered: list[Any] = [None] * dist.get_world_size()
            dist.all_gather_object(gathered, states)
            return {"ranks": gathered}
        return {"ranks": [states]}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self._pending = list(state_dict.get("ranks", [])) or None

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if self._pending is None:
            return
        ranks, self._pending = self._pending, None
        if len(ranks) != trainer.world_size:
            rank_zero_warn(
                f"RNGStateCheckpoint: the checkpoint holds generator states of {len(ranks)} process(es), this run has "
                f"{trainer.world_size}; every process gets rank zero's, so random draws will differ from the "
                "uninterrupted run"
            )
        _set_rng_states(ranks[trainer.global_rank] if len(ranks) == trainer.world_size else ranks[0])
