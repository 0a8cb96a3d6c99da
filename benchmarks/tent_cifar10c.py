"""TENT on CIFAR-10-C-style corruptions (Wang et al., ICLR 2021), the paper's protocol at CPU size: the pretrained
CIFAR ResNet-20 (``$REPROZOO_DATA/cifar10/pretrained``) on the real CIFAR-10 test images (``test_jpeg_q75.npz``)
corrupted with CIFAR-10-C's parameters (``CIFAR10CDataModule(source="generate")``) at every severity, one pass over
each corruption's images, batch 200, Adam lr 1e-3, one step per batch. Measured per corruption and severity:

* ``source`` (no adaptation), ``norm`` (batch statistics) and ``tent`` with a reset for every corruption (the
  official ``cifar10c.py`` protocol);
* ``tent-online``: the same, without reset between corruptions (``reset="never"``): continual adaptation over the
  corruptions of one severity in the standard order, from the source model at the start of each severity;
* the error of ``norm`` and ``tent`` against the number of adaptation batches seen (``--curve-corruptions`` at
  severity 5, ``--curve-images`` each; one batch of 200 = one step);
* throughput of adaptation against plain inference, and optionally (``--grid-*``, off with ``--no-grid``) TENT's
  sensitivity to the learning rate and the batch size at severity 5.

Figures (PNG, written atomically): error per corruption at severity 5, mean error against severity, error against
batches seen, error against entropy, and the sensitivity grid. Tables: ``tent_cifar10c.md``.

Data: ``--data-dir`` (default ``$REPROZOO_DATA/cifar10``) holding ``test_jpeg_q75.npz`` and
``pretrained/resnet<depth>-*.th``; the script stops when they are not there. The images there are sorted by class,
so each corruption uses a seeded random ``--images`` of them (a batch of one class would wreck batch statistics).

    python benchmarks/tent_cifar10c.py --no-grid               # 15 corruptions x 5 severities, 400 images each
    python benchmarks/tent_cifar10c.py --images 400 --corruptions gaussian_noise fog --severities 5 --no-grid

The paper's size (RobustBench's ``Standard`` WRN-28-10, the official CIFAR-10-C, severity 5, 10,000 images per
corruption) is the config ``configs/tent/cifar10c_standard.yaml`` (``cifar10c_standard_online.yaml`` for online).
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import lightning as L
import numpy as np
import torch
from _common import ROOT, cifar10_tent_files, quiet_lightning, shown, shown_command

from reprozoo._files import data_path, data_root, save_figure, write_atomic
from reprozoo.datamodules.cifar10c import CIFAR10CDataModule
from reprozoo.methods.tent import TentModule
from reprozoo.methods.tent_adapter import TentAdapter
from reprozoo.nets import load_legacy_cifar_resnet
from reprozoo.transforms.corruptions import BENCHMARK_CORRUPTIONS, available_corruptions

MODES = ("source", "norm", "tent")
RUNS = (*MODES, "tent-online")
PAPER = {"source": 43.5, "norm": 20.4, "tent": 18.6}  # paper reports: WRN-28-10, CIFAR-10-C severity 5, mean error %


def _run(weights: Path, run: str, lr: float, dm: CIFAR10CDataModule, root: str) -> tuple[dict, float]:
    """One test pass of a fresh pretrained model: (all logged metrics, seconds)."""
    mode, reset = ("tent", "never") if run == "tent-online" else (run, "each_domain")
    model = TentModule(load_legacy_cifar_resnet(weights), mode=mode, lr=lr, steps=1, reset=reset)
    trainer = L.Trainer(
        accelerator="cpu",
        devices=1,
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        default_root_dir=root,
    )
    start = time.perf_counter()
    results = trainer.test(model, datamodule=dm, verbose=False)
    return {k: v for r in results for k, v in r.items()}, time.perf_counter() - start


def _per_batch_errors(weights: Path, mode: str, loader) -> list[float]:
    """Error of every batch in stream order, each predicted before the update it drives."""
    adapter = TentAdapter(load_legacy_cifar_resnet(weights), mode=mode, lr=1e-3, steps=1)
    errors = []
    with torch.no_grad():
        for x, y in loader:
            errors.append((adapter(x).argmax(1) != y).float().mean().item())
    return errors


def _figure(size):
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=size, layout="constrained")
    FigureCanvasAgg(fig)
    return fig, fig.add_subplot()


def severity_figure(mean: dict, severities: list[int], corruptions: int, images: int, depth: int, path: Path) -> None:
    """Mean error (%) against severity per run (``mean[run][severity]``), with the paper's severity-5 numbers."""
    fig, ax = _figure((6.5, 4.5))
    for run in RUNS:
        ax.plot(severities, [mean[run][s] for s in severities], marker="o", label=run)
    if 5 in severities:
        for mode, marker in zip(MODES, ("s", "D", "^")):
            ax.scatter(
                [5.15], [PAPER[mode]], marker=marker, color="k", s=22, label=f"{mode}, paper reports (WRN-28-10)"
            )
    ax.set_xticks(severities)
    ax.set_xlabel("severity")
    ax.set_ylabel(f"mean error over {corruptions} corruptions (%)")
    ax.set_title(f"ResNet-{depth}, {images} images per corruption and severity")
    ax.legend(fontsize=8)
    save_figure(fig, path, dpi=100)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data-dir", type=data_path, default=None, help="default: $REPROZOO_DATA/cifar10")
    parser.add_argument("--images", type=int, default=400, help="per corruption and severity")
    parser.add_argument("--corruptions", nargs="+", default=None, help="default: the 15 of CIFAR-10-C's benchmark")
    parser.add_argument("--severities", nargs="+", type=int, default=[1, 2, 3, 4, 5])
    parser.add_argument("--batch", type=int, default=200)
    parser.add_argument("--depth", type=int, default=20, choices=[20, 32, 44])
    parser.add_argument("--cache", type=Path, default=None, help="where generated corruptions are cached")
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results")
    parser.add_argument("--curve-corruptions", nargs="+", default=["gaussian_noise", "defocus_blur", "contrast"])
    parser.add_argument("--curve-images", type=int, default=2000, help="per curve corruption (severity 5)")
    parser.add_argument("--grid-corruptions", nargs="+", default=["gaussian_noise", "defocus_blur", "contrast"])
    parser.add_argument("--grid-lrs", nargs="+", type=float, default=[1e-4, 3e-4, 1e-3, 3e-3, 1e-2])
    parser.add_argument("--grid-batches", nargs="+", type=int, default=[50, 100, 200])
    parser.add_argument("--no-grid", action="store_true", help="skip the lr x batch-size grid")
    args = parser.parse_args()
    args.data_dir = args.data_dir or data_root() / "cifar10"
    clean_npz, weights = cifar10_tent_files("tent_cifar10c.py", args.data_dir, args.depth)
    bad = [s for s in args.severities if s not in (1, 2, 3, 4, 5)]
    if bad:
        parser.error(f"--severities must be in 1..5, got {bad}")
    quiet_lightning()
    corruptions = args.corruptions or [c for c in BENCHMARK_CORRUPTIONS if c in available_corruptions()]
    severities = sorted(set(args.severities))
    top = severities[-1]

    def datamodule(cache: str, names, severity: int, images: int, batch: int) -> CIFAR10CDataModule:
        dm = CIFAR10CDataModule(
            data_dir=cache,
            source="generate",
            clean="npz",
            clean_npz=str(clean_npz),
            corruptions=names,
            severities=(severity,),
            num_examples=images,
            subset="random",
            batch_size=batch,
            seed=0,
        )
        dm.prepare_data()
        dm.setup("test")
        return dm

    total = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        cache = str(args.cache or Path(tmp))
        errors: dict[str, dict[int, dict[str, float]]] = {r: {} for r in RUNS}  # run -> severity -> corruption
        entropies: dict[str, dict[str, float]] = {}  # at the top severity
        seconds = dict.fromkeys(RUNS, 0.0)
        generate_s = 0.0
        for severity in severities:
            start = time.perf_counter()
            dm = datamodule(cache, corruptions, severity, args.images, args.batch)
            generate_s += time.perf_counter() - start
            for run in RUNS:
                merged, took = _run(weights, run, 1e-3, dm, tmp)
                seconds[run] += took
                errors[run][severity] = {c: merged[f"test/error/{c}-{severity}"] for c in corruptions}
                if severity == top:
                    entropies[run] = {c: merged[f"test/entropy/{c}-{severity}"] for c in corruptions}
            print(
                f"severity {severity}: "
                + ", ".join(f"{r} {100 * np.mean(list(errors[r][severity].values())):.1f}" for r in RUNS),
                flush=True,
            )
        speed = {r: len(severities) * len(corruptions) * args.images / seconds[r] for r in RUNS}

        curve: dict[str, np.ndarray] = {}
        if args.curve_images > 0 and args.curve_corruptions:
            cdm = datamodule(cache, args.curve_corruptions, 5, args.curve_images, args.batch)
            for mode in ("norm", "tent"):
                curve[mode] = np.mean([_per_batch_errors(weights, mode, loader) for loader in cdm.test_dataloader()], 0)

        grid: dict[tuple[float, int], float] = {}
        if not args.no_grid:
            for batch in args.grid_batches:
                sub = datamodule(cache, args.grid_corruptions, top, args.images, batch)
                for lr in args.grid_lrs:
                    merged, _ = _run(weights, "tent", lr, sub, tmp)
                    grid[(lr, batch)] = float(np.mean([merged[f"test/error/{d}"] for d in sub.domains]))
    total_s = time.perf_counter() - total

    mean = {r: {s: 100 * float(np.mean(list(errors[r][s].values()))) for s in severities} for r in RUNS}
    args.out.mkdir(parents=True, exist_ok=True)
    lines = [
        f"# TENT on CIFAR-10-C-style corruptions (`python benchmarks/tent_cifar10c.py {shown_command(sys.argv[1:])}`, "
        f"{time.strftime('%Y-%m-%d')}, 2-core CPU, {total_s / 60:.1f} min)",
        "",
        f"ResNet-{args.depth} (pretrained, `{shown(weights.parent)}`), {args.images} random real CIFAR-10 "
        f"test images (JPEG q75) per corruption and severity, generated with CIFAR-10-C's parameters "
        f"({generate_s:.0f} s for all); one pass over each, batch {args.batch}, Adam lr 1e-3, 1 step per batch. "
        "`tent`: reset per corruption (the official protocol); `tent-online`: no reset between the corruptions of a "
        "severity (continual, in the order of the table).",
        "",
        "Mean error (%) over the corruptions, per severity:",
        "",
        "| severity | " + " | ".join(RUNS) + " |",
        "|---|" + "---|" * len(RUNS),
        *[f"| {s} | " + " | ".join(f"{mean[r][s]:.1f}" for r in RUNS) + " |" for s in severities],
        "",
        f"Paper reports (WRN-28-10, the official CIFAR-10-C, severity 5, mean over 15 corruptions): source "
        f"{PAPER['source']} %, norm {PAPER['norm']} %, tent {PAPER['tent']} %.",
    ]
    for severity in severities:
        lines += [
            "",
            f"Severity {severity}, error (%):",
            "",
            "| corruption | " + " | ".join(RUNS) + " |",
            "|---|" + "---|" * len(RUNS),
            *[
                f"| {c} | " + " | ".join(f"{100 * errors[r][severity][c]:.1f}" for r in RUNS) + " |"
                for c in corruptions
            ],
            "| **mean** | " + " | ".join(f"**{mean[r][severity]:.1f}**" for r in RUNS) + " |",
        ]
    lines += [
        "",
        "Throughput (images/s, whole test loop): "
        + ", ".join(f"{r} {speed[r]:.0f}" for r in RUNS)
        + f"; tent adapts at {speed['tent'] / speed['source']:.2f}x the speed of plain inference.",
    ]

    fig, ax = _figure((max(8, 0.7 * len(corruptions) + 3), 4.5))
    width = 0.8 / len(RUNS)
    for i, run in enumerate(RUNS):
        ax.bar(
            [j + (i - (len(RUNS) - 1) / 2) * width for j in range(len(corruptions))],
            [100 * errors[run][top][c] for c in corruptions],
            width,
            label=f"{run} (mean {mean[run][top]:.1f} %)",
        )
    ax.set_xticks(range(len(corruptions)), corruptions, rotation=45, ha="right")
    ax.set_ylabel("error (%)")
    ax.set_title(f"ResNet-{args.depth}, CIFAR-10-C-style corruptions, severity {top}")
    ax.legend()
    save_figure(fig, args.out / "tent_cifar10c.png", dpi=100)

    severity_figure(mean, severities, len(corruptions), args.images, args.depth, args.out / "tent_severity.png")

    if curve:
        n = len(curve["tent"])
        lines += [
            "",
            f"Error (%) of batch k (each predicted before its own update), mean over "
            f"{', '.join(args.curve_corruptions)} at severity 5, {args.curve_images} images each (batch {args.batch}):",
            "",
            "| batches seen | " + " | ".join(str(k) for k in range(n)) + " |",
            "|---|" + "---|" * n,
            *[f"| {m} | " + " | ".join(f"{100 * v:.1f}" for v in curve[m]) + " |" for m in ("norm", "tent")],
        ]
        fig, ax = _figure((6.5, 4.2))
        for mode in ("norm", "tent"):
            ax.plot(range(n), 100 * curve[mode], marker=".", label=f"{mode}, batch k")
            running = 100 * np.cumsum(curve[mode]) / np.arange(1, n + 1)
            ax.plot(range(n), running, linestyle="--", label=f"{mode}, mean of batches 0..k")
        from matplotlib.ticker import MaxNLocator

        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.set_xlabel(f"adaptation batches seen (= TENT steps; batch {args.batch})")
        ax.set_ylabel("error (%)")
        ax.set_title(f"Severity 5, mean over {', '.join(args.curve_corruptions)}")
        ax.legend()
        save_figure(fig, args.out / "tent_steps.png", dpi=100)

    fig, ax = _figure((6, 4.5))
    for run in RUNS:
        ax.scatter(
            [entropies[run][c] for c in corruptions], [100 * errors[run][top][c] for c in corruptions], label=run, s=18
        )
    ax.set_xlabel("mean prediction entropy (nats)")
    ax.set_ylabel("error (%)")
    ax.set_title(f"Error vs entropy, one point per corruption (severity {top})")
    ax.legend()
    save_figure(fig, args.out / "tent_error_vs_entropy.png", dpi=100)

    figures = ["tent_cifar10c.png", "tent_severity.png"] + (["tent_steps.png"] if curve else [])
    figures.append("tent_error_vs_entropy.png")
    if grid:
        lrs, batches = args.grid_lrs, args.grid_batches
        values = np.array([[100 * grid[(lr, b)] for lr in lrs] for b in batches])
        fig, ax = _figure((6.5, 3.8))
        image = ax.imshow(values, cmap="viridis_r", aspect="auto")
        for i in range(len(batches)):
            for j in range(len(lrs)):
                ax.text(j, i, f"{values[i, j]:.1f}", ha="center", va="center", color="w", fontsize=9)
        ax.set_xticks(range(len(lrs)), [f"{lr:g}" for lr in lrs])
        ax.set_yticks(range(len(batches)), [str(b) for b in batches])
        ax.set_xlabel("learning rate (Adam)")
        ax.set_ylabel("batch size")
        ax.set_title(f"TENT mean error (%) over {', '.join(args.grid_corruptions)}")
        fig.colorbar(image, ax=ax)
        save_figure(fig, args.out / "tent_sensitivity.png", dpi=100)
        figures.append("tent_sensitivity.png")
        lines += [
            "",
            f"TENT sensitivity, mean error (%) over {', '.join(args.grid_corruptions)} (severity "
            f"{top}, {args.images} images each); rows: batch size, columns: Adam learning rate:",
            "",
            "| batch \\ lr | " + " | ".join(f"{lr:g}" for lr in lrs) + " |",
            "|---|" + "---|" * len(lrs),
        ]
        lines += [f"| {b} | " + " | ".join(f"{100 * grid[(lr, b)]:.1f}" for lr in lrs) + " |" for b in batches]
    lines += ["", "Figures: " + ", ".join(f"`{f}`" for f in figures) + "."]
    write_atomic(args.out / "tent_cifar10c.md", ("\n".join(lines) + "\n").encode())
    print("\n".join(lines))


if __name__ == "__main__":
    main()
