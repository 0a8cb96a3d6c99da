"""Engression paper, Figure 4: extrapolation of the conditional median, engression vs L1 / L2 regression.

For each function (softplus, square, cubic, log) and each noise model (pre-additive Y = g(X + eps), the paper's
setting, and post-additive Y = g(X) + eps), train engression and the L1 and L2 baselines on x ~ U[0, 2] with
several seeds, then measure the mean absolute error of the predicted median (L1) or mean (L2) against the true
median or mean on a grid over [0, 4], separately inside and outside the training support. The network is the
official default StoNet; the baselines are the same network minus its noise inputs (``without_noise()``: same
layers, same batch norm). Training as the official README example (batch 1,000, Adam lr 1e-2) for ``--epochs``
(the official 500 by default). Writes a figure like the paper's (training data, true median with its 10-90 %
band, the L1 / L2 fits, the engression median with its 10-90 % band) and a markdown table, and prints the table.

    python benchmarks/engression_fig4.py                 # all settings, 3 seeds, 500 epochs: hours on 2 CPU cores
    python benchmarks/engression_fig4.py --seeds 1 --epochs 100 --noise pre   # CPU size (results/engression_fig4.md)
    python benchmarks/engression_fig4.py --functions softplus --noise pre --seeds 1 --epochs 20   # smoke run
"""

from __future__ import annotations

import argparse
import os
import statistics
import time
from pathlib import Path

from _common import run_grid

from reprozoo._files import save_figure

FUNCTIONS = ["softplus", "square", "cubic", "log"]
METHODS = {"engression": "energy", "L1": "l1", "L2": "l2"}


def run_one(job: dict) -> dict:
    """Train one model and return its median errors and curves on the test grid (runs in a worker process)."""
    import lightning as L
    import torch

    from reprozoo.datamodules import SyntheticRegressionDataModule
    from reprozoo.methods.engression import EngressionRegressor, energy_score
    from reprozoo.nets import StochasticMLP

    torch.set_num_threads(1)
    L.seed_everything(job["seed"], verbose=False)
    dm = SyntheticRegressionDataModule(function=job["function"], noise=job["noise"], seed=job["seed"], n_test=400)
    loss = METHODS[job["method"]]
    generator = StochasticMLP()  # the official StoNet's defaults
    if loss != "energy":
        generator = generator.without_noise()  # like for like: the same layers and batch norm, no noise
    model = EngressionRegressor(generator, loss=loss, lr=job.get("lr", 1e-2), m=job.get("m", 2))
    trainer = L.Trainer(
        accelerator="cpu",
        devices=1,
        max_epochs=job["epochs"],
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        limit_val_batches=0,
    )
    start = time.perf_counter()
    trainer.fit(model, datamodule=dm)
    seconds = time.perf_counter() - start
    model.eval()
    dm.setup("test")
    grid = dm.splits["test"].tensors[0]  # (N, 1)
    with torch.no_grad():
        q = model.predict_quantiles(grid, [0.1, 0.5, 0.9], num_samples=2000)[:, :, 0]  # (N, 3)
    truth = dm.true_median(grid)[:, 0]
    # L2 regression estimates the conditional mean: it is scored against the true mean, the others the median
    target = _true_mean(dm, grid)[:, 0] if loss == "l2" else truth
    err = (q[:, 1] - target).abs()  # a deterministic baseline's quantiles are all its prediction
    inside = dm.in_support(grid)[:, 0]
    with torch.no_grad():  # the energy score of the predicted distribution, against one draw of Y per grid point
        score = energy_score(dm.splits["test"].tensors[1], model.sample(grid, 100))
    x_train, y_train = dm.splits["train"].tensors
    return {
        **job,
        "mae_in": err[inside].mean().item(),
        "mae_out": err[~inside].mean().item(),
        "energy_score": score.item(),
        "seconds": seconds,
        "grid": grid[:, 0].tolist(),
        "truth": truth.tolist(),
        "true_q10": dm.true_quantile(grid, 0.1)[:, 0].tolist(),
        "true_q90": dm.true_quantile(grid, 0.9)[:, 0].tolist(),
        "q10": q[:, 0].tolist(),
        "median": q[:, 1].tolist(),
        "q90": q[:, 2].tolist(),
        "train": (x_train[:600, 0].tolist(), y_train[:600, 0].tolist()),
    }


def _true_mean(dm, x, levels: int = 1000):
    """E[Y | x] as the average of the true quantiles at the midpoints of ``levels`` equal bins: a deterministic
    quadrature of the mean, exact up to the tails of the noise."""
    import torch

    return torch.stack([dm.true_quantile(x, (k + 0.5) / levels) for k in range(levels)]).mean(dim=0)


