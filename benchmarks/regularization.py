"""The regularisation study (the seed notebook): the 784-392-196-10 MLP trained plain, with BatchNorm, LayerNorm,
dropout, an L1 and an L2 penalty, from the six configs in ``configs/regularization/``, run through the CLI in this
process; each run logs its weight norms (FrobeniusNormMonitor) and draws its loss landscape (LossLandscape).

Compared: validation loss per epoch, the Frobenius norm of the parameters per epoch, final validation accuracy, and
the landscape's sharpness: the mean rise of the training loss over the grid points at distance ``--radius`` (in units
of the filter-normalised directions) from the final weights, above the loss at the weights themselves. Then the seed's
pictures of the final weights: a spy plot of the first layer's weight matrix (the entries with ``|w| >
--spy-precision``), the histogram of all weights, and the 3-D loss surface of each variant.

Data: Fashion-MNIST's images are not on this project's machines, so by default the study runs on the real MNIST
test images of ``$REPROZOO_DATA/mnist`` (``--train`` for training, of which ``--val`` held out, ``--test`` for
testing); ``--dataset fashion_mnist`` runs it on Fashion-MNIST (``$REPROZOO_DATA/fashion_mnist``, or
``--data-dir DIR``; flat or torchvision's layout). The script stops when the idx files are not there.

    python benchmarks/regularization.py     # benchmarks/results/regularization.{png,md}, regularization_weights.png,
                                            # regularization_landscape.png
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
    net = cli.model.net
    weights = [p.detach().cpu().numpy() for p in net.parameters() if p.dim() > 1]
    test = trainer.test(cli.model, datamodule=cli.datamodule, verbose=False)[0]
    log_dir = trainer.logger.log_dir
    return {
        "val_loss": _scalars(log_dir, "val/loss"),
        "val_acc": _scalars(log_dir, "val/acc")[-1],
        "test_acc": test["test/acc"],
        "norm": monitor.history[-1]["norms"]["total"],
        "norms": [monitor.initial["norms"]["total"]] + [e["norms"]["total"] for e in monitor.history],
        "first_layer": weights[0],  # (392, 784)
        "weights": np.concatenate([w.ravel() for w in weights]),
        "landscape": landscape,
        "sharpness": sharpness(landscape, args.radius, 2 * (landscape["x"][1] - landscape["x"][0])),
        "seconds": seconds,
    }


def figure(results: dict[str, dict], radius: float):
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(14, 12), layout="constrained")
    FigureCanvasAgg(fig)
    grid = fig.add_gridspec(3, 4)
    curves = fig.add_subplot(grid[0, :2])
    for name, r in results.items():
        curves.plot(range(1, len(r["val_loss"]) + 1), r["val_loss"], label=name)
    curves.set_xlabel("epoch")
    curves.set_ylabel("validation loss")
    curves.set_title("Validation loss")
    curves.legend(fontsize=8)
    norms = fig.add_subplot(grid[1, :2])
    for name, r in results.items():
        norms.plot(range(len(r["norms"])), r["norms"], label=name)
    norms.set_xlabel("epoch (0: before training)")
    norms.set_ylabel("Frobenius norm of all parameters")
    norms.set_title("Size of the model")
    norms.legend(fontsize=8)
    bars = fig.add_subplot(grid[2, :2])
    names = list(results)
    bars.bar(names, [results[n]["sharpness"] for n in names], color="tab:purple")
    bars.set_ylabel(f"mean loss rise at radius {radius}")
    bars.set_title("Landscape sharpness around the final weights (lower = flatter)")
    vmax = max(float(np.percentile(r["landscape"]["loss"], 95)) for r in results.values())
    for i, (name, r) in enumerate(results.items()):
        ax = fig.add_subplot(grid[i // 2, 2 + i % 2])
        land = r["landscape"]
        X, Y = np.meshgrid(land["x"], land["y"])
        cs = ax.contourf(X, Y, np.minimum(land["loss"], vmax), levels=20, cmap="viridis")
        ax.plot([0], [0], "r+")
        ax.set_title(f"{name}: test acc {r['test_acc']:.3f}", fontsize=9)
        ax.set_xticks([])
        ax.set_yticks([])
    fig.colorbar(cs, ax=fig.axes[-6:], shrink=0.6, label="training loss (clipped)")
    return fig


def weights_figure(results: dict[str, dict], precision: float):
    """The seed's pictures of the trained weights: per variant, a spy plot of the first layer's (392, 784) weight
    matrix (black: ``|w| > precision``) above the histogram of all its weights."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(3.2 * len(results), 6.4), layout="constrained")
    FigureCanvasAgg(fig)
    axes = fig.subplots(2, len(results), height_ratios=[1, 0.8])
    edges = np.linspace(-0.3, 0.3, 121)
    for (spy, hist), (name, r) in zip(axes.T, results.items()):
        w = r["first_layer"]
        spy.spy(w, precision=precision, aspect="auto")
        spy.set_title(f"{name}: {np.mean(np.abs(w) > precision):.0%} of layer 1 > {precision:g}", fontsize=9)
        spy.tick_params(labelsize=7)
        hist.hist(np.clip(r["weights"], edges[0], edges[-1]), bins=edges, color="tab:blue")
        hist.set_yscale("log")
        hist.set_xlabel("weight (clipped to +-0.3)", fontsize=8)
        hist.set_title(f"all weights, std {r['weights'].std():.3f}", fontsize=9)
        hist.tick_params(labelsize=7)
    return fig


def landscape_figure(results: dict[str, dict]):
    """The loss surface around each variant's final weights, in 3-D (the filter-normalised random plane)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(13, 8), layout="constrained")
    FigureCanvasAgg(fig)
    for i, (name, r) in enumerate(results.items()):
        ax = fig.add_subplot(2, 3, i + 1, projection="3d")
        land = r["landscape"]
        xx, yy = np.meshgrid(land["x"], land["y"])
        ax.plot_surface(xx, yy, land["loss"], cmap="viridis", linewidth=0, antialiased=True)
        ax.set_title(f"{name}: training loss", fontsize=10)
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
    parser.add_argument("--spy-precision", type=float, default=0.01, help="spy plots mark |w| above this")
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
    save_figure(weights_figure(results, args.spy_precision), args.out / "regularization_weights.png", dpi=90)
    save_figure(landscape_figure(results), args.out / "regularization_landscape.png", dpi=90)
    data = (
        f"{args.train - args.val} training / {args.val} validation / {args.test} test images from the real MNIST "
        "test set"
        if args.dataset == "mnist"
        else "Fashion-MNIST"
    )
    lines = [
        "# Regularisation study: 784-392-196-10 MLP",
        "",
        f"`python benchmarks/regularization.py` ({time.strftime('%Y-%m-%d')}): {data}; {args.epochs} epochs, Adam "
        "3e-4, batch 128; L1 and L2 1e-3 over every parameter. Sharpness: mean training-loss rise at radius "
        f"{args.radius} of the filter-normalised random plane (21 x 21 grid on [-1, 1]^2, 4 training batches). "
        f"Figures: `regularization.png`, `regularization_weights.png` (spy plots: |w| > {args.spy_precision:g}), "
        "`regularization_landscape.png`.",
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
