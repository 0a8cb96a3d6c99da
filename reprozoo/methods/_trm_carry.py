"""TRM's streaming carry: the official trainer's way to run deep supervision across optimizer steps.

The carry is a fixed number of slots (the batch size), each holding one puzzle in progress: its data, its latents
(y, z) and how many supervision steps it has had. Every optimizer step is one supervision step for every slot;
a slot whose puzzle halted takes, at the next step, the puzzle at the same row of the next loader batch (the rows
of the slots still running are not used, as in the official ``TinyRecursiveReasoningModel_ACTV1.forward``). So the
model sees as many new puzzles per step as puzzles halted the step before, instead of one batch per N_sup steps.

A fresh carry has every slot halted: its first step takes the whole batch.
"""

from __future__ import annotations

import dataclasses

import torch


@dataclasses.dataclass
class Carry:
    """Slots (B of them) of puzzles in progress; ``data`` holds the batch fields (``inputs``, ``labels``, and
    ``puzzle_identifiers`` when the loader gives them)."""

    y: torch.Tensor  # (B, S, D)
    z: torch.Tensor  # (B, S, D)
    steps: torch.Tensor  # (B,) supervision steps taken by the slot's puzzle
    halted: torch.Tensor  # (B,) bool: the puzzle is done, the slot takes a new one at the next step
    data: dict[str, torch.Tensor]  # each (B, ...)

    @property
    def size(self) -> int:
        return self.steps.shape[0]

    @classmethod
    def empty(cls, batch: dict[str, torch.Tensor], y0: torch.Tensor, z0: torch.Tensor) -> Carry:
        b = y0.shape[0]
        return cls(
            y=y0,
            z=z0,
            steps=torch.zeros(b, dtype=torch.long, device=y0.device),
            halted=torch.ones(b, dtype=torch.bool, device=y0.device),  # every slot takes the first batch's puzzle
            data={k: torch.zeros_like(v) for k, v in batch.items()},
        )

    def refill(self, batch: dict[str, torch.Tensor], y0: torch.Tensor, z0: torch.Tensor) -> Carry:
        """The carry for the next step: halted slots restart from (y0, z0) with step 0 and the batch's puzzle at
        their row; the other slots keep their latents, steps and puzzle."""
        new = self.halted
        return Carry(
            y=torch.where(new[:, None, None], y0, self.y),
            z=torch.where(new[:, None, None], z0, self.z),
            steps=torch.where(new, 0, self.steps),
            halted=self.halted,
            data={k: torch.where(new.view(-1, *[1] * (v.ndim - 1)), batch[k], v) for k, v in self.data.items()},
        )

    def state(self) -> dict[str, torch.Tensor]:
        """Flat tensors, for a checkpoint."""
        fields = {"y": self.y, "z": self.z, "steps": self.steps, "halted": self.halted}
        return fields | {f"data.{k}": v for k, v in self.data.items()}

    @classmethod
    def from_state(cls, state: dict[str, torch.Tensor], device: torch.device) -> Carry:
        state = {k: v.to(device) for k, v in state.items()}
        data = {k[len("data.") :]: v for k, v in state.items() if k.startswith("data.")}
        return cls(y=state["y"], z=state["z"], steps=state["steps"], halted=state["halted"].bool(), data=data)

    def fits(self, batch: dict[str, torch.Tensor]) -> bool:
        """Whether ``batch`` can refill this carry: the same fields, with the same shapes, on the same device."""
        return set(batch) == set(self.data) and all(
            batch[k].shape == v.shape and batch[k].device == v.device for k, v in self.data.items()
        )


def halted_after_step(steps: torch.Tensor, q_halt: torch.Tensor, n_sup: int, min_steps: torch.Tensor) -> torch.Tensor:
    """The official halting rule in training: a puzzle stops after N_sup steps, or earlier when its halting logit
    is positive, but never before its exploration minimum (0 for most puzzles). (B,) -> (B,) bool"""
    halted = steps >= n_sup
    if n_sup > 1:
        halted = halted | (q_halt > 0)
    return halted & (steps >= min_steps)
