"""LossLandscape speed: the same 21 x 21 grid evaluated by the callback (each data batch read once; grid points
batched with ``vmap``, or one at a time, or ``auto``: timed and the faster kept) and by the classic point-by-point
loop of the loss-landscape tools (write the weights of one point into the model, run a full pass over the data
loader, restore), side by side in one process, on a small CNN with BatchNorm and on an MLP; then the per-step
overhead of ``FrobeniusNormMonitor(every_n_steps=1)`` on a training loop, against the same loop without it.

Rows: ``classic loop`` re-reads the loader at every point (items converted from uint8 as torchvision's
``ToTensor`` + ``Normalize`` do); ``loop, batches read once`` is the same loop over batches kept in memory (what
the callback's own loop does); then the callback in each mode. Speed-ups are against the classic loop.

Data: the first ``--batches`` x ``--batch`` real CIFAR-10 test images of ``test_jpeg_q75.npz`` in ``--data-dir``
(default ``$REPROZOO_DATA/cifar10``); the script stops when that file is not there, unless ``--random-images``
asks for seeded random images of the same shape instead (the timings do not depend on the pixels; the output then
says "random images, not real data").

    python benchmarks/landscape_speed.py                 # 21 x 21, 4 batches of 128, CNN and MLP, chunk 32
    python benchmarks/landscape_speed.py --chunks 8 32 64 --resolution 11
    python benchmarks/landscape_speed.py --skip-frobenius
"""

from __future__ import annotations

import argparse
import logging
import statistics
import sys
import time
import warnings
from pathlib import Path

import lightning as L
import numpy as np
import torch
from _common import shown, stop_missing_data
from torch.utils.data import DataLoader, TensorDataset

from reprozoo._files import data_path, data_root
from reprozoo.callbacks import LossLandscape
from reprozoo.callbacks.landscape import random_directions
from reprozoo.methods.classifier import ClassifierModule
from reprozoo.nets import MLP, ConvNet

NPZ = "test_jpeg_q75.npz"


class _Uint8Images(torch.utils.data.Dataset):
    """(N, 32, 32, 3) uint8 images served one by one as normalised float (3, 32, 32) tensors, as a torchvision
    dataset with ``ToTensor()`` and ``Normalize(0.5, 0.5)`` does."""

    def __init__(self, x: torch.Tensor, y: torch.Tensor):
        self.x, self.y = x, y

    def __len__(self) -> int:
        return len(self.y)

    def __getitem__(self, i: int):
        return (self.x[i].permute(2, 0, 1).float().div(255) - 0.5) / 0.5, self.y[i]


def _images(n: int, npz: Path | None) -> tuple[_Uint8Images, str]:
    """The first ``n`` images of ``npz``, or ``n`` seeded random ones when ``npz`` is None (``--random-images``)."""
    if npz is not None:
        with np.load(npz) as data:
            x = torch.from_numpy(data["x"][:n])
            y = torch.from_numpy(data["y"][:n]).long()
        source = f"{n} real CIFAR-10 test images (JPEG q75, {shown(npz)})"
    else:
        g = torch.Generator().manual_seed(0)
        x = torch.randint(0, 256, (n, 32, 32, 3), generator=g, dtype=torch.uint8)
        y = torch.randint(0, 10, (n,), generator=g)
        source = f"{n} seeded random 32x32 images (--random-images: random images, not real data)"
    return _Uint8Images(x, y), source


def _models() -> dict[str, ClassifierModule]:
    torch.manual_seed(0)
    cnn = ConvNet(in_channels=3, num_classes=10, channels=(16, 32), layers_per_block=2, pool_every=2, hidden=(64,))
    mlp = MLP(in_features=3 * 32 * 32, num_classes=10, hidden=(256, 128), dropout=0.2)
    return {"CNN (BatchNorm)": ClassifierModule(cnn), "MLP (dropout)": ClassifierModule(mlp)}


def _trainer() -> L.Trainer:
    return L.Trainer(accelerator="cpu", devices=1, logger=False, enable_progress_bar=False, enable_model_summary=False)


def loop_landscape(model: ClassifierModule, batches, resolution: int, span: float, seed: int) -> np.ndarray:
    """The baseline: for each grid point, write ``theta + a d1 + b d2`` into the parameters, run every batch of
    ``batches`` (a loader, read again at each point, or a list), restore. Same directions (seed, filter
    normalisation, biasbn) and same batch-size weighting as the callback."""
    params = {n: p for n, p in model.named_parameters() if p.requires_grad}
    d1, d2 = random_directions({n: p.detach() for n, p in params.items()}, num=2, seed=seed)
    saved = {n: p.detach().clone() for n, p in params.items()}
    axis = np.linspace(-span, span, resolution)
    out = np.zeros((resolution, resolution))
    model.eval()
    with torch.no_grad():
        for i, b in enumerate(axis):
            for j, a in enumerate(axis):
                for n, p in params.items():
                    p.copy_(saved[n] + float(a) * d1[n] + float(b) * d2[n])
                total = count = 0.0
                for batch in batches:
                    total += model.loss(batch)["loss"].item() * len(batch[1])
                    count += len(batch[1])
                out[i, j] = total / count
        for n, p in params.items():
            p.copy_(saved[n])
    return out


