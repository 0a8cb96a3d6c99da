"""Tiny Recursive Models (TRM): recursive reasoning with a 2-layer network and deep supervision.

Jolicoeur-Martineau, "Less is More: Recursive Reasoning with Tiny Networks" (2025), and the official code
(SamsungSAILMontreal/TinyRecursiveModels), sudoku MLP variant.

One network f (2 blocks) is applied recursively to an answer embedding y and a latent z, both (B, P + L, D):

    latent recursion:  n times  z = f(z, y + x);  then  y = f(y, z)
    deep recursion:    T - 1 latent recursions without gradient, then one with gradient
    deep supervision:  up to N_sup deep recursions per puzzle, each followed by a loss and an optimizer step,
                       (y, z) carried over detached; a learned halting head on y decides when to stop.

Training streams puzzles through a carry, as the official trainer: every optimizer step is one supervision step
for each of the B slots, and a slot whose puzzle halted takes a new puzzle from the next batch
(``training_loop="carry"``, see :mod:`reprozoo.methods._trm_carry`). ``training_loop="whole_batch"`` is the
paper's pseudo-code instead: a batch runs all its supervision steps before the next batch is taken.

Names follow the paper (y, z, n, T, N_sup); the official code calls them z_H, z_L, L_cycles, H_cycles,
halt_max_steps. Deviations from the official code, all documented where they occur:
  * The optimizer is AdamW by default (``optimizer="adam_atan2"``: the official AdamATan2 for the weights and
    sign-SGD for the puzzle embedding, as ``configs/trm/sudoku_extreme.yaml`` trains); the same betas, weight decay
    and warmup.
  * The puzzle-identifier embedding is a dense ``nn.Embedding`` (own learning rate and weight decay) instead of the
    official sparse one; its sign-SGD updates the rows the batch used. For sudoku there is a single identifier.
  * Computation in the trainer's precision (fp32 by default; ``--trainer.precision bf16-mixed`` on GPUs)
    instead of a hard-wired bfloat16 forward.
  * The carry is part of the checkpoint (the official trainer saves only the weights), so a resumed run continues
    the puzzles in progress; a batch of another size than the carry (the short last batch of a loader that keeps
    it) starts a fresh carry.

Distributed and XLA: under DDP each process has its own carry, filled from its own share of the batches
(``training_loop="whole_batch"``: every process takes the same number of supervision steps per batch, halting is
decided over all processes); evaluation scores are torchmetrics. Not XLA-ready: the training step reads a device
value on the host (the finite-loss check, the halted count) and the loss is computed in float64; the module warns
at start-up on XLA.
"""

from __future__ import annotations

import numbers
import warnings
from collections import Counter
from collections.abc import Sequence
from typing import Literal

import lightning as L
import torch
import torch.nn.functional as F
from lightning.pytorch.utilities import rank_zero_info
from torch import nn
from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn
from torchmetrics import MeanMetric

from reprozoo._checks import CheckpointGuard, check_finite_loss
from reprozoo._xla import attached_trainer, warn_if_xla
from reprozoo.methods._trm_carry import Carry, halted_after_step
from reprozoo.nets import TinyRecursiveNetwork, net_from, net_record
from reprozoo.optim import AdamATan2SignSGD
from reprozoo.sudoku import answer_problem, consistent, count_solutions, decode, encode, grid_problem, is_valid_solution
from reprozoo.zoo.registry import load_pretrained_into

__all__ = ["TRMModule", "UnsolvedPuzzlesError", "stablemax_cross_entropy"]


# ----------------------------------------------------------------------------------------------------- losses


