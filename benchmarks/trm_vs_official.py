"""TRMModule against the official TinyRecursiveModels code, trained side by side with the streaming carry.

Both start from the same weights (the official model's initialisation, copied into ours), read the same batches of
generated sudoku puzzles and draw the same exploration numbers (the official model draws them from the global
generator, ours from its own; both are seeded alike before every step). Each takes ``--steps`` optimizer steps of
the official recipe: one supervision step per optimizer step, halted slots refilled from the next batch, the
exploration rule, stablemax loss with the halting term, AdamATan2 for the weights and sign-SGD for the puzzle
embedding, linear warmup. The script prints the largest absolute weight difference along the way, whether the two
halted the same puzzles at every step, and the time per optimizer step of each (ours through the Lightning
Trainer, everything included; the official model through its trainer's loop, below), with the ratio official/ours.

    python benchmarks/trm_vs_official.py --official DIR                    # tiny network, 32 steps, batch 16
    python benchmarks/trm_vs_official.py --official DIR --size official    # the 5M-parameter sudoku network
    python benchmarks/trm_vs_official.py --official DIR --compile          # ours with torch.compile (compare: --steps 64)

Without ``--official`` (or ``$TRM_OFFICIAL``) it stops with exit status 2, which ``run_all.py`` reports as skipped.

DIR is a checkout of https://github.com/SamsungSAILMontreal/TinyRecursiveModels; its code is imported from there,
never copied here, and needs ``pip install pydantic einops``. Its trainer (``pretrain.py``) needs CUDA, wandb and
hydra, so the official model is driven here by the steps of ``pretrain.train_batch`` for one process: the carry
from ``initial_carry``, the forward of ``ACTLossHead``, backward of ``loss / batch_size``, then every optimizer at
the scheduled rate (the recipe's ``lr_min_ratio=1``: linear warmup, then constant). Its AdamATan2 is the official
``adam_atan2`` package when that imports (it is a CUDA extension), else ``reprozoo.optim.AdamATan2``, whose
formula ``tests/test_optim.py`` checks against that package's kernel; the output says which.

The halting head's bias starts at 0 in both instead of the official -5, so that slots halt at different steps from
the first steps on (with -5 every slot runs all N_sup steps until the head has learned), which is the case worth
comparing. Everything runs in float32 on the CPU (the official default is bfloat16 on CUDA).
"""

from __future__ import annotations

import argparse
import importlib
import os
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks._common import MISSING_DATA, quiet_lightning  # noqa: E402

SIZES = {  # the official sudoku network is --size official; tiny keeps a CPU run short
    "tiny": dict(hidden_size=64, n=2, T=2, n_sup=4),
    "official": dict(hidden_size=512, n=6, T=3, n_sup=16),
}
# ours <- official (inside ACTLossHead.model.inner); the official "H" state is the answer y, "L" the latent z
_NAMES = {
    "y_init": "H_init",
    "z_init": "L_init",
    "embed_tokens.weight": "embed_tokens.embedding_weight",
    "puzzle_emb.weight": "puzzle_emb.weights",
    "lm_head.weight": "lm_head.weight",
    "q_head.weight": "q_head.weight",
    "q_head.bias": "q_head.bias",
}
_BLOCK = {"token_mlp": "mlp_t", "channel_mlp": "mlp", "gate_up": "gate_up_proj", "down": "down_proj"}


def _official_name(ours: str) -> str:
    if ours in _NAMES:
        return _NAMES[ours]
    _, i, mlp, proj, leaf = ours.split(".")  # blocks.{i}.{token_mlp|channel_mlp}.{gate_up|down}.weight
    return f"L_level.layers.{i}.{_BLOCK[mlp]}.{_BLOCK[proj]}.{leaf}"


def _import_official(folder: Path):
    if not (folder / "models" / "recursive_reasoning" / "trm.py").is_file():
        raise SystemExit(
            f"trm_vs_official.py: {folder} is not a TinyRecursiveModels checkout (no models/recursive_reasoning/trm.py)"
        )
    sys.path.insert(0, str(folder))
    try:
        trm = importlib.import_module("models.recursive_reasoning.trm")
        losses = importlib.import_module("models.losses")
        sparse = importlib.import_module("models.sparse_embedding")
    except ModuleNotFoundError as err:
        raise SystemExit(
            f"trm_vs_official.py: the official code needs {err.name}: pip install pydantic einops"
        ) from err
    try:
        from adam_atan2 import AdamATan2  # the official optimizer (CUDA extension)

        which = "the official adam_atan2 package"
    except ImportError:
        from reprozoo.optim import AdamATan2

        which = "reprozoo.optim.AdamATan2 (the adam_atan2 package needs CUDA; tests/test_optim.py checks the formula)"
    return trm, losses, sparse, AdamATan2, which