def landscape_table(args: argparse.Namespace) -> None:
    dataset, source = _images(args.batches * args.batch, None if args.random_images else args.data_dir / NPZ)
    loader = DataLoader(dataset, batch_size=args.batch)
    batches = list(loader)
    points = args.resolution**2
    print(
        f"Loss landscape {args.resolution} x {args.resolution} = {points} points, span {args.span}, on {source}, "
        f"{args.batches} batches of {args.batch}; torch {torch.__version__}, {torch.get_num_threads()} threads"
    )
    print(f"{'model':<18} {'params':>9} {'method':<28} {'seconds':>8} {'ms/point':>9} {'speed-up':>9}  max |diff|")

    def row(name: str, n_params: str, method: str, s: float, classic_s: float, diff: str = "") -> None:
        print(
            f"{name:<18} {n_params:>9} {method:<28} {s:>8.2f} {1000 * s / points:>9.2f} {classic_s / s:>8.1f}x  {diff}"
        )

    for name, model in _models().items():
        n_params = f"{sum(p.numel() for p in model.parameters()):,}"
        start = time.perf_counter()
        reference = loop_landscape(model, loader, args.resolution, args.span, args.seed)
        classic_s = time.perf_counter() - start
        row(name, n_params, "classic loop (loader/point)", classic_s, classic_s)
        start = time.perf_counter()
        cached = loop_landscape(model, batches, args.resolution, args.span, args.seed)
        row(
            "",
            "",
            "loop, batches read once",
            time.perf_counter() - start,
            classic_s,
            f"{float(np.abs(cached - reference).max()):.1e}",
        )
        for mode, chunk in [("loop", args.chunks[0])] + [("vmap", c) for c in args.chunks] + [("auto", args.chunks[0])]:
            cb = LossLandscape(
                resolution=args.resolution,
                span=args.span,
                seed=args.seed,
                num_batches=args.batches,
                chunk_size=chunk,
                mode=mode,
                progress=False,
            )
            start = time.perf_counter()
            result = cb.compute(_trainer(), model, dataloader=loader)
            s = time.perf_counter() - start
            label = {"loop": "LossLandscape loop", "vmap": f"LossLandscape vmap, chunk {chunk}"}.get(
                mode, f"LossLandscape auto -> {cb.used_mode}"
            )
            row("", "", label, s, classic_s, f"{float(np.abs(result['loss'] - reference).max()):.1e}")
            if mode == "auto" and cb.timings:
                t = cb.timings
                print(
                    f"{'':<18} {'':>9}   (auto measured vmap {t['vmap_ms_per_point']:.2f} / loop "
                    f"{t['loop_ms_per_point']:.2f} ms per point and batch)"
                )


def frobenius_table(args: argparse.Namespace) -> None:
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    import frobenius_overhead  # the overhead benchmark of the monitor, run here with its defaults

    fargs = argparse.Namespace(
        width=512, depth=4, batch=256, steps=args.frobenius_steps, rounds=args.frobenius_rounds, every=1, grad=False
    )
    data = TensorDataset(torch.randn(fargs.batch * fargs.steps, fargs.width), torch.randn(fargs.batch * fargs.steps, 1))
    loader = DataLoader(data, batch_size=fargs.batch)
    frobenius_overhead.run(loader, argparse.Namespace(**{**vars(fargs), "steps": 20}), monitored=True)  # warm-up
    times: dict[bool, list[float]] = {False: [], True: []}
    for r in range(fargs.rounds):
        for monitored in (False, True) if r % 2 == 0 else (True, False):
            times[monitored].append(frobenius_overhead.run(loader, fargs, monitored))
    print(
        f"\nFrobeniusNormMonitor(every_n_steps=1) on a 4 x 512 MLP, batch 256, {fargs.steps} steps, {fargs.rounds} "
        "rounds alternating with and without it (fastest and median round):"
    )
    base_min, mon_min = min(times[False]), min(times[True])
    base_med, mon_med = statistics.median(times[False]), statistics.median(times[True])
    print(f"  without: min {base_min:.2f} s, median {base_med:.2f} s ({1000 * base_min / fargs.steps:.2f} ms/step)")
    print(f"  with:    min {mon_min:.2f} s, median {mon_med:.2f} s ({1000 * mon_min / fargs.steps:.2f} ms/step)")
    print(
        f"  overhead: {100 * (mon_min - base_min) / base_min:+.1f} % (fastest rounds), "
        f"{100 * (mon_med - base_med) / base_med:+.1f} % (medians); measurement alone "
        f"{frobenius_overhead.measurement_ms(fargs):.3f} ms per step"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data-dir", type=data_path, default=None, help="default: $REPROZOO_DATA/cifar10")
    parser.add_argument("--random-images", action="store_true", help=f"seeded random images instead of {NPZ}")
    parser.add_argument("--resolution", type=int, default=21)
    parser.add_argument("--span", type=float, default=1.0)
    parser.add_argument("--batches", type=int, default=4)
    parser.add_argument("--batch", type=int, default=128)
    parser.add_argument("--chunks", type=int, nargs="+", default=[32])
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--skip-frobenius", action="store_true")
    parser.add_argument("--frobenius-steps", type=int, default=300)
    parser.add_argument("--frobenius-rounds", type=int, default=5)
    args = parser.parse_args()
    args.data_dir = args.data_dir or data_root() / "cifar10"
    if not args.random_images and not (args.data_dir / NPZ).is_file():
        stop_missing_data("landscape_speed.py", [NPZ], args.data_dir, other_fix="run with --random-images")
    warnings.filterwarnings("ignore", ".*does not have many workers.*")
    for name in ("lightning.pytorch", "lightning.fabric"):
        logging.getLogger(name).setLevel(logging.WARNING)
    landscape_table(args)
    if not args.skip_frobenius:
        frobenius_table(args)


if __name__ == "__main__":
    main()
