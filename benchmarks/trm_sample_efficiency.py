"""TRM's two training loops at an equal number of optimizer steps: the streaming carry against the whole batch.

The same model, puzzles, seed and optimizer steps, trained twice: ``training_loop="carry"`` (the official trainer:
one supervision step per optimizer step, halted slots refilled from the next batch) and ``"whole_batch"`` (the
paper's pseudo-code: a batch runs until all its puzzles halted). For each it reports how many new puzzles entered
training per optimizer step (over the whole run and over its last quarter, once halting is learned), the mean
number of supervision steps a puzzle got, the validation exact accuracy after every ``--val-every`` steps (full
N_sup, EMA weights) and the wall time; a PNG draws the accuracy against the optimizer step.

    python benchmarks/trm_sample_efficiency.py                         # CPU: ~10 minutes
    python benchmarks/trm_sample_efficiency.py --steps 400 --givens 50  # shorter

Puzzles: generated with unique solutions (``SudokuExtremeDataModule(source="generate")``, cached under the data
root), ``--givens`` givens each; validation on puzzles not trained on. The model is the quickstart's (the official
architecture narrowed to 64 channels, n=2, T=1) with ``--n-sup`` supervision steps.
"""

from __future__ import annotations

import argparse
import sys
import textwrap
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks._common import ROOT, quiet_lightning  # noqa: E402

LOOPS = ("carry", "whole_batch")


