"""The memorization experiment (Zhang et al. 2017, as the seed notebook runs it): BigAnimalNet fitted to AFHQ with
real, partly random (15 %) and fully random labels, from the three configs in ``configs/memorization/``, run through
the CLI in this process for all their epochs (no early stopping); then the seed's figures: train and validation
accuracy per epoch for the three label settings, the Frobenius norm of the weights per epoch, and the 3-D loss
surface around each run's final weights (LossLandscape).

Data: ``--data-dir``, a folder holding ``afhq/train/{cat,dog,wild}/`` (default: the data root, ``$REPROZOO_DATA``).
The full AFHQ (with ``afhq/val/``) gets the configs' subsets (100 train / 100 val). A small sample (no ``afhq/val/``
and fewer than 200 training images, like the data root's 41 real AFHQ images) is too few to show anything, so it is
cut into views: 20 % of the source images of each class are held out for validation, and each image gives
``--views`` crops (a 3 x 3 grid of half-size crops and their mirror images, 18 by default), saved at 64 x 64 into a
temporary AFHQ-layout folder that the configs read; validation views come from held-out images only. The script
stops when the images are not there, unless ``--download`` lets the datamodule fetch AFHQ into ``--data-dir``.

    python benchmarks/memorization.py                          # writes benchmarks/results/memorization*.{png,md}
    python benchmarks/memorization.py --max-epochs 100 --out runs/memorization
"""

from __future__ import annotations

import argparse
import io
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from _common import ROOT, quiet_lightning, shown, stop_missing_data

from reprozoo._files import data_path, data_root, save_figure, write_atomic
from reprozoo.callbacks import FrobeniusNormMonitor, LossLandscape, load_landscape
from reprozoo.cli import run_lightning

# The curves' labels and the configs they run (the seed's run names are not recorded: docs/classifier.md).
SETTINGS = {"real labels": "real_labels", "15 % random labels": "partly_random", "random labels": "fully_random"}
COLORS = {"real labels": "tab:green", "15 % random labels": "tab:orange", "random labels": "tab:red"}
CLASSES = ("cat", "dog", "wild")
IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png"}  # what AnimalFacesDataModule reads
SMALL = 200  # the configs' num_train + num_val: a sample with fewer training images is cut into views
VIEW_SIZE = 64  # the views are stored at 64 x 64; the datamodule resizes them to the configs' 32 x 32
VAL_SHARE = 0.2


def image_files(folder: Path) -> list[Path]:
    return sorted(p for p in folder.iterdir() if not p.name.startswith(".") and p.suffix.lower() in IMAGE_SUFFIXES)


def count_images(folder: Path) -> int:
    """The images in ``folder/{cat,dog,wild}/`` (0 when a class folder is missing or empty: not usable)."""
    counts = [len(image_files(folder / c)) if (folder / c).is_dir() else 0 for c in CLASSES]
    return sum(counts) if all(counts) else 0