def _batches(steps: int, batch: int, seed: int) -> list[dict[str, torch.Tensor]]:
    from reprozoo.sudoku import encode, generate_puzzles

    pairs = generate_puzzles(steps * batch, 40, seed=f"trm-vs-official-{seed}")
    inputs = torch.stack([encode(q) for q, _ in pairs]).view(steps, batch, -1)
    labels = torch.stack([encode(a) for _, a in pairs]).view(steps, batch, -1)
    ids = torch.zeros(steps, batch, dtype=torch.long)
    return [{"inputs": inputs[i], "labels": labels[i], "puzzle_identifiers": ids[i]} for i in range(steps)]


def _lr(base: float, step: int, warmup: int) -> float:
    """The official compute_lr with lr_min_ratio=1 (the recipe): step counts from 1."""
    return base * step / warmup if step < warmup else base


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--official", type=Path, help="a TinyRecursiveModels checkout (default: $TRM_OFFICIAL)")
    parser.add_argument("--size", choices=list(SIZES), default="tiny")
    parser.add_argument("--steps", type=int, default=32, help="optimizer steps (>= 32 for the comparison)")
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--lr", type=float, default=1e-3, help="both groups (recipe: 1e-4; larger shows more)")
    parser.add_argument("--warmup", type=int, default=8)
    parser.add_argument("--weight-decay", type=float, default=1.0)
    parser.add_argument("--exploration", type=float, default=0.1)
    parser.add_argument("--compile", action="store_true", help="torch.compile our network (TRMModule(compile=True))")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    if args.official is None and os.environ.get("TRM_OFFICIAL"):
        args.official = Path(os.environ["TRM_OFFICIAL"])
    if args.official is None:  # run_all.py reports a benchmark stopped for missing data as skipped
        print(
            f"trm_vs_official.py: {MISSING_DATA} a checkout of SamsungSAILMontreal/TinyRecursiveModels; pass "
            "--official DIR or set TRM_OFFICIAL",
            file=sys.stderr,
        )
        raise SystemExit(2)
    if args.steps < 2:
        parser.error("--steps must be >= 2 (the first step is not timed)")
    import lightning.pytorch  # noqa: F401  (imported first: its import sets its loggers' levels)

    quiet_lightning()
    torch.set_num_threads(torch.get_num_threads())
    size = SIZES[args.size]
    trm, losses, sparse, AdamATan2, which = _import_official(args.official.resolve())
    batches = _batches(args.steps, args.batch, args.seed)

    # ---------------------------------------------------------------- the official model, optimizers and loop
    torch.manual_seed(args.seed)
    config = dict(
        batch_size=args.batch, seq_len=81, vocab_size=11, num_puzzle_identifiers=1, puzzle_emb_ndim=size["hidden_size"],
        puzzle_emb_len=16, H_cycles=size["T"], L_cycles=size["n"], H_layers=0, L_layers=2,
        hidden_size=size["hidden_size"], expansion=4, num_heads=8, pos_encodings="none", mlp_t=True,
        halt_max_steps=size["n_sup"], halt_exploration_prob=args.exploration, no_ACT_continue=True,
        forward_dtype="float32",
    )  # fmt: skip
    official = losses.ACTLossHead(trm.TinyRecursiveReasoningModel_ACTV1(config), loss_type="stablemax_cross_entropy")
    inner = official.model.inner
    with torch.no_grad():
        inner.q_head.bias.zero_()
    official.train()
    optimizers = [
        sparse.CastedSparseEmbeddingSignSGD_Distributed(
            official.model.puzzle_emb.buffers(), lr=0, weight_decay=args.weight_decay, world_size=1
        ),
        AdamATan2(official.parameters(), lr=0, weight_decay=args.weight_decay, betas=(0.9, 0.95)),
    ]

    # ---------------------------------------------------------------- ours, from the official initial weights
    from lightning.pytorch import Callback, Trainer
    from torch.utils.data import DataLoader

    from reprozoo.methods.trm import TRMModule
    from reprozoo.nets import TinyRecursiveNetwork

    net = TinyRecursiveNetwork(hidden_size=size["hidden_size"], puzzle_emb_ndim=size["hidden_size"], mixer="mlp")
    official_state = inner.state_dict()
    net.load_state_dict({k: official_state[_official_name(k)].clone() for k in net.state_dict()}, strict=True)
    ours = TRMModule(
        net=net, n=size["n"], T=size["T"], n_sup=size["n_sup"], halt_exploration_prob=args.exploration,
        training_loop="carry", optimizer="adam_atan2", lr=args.lr, puzzle_emb_lr=args.lr,
        weight_decay=args.weight_decay, puzzle_emb_weight_decay=args.weight_decay, warmup_steps=args.warmup,
        ema_decay=0.0, compile=args.compile,
    )  # fmt: skip

    checkpoints = {s for s in (1, 2, 4, 8, 16, 32, 64, 128) if s <= args.steps} | {args.steps}
    official_halted, official_times, diffs = [], [], {}
    our_halted, our_times = [], []

    class Record(Callback):
        """Seeds the exploration draws of each step as the official side does, times whole loop iterations,
        records the halted slots and, at the checkpoint steps, runs the official step to compare weights."""

        def on_train_batch_start(self, trainer, module, batch, batch_idx):
            module._rng.manual_seed(args.seed * 100_003 + batch_idx)
            our_times.append(time.perf_counter())

        def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx):
            our_halted.append(module._carry.halted.clone())

    # The official run first, every step timed, weights saved where they are compared.
    official_states = {}
    carry = None
    for step, batch in enumerate(batches, start=1):
        batch = {k: v.to(torch.int32) for k, v in batch.items()}
        start = time.perf_counter()
        if carry is None:
            carry = official.initial_carry(batch)
        torch.manual_seed(args.seed * 100_003 + step - 1)
        carry, loss, _, _, _ = official(carry=carry, batch=batch, return_keys=[])
        ((1 / args.batch) * loss).backward()
        for optimizer, base in zip(optimizers, [args.lr, args.lr]):
            for group in optimizer.param_groups:
                group["lr"] = _lr(base, step, args.warmup)
            optimizer.step()
            optimizer.zero_grad()
        official_times.append(time.perf_counter() - start)
        official_halted.append(carry.halted.clone())
        if step in checkpoints:
            official_states[step] = {k: v.clone() for k, v in inner.state_dict().items()}

    class Compare(Callback):
        def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx):
            step = batch_idx + 1
            if step in official_states:
                now = official_states[step]
                diffs[step] = max(
                    (v - now[_official_name(k)]).abs().max().item() for k, v in module.net.state_dict().items()
                )

    trainer = Trainer(
        accelerator="cpu", devices=1, max_steps=args.steps, logger=False, enable_checkpointing=False,
        enable_progress_bar=False, enable_model_summary=False, num_sanity_val_steps=0, limit_val_batches=0,
        callbacks=[Record(), Compare()],
    )  # fmt: skip
    trainer.fit(ours, DataLoader(batches, batch_size=None))
    end = time.perf_counter()
    our_step_times = [b - a for a, b in zip(our_times, our_times[1:] + [end])]

    differ = [i for i, (a, b) in enumerate(zip(official_halted, our_halted), start=1) if not torch.equal(a, b)]
    same_halting = not differ
    refills = [int(h.sum()) for h in official_halted[:-1]]
    skip = 2 if args.compile else 1  # the first step(s) include set-up (and compiling)
    t_official = sum(official_times[skip:]) / (args.steps - skip)
    t_ours = sum(our_step_times[skip:]) / (args.steps - skip)
    print(f"TRM vs official TinyRecursiveModels ({args.official.name}), {args.size} network, batch {args.batch}, "
          f"{args.steps} optimizer steps with the streaming carry, halting and exploration {args.exploration}; "
          f"official AdamATan2: {which}")  # fmt: skip
    print(f"{'step':>6} {'max |w_ours - w_official|':>28}")
    for step in sorted(diffs):
        print(f"{step:>6} {diffs[step]:>28.3e}")
    halting = "yes" if same_halting else f"NO (first at step {differ[0]})"
    print(f"halted the same puzzles at every step: {halting}; puzzles refilled per step "
          f"(official): mean {sum(refills) / max(1, len(refills)):.2f} of {args.batch}, min {min(refills, default=0)}, "
          f"max {max(refills, default=0)}")  # fmt: skip
    print(f"time per optimizer step (steps {skip + 1}..{args.steps}): official {t_official * 1e3:.1f} ms, ours "
          f"{t_ours * 1e3:.1f} ms{' (compiled)' if args.compile else ''}, ratio official/ours {t_official / t_ours:.2f}")  # fmt: skip
    if not same_halting or max(diffs.values()) > 1e-4:
        raise SystemExit(1)


if __name__ == "__main__":
    main()
