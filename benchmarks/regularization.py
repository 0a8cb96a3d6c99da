"""The regularisation study (the seed notebook): the 784-392-196-10 MLP trained plain, with BatchNorm, LayerNorm,
dropout, an L1 and an L2 penalty, from the six configs in ``configs/regularization/``, run through the CLI in this
process; each run logs its weight norms (FrobeniusNormMonitor) and draws its loss landscape (LossLandscape).

Compared: validation loss per epoch, final validation accuracy, total weight norm, and the landscape's sharpness:
the mean rise of the training loss over the grid points at distance ``--radius`` (in units of the filter-normalised
directions) from the final weights, above the loss at the weights themselves.

Data: Fashion-MNIST's images are not on this project's machines, so by default the study runs on the real MNIST
test images of ``$REPROZOO_DATA/mnist`` (``--train`` for training, of which ``--val`` held out, ``--test`` for
testing); ``--dataset fashion_mnist`` runs it on Fashion-MNIST (``$REPROZOO_DATA/fashion_mnist``, or
``--data-dir DIR``; flat or torchvision's layout). The script stops when the idx files are not there.

    python benchmarks/regularization.py              # writes benchmarks/results/regularization.{png,md}
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import numpy as np
from _common import MNIST_TEST_FILES, MNIST_TRAIN_FILES, ROOT, missing_idx_files, quiet_lightning, stop_missing_data

from reprozoo._files import data_path, data_root, save_figure, write_atomic
from reprozoo.callbacks import FrobeniusNormMonitor, LossLandscape, load_landscape
from reprozoo.cli import run_lightning

VARIANTS = ["plain", "batchnorm", "layernorm", "dropout", "l1", "l2"]


def sharpness(landscape: dict, radius: float, width: float) -> float:
    """Mean loss on the ring ``|(x, y)| ~ radius`` minus the loss at the centre."""
    xx, yy = np.meshgrid(landscape["x"], landscape["y"])
    ring = np.abs(np.hypot(xx, yy) - radius) <= width / 2
    centre = landscape["loss"][len(landscape["y"]) // 2, len(landscape["x"]) // 2]
    return float(landscape["loss"][ring].mean() - centre)


def _scalars(log_dir: str, tag: str) -> list[float]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(log_dir, size_guidance={"scalars": 0}).Reload()
    return [e.value for e in events.Scalars(tag)] if tag in events.Tags()["scalars"] else []


def run(variant: str, args: argparse.Namespace, work: Path) -> dict:
    argv = [
        "fit",
        "--config",
        str(ROOT / "reprozoo" / "configs" / "regularization" / "base.yaml"),  # the shared settings, then the variant's
        "--config",
        str(ROOT / "reprozoo" / "configs" / "regularization" / f"{variant}.yaml"),
        "--data.init_args.dataset",
        args.dataset,
        "--data.init_args.data_dir",
        str(args.data_dir),
        "--trainer.max_epochs",
        str(args.epochs),
        "--trainer.logger.init_args.save_dir",
        str(work),
        "--checkpoint.dirpath",
        str(work / variant / "ckpt"),
        "--trainer.enable_progress_bar",
        "false",
        "--trainer.enable_model_summary",
        "false",
        "--trainer.num_sanity_val_steps",
        "0",
    ]
    if args.dataset == "mnist":
        argv += [
            "--data.init_args.train_source",
            "test",
            "--data.init_args.num_train",
            str(args.train),
            "--data.init_args.val_size",
            str(args.val),
            "--data.init_args.num_test",
            str(args.test),
        ]
    start = time.perf_counter()
    cli = run_lightning(argv)
    seconds = time.perf_counter() - start
    trainer = cli.trainer
    landscape_cb = next(c for c in trainer.callbacks if isinstance(c, LossLandscape))
    monitor = next(c for c in trainer.callbacks if isinstance(c, FrobeniusNormMonitor))
    landscape = load_landscape(landscape_cb.history[-1]["file"])
    test = trainer.test(cli.model, datamodule=cli.datamodule, verbose=False)[0]
    log_dir = trainer.logger.log_dir
    return {
        "val_loss": _scalars(log_dir, "val/loss"),
        "val_acc": _scalars(log_dir, "val/acc")[-1],
        "test_acc": test["test/acc"],
        "norm": monitor.history[-1]["norms"]["total"],
        "landscape": landscape,
        "sharpness": sharpness(landscape, args.radius, 2 * (landscape["x"][1] - landscape["x"][0])),
        "seconds": seconds,
    }


def figure(results: dict[str, dict], radius: float):
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(16, 8), layout="constrained")
    FigureCanvasAgg(fig)
    grid = fig.add_gridspec(2, 5)
    curves = fig.add_subplot(grid[0, :2])
    for name, r in results.items():
        curves.plot(range(1, len(r["val_loss"]) + 1), r["val_loss"], label=name)
    curves.set_xlabel("epoch")
    curves.set_ylabel("validation loss")
    curves.set_title("Validation loss")
    curves.legend(fontsize=8)
    bars = fig.add_subplot(grid[1, :2])
    names = list(results)
    bars.bar(names, [results[n]["sharpness"] for n in names], color="tab:purple")
    bars.set_ylabel(f"mean loss rise at radius {radius}")
    bars.set_title("Landscape sharpness around the final weights (lower = flatter)")
    vmax = max(float(np.percentile(r["landscape"]["loss"], 95)) for r in results.values())
    for i, (name, r) in enumerate(results.items()):
        ax = fig.add_subplot(grid[i // 3, 2 + i % 3])
        land = r["landscape"]
        X, Y = np.meshgrid(land["x"], land["y"])
        cs = ax.contourf(X, Y, np.minimum(land["loss"], vmax), levels=20, cmap="viridis")
        ax.plot([0], [0], "r+")
        ax.set_title(f"{name}: test acc {r['test_acc']:.3f}", fontsize=9)
        ax.set_xticks([])
        ax.set_yticks([])
    fig.colorbar(cs, ax=fig.axes[-3:], shrink=0.6, label="training loss (clipped)")
    return fig


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--dataset", choices=["mnist", "fashion_mnist"], default="mnist")
    parser.add_argument("--data-dir", type=data_path, default=None, help="default: $REPROZOO_DATA/<dataset>")
    parser.add_argument("--train", type=int, default=8000)
    parser.add_argument("--val", type=int, default=1000)
    parser.add_argument("--test", type=int, default=2000)
    parser.add_argument("--epochs", type=int, default=20)
    parser.add_argument("--radius", type=float, default=0.5)
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results")
    args = parser.parse_args()
    args.data_dir = args.data_dir or data_root() / args.dataset
    needed = MNIST_TEST_FILES if args.dataset == "mnist" else MNIST_TRAIN_FILES + MNIST_TEST_FILES
    torchvision_name = {"mnist": "MNIST", "fashion_mnist": "FashionMNIST"}[args.dataset]
    if missing := missing_idx_files(args.data_dir, needed, torchvision_name):
        stop_missing_data("regularization.py", missing, args.data_dir)
    quiet_lightning()

    with tempfile.TemporaryDirectory() as tmp:
        results = {v: run(v, args, Path(tmp)) for v in VARIANTS}
    args.out.mkdir(parents=True, exist_ok=True)
    save_figure(figure(results, args.radius), args.out / "regularization.png", dpi=100)
    data = (
        f"{args.train - args.val} training / {args.val} validation / {args.test} test images from the real MNIST "
        "test set"
        if args.dataset == "mnist"
        else "Fashion-MNIST"
    )
    lines = [
        "# Regularisation study: 784-392-196-10 MLP",
        "",
        f"`python benchmarks/regularization.py` ({time.strftime('%Y-%m-%d')}): {data}; {args.epochs} epochs, SGD "
        f"0.05 momentum 0.9, batch 128. Sharpness: mean training-loss rise at radius {args.radius} of the "
        "filter-normalised random plane (21 x 21 grid on [-1, 1]^2, 4 training batches). Figure: `regularization.png`.",
        "",
        "| variant | min val loss | final val loss | val acc | test acc | total weight norm | sharpness | s |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for name, r in results.items():
        lines.append(
            f"| {name} | {min(r['val_loss']):.4f} | {r['val_loss'][-1]:.4f} | {r['val_acc']:.4f} | "
            f"{r['test_acc']:.4f} | {r['norm']:.1f} | {r['sharpness']:.4f} | {r['seconds']:.0f} |"
        )
    write_atomic(args.out / "regularization.md", ("\n".join(lines) + "\n").encode())
    print("\n".join(lines))


if __name__ == "__main__":
    main()