def views(image, n: int) -> list:
    """Up to ``n`` crops of a PIL image: a 3 x 3 grid of half-size crops (stride a quarter of the side), then the
    same crops mirrored left-right. Half-size crops of a face image still show most of the face; the mirror images
    double the views without new content, as the usual flip augmentation does."""
    from PIL import Image

    w, h = image.size
    cw, ch = w // 2, h // 2
    crops = [image.crop((i * w // 4, j * h // 4, i * w // 4 + cw, j * h // 4 + ch)) for j in range(3) for i in range(3)]
    crops += [c.transpose(Image.Transpose.FLIP_LEFT_RIGHT) for c in crops]
    return [c.resize((VIEW_SIZE, VIEW_SIZE), Image.Resampling.BILINEAR, reducing_gap=None) for c in crops[:n]]


def make_views(source: Path, dest: Path, n_views: int, seed: int) -> dict[str, int]:
    """Write ``dest/afhq/{train,val}/<class>/`` from the images of ``source/<class>/``: per class, a seeded 20 % of
    the source images (at least one) go to ``val``, the rest to ``train``; each image becomes ``n_views`` PNGs.
    Returns how many source images each split got."""
    from PIL import Image

    rng = np.random.default_rng(seed)
    sources = {"train": 0, "val": 0}
    for cls in CLASSES:
        files = image_files(source / cls)
        held = set(rng.choice(len(files), size=max(1, round(VAL_SHARE * len(files))), replace=False).tolist())
        for k, path in enumerate(files):
            split = "val" if k in held else "train"
            sources[split] += 1
            with Image.open(path) as image:
                image = image.convert("RGB")
            for v, view in enumerate(views(image, n_views)):
                buffer = io.BytesIO()
                view.save(buffer, format="PNG")
                out = dest / "afhq" / split / cls / f"{path.stem}_v{v:02d}.png"
                out.parent.mkdir(parents=True, exist_ok=True)
                write_atomic(out, buffer.getvalue())
    return sources


def _scalars(log_dir: str, tag: str) -> list[tuple[int, float]]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(log_dir, size_guidance={"scalars": 0}).Reload()
    if tag not in events.Tags()["scalars"]:
        return []
    return [(e.step, e.value) for e in events.Scalars(tag)]


def run_setting(config: str, args: argparse.Namespace, work: Path) -> dict:
    argv = [
        "fit",
        "--config",
        str(ROOT / "reprozoo" / "configs" / "memorization" / "base.yaml"),  # the shared settings, then the setting's
        "--config",
        str(ROOT / "reprozoo" / "configs" / "memorization" / f"{config}.yaml"),
        "--trainer.logger.init_args.save_dir",
        str(work),
        "--checkpoint.dirpath",
        str(work / config / "ckpt"),
        "--trainer.enable_progress_bar",
        "false",
        "--trainer.enable_model_summary",
        "false",
    ]
    if args.max_epochs:
        argv += ["--trainer.max_epochs", str(args.max_epochs)]
    argv += ["--data.init_args.data_dir", str(args.train_data)]
    if args.small:  # the views: all of them
        argv += ["--data.init_args.num_train", "null", "--data.init_args.num_val", "null"]
    start = time.perf_counter()
    cli = run_lightning(argv)
    seconds = time.perf_counter() - start
    trainer = cli.trainer
    monitor = next(c for c in trainer.callbacks if isinstance(c, FrobeniusNormMonitor))
    landscape_cb = next(c for c in trainer.callbacks if isinstance(c, LossLandscape))
    log_dir = trainer.logger.log_dir
    # The epoch-level scalars are logged at the global step of the epoch's end: map them back to epochs.
    steps_of_epoch = {}
    for step, epoch in _scalars(log_dir, "epoch"):
        steps_of_epoch.setdefault(step, int(epoch))
    train = [(steps_of_epoch.get(s, i), v) for i, (s, v) in enumerate(_scalars(log_dir, "train/acc_epoch"))]
    val = [(steps_of_epoch.get(s, i), v) for i, (s, v) in enumerate(_scalars(log_dir, "val/acc"))]
    # the sanity check's val/acc is not logged (Lightning drops it), so val[k] is the end of epoch k
    data = cli.datamodule
    return {
        "train": train,
        "val": val,
        "norms": [(-1, monitor.initial["norms"]["total"])]
        + [(e["epoch"], e["norms"]["total"]) for e in monitor.history],
        "initial": monitor.initial["norms"],
        "final": monitor.history[-1]["norms"],
        "landscape": load_landscape(landscape_cb.history[-1]["file"]),
        "epochs": trainer.current_epoch,
        "memorised_at": next((e for e, v in train if v > 0.999), None),
        "final_train": train[-1][1] if train else float("nan"),
        "final_val": val[-1][1] if val else float("nan"),
        "mean_val_last10": float(np.mean([v for _, v in val[-10:]])) if val else float("nan"),
        "n_train": len(data.splits["train"]),
        "n_val": len(data.splits["val"]),
        "changed": int((data.splits["train"].labels != data.true_labels).sum()),
        "seconds": seconds,
        "log_dir": log_dir,
    }


def curves_figure(results: dict[str, dict]):
    """The seed's two curve plots: accuracy per epoch (train solid, validation dashed) and the total Frobenius norm
    of the parameters per epoch."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(13, 4.6), layout="constrained")
    FigureCanvasAgg(fig)
    acc_ax, norm_ax = fig.subplots(1, 2, width_ratios=[1.5, 1])
    for label, r in results.items():
        if r["train"]:
            acc_ax.plot(
                [e + 1 for e, _ in r["train"]], [v for _, v in r["train"]], color=COLORS[label], label=f"{label}: train"
            )
        if r["val"]:
            acc_ax.plot(
                [e + 1 for e, _ in r["val"]],
                [v for _, v in r["val"]],
                color=COLORS[label],
                linestyle="--",
                label=f"{label}: val",
            )
        norm_ax.plot([e + 1 for e, _ in r["norms"]], [v for _, v in r["norms"]], color=COLORS[label], label=label)
    acc_ax.axhline(1 / 3, color="grey", linewidth=0.8, linestyle=":", label="chance (1/3)")
    acc_ax.set_xlabel("epoch")
    acc_ax.set_ylabel("accuracy")
    acc_ax.set_ylim(0, 1.02)
    acc_ax.set_title("BigAnimalNet on AFHQ: memorisation")
    acc_ax.legend(fontsize=7, loc="center right")
    norm_ax.set_xlabel("epoch (0: before training)")
    norm_ax.set_ylabel("Frobenius norm of all parameters")
    norm_ax.set_title("Size of the model")
    norm_ax.legend(fontsize=7)
    return fig


def landscape_figure(results: dict[str, dict]):
    """The loss surface around each run's final weights, in 3-D (the filter-normalised random plane)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(5 * len(results), 4.6), layout="constrained")
    FigureCanvasAgg(fig)
    for i, (label, r) in enumerate(results.items()):
        ax = fig.add_subplot(1, len(results), i + 1, projection="3d")
        land = r["landscape"]
        xx, yy = np.meshgrid(land["x"], land["y"])
        ax.plot_surface(xx, yy, land["loss"], cmap="viridis", linewidth=0, antialiased=True)
        ax.set_title(f"{label}: training loss", fontsize=10)
        ax.set_xlabel("direction 1")
        ax.set_ylabel("direction 2")
    return fig


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data-dir", type=data_path, default=None, help="holds afhq/train/ (default: the data root)")
    parser.add_argument("--download", action="store_true", help="download AFHQ into --data-dir when it is missing")
    parser.add_argument("--max-epochs", type=int, default=None, help="override the configs' max_epochs (200)")
    parser.add_argument("--views", type=int, default=18, help="views cut from each image of a small sample (1-18)")
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results")
    parser.add_argument("--work", type=Path, default=None, help="where the runs log (default: a temporary folder)")
    args = parser.parse_args()
    if not 1 <= args.views <= 18:
        print(
            f"memorization.py: --views must be in 1..18 (3 x 3 crops and their mirrors), got {args.views}",
            file=sys.stderr,
        )
        raise SystemExit(2)
    args.data_dir = args.data_dir or data_root()
    train_dir = args.data_dir / "afhq" / "train"
    n_images = count_images(train_dir)
    if not n_images and not args.download:
        files = [f"afhq/train/{c}/*.jpg" for c in CLASSES]
        stop_missing_data("memorization.py", files, args.data_dir, other_fix="run with --download to fetch AFHQ there")
    args.small = 0 < n_images < SMALL and not (args.data_dir / "afhq" / "val").is_dir()
    quiet_lightning(offline=not args.download)

    with tempfile.TemporaryDirectory() as tmp:
        work = args.work or Path(tmp)
        args.train_data, sources = args.data_dir, None
        if args.small:
            args.train_data = Path(tmp) / "views"
            sources = make_views(train_dir, args.train_data, args.views, seed=2021)
        results = {label: run_setting(config, args, work) for label, config in SETTINGS.items()}
        args.out.mkdir(parents=True, exist_ok=True)
        save_figure(curves_figure(results), args.out / "memorization.png", dpi=110)
        save_figure(landscape_figure(results), args.out / "memorization_landscape.png", dpi=90)

    first = next(iter(results.values()))
    n_images = count_images(train_dir)  # after any download
    if args.small:
        source = (
            f"{shown(args.data_dir / 'afhq')} ({n_images} real AFHQ images: {sources['train']} for training, "
            f"{sources['val']} held out, {args.views} views of each)"
        )
    else:
        source = f"{shown(args.data_dir / 'afhq')} ({n_images} real AFHQ training images)"
    lines = [
        "# Memorization: BigAnimalNet on AFHQ with real, partly random and random labels",
        "",
        f"`python benchmarks/memorization.py{'' if not args.max_epochs else f' --max-epochs {args.max_epochs}'}` "
        f"({time.strftime('%Y-%m-%d')}), configs `configs/memorization/*.yaml` (SGD 5e-3 momentum 0.9, batch 128, "
        f"no early stopping), data {source}: {first['n_train']} training and {first['n_val']} "
        "validation items (32x32, flattened). Figures: `memorization.png`, `memorization_landscape.png`.",
        "",
        "| labels | changed train labels | epochs | train acc = 1 from epoch | final train acc | final val acc "
        "| mean val acc, last 10 epochs | total norm start -> end | s |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for label, r in results.items():
        memorised = "-" if r["memorised_at"] is None else str(r["memorised_at"] + 1)
        lines.append(
            f"| {label} | {r['changed']} / {r['n_train']} | {r['epochs']} | {memorised} | {r['final_train']:.3f} | "
            f"{r['final_val']:.3f} | {r['mean_val_last10']:.3f} | "
            f"{r['initial']['total']:.2f} -> {r['final']['total']:.2f} | {r['seconds']:.0f} |"
        )
    lines += ["", "Chance is 1/3. Epochs are counted from 1."]
    write_atomic(args.out / "memorization.md", ("\n".join(lines) + "\n").encode())
    print("\n".join(lines))


if __name__ == "__main__":
    main()
