"""Plot scalar curves from a run's TensorBoard log directory to a PNG, and print them as a table.

    python benchmarks/plot_curves.py lightning_logs/quickstart/version_0 --tags val/exact_acc val/cell_acc \
        --out benchmarks/results/trm_quickstart_curve.png
"""

from __future__ import annotations

import argparse
from pathlib import Path

from reprozoo._files import save_figure


def read_scalars(log_dir: Path, tags: list[str]) -> dict[str, list[tuple[int, float]]]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(log_dir), size_guidance={"scalars": 0})
    events.Reload()
    available = events.Tags()["scalars"]
    missing = [t for t in tags if t not in available]
    if missing:
        raise SystemExit(f"{log_dir}: no scalars {missing}; available: {sorted(available)}")
    return {t: [(e.step, e.value) for e in events.Scalars(t)] for t in tags}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("log_dir", type=Path)
    parser.add_argument("--tags", nargs="+", required=True)
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--title", default=None)
    args = parser.parse_args()

    curves = read_scalars(args.log_dir, args.tags)
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.4, 4.0))
    for tag, points in curves.items():
        steps, values = zip(*points)
        ax.plot(steps, values, marker="o", ms=3, label=tag)
    ax.set_xlabel("logging step (training batches; TRM takes up to N_sup optimizer steps per batch)")
    ax.set_ylim(0, 1.02)
    ax.grid(alpha=0.3)
    ax.legend()
    ax.set_title(args.title or str(args.log_dir))
    fig.tight_layout()
    args.out.parent.mkdir(parents=True, exist_ok=True)
    save_figure(fig, args.out, dpi=110)
    print(f"wrote {args.out}")
    print("| step | " + " | ".join(args.tags) + " |")
    print("|---" * (len(args.tags) + 1) + "|")
    by_step: dict[int, dict[str, float]] = {}
    for tag, points in curves.items():
        for step, value in points:
            by_step.setdefault(step, {})[tag] = value
    for step in sorted(by_step):
        print(f"| {step} | " + " | ".join(f"{by_step[step].get(t, float('nan')):.3f}" for t in args.tags) + " |")


if __name__ == "__main__":
    main()