def stablemax_cross_entropy(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Per-token cross-entropy with stablemax, s(x) = x + 1 for x >= 0 and 1 / (1 - x) below, in float64
    (the official choice against softmax's numerical collapse on small data). (..., V), (...) -> (...)"""
    x = logits.double()
    s = torch.where(x < 0, 1 / (1 - x + 1e-30), x + 1)
    log_probs = torch.log(s / s.sum(-1, keepdim=True))
    return -log_probs.gather(-1, labels.long().unsqueeze(-1)).squeeze(-1)


def _softmax_cross_entropy(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(logits.float().flatten(0, -2), labels.long().flatten(), reduction="none").view(labels.shape)


# ----------------------------------------------------------------------------------------------------- module


class TRMModule(CheckpointGuard, L.LightningModule):
    """TRM with deep supervision, EMA and halting, for puzzles given as token sequences.

    Batches are dicts ``{"inputs": (B, L), "labels": (B, L), "puzzle_identifiers": (B,)}`` (tokens: 0 pad, 1 blank,
    2.. values), as :class:`~reprozoo.datamodules.SudokuExtremeDataModule` yields them.

    Args (network): ``net``, a :class:`~reprozoo.nets.TinyRecursiveNetwork` (in a config: ``class_path:
        reprozoo.nets.TinyRecursiveNetwork`` plus ``init_args``); default: the official sudoku MLP model, 5,028,866
        trainable parameters without the puzzle-identifier embedding. The network's arguments are recorded in the
        hyperparameters, so ``load_from_checkpoint(path)`` rebuilds it however it was given.
    Args (recursion): ``n`` latent updates per recursion (official L_cycles = 6), ``T`` recursions per step
        (H_cycles = 3), ``n_sup`` supervision steps (halt_max_steps = 16); ``n_sup_eval`` (default ``n_sup``) steps
        at evaluation, which always runs them all; ``halt_exploration_prob`` = 0.1: with this probability a sample
        draws a minimum number of steps uniformly from 2..N_sup before it may halt (drawn at every step).
    Args (training loop): ``training_loop="carry"`` (default, the official trainer): one supervision step per
        optimizer step for every slot of a carry of B puzzles in progress; halted slots take the puzzle at their
        row of the next batch, the rows of running slots are skipped. An epoch is one pass of the loader, one
        optimizer step per batch; the carry runs on across epochs, and the puzzles still in progress when
        training stops are dropped. ``"whole_batch"``: the paper's pseudo-code, each batch runs until all its
        puzzles halted (up to N_sup optimizer steps per batch).
    Args (beyond the paper):
        randomize_depth: draw n, T and N_sup per batch from uniforms centred on the defaults (path independence).
        curriculum: (n, T) pairs applied over equal parts of training, e.g. ``[[2, 1], [4, 2], [6, 3]]``.
        eval_k: best-of-k at evaluation, from k latent initialisations (the fixed one and k - 1 random ones);
            ``eval_select``: ``confidence`` (highest halting probability) or ``vote`` (puzzle-wise majority vote over
            the k answers, ties broken by confidence).
        log_alignment: log the Asymptotic Alignment Score at validation: a second run of ``n_sup_eval`` steps from
            the first run's final (y, z); cosine similarity of the final y's and agreement of the predictions.
        compile: ``torch.compile`` the network for training (``nn.Module.compile``, in place). On a GPU it pays
            after the first minute or so of compiling; the official trainer compiles too. Evaluation runs the EMA
            copy uncompiled.
    Args (optimisation): ``optimizer="adamw"``: AdamW(lr, betas, weight_decay) for everything, with a separate
        ``puzzle_emb_lr`` / ``puzzle_emb_weight_decay`` group for the puzzle embedding; ``"adam_atan2"``: the
        official pair as one optimizer (:class:`~reprozoo.optim.AdamATan2SignSGD`, so that Lightning counts one
        optimizer step per step): AdamATan2 (lr, betas, weight_decay) for the weights and sign-SGD (puzzle_emb_lr,
        puzzle_emb_weight_decay) for the puzzle embedding. Both with
        linear warmup over ``warmup_steps`` optimizer steps; ``ema_decay`` (0.999;
        0 disables) for the weights used in evaluation, ``solve`` and zoo export. The official sudoku recipe:
        lr 1e-4, weight decay 1.0, betas (0.9, 0.95), warmup 2000, batch 768.
    """

    def __init__(
        self,
        net: TinyRecursiveNetwork | None = None,
        *,
        n: int = 6,
        T: int = 3,
        n_sup: int = 16,
        n_sup_eval: int | None = None,
        halt_exploration_prob: float = 0.1,
        training_loop: Literal["carry", "whole_batch"] = "carry",
        loss: Literal["stablemax", "softmax"] = "stablemax",
        halt_loss_weight: float = 0.5,
        optimizer: Literal["adamw", "adam_atan2"] = "adamw",
        lr: float = 1e-4,
        puzzle_emb_lr: float = 1e-4,
        weight_decay: float = 1.0,
        puzzle_emb_weight_decay: float = 1.0,
        betas: tuple[float, float] = (0.9, 0.95),
        warmup_steps: int = 2000,
        ema_decay: float = 0.999,
        randomize_depth: bool = False,
        curriculum: list[tuple[int, int]] | None = None,
        eval_k: int = 1,
        eval_select: Literal["confidence", "vote"] = "confidence",
        log_alignment: bool = False,
        compile: bool = False,
        weights: str | None = None,
    ):
        super().__init__()
        for field, value in {"n": n, "T": T, "n_sup": n_sup, "eval_k": eval_k}.items():
            if value < 1:
                raise ValueError(f"TRMModule: {field} must be >= 1, got {value}")
        for field, value in {"lr": lr, "puzzle_emb_lr": puzzle_emb_lr}.items():
            if not value > 0:
                raise ValueError(f"TRMModule: {field} must be > 0, got {value}")
        for field, value in {
            "weight_decay": weight_decay,
            "puzzle_emb_weight_decay": puzzle_emb_weight_decay,
            "warmup_steps": warmup_steps,
            "halt_loss_weight": halt_loss_weight,
        }.items():
            if not value >= 0:
                raise ValueError(f"TRMModule: {field} must be >= 0, got {value}")
        for field, value, choices in (
            ("loss", loss, ("stablemax", "softmax")),
            ("eval_select", eval_select, ("confidence", "vote")),
            ("optimizer", optimizer, ("adamw", "adam_atan2")),
            ("training_loop", training_loop, ("carry", "whole_batch")),
        ):
            if value not in choices:
                raise ValueError(f"TRMModule: {field} must be one of {', '.join(choices)}, got {value!r}")
        if len(betas) != 2 or not all(0 <= b < 1 for b in betas):
            raise ValueError(f"TRMModule: betas must be two numbers in [0, 1), got {betas}")
        if n_sup_eval is not None and n_sup_eval < 1:
            raise ValueError(f"TRMModule: n_sup_eval must be >= 1, got {n_sup_eval}")
        if not 0 <= ema_decay < 1:
            raise ValueError(f"TRMModule: ema_decay must be in [0, 1), got {ema_decay}")
        if not 0 <= halt_exploration_prob <= 1:
            raise ValueError(f"TRMModule: halt_exploration_prob must be in [0, 1], got {halt_exploration_prob}")
        if curriculum is not None and any(len(stage) != 2 or min(stage) < 1 for stage in curriculum):
            raise ValueError(f"TRMModule: curriculum must be a list of (n, T) pairs >= 1, got {curriculum}")
        net = net_from(net, TinyRecursiveNetwork, "TRMModule", "net")
        # The network's arguments go into the hyperparameters however it was given, so that a checkpoint rebuilds it.
        self.save_hyperparameters(ignore=["net"])
        self.hparams["net"] = net_record(net)
        self.automatic_optimization = False  # one optimizer step per supervision step

        self.cfg = net.cfg
        self.net = net
        self.ema = (
            AveragedModel(self.net, multi_avg_fn=get_ema_multi_avg_fn(ema_decay), use_buffers=True)
            if ema_decay > 0
            else None
        )
        if self.ema is not None:
            # Updated by averaging, never by gradients: without this DDP counts its copy as unused parameters.
            self.ema.requires_grad_(False)
        self.loss_fn = stablemax_cross_entropy if loss == "stablemax" else _softmax_cross_entropy
        # Training randomness (exploration, depth draws) has its own generator, saved in checkpoints, so that a
        # resumed run draws exactly what an uninterrupted one would.
        self._rng = torch.Generator().manual_seed(int(torch.randint(2**62, ())))  # follows seed_everything
        self._carry: Carry | None = None  # the streaming carry (training_loop="carry"), saved in checkpoints
        self._pending_carry: dict | None = None  # a checkpoint's carry, taken up when training starts
        self.val_scores = _PuzzleScores()
        self.test_scores = _PuzzleScores()
        if weights:
            load_pretrained_into(self, weights)

    # ------------------------------------------------------------------------------------------ helpers

    @property
    def eval_net(self) -> TinyRecursiveNetwork:
        """The weights used for evaluation and solving: the EMA copy when there is one."""
        return self.ema.module if self.ema is not None else self.net

    def num_trainable_parameters(self, include_puzzle_emb: bool = False) -> int:
        return sum(
            p.numel()
            for name, p in self.net.named_parameters()
            if p.requires_grad and (include_puzzle_emb or not name.startswith("puzzle_emb."))
        )

    def _depth(self) -> tuple[int, int, int]:
        """(n, T, N_sup) for this training batch."""
        hp = self.hparams
        n, T, n_sup = hp.n, hp.T, hp.n_sup
        if hp.curriculum:
            stage = min(int(self._progress() * len(hp.curriculum)), len(hp.curriculum) - 1)
            n, T = hp.curriculum[stage]
        if hp.randomize_depth:
            n, T, n_sup = self._draw(n, 2), self._draw(T, 1), self._draw(n_sup, max(1, n_sup // 4))
        return n, T, n_sup

    def _draw(self, centre: int, spread: int) -> int:
        return int(torch.randint(max(1, centre - spread), centre + spread + 1, (), generator=self._rng))

    def _progress(self) -> float:
        trainer = self.trainer
        if trainer.max_epochs and trainer.max_epochs > 0:
            return trainer.current_epoch / trainer.max_epochs
        if trainer.max_steps and trainer.max_steps > 0:
            return trainer.global_step / trainer.max_steps
        return 0.0

    @staticmethod
    def _unpack(batch: dict) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
        return batch["inputs"], batch.get("labels"), batch.get("puzzle_identifiers")

    # ------------------------------------------------------------------------------------------ training

    def setup(self, stage: str) -> None:
        if stage == "fit" and self.hparams.compile:
            self.net.compile()  # in place: the state dict keeps its names (no `_orig_mod.`)
        if stage == "fit":
            # With `--checkpoint.every_n_train_steps N` Lightning prints, at every save, 15 lines on keeping a copy of
            # the weights from before optimizer.step() under manual optimisation. TRM steps by hand by design (once
            # per batch with the carry, up to N_sup times with whole_batch), and the state after the batch is
            # exactly the one to resume from: nothing to act on.
            warnings.filterwarnings(
                "ignore",
                message="Using ModelCheckpoint with manual optimization and every_n_train_steps",
                category=UserWarning,
                module=r"lightning\.pytorch\.callbacks\.model_checkpoint",
            )
        warn_if_xla(
            self,
            "the training step reads device values on the host (the finite-loss check, how many puzzles "
            "halted; whole_batch: whether any sample is still active), takes its optimizer steps by hand, "
            "and computes the stablemax loss in float64",
        )

    def _min_steps(self, b: int, n_sup: int, like: torch.Tensor) -> torch.Tensor:
        explore = torch.rand(b, generator=self._rng) < self.hparams.halt_exploration_prob
        drawn = (
            torch.randint(2, n_sup + 1, (b,), generator=self._rng) if n_sup >= 2 else torch.ones(b, dtype=torch.long)
        )
        return torch.where(explore, drawn, 0).to(like.device)  # (B,)

    def training_step(self, batch: dict, batch_idx: int) -> None:
        if self.hparams.training_loop == "carry":
            self._carry_step(batch, batch_idx)
        else:
            self._whole_batch_step(batch, batch_idx)

    def _supervise(self, inputs, labels, ids, y, z, n: int, T: int, weight, batch_idx: int, where: str):
        """One supervision step and its optimizer step: the loss of the slots with ``weight`` 1 (pad positions
        excluded), normalised by the batch size as the official 1 / global_batch_size. Returns the new (y, z),
        the logits, the halting logit, and per sample the LM loss, the halting loss and whether it is solved."""
        optimizers, schedulers = _as_list(self.optimizers()), _as_list(self.lr_schedulers())
        mask = labels > 0  # pad (0) positions do not count
        x = self.net.embed(inputs, ids)
        (y, z), logits, q_halt = self.net(x, y, z, n, T)
        lm_loss = (self.loss_fn(logits, labels) * mask).sum(-1) / mask.sum(-1).clamp_min(1)  # (B,)
        with torch.no_grad():
            correct = ((logits.argmax(-1) == labels) | ~mask).all(-1)  # whole puzzle right
        halt_loss = F.binary_cross_entropy_with_logits(q_halt, correct.float(), reduction="none")
        weight = weight.to(lm_loss.dtype)
        loss = ((lm_loss + self.hparams.halt_loss_weight * halt_loss) * weight).sum() / inputs.shape[0]
        check_finite_loss(self, loss, batch_idx, where)
        for optimizer in optimizers:
            optimizer.zero_grad(set_to_none=True)
        self.manual_backward(loss)
        for optimizer, scheduler in zip(optimizers, schedulers):
            optimizer.step()
            scheduler.step()
        if self.ema is not None:
            self.ema.update_parameters(self.net)
        self.log("train/lr", schedulers[0].get_last_lr()[0], batch_size=inputs.shape[0])
        return y, z, q_halt.detach(), lm_loss.detach(), halt_loss.detach(), correct

    def _carry_step(self, batch: dict, batch_idx: int) -> None:
        """The official streaming loop: one supervision step for every slot of the carry, after the slots whose
        puzzle halted took the puzzle at their row of ``batch`` (see :mod:`reprozoo.methods._trm_carry`)."""
        n, T, n_sup = self._depth()
        fields = {k: v for k, v in batch.items() if k in ("inputs", "labels", "puzzle_identifiers")}
        y0, z0 = self.net.initial_state(fields["inputs"].shape[0])
        if self._carry is None or not self._carry.fits(fields):
            # First step, or a batch of another size (the short last batch of a loader that keeps it): a fresh
            # carry, the puzzles in progress are dropped.
            self._carry = Carry.empty(fields, y0, z0)
        carry = self._carry.refill(fields, y0, z0)
        new_puzzles = carry.halted.float().mean()
        data = carry.data
        b = carry.size
        y, z, q_halt, lm_loss, halt_loss, correct = self._supervise(
            data["inputs"],
            data["labels"],
            data.get("puzzle_identifiers"),
            carry.y,
            carry.z,
            n,
            T,
            torch.ones_like(carry.halted),
            batch_idx,
            "",
        )
        steps = carry.steps + 1
        halted = halted_after_step(steps, q_halt, n_sup, self._min_steps(b, n_sup, steps))
        self._carry = Carry(y=y, z=z, steps=steps, halted=halted, data=data)
        self.log("train/loss", lm_loss.mean().float(), prog_bar=True, batch_size=b)
        self.log_dict(
            {
                "train/lm_loss": lm_loss.mean().float(),
                "train/halt_loss": halt_loss.mean().float(),
                "train/new_puzzles": new_puzzles,  # fraction of the slots given a new puzzle at this step
            },
            batch_size=b,
        )
        finished = int(halted.sum())
        if finished:  # the official train metrics: over the puzzles that halted at this step
            self.log_dict(
                {
                    "train/exact_acc": (correct & halted).sum() / finished,
                    "train/sup_steps": (steps * halted).sum() / finished,
                },
                batch_size=finished,
            )

    def _whole_batch_step(self, batch: dict, batch_idx: int) -> None:
        """The paper's pseudo-code: every sample of the batch runs until it halts, then the next batch comes."""
        inputs, labels, ids = self._unpack(batch)
        b = inputs.shape[0]
        n, T, n_sup = self._depth()
        y, z = self.net.initial_state(b)
        # The whole batch goes through every step (static shapes, as the official fixed-size batch); halted
        # samples just stop contributing to the loss. The loop ends when no sample is active on any process, so
        # that all DDP ranks take the same number of optimizer steps.
        active = torch.ones(b, dtype=torch.bool, device=inputs.device)
        steps_used = torch.full((b,), n_sup, device=inputs.device)
        lm_total = halt_total = 0.0
        first_correct = None
        for step in range(1, n_sup + 1):
            y, z, q_halt, lm_loss, halt_loss, correct = self._supervise(
                inputs, labels, ids, y, z, n, T, active, batch_idx, f", supervision step {step} of {n_sup}"
            )
            lm_total += (lm_loss * active).sum()
            halt_total += (halt_loss * active).sum()
            if first_correct is None:
                first_correct = correct.float().mean()
            step_count = torch.full_like(steps_used, step)
            halted = active & halted_after_step(step_count, q_halt, n_sup, self._min_steps(b, n_sup, inputs))
            steps_used[halted] = step
            active &= ~halted
            if not self._anyone_active(active):
                break
        self.log_dict(
            {
                "train/lm_loss": (lm_total / steps_used.sum()).float(),
                "train/halt_loss": (halt_total / steps_used.sum()).float(),
                "train/sup_steps": steps_used.float().mean(),
                "train/exact_acc_step1": first_correct,
            },
            batch_size=b,
        )
        self.log("train/loss", (lm_total / steps_used.sum()).float(), prog_bar=True, batch_size=b)

    def _anyone_active(self, active: torch.Tensor) -> bool:
        count = active.sum()
        if self.trainer.world_size > 1:
            count = self.trainer.strategy.reduce(count, reduce_op="sum")
        return bool(count > 0)

    def on_train_start(self) -> None:
        pending, self._pending_carry = self._pending_carry, None
        if pending is None or self.hparams.training_loop != "carry":
            return
        world, rank = self.trainer.world_size, self.trainer.global_rank
        saved = int(pending["world_size"])
        if saved != world:
            rank_zero_info(
                f"TRMModule: the checkpoint's carry is of {saved} process(es), this run has {world}: the puzzles in "
                "progress are dropped and a fresh carry starts (resume with the same number of devices to keep them)"
            )
            return
        self._carry = Carry.from_state({k: v[rank] for k, v in pending["slots"].items()}, self.device)

    def on_save_checkpoint(self, checkpoint: dict) -> None:
        checkpoint["trm_rng_state"] = self._rng.get_state()
        if self._carry is not None:
            # Every process has its own carry: all of them go into the checkpoint, (world_size, B, ...) each, so
            # that a resumed run continues each rank's puzzles where they were. Under DDP this hook runs on every
            # rank (Lightning's save_checkpoint), so the gather is collective.
            trainer = attached_trainer(self)
            world = trainer.world_size if trainer is not None else 1
            slots = self._carry.state()
            if world > 1:
                slots = {k: self.all_gather(v.contiguous()) for k, v in slots.items()}
            else:
                slots = {k: v.unsqueeze(0) for k, v in slots.items()}
            checkpoint["trm_carry"] = {"world_size": world, "slots": {k: v.cpu() for k, v in slots.items()}}
        super().on_save_checkpoint(checkpoint)

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        super().on_load_checkpoint(checkpoint)  # refuses another method's checkpoint first
        if "trm_rng_state" in checkpoint:
            self._rng.set_state(checkpoint["trm_rng_state"])
        self._pending_carry = checkpoint.get("trm_carry")

    def zoo_state_dict(self) -> dict[str, torch.Tensor]:
        """What a zoo file holds: the evaluation (EMA) weights of the network, under ``net.``; half the size of
        the full state, and what the official code evaluates and saves too."""
        return {f"net.{k}": v for k, v in self.eval_net.state_dict().items()}

    def load_zoo_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        """Load a zoo file into the network and its EMA copy (fine-tuning then starts from the EMA weights)."""
        unexpected = [k for k in state if not k.startswith("net.")]
        if unexpected:
            raise RuntimeError(f"unexpected keys in a TRM zoo state: {unexpected[:5]}")
        net_state = {k[len("net.") :]: v for k, v in state.items()}
        self.net.load_state_dict(net_state, strict=True)
        if self.ema is not None:
            self.ema.module.load_state_dict(net_state, strict=True)

    # ------------------------------------------------------------------------------------------ inference

    @torch.no_grad()
    def _run(self, net, inputs, ids, n_sup: int, y=None, z=None):
        """Full-depth inference: all n_sup steps, no halting. Returns final (y, z), logits and halting logit."""
        x = net.embed(inputs, ids)
        if y is None:
            y, z = net.initial_state(inputs.shape[0])
        for _ in range(n_sup):
            (y, z), logits, q_halt = net(x, y, z, self.hparams.n, self.hparams.T)
        return y, z, logits, q_halt

    @torch.no_grad()
    def predict_tokens(
        self, inputs: torch.Tensor, ids: torch.Tensor | None = None, n_sup: int | None = None, k: int | None = None
    ):
        """Predicted tokens (B, L) and halting confidence (B,), with the EMA weights, best-of-k if k > 1."""
        net, n_sup = self.eval_net, n_sup or self.hparams.n_sup_eval or self.hparams.n_sup
        k = k or self.hparams.eval_k
        candidates, confidences = [], []
        gen = torch.Generator(device=inputs.device).manual_seed(0)  # reproducible best-of-k
        for i in range(k):
            y0, z0 = net.initial_state(inputs.shape[0], generator=gen, random=i > 0)
            _, _, logits, q_halt = self._run(net, inputs, ids, n_sup, y0, z0)
            candidates.append(logits.argmax(-1))
            confidences.append(torch.sigmoid(q_halt))
        if k == 1:
            return candidates[0], confidences[0]
        cand, conf = torch.stack(candidates, 1), torch.stack(confidences, 1)  # (B, k, L), (B, k)
        if self.hparams.eval_select == "confidence":
            best = conf.argmax(1)
        else:
            best = torch.tensor([_vote(cand[i], conf[i]) for i in range(cand.shape[0])], device=cand.device)
        rows = torch.arange(cand.shape[0], device=cand.device)
        return cand[rows, best], conf[rows, best]

    def _evaluate(self, batch: dict, scores: _PuzzleScores, prefix: str) -> None:
        inputs, labels, ids = self._unpack(batch)
        n_sup = self.hparams.n_sup_eval or self.hparams.n_sup
        if self.hparams.eval_k == 1:
            y, z, logits, q_halt = self._run(self.eval_net, inputs, ids, n_sup)
            pred, confidence = logits.argmax(-1), torch.sigmoid(q_halt)
        else:
            pred, confidence = self.predict_tokens(inputs, ids, n_sup)
        mask = labels > 0
        exact = ((pred == labels) | ~mask).all(-1).float()
        scores.exact.update(exact)
        scores.cell.update(((pred == labels) & mask).sum(-1) / mask.sum(-1).clamp_min(1))
        scores.halt.update(((confidence > 0.5).float() == exact).float())
        logged = {
            f"{prefix}/exact_acc": scores.exact,
            f"{prefix}/cell_acc": scores.cell,
            f"{prefix}/halt_acc": scores.halt,
        }
        if self.hparams.log_alignment and self.hparams.eval_k == 1:
            y2, _, logits2, _ = self._run(self.eval_net, inputs, ids, n_sup, y, z)
            scores.align_cos.update(F.cosine_similarity(y.flatten(1), y2.flatten(1), dim=1))
            scores.align_pred.update((logits2.argmax(-1) == pred).float().mean(-1))
            logged |= {f"{prefix}/aas_latent_cos": scores.align_cos, f"{prefix}/aas_pred_agree": scores.align_pred}
        self.log(f"{prefix}/exact_acc", logged.pop(f"{prefix}/exact_acc"), prog_bar=True, batch_size=len(inputs))
        self.log_dict(logged, batch_size=len(inputs))

    def validation_step(self, batch: dict, batch_idx: int) -> None:
        self._evaluate(batch, self.val_scores, "val")

    def test_step(self, batch: dict, batch_idx: int) -> None:
        self._evaluate(batch, self.test_scores, "test")

    def predict_step(self, batch: dict, batch_idx: int, dataloader_idx: int = 0) -> dict:
        inputs, _, ids = self._unpack(batch)
        pred, confidence = self.predict_tokens(inputs, ids)
        pred = self._complete(inputs, pred)
        questions = [decode(row) for row in inputs.cpu()]
        solutions = [decode(row) for row in pred.cpu()]
        valid = [is_valid_solution(s) and consistent(q, s) for q, s in zip(questions, solutions)]
        return {"question": questions, "solution": solutions, "valid": valid, "confidence": confidence.cpu().tolist()}

    def _complete(self, inputs: torch.Tensor, pred: torch.Tensor) -> torch.Tensor:
        """A full grid: the givens as given, every other cell the predicted digit (never pad or blank)."""
        return torch.where(inputs > 1, inputs, pred.clamp(2, self.cfg.vocab_size - 1))

    @torch.no_grad()
    def solve(
        self,
        puzzles: Sequence[str],
        n_sup: int | None = None,
        k: int = 1,
        batch_size: int = 256,
        *,
        strict: bool = True,
    ) -> list[str]:
        """Solve sudoku puzzles with the EMA weights: one 81-digit answer string per puzzle, in order, givens kept.

        Puzzles are 81-character strings in row-major order, ``.`` or ``0`` for a blank, ``1``-``9`` for a given.
        All of them are checked before the model runs; the first bad one raises ``ValueError("puzzle 3: ...")``
        naming its index and the problem: a wrong length, a character other than ``.``, ``0``, ``1``-``9``, givens
        that contradict each other (a digit twice in a row, column or box), or no givens at all (a blank grid is
        refused: any valid grid would answer it, so it is almost always a mistake, e.g. an empty or wrong column).
        A list (or any iterable) of strings is expected: a single string, or an item that is no string, raises
        ``TypeError`` (``solve([puzzle])``).

        The model can be wrong. With ``strict=True`` (default), if an answer is not a valid sudoku consistent with
        its givens, :class:`UnsolvedPuzzlesError` (a ``ValueError``) names the first such puzzle, why (e.g.
        ``"puzzle 3: the model's answer is not a valid sudoku (row 2 has two 5s)"``, or that the puzzle itself
        has no solution) and how many failed; it carries every answer (``.answers``) and the problem of each
        failed puzzle by index (``.problems``), so a large batch is not lost. ``strict=False`` returns the answers
        as they are: a wrong one is still a full grid, which
        :func:`~reprozoo.sudoku.answer_problem` explains.

        ``n_sup``: supervision steps (default ``n_sup_eval``); ``k``: best-of-k (see :meth:`predict_tokens`);
        ``batch_size``: puzzles per forward pass.
        """
        puzzles = self._check_puzzles(puzzles)
        for field, value in {"k": k, "batch_size": batch_size, "n_sup": 1 if n_sup is None else n_sup}.items():
            if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < 1:
                raise ValueError(f"TRMModule.solve: {field} must be an integer >= 1, got {value!r}")
        was_training = self.training
        self.eval()
        answers: list[str] = []
        try:
            for start in range(0, len(puzzles), batch_size):
                inputs = torch.stack([encode(p) for p in puzzles[start : start + batch_size]]).to(self.device)
                pred, _ = self.predict_tokens(inputs, None, n_sup, k)
                answers += [decode(row) for row in self._complete(inputs, pred).cpu()]
        finally:
            self.train(was_training)
        if not strict:
            return answers
        problems = {}
        for i, (puzzle, answer) in enumerate(zip(puzzles, answers)):
            problem = answer_problem(puzzle, answer)
            if problem is not None:
                # Tell a puzzle without any solution (no clash among the givens, but nothing fits them) from a
                # model error; the search runs only for failed puzzles.
                unsolvable = count_solutions(puzzle, limit=1) == 0
                problems[i] = (
                    "the puzzle has no solution (no valid grid fits its givens)"
                    if unsolvable
                    else f"the model's answer {problem}"
                )
        if problems:
            first = next(iter(problems))
            shown = ", ".join(map(str, list(problems)[:10])) + (", ..." if len(problems) > 10 else "")
            raise UnsolvedPuzzlesError(
                f"puzzle {first}: {problems[first]}; {len(problems)} of {len(puzzles)} puzzles not solved "
                f"(index {shown}). The exception's .answers holds every answer and .problems the reasons; "
                "solve(..., strict=False) returns the answers without raising",
                answers=answers,
                problems=problems,
            )
        return answers

    @staticmethod
    def _check_puzzles(puzzles: Sequence[str]) -> list[str]:
        """``puzzles`` as a list (read once: a generator works too), each an 81-character sudoku question with at
        least one given and no two equal givens in a row, column or box; else an error naming the first bad one."""
        if isinstance(puzzles, (str, bytes)):
            raise TypeError("TRMModule.solve takes a list of puzzle strings, got a single string: use solve([puzzle])")
        puzzles = list(puzzles)
        for i, puzzle in enumerate(puzzles):
            if not isinstance(puzzle, str):
                raise TypeError(f"puzzle {i} is a {type(puzzle).__name__}, not an 81-character sudoku string")
            problem = grid_problem(puzzle)
            if problem is not None:
                # Right length and characters: what is left is a digit repeated among the givens.
                if len(puzzle) == 81 and set(puzzle) <= set(".0123456789"):
                    raise ValueError(f"puzzle {i}: its givens contradict each other ({problem})")
                raise ValueError(f"puzzle {i}: {problem}; a puzzle is 81 characters, '.' or '0' blank, 1-9 a given")
            if not puzzle.strip(".0"):
                raise ValueError(
                    f"puzzle {i}: has no givens (all 81 cells blank): any valid grid would answer it, so it is refused "
                    "as a likely mistake (an empty row, the wrong column?)"
                )
        return puzzles

    # ------------------------------------------------------------------------------------------ optimisation

    def configure_optimizers(self):
        hp = self.hparams
        emb = [p for name, p in self.net.named_parameters() if name.startswith("puzzle_emb.")]
        rest = [p for name, p in self.net.named_parameters() if not name.startswith("puzzle_emb.")]
        groups = [{"params": rest, "lr": hp.lr, "weight_decay": hp.weight_decay}]
        if emb:
            groups.append({"params": emb, "lr": hp.puzzle_emb_lr, "weight_decay": hp.puzzle_emb_weight_decay})
        if hp.optimizer == "adamw":
            optimizer = torch.optim.AdamW(groups, betas=tuple(hp.betas))
        else:  # the official pair, as one optimizer: AdamATan2 for the weights, sign-SGD for the puzzle embedding
            groups[1:] = [group | {"sign_sgd": True} for group in groups[1:]]
            optimizer = AdamATan2SignSGD(groups, betas=tuple(hp.betas))
        warmup = max(1, hp.warmup_steps)
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: min(1.0, (step + 1) / warmup))
        return [optimizer], [{"scheduler": scheduler, "interval": "step"}]


def _as_list(value) -> list:
    return value if isinstance(value, list) else [value]


class UnsolvedPuzzlesError(ValueError):
    """:meth:`TRMModule.solve` (``strict=True``) got answers that do not solve their puzzles.

    ``answers``: every answer, as ``strict=False`` returns them; ``problems``: index of each failed puzzle -> what
    is wrong with its answer (or that the puzzle has no solution)."""

    def __init__(self, message: str, *, answers: list[str] | None = None, problems: dict[int, str] | None = None):
        super().__init__(message)
        self.answers = list(answers or [])
        self.problems = dict(problems or {})


class _PuzzleScores(nn.Module):
    def __init__(self):
        super().__init__()
        self.exact, self.cell, self.halt = MeanMetric(), MeanMetric(), MeanMetric()
        self.align_cos, self.align_pred = MeanMetric(), MeanMetric()


def _vote(candidates: torch.Tensor, confidence: torch.Tensor) -> int:
    """Index of the majority answer among k candidates (k, L); ties go to the most confident candidate."""
    keys = [tuple(row.tolist()) for row in candidates]
    counts = Counter(keys)
    top = max(counts.values())
    tied = [i for i, key in enumerate(keys) if counts[key] == top]
    return max(tied, key=lambda i: confidence[i].item())
