"""TENT on CIFAR-10-C-style corruptions (Wang et al., ICLR 2021), in one run: the pretrained CIFAR ResNet-20
(``$REPROZOO_DATA/cifar10/pretrained``) on the real CIFAR-10 test images (``test_jpeg_q75.npz``) corrupted at
severity 5 with CIFAR-10-C's parameters (``CIFAR10CDataModule(source="generate")``), batch 200, Adam lr 1e-3, one
step per batch, reset for each corruption; error of ``source`` (no adaptation), ``norm`` (batch statistics) and
``tent`` per corruption and their mean, and the throughput of adaptation against plain inference of the model;
then the seed notebook's two figures: error against mean prediction entropy (one point per corruption and mode),
and TENT's sensitivity to the learning rate and the batch size (mean error over ``--grid-corruptions``).

Data: ``--data-dir`` (default ``$REPROZOO_DATA/cifar10``) holding ``test_jpeg_q75.npz`` and
``pretrained/resnet<depth>-*.th``; the script stops when they are not there. The images there are sorted by class,
so each corruption uses a seeded random ``--images`` of them (a batch of one class would wreck batch statistics).
Writes ``benchmarks/results/tent_cifar10c.{md,png}``.

    python benchmarks/tent_cifar10c.py                         # every available corruption, 2,000 images each
    python benchmarks/tent_cifar10c.py --images 500 --corruptions gaussian_noise fog --no-grid
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import lightning as L
import numpy as np
from _common import ROOT, quiet_lightning, shown, stop_missing_data

from reprozoo._files import data_path, data_root, save_figure, write_atomic
from reprozoo.datamodules.cifar10c import CIFAR10CDataModule
from reprozoo.methods.tent import TentModule
from reprozoo.nets import load_legacy_cifar_resnet
from reprozoo.transforms.corruptions import available_corruptions

MODES = ("source", "norm", "tent")


def _run(weights: Path, mode: str, lr: float, dm: CIFAR10CDataModule, root: str) -> tuple[dict, float]:
    """One test pass of a fresh pretrained model in ``mode``: (all logged metrics, seconds)."""
    model = TentModule(load_legacy_cifar_resnet(weights), mode=mode, lr=lr, steps=1, reset="each_domain")
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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data-dir", type=data_path, default=None, help="default: $REPROZOO_DATA/cifar10")
    parser.add_argument("--images", type=int, default=2000, help="per corruption")
    parser.add_argument("--corruptions", nargs="+", default=None, help="default: every available one")
    parser.add_argument("--severity", type=int, default=5)
    parser.add_argument("--batch", type=int, default=200)
    parser.add_argument("--depth", type=int, default=20, choices=[20, 32, 44])
    parser.add_argument("--cache", type=Path, default=None, help="where generated corruptions are cached")
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results")
    parser.add_argument("--grid-corruptions", nargs="+", default=["gaussian_noise", "defocus_blur", "contrast"])
    parser.add_argument("--grid-lrs", nargs="+", type=float, default=[1e-4, 3e-4, 1e-3, 3e-3, 1e-2])
    parser.add_argument("--grid-batches", nargs="+", type=int, default=[50, 100, 200])
    parser.add_argument("--no-grid", action="store_true", help="skip the lr x batch-size grid")
    args = parser.parse_args()
    args.data_dir = args.data_dir or data_root() / "cifar10"
    clean_npz = args.data_dir / "test_jpeg_q75.npz"
    weights = next(iter(sorted((args.data_dir / "pretrained").glob(f"resnet{args.depth}-*.th"))), None)
    missing = [] if clean_npz.is_file() else [clean_npz.name]
    missing += [] if weights else [f"pretrained/resnet{args.depth}-*.th"]
    if missing:
        stop_missing_data("tent_cifar10c.py", missing, args.data_dir)
    quiet_lightning()
    corruptions = args.corruptions or list(available_corruptions())

    with tempfile.TemporaryDirectory() as tmp:
        dm = CIFAR10CDataModule(
            data_dir=str(args.cache or Path(tmp)),
            source="generate",
            clean="npz",
            clean_npz=str(clean_npz),
            corruptions=corruptions,
            severities=(args.severity,),
            num_examples=args.images,
            subset="random",
            batch_size=args.batch,
            seed=0,
        )
        start = time.perf_counter()
        dm.prepare_data()
        dm.setup("test")
        generate_s = time.perf_counter() - start
        errors: dict[str, dict[str, float]] = {}
        entropies: dict[str, dict[str, float]] = {}
        speed: dict[str, float] = {}
        for mode in MODES:
            merged, seconds = _run(weights, mode, 1e-3, dm, tmp)
            errors[mode] = {d: merged[f"test/error/{d}"] for d in dm.domains}
            entropies[mode] = {d: merged[f"test/entropy/{d}"] for d in dm.domains}
            speed[mode] = len(dm.domains) * args.images / seconds
        grid: dict[tuple[float, int], float] = {}
        if not args.no_grid:
            for batch in args.grid_batches:
                sub = CIFAR10CDataModule(
                    data_dir=dm.hparams.data_dir,
                    source="generate",
                    clean="npz",
                    clean_npz=dm.hparams.clean_npz,
                    corruptions=args.grid_corruptions,
                    severities=(args.severity,),
                    num_examples=args.images,
                    subset="random",
                    batch_size=batch,
                    seed=0,
                )
                for lr in args.grid_lrs:
                    merged, _ = _run(weights, "tent", lr, sub, tmp)
                    grid[(lr, batch)] = float(np.mean([merged[f"test/error/{d}"] for d in sub.domains]))

    domains = list(errors["source"])
    mean = {m: float(np.mean([errors[m][d] for d in domains])) for m in MODES}
    lines = [
        f"# TENT on CIFAR-10-C-style corruptions (`python benchmarks/tent_cifar10c.py` with the arguments below, {time.strftime('%Y-%m-%d')}, "
        "2-core CPU)",
        "",
        f"ResNet-{args.depth} (pretrained, `{shown(weights.parent)}`), {args.images} random real CIFAR-10 "
        f"test images (JPEG q75) per corruption, severity {args.severity}, generated with CIFAR-10-C's parameters "
        f"({generate_s:.0f} s for all); batch {args.batch}, Adam lr 1e-3, 1 step per batch, reset per corruption.",
        "",
        "| corruption | source | norm | tent |",
        "|---|---|---|---|",
        *[
            f"| {d.rsplit('-', 1)[0]} | {100 * errors['source'][d]:.1f} | {100 * errors['norm'][d]:.1f} | "
            f"{100 * errors['tent'][d]:.1f} |"
            for d in domains
        ],
        f"| **mean** | **{100 * mean['source']:.1f}** | **{100 * mean['norm']:.1f}** | **{100 * mean['tent']:.1f}** |",
        "",
        "Error in %. Throughput (images/s, whole test loop): "
        + ", ".join(f"{m} {speed[m]:.0f}" for m in MODES)
        + f"; tent adapts at {speed['tent'] / speed['source']:.2f}x the speed of plain inference.",
        "",
        "The paper reports, for the robustbench WRN-28-10 on the real CIFAR-10-C at severity 5 (mean over 15 "
        "corruptions): source 43.5 %, norm 20.4 %, tent 18.6 %.",
    ]
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(max(8, 0.7 * len(domains) + 3), 4.5), layout="constrained")
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    width = 0.27
    for i, mode in enumerate(MODES):
        ax.bar(
            [j + (i - 1) * width for j in range(len(domains))],
            [100 * errors[mode][d] for d in domains],
            width,
            label=f"{mode} (mean {100 * mean[mode]:.1f} %)",
        )
    ax.set_xticks(range(len(domains)), [d.rsplit("-", 1)[0] for d in domains], rotation=45, ha="right")
    ax.set_ylabel("error (%)")
    ax.set_title(f"ResNet-{args.depth}, CIFAR-10-C-style corruptions, severity {args.severity}")
    ax.legend()
    args.out.mkdir(parents=True, exist_ok=True)
    save_figure(fig, args.out / "tent_cifar10c.png", dpi=100)

    # Error against entropy: the paper's motivation (lower entropy goes with lower error).
    fig2 = Figure(figsize=(6, 4.5), layout="constrained")
    FigureCanvasAgg(fig2)
    ax2 = fig2.add_subplot()
    for mode in MODES:
        ax2.scatter([entropies[mode][d] for d in domains], [100 * errors[mode][d] for d in domains], label=mode, s=18)
    ax2.set_xlabel("mean prediction entropy (nats)")
    ax2.set_ylabel("error (%)")
    ax2.set_title("Error vs entropy, one point per corruption")
    ax2.legend()
    save_figure(fig2, args.out / "tent_error_vs_entropy.png", dpi=100)
    if grid:
        lrs, batches = args.grid_lrs, args.grid_batches
        values = np.array([[100 * grid[(lr, b)] for lr in lrs] for b in batches])
        fig3 = Figure(figsize=(6.5, 3.8), layout="constrained")
        FigureCanvasAgg(fig3)
        ax3 = fig3.add_subplot()
        image = ax3.imshow(values, cmap="viridis_r", aspect="auto")
        for i in range(len(batches)):
            for j in range(len(lrs)):
                ax3.text(j, i, f"{values[i, j]:.1f}", ha="center", va="center", color="w", fontsize=9)
        ax3.set_xticks(range(len(lrs)), [f"{lr:g}" for lr in lrs])
        ax3.set_yticks(range(len(batches)), [str(b) for b in batches])
        ax3.set_xlabel("learning rate (Adam)")
        ax3.set_ylabel("batch size")
        ax3.set_title(f"TENT mean error (%) over {', '.join(args.grid_corruptions)}")
        fig3.colorbar(image, ax=ax3)
        save_figure(fig3, args.out / "tent_sensitivity.png", dpi=100)
        lines += [
            "",
            f"TENT sensitivity, mean error (%) over {', '.join(args.grid_corruptions)} (severity "
            f"{args.severity}, {args.images} images each); rows: batch size, columns: Adam learning rate:",
            "",
            "| batch \\ lr | " + " | ".join(f"{lr:g}" for lr in lrs) + " |",
            "|---|" + "---|" * len(lrs),
        ]
        lines += [f"| {b} | " + " | ".join(f"{100 * grid[(lr, b)]:.1f}" for lr in lrs) + " |" for b in batches]
    lines += [
        "",
        "Figures: `tent_cifar10c.png`, `tent_error_vs_entropy.png`" + (", `tent_sensitivity.png`." if grid else "."),
    ]
    write_atomic(args.out / "tent_cifar10c.md", ("\n".join(lines) + "\n").encode())
    print("\n".join(lines))


if __name__ == "__main__":
    main()