def _fmt(values: list[float]) -> str:
    if len(values) == 1:
        return f"{values[0]:.3f}"
    return f"{statistics.mean(values):.3f} ± {statistics.stdev(values):.3f}"


def make_table(results: list[dict], args) -> str:
    lines = [
        f"Median absolute error vs the true median, mean ± sd over {args.seeds} seed(s); "
        f"{args.epochs} epochs; train x ~ U[0, 2], test grid on [0, 4]. Engression and L1 are scored by their median "
        "against the true median, L2 by its fit against the true mean. Ratio: outside-support MAE of engression over "
        "that of the baseline of its row.",
        "",
        "| function | noise | method | MAE inside [0, 2] | MAE outside (2, 4] | out-of-support ratio engression / this |",
        "|---|---|---|---|---|---|",
    ]
    for noise in args.noise:
        for fn in args.functions:
            rows = {
                m: [r for r in results if r["function"] == fn and r["noise"] == noise and r["method"] == m]
                for m in METHODS
            }
            eng_out = statistics.mean(r["mae_out"] for r in rows["engression"])
            for m in METHODS:
                ratio = eng_out / max(statistics.mean(r["mae_out"] for r in rows[m]), 1e-12)
                cell = f"{ratio:.2f}" if m != "engression" else ""
                lines.append(
                    f"| {fn} | {noise} | {m} | {_fmt([r['mae_in'] for r in rows[m]])} | "
                    f"{_fmt([r['mae_out'] for r in rows[m]])} | {cell} |"
                )
    return "\n".join(lines)


def make_figure(results: list[dict], args, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    seed = min(r["seed"] for r in results)
    fig, axes = plt.subplots(
        len(args.noise), len(args.functions), figsize=(3.6 * len(args.functions), 3.3 * len(args.noise)), squeeze=False
    )
    for i, noise in enumerate(args.noise):
        for j, fn in enumerate(args.functions):
            ax = axes[i][j]
            pick = {
                r["method"]: r for r in results if r["function"] == fn and r["noise"] == noise and r["seed"] == seed
            }
            eng, l1, l2 = pick["engression"], pick["L1"], pick["L2"]
            ax.scatter(*eng["train"], s=2, c="0.75", label="training data")
            ax.plot(eng["grid"], eng["truth"], "k-", lw=2, label="true median")
            ax.fill_between(
                eng["grid"], eng["true_q10"], eng["true_q90"], color="0.5", alpha=0.12, label="true 10-90 %"
            )
            ax.plot(l1["grid"], l1["median"], "--", c="tab:blue", lw=1.8, label="L1 regression")
            ax.plot(l2["grid"], l2["median"], "-.", c="tab:green", lw=1.5, label="L2 regression")
            ax.plot(eng["grid"], eng["median"], c="tab:red", lw=1.8, label="engression median")
            ax.fill_between(
                eng["grid"], eng["q10"], eng["q90"], color="tab:red", alpha=0.18, label="engression 10-90 %"
            )
            ax.axvline(2.0, c="0.4", ls=":", lw=1)
            truth = eng["truth"]
            span = max(truth) - min(truth)
            ax.set_ylim(min(truth) - 0.4 * span - 1, max(truth) + 0.25 * span + 1)
            ax.set_title(f"{fn}, {noise}-additive noise", fontsize=10)
            ax.set_xlabel("x")
    axes[0][0].legend(fontsize=7, loc="upper left")
    fig.suptitle(
        "Engression vs L1 / L2 regression (the same network without noise), trained on x in [0, 2] "
        "(left of the dotted line)",
        fontsize=11,
    )
    fig.tight_layout()
    save_figure(fig, path, dpi=110)
    plt.close(fig)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--functions", nargs="+", default=FUNCTIONS, choices=FUNCTIONS)
    parser.add_argument("--noise", nargs="+", default=["pre", "post"], choices=["pre", "post"])
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--epochs", type=int, default=500, help="the official package's default: 500")
    parser.add_argument("--jobs", type=int, default=min(2, os.cpu_count() or 1), help="worker processes")
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results")
    args = parser.parse_args()

    jobs = [
        {"function": fn, "noise": noise, "seed": seed, "method": method, "epochs": args.epochs}
        for noise in args.noise
        for fn in args.functions
        for seed in range(args.seeds)
        for method in METHODS
    ]
    run_grid(
        run_one,
        jobs,
        workers=args.jobs,
        line=lambda r: (
            f"{r['function']:<8} {r['noise']:<4} seed {r['seed']} {r['method']:<10} MAE in {r['mae_in']:.3f} "
            f"out {r['mae_out']:.3f}"
        ),
        out=args.out,
        stem="engression_fig4",
        make_table=make_table,
        make_figure=make_figure,
        args=args,
    )


if __name__ == "__main__":
    main()
