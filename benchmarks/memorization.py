"""The memorization experiment: BigAnimalNet fitted to AFHQ with real, partly random (15 %) and fully random labels,
from the three configs in ``configs/memorization/``, run through the CLI in this process; then the figures of the
Neuromatch regularization tutorial: train and validation accuracy per epoch for the three label settings, and the
Frobenius norm per layer at the start and at the end of training.

Data: ``--data-dir``, a folder holding ``afhq/train/{cat,dog,wild}/`` (default: the data root, ``$REPROZOO_DATA``).
A small sample (no ``afhq/val/`` and fewer than 200 training images, like the data root's 41 real AFHQ images) is
used whole, 20 % held out for validation; the full AFHQ gets the configs' subsets (100 train / 100 val). The script
stops when the images are not there, unless ``--download`` lets the datamodule fetch AFHQ into ``--data-dir``.

    python benchmarks/memorization.py                          # writes benchmarks/results/memorization.{png,md}
    python benchmarks/memorization.py --max-epochs 100 --out runs/memorization
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

from _common import ROOT, quiet_lightning, shown, stop_missing_data

from reprozoo._files import data_path, data_root, save_figure, write_atomic
from reprozoo.callbacks import FrobeniusNormMonitor
from reprozoo.cli import run_lightning

SETTINGS = {"real labels": "real_labels", "15 % random labels": "partly_random", "random labels": "fully_random"}
CLASSES = ("cat", "dog", "wild")
IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png"}  # what AnimalFacesDataModule reads
SMALL = 200  # the configs' num_train + num_val: a sample with fewer training images is used whole


def count_images(folder: Path) -> int:
    """The images in ``folder/{cat,dog,wild}/`` (0 when a class folder is missing or empty: not usable)."""
    counts = [
        sum(1 for p in (folder / c).iterdir() if not p.name.startswith(".") and p.suffix.lower() in IMAGE_SUFFIXES)
        if (folder / c).is_dir()
        else 0
        for c in CLASSES
    ]
    return sum(counts) if all(counts) else 0


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
    argv += ["--data.init_args.data_dir", str(args.data_dir)]
    if args.small:  # e.g. 41 images: all of them, 20 % held out
        argv += ["--data.init_args.num_train", "null", "--data.init_args.num_val", "null"]
    start = time.perf_counter()
    cli = run_lightning(argv)
    seconds = time.perf_counter() - start
    trainer = cli.trainer
    monitor = next(c for c in trainer.callbacks if isinstance(c, FrobeniusNormMonitor))
    log_dir = trainer.logger.log_dir
    # The epoch-level scalars are logged at the global step of the epoch's end: map them back to epochs.
    epochs = [int(v) for _, v in _scalars(log_dir, "epoch")]
    steps_of_epoch = {}
    for (step, _), epoch in zip(_scalars(log_dir, "epoch"), epochs):
        steps_of_epoch.setdefault(step, epoch)
    train = [(steps_of_epoch.get(s, i), v) for i, (s, v) in enumerate(_scalars(log_dir, "train/acc_epoch"))]
    val = [(steps_of_epoch.get(s, i), v) for i, (s, v) in enumerate(_scalars(log_dir, "val/acc"))]
    data = cli.datamodule
    return {
        "train": train,
        "val": val,
        "initial": monitor.initial["norms"],
        "final": monitor.history[-1]["norms"],
        "epochs": trainer.current_epoch,
        "memorised_at": next((e for e, v in train if v > 0.999), None),
        "best_val": max((v for _, v in val), default=float("nan")),
        "n_train": len(data.splits["train"]),
        "n_val": len(data.splits["val"]),
        "changed": int((data.splits["train"].labels != data.true_labels).sum()),
        "seconds": seconds,
        "log_dir": log_dir,
    }


def figure(results: dict[str, dict]):
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(15, 4.8), layout="constrained")
    FigureCanvasAgg(fig)
    acc_ax, *norm_axes = fig.subplots(1, 1 + len(results), width_ratios=[1.6] + [1] * len(results))
    colors = dict(zip(results, ["tab:green", "tab:orange", "tab:red"]))
    for label, r in results.items():
        if r["train"]:
            acc_ax.plot(*zip(*r["train"]), color=colors[label], label=f"{label}: train")
        if r["val"]:
            acc_ax.plot(*zip(*r["val"]), color=colors[label], linestyle="--", label=f"{label}: val")
    acc_ax.axhline(1 / 3, color="grey", linewidth=0.8, linestyle=":", label="chance (1/3)")
    acc_ax.set_xlabel("epoch")
    acc_ax.set_ylabel("accuracy")
    acc_ax.set_ylim(0, 1.02)
    acc_ax.set_title("BigAnimalNet on AFHQ: memorisation")
    acc_ax.legend(fontsize=7, loc="lower right")
    for ax, (label, r) in zip(norm_axes, results.items()):
        names = [n for n in r["final"] if n != "total" and n.endswith("weight")]
        short = [n.replace("net.", "").replace(".linear", "").replace(".weight", "") for n in names]
        x = range(len(names))
        ax.bar(
            [i - 0.2 for i in x],
            [r["initial"][n] for n in names],
            width=0.4,
            alpha=0.4,
            color=colors[label],
            label=f"start (total {r['initial']['total']:.1f})",
        )
        ax.bar(
            [i + 0.2 for i in x],
            [r["final"][n] for n in names],
            width=0.4,
            color=colors[label],
            label=f"end (total {r['final']['total']:.1f})",
        )
        ax.set_xticks(list(x), short, rotation=30, fontsize=8)
        ax.set_title(f"weight norms, {label}", fontsize=10)
        ax.set_ylabel("Frobenius norm")
        ax.legend(fontsize=7)
    return fig


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data-dir", type=data_path, default=None, help="holds afhq/train/ (default: the data root)")
    parser.add_argument("--download", action="store_true", help="download AFHQ into --data-dir when it is missing")
    parser.add_argument("--max-epochs", type=int, default=None, help="override the configs' max_epochs")
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results")
    parser.add_argument("--work", type=Path, default=None, help="where the runs log (default: a temporary folder)")
    args = parser.parse_args()
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
        results = {label: run_setting(config, args, work) for label, config in SETTINGS.items()}
        args.out.mkdir(parents=True, exist_ok=True)
        save_figure(figure(results), args.out / "memorization.png", dpi=110)

    first = next(iter(results.values()))
    n_images = count_images(train_dir)  # after any download
    source = f"{shown(args.data_dir / 'afhq')} ({n_images} real AFHQ {'images' if args.small else 'training images'})"
    lines = [
        "# Memorization: BigAnimalNet on AFHQ with real, partly random and random labels",
        "",
        f"`python benchmarks/memorization.py` ({time.strftime('%Y-%m-%d')}), configs `configs/memorization/*.yaml`, "
        f"data {source}: {first['n_train']} training and {first['n_val']} "
        "validation images (32x32, flattened). Figure: `memorization.png`.",
        "",
        "| labels | changed train labels | epochs run | memorised at epoch | best val acc | total norm start -> end | s |",
        "|---|---|---|---|---|---|---|",
    ]
    for label, r in results.items():
        memorised = "-" if r["memorised_at"] is None else str(r["memorised_at"])
        lines.append(
            f"| {label} | {r['changed']} / {r['n_train']} | {r['epochs']} | {memorised} | {r['best_val']:.3f} | "
            f"{r['initial']['total']:.2f} -> {r['final']['total']:.2f} | {r['seconds']:.0f} |"
        )
    lines += [
        "",
        f"Chance is 1/3. With this few validation images the val accuracies are coarse (steps of 1/{first['n_val']}).",
    ]
    write_atomic(args.out / "memorization.md", ("\n".join(lines) + "\n").encode())
    print("\n".join(lines))


if __name__ == "__main__":
    main()
