"""Engression study: the number of samples per x in the energy score (``m``) and the noise position.

The official package estimates the energy score with m = 2 samples per x; more samples lower the variance of the
loss's gradient at m times the compute of a step. This trains engression (the official default StoNet, the README
example's batch 1,000 and Adam lr 1e-2) for each m and each noise model of the data, pre-additive Y = g(X + eps)
(the model engression's extrapolation result is about) and post-additive Y = g(X) + eps, and measures on a grid
over [0, 4] (training support [0, 2]): the median's absolute error against the true median inside and outside the
support, the energy score of the predicted distribution against one draw of Y per grid point, and the wall time.
Writes a markdown table and a figure, and prints the table.

    python benchmarks/engression_study.py                  # CPU size: square, m in 2 4 8 16, 50 epochs, 1 seed
    python benchmarks/engression_study.py --m 2 4 --epochs 5 --out study_smoke   # a smoke run
"""

from __future__ import annotations

import argparse
import os
import statistics
from pathlib import Path

from _common import run_grid
from engression_fig4 import FUNCTIONS, run_one

from reprozoo._files import save_figure

NOISES = ["pre", "post"]


def _mean(rows: list[dict], key: str) -> str:
    values = [r[key] for r in rows]
    if len(values) == 1:
        return f"{values[0]:.3f}"
    return f"{statistics.mean(values):.3f} ± {statistics.stdev(values):.3f}"


def make_table(results: list[dict], args) -> str:
    lines = [
        f"Engression on {args.function}, {args.epochs} epochs, mean ± sd over {args.seeds} seed(s); train x ~ U[0, 2], "
        "test grid on [0, 4]. MAE: the predicted median against the true median. Energy score: of 100 samples per "
        "grid point against one draw of Y there (lower is better).",
        "",
        "| noise | m | MAE inside [0, 2] | MAE outside (2, 4] | energy score on [0, 4] | seconds per run |",
        "|---|---|---|---|---|---|",
    ]
    for noise in args.noise:
        for m in args.m:
            rows = [r for r in results if r["noise"] == noise and r["m"] == m]
            lines.append(
                f"| {noise} | {m} | {_mean(rows, 'mae_in')} | {_mean(rows, 'mae_out')} | "
                f"{_mean(rows, 'energy_score')} | {statistics.mean(r['seconds'] for r in rows):.0f} |"
            )
    return "\n".join(lines)


def make_figure(results: list[dict], args, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = [("mae_out", "median MAE outside the support (2, 4]"), ("energy_score", "energy score on [0, 4]")]
    fig, axes = plt.subplots(1, len(panels), figsize=(9, 3.4))
    for ax, (key, title) in zip(axes, panels):
        for noise, style in zip(args.noise, ["o-", "s--"]):
            means = [statistics.mean(r[key] for r in results if r["noise"] == noise and r["m"] == m) for m in args.m]
            ax.plot(args.m, means, style, label=f"{noise}-additive noise")
        ax.set_xscale("log", base=2)
        ax.set_xticks(args.m, [str(m) for m in args.m])
        ax.set_xlabel("m, samples per x in the energy score")
        ax.set_title(title, fontsize=10)
    axes[0].legend(fontsize=8)
    fig.suptitle(f"Engression on {args.function}: samples per x and noise position ({args.epochs} epochs)", fontsize=11)
    fig.tight_layout()
    save_figure(fig, path, dpi=110)
    plt.close(fig)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--function", default="square", choices=FUNCTIONS)
    parser.add_argument("--m", nargs="+", type=int, default=[2, 4, 8, 16])
    parser.add_argument("--noise", nargs="+", default=NOISES, choices=NOISES)
    parser.add_argument("--seeds", type=int, default=1)
    parser.add_argument("--epochs", type=int, default=50, help="CPU size; the official package trains for 500")
    parser.add_argument("--jobs", type=int, default=min(2, os.cpu_count() or 1), help="worker processes")
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results")
    args = parser.parse_args()
    if any(m < 2 for m in args.m):
        parser.error("--m: every value must be >= 2 (the energy score's pairwise term needs two samples per x)")

    jobs = [
        {"function": args.function, "noise": noise, "seed": seed, "method": "engression", "epochs": args.epochs, "m": m}
        for noise in args.noise
        for m in args.m
        for seed in range(args.seeds)
    ]
    run_grid(
        run_one,
        jobs,
        workers=args.jobs,
        line=lambda r: (
            f"{r['noise']:<4} m {r['m']:<3} seed {r['seed']} MAE in {r['mae_in']:.3f} out {r['mae_out']:.3f} "
            f"energy {r['energy_score']:.3f}"
        ),
        out=args.out,
        stem="engression_study",
        make_table=make_table,
        make_figure=make_figure,
        args=args,
    )


if __name__ == "__main__":
    main()