def _run(loop: str, args) -> dict:
    import lightning as L
    import torch

    from reprozoo.datamodules import SudokuExtremeDataModule
    from reprozoo.methods.trm import TRMModule
    from reprozoo.nets import TinyRecursiveNetwork

    L.seed_everything(args.seed)
    data = SudokuExtremeDataModule(
        source="generate", num_givens=args.givens, n_train_generated=args.train + args.val, n_test_generated=100,
        num_train_puzzles=args.train, num_val=args.val, batch_size=args.batch, seed=args.seed,
    )  # fmt: skip
    model = TRMModule(
        TinyRecursiveNetwork(hidden_size=64, puzzle_emb_ndim=64), n=2, T=1, n_sup=args.n_sup, lr=2e-3,
        warmup_steps=50, weight_decay=0.1, ema_decay=0.99, training_loop=loop,
    )  # fmt: skip
    new_puzzles: list[float] = []
    sup_steps: list[float] = []
    curve: list[tuple[int, float]] = []

    def val_exact(module) -> float:
        """Exact accuracy on the validation puzzles: EMA weights, all N_sup steps (as validation_step)."""
        val = data.splits["val"]
        items = [val[i] for i in range(len(val))]
        inputs = torch.stack([item["inputs"] for item in items]).long()
        labels = torch.stack([item["labels"] for item in items]).long()
        was_training = module.training
        module.eval()
        pred, _ = module.predict_tokens(inputs)
        module.train(was_training)
        return float((pred == labels).all(-1).float().mean())

    class Record(L.Callback):
        def on_train_batch_start(self, trainer, module, batch, batch_idx):
            self.before = trainer.global_step

        def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx):
            steps = trainer.global_step - self.before
            if loop == "carry":  # the slots refilled at this step, and the steps of the puzzles that halted
                new_puzzles.append(float(trainer.callback_metrics["train/new_puzzles"]) * args.batch)
                halted = module._carry.halted
                sup_steps.extend(module._carry.steps[halted].float().tolist())
            else:  # one batch of new puzzles over all the optimizer steps it took
                new_puzzles.extend([args.batch / steps] * steps)
                sup_steps.append(float(trainer.callback_metrics["train/sup_steps"]))
            # validation every --val-every optimizer steps (a whole batch may take several at once)
            if (
                trainer.global_step // args.val_every > self.before // args.val_every
                or trainer.global_step >= args.steps
            ):
                curve.append((trainer.global_step, val_exact(module)))

    trainer = L.Trainer(
        accelerator="cpu", devices=1, max_steps=args.steps, max_epochs=-1, limit_val_batches=0, logger=False,
        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False, callbacks=[Record()],
    )  # fmt: skip
    start = time.perf_counter()
    trainer.fit(model, datamodule=data)
    elapsed = time.perf_counter() - start
    tail = new_puzzles[-max(1, len(new_puzzles) // 4) :]
    return {
        "loop": loop,
        "steps": trainer.global_step,
        "new_per_step": sum(new_puzzles) / len(new_puzzles),
        "new_per_step_tail": sum(tail) / len(tail),
        "sup_steps": sum(sup_steps) / max(1, len(sup_steps)),
        "curve": curve,
        "seconds": elapsed,
    }


def _accuracy_at(curve: list[tuple[int, float]], step: int) -> float:
    """The first validation at or after ``step`` optimizer steps (a whole batch may pass a multiple of --val-every
    by up to N_sup - 1 steps; the carry validates exactly there)."""
    seen = [acc for s, acc in curve if s >= step]
    return seen[0] if seen else float("nan")


def _plot(results: list[dict], path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from reprozoo._files import write_atomic

    fig, ax = plt.subplots(figsize=(6, 3.6))
    for r in results:
        steps, accs = zip(*r["curve"])
        ax.plot(
            steps, accs, marker="o", label=f"{r['loop']} ({r['new_per_step_tail']:.1f} new puzzles/step at the end)"
        )
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("validation exact accuracy")
    ax.set_title("\n".join(textwrap.wrap(title, 80)), fontsize=9)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    import io

    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=120)
    plt.close(fig)
    write_atomic(path, buffer.getvalue())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=600, help="optimizer steps of each run")
    parser.add_argument("--val-every", type=int, default=100)
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--n-sup", type=int, default=4)
    parser.add_argument("--givens", type=int, default=50, help="givens per generated puzzle (fewer: harder)")
    parser.add_argument("--train", type=int, default=3000, help="training puzzles (augmented on the fly)")
    parser.add_argument("--val", type=int, default=256)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results")
    args = parser.parse_args()
    import lightning.pytorch  # noqa: F401  (imported first: its import sets its loggers' levels)

    quiet_lightning()
    results = [_run(loop, args) for loop in LOOPS]
    checkpoints = sorted({s for r in results for s, _ in r["curve"] if s % args.val_every == 0} | {args.steps})
    title = (
        f"TRM (64 channels, n=2, T=1, N_sup={args.n_sup}), batch {args.batch}, generated sudoku with "
        f"{args.givens} givens, {args.steps} optimizer steps"
    )
    lines = [
        f"# {title}",
        "",
        "| loop | new puzzles / step (all) | (last quarter) | supervision steps / puzzle | "
        + " | ".join(f"val exact @{s}" for s in checkpoints)
        + " | wall s |",
        "|---|---|---|---|" + "---|" * len(checkpoints) + "---|",
    ]
    for r in results:
        accs = " | ".join(f"{_accuracy_at(r['curve'], s):.3f}" for s in checkpoints)
        lines.append(
            f"| {r['loop']} | {r['new_per_step']:.1f} | {r['new_per_step_tail']:.1f} | {r['sup_steps']:.2f} | "
            f"{accs} | {r['seconds']:.0f} |"
        )
    carry, whole = results
    lines += [
        "",
        f"New puzzles per optimizer step, carry / whole batch: {carry['new_per_step_tail'] / whole['new_per_step_tail']:.2f}x "
        f"over the last quarter; carry's is {carry['new_per_step_tail'] / args.batch:.2f} x the batch.",
    ]
    text = "\n".join(lines)
    print(text)
    args.out.mkdir(parents=True, exist_ok=True)
    from reprozoo._files import write_atomic

    write_atomic(args.out / "trm_sample_efficiency.md", (text + "\n").encode())
    _plot(results, args.out / "trm_sample_efficiency.png", title)
    print(f"wrote {args.out / 'trm_sample_efficiency.md'} and trm_sample_efficiency.png")


if __name__ == "__main__":
    main()
