"""LossLandscape speed against the machine's limit: per net (a tiny conv net, the CIFAR CNN with BatchNorm, a
ResNet-20, an MLP) the time per grid point of the callback (``loop``: one point at a time; ``vmap``: chunks of points
batched; ``auto``: both timed on the first batch, the faster kept) and of the classic point-by-point loop of the
loss-landscape tools (write the weights of one point into the model, run a full pass over the data loader, restore),
against the LIMIT = points x one eval forward over the same batches (model in eval mode, ``no_grad``, the batches
already in memory, nothing else), all in one process, in alternating rounds (A B C, C B A, ...).

Columns: ms per grid point (fastest and median round), ``limit/ours`` (1.0 = as fast as the bare forwards; above 1
when vmap batches points into fewer, larger kernels), the speed-up over the classic loop, the largest relative
difference of the surface from the classic loop's, and the goal: ``limit/ours >= 0.9`` on the compute-bound nets
(CNN, ResNet-20), ``>= 5x`` the classic loop on the small, overhead-bound ones (tiny conv, MLP); for ``auto``, the
mode it chose and the cost of deciding (the probe's time on the path it did not choose, its values thrown away) as a % of the grid
(goal <= 5 %). The classic loop re-reads the loader at every point (items converted from uint8 as torchvision's
``ToTensor`` + ``Normalize`` do).

Data: the first ``--batches`` x ``--batch`` real CIFAR-10 test images of ``test_jpeg_q75.npz`` in ``--data-dir``
(default ``$REPROZOO_DATA/cifar10``); the script stops when that file is not there, unless ``--random-images``
asks for seeded random images of the same shape instead (the timings do not depend on the pixels; the output then
says "random images, not real data"). The nets are randomly initialised (seed 0): the cost does not depend on the
weights. ``--sizes NET=RESxBATCHES`` sizes one net's grid and batches apart from ``--resolution`` / ``--batches``.

    python benchmarks/landscape_speed.py                 # 21 x 21, 4 batches of 128 (ResNet-20: 11 x 11, 2), 3 rounds
    python benchmarks/landscape_speed.py --resolution 11 --batches 2 --sizes cnn=7x1 resnet20=3x1 --rounds 2
    python benchmarks/landscape_speed.py --nets cnn mlp --chunks 8 32 64
"""

from __future__ import annotations

import argparse
import logging
import statistics
import time
import warnings
from pathlib import Path

import lightning as L
import numpy as np
import torch
from _common import goal_line, shown, stop_missing_data
from torch.utils.data import DataLoader

from reprozoo._files import data_path, data_root
from reprozoo.callbacks import LossLandscape
from reprozoo.callbacks.landscape import random_directions
from reprozoo.methods.classifier import ClassifierModule
from reprozoo.nets import MLP, ConvNet
from reprozoo.nets.resnet import resnet20

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


# name -> (label, compute-bound?): the goal is limit/ours >= 0.9 for the compute-bound nets, >= 5x the classic
# loop for the others, whose forwards are short enough that a loop is bound by its per-point overhead.
NETS = {
    "tiny": ("tiny conv", False),
    "cnn": ("CNN (BatchNorm)", True),
    "resnet20": ("ResNet-20", True),
    "mlp": ("MLP (dropout)", False),
}


def _model(name: str) -> ClassifierModule:
    torch.manual_seed(0)
    if name == "tiny":  # two strided convs and a linear head: about 0.13 M multiply-adds per image
        net = torch.nn.Sequential(
            torch.nn.Conv2d(3, 8, 3, stride=2, padding=1),
            torch.nn.ReLU(),
            torch.nn.Conv2d(8, 16, 3, stride=2, padding=1),
            torch.nn.ReLU(),
            torch.nn.AdaptiveAvgPool2d(1),
            torch.nn.Flatten(),
            torch.nn.Linear(16, 10),
        )
        return ClassifierModule(net, num_classes=10)
    if name == "cnn":
        return ClassifierModule(
            ConvNet(in_channels=3, num_classes=10, channels=(16, 32), layers_per_block=2, pool_every=2, hidden=(64,))
        )
    if name == "resnet20":
        return ClassifierModule(resnet20())
    return ClassifierModule(MLP(in_features=3 * 32 * 32, num_classes=10, hidden=(256, 128), dropout=0.2))


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


def forward_pass(model: ClassifierModule, batches: list) -> float:
    """Seconds of one eval forward (the loss the callback plots) over ``batches`` already in memory: the limit's
    unit, what a grid point costs with no overhead at all."""
    model.eval()
    with torch.no_grad():
        start = time.perf_counter()
        for batch in batches:
            model.loss(batch)["loss"]
        return time.perf_counter() - start


def _net_rounds(name: str, args: argparse.Namespace, dataset) -> None:
    label, compute_bound = NETS[name]
    resolution, n_batches = args.sizes.get(name, (args.resolution, args.batches))
    points = resolution**2
    loader = DataLoader(torch.utils.data.Subset(dataset, range(n_batches * args.batch)), batch_size=args.batch)
    batches = list(loader)
    model = _model(name)
    n_params = sum(p.numel() for p in model.parameters())

    def callback(mode: str, chunk: int) -> LossLandscape:
        return LossLandscape(
            resolution=resolution,
            span=args.span,
            seed=args.seed,
            num_batches=n_batches,
            chunk_size=chunk,
            mode=mode,
            progress=False,
        )

    methods = ["limit", "classic"] + ["loop"] + [f"vmap {c}" for c in args.chunks] + ["auto"]
    times: dict[str, list[float]] = {m: [] for m in methods}
    diffs: dict[str, float] = {}
    chosen, waste = [], []
    reference = None
    forward_pass(model, batches)  # warm-up
    for r in range(args.rounds):
        for method in methods if r % 2 == 0 else methods[::-1]:
            if method == "limit":  # the fastest of a few passes, times the points
                times[method].append(points * min(forward_pass(model, batches) for _ in range(args.passes)))
                continue
            start = time.perf_counter()
            if method == "classic":
                surface = loop_landscape(model, loader, resolution, args.span, args.seed)
                seconds = time.perf_counter() - start
                reference = surface if reference is None else reference
            else:
                mode, _, chunk = method.partition(" ")
                cb, trainer = callback(mode, int(chunk) if chunk else args.chunks[0]), _trainer()
                start = time.perf_counter()
                surface = cb.compute(trainer, model, dataloader=loader)["loss"]
                seconds = time.perf_counter() - start
                if mode == "auto":
                    chosen.append(cb.used_mode)
                    if cb.timings:
                        waste.append(100 * cb.timings["wasted_seconds"] / seconds)
            times[method].append(seconds)
            if reference is not None:  # relative: a randomly initialised ResNet's losses are in the thousands
                diff = float((np.abs(surface - reference) / np.abs(reference)).max())
                diffs[method] = max(diffs.get(method, 0.0), diff)
    limit = statistics.median(times["limit"]) / points
    classic = statistics.median(times["classic"]) / points
    head = f"{label} ({n_params:,} params), {resolution} x {resolution} = {points} points, {n_batches} x {args.batch}"
    print(f"\n{head}")
    print(
        f"{'method':<32} {'ms/point best':>13} {'median':>8} {'limit/ours':>10} {'vs classic':>10} "
        f"{'max rel diff':>12}  goal"
    )
    for method in methods:
        best, median = min(times[method]) / points, statistics.median(times[method]) / points
        text = {"limit": "LIMIT (eval forwards only)", "classic": "classic loop (loader/point)"}.get(
            method, f"LossLandscape {method}"
        )
        goal = ""
        if method == "auto":
            text = f"LossLandscape auto -> {'/'.join(sorted(set(chosen)))}"
        if method not in ("limit", "classic"):
            if compute_bound:
                goal = f">= 0.9 of limit: {'yes' if limit / median >= 0.9 else 'no'}"
            else:
                goal = f">= 5x classic: {'yes' if classic / median >= 5 else 'no'}"
        diff = f"{diffs[method]:.1e}" if method in diffs else "-"
        print(
            f"{text:<32} {1000 * best:>13.2f} {1000 * median:>8.2f} {limit / median:>10.2f} "
            f"{classic / median:>9.1f}x {diff:>12}  {goal}"
        )
    if waste:
        print(
            f"  auto: deciding cost {min(waste):.1f} % (best) / {statistics.median(waste):.1f} % (median) of the grid "
            f"(goal <= 5 %: {'yes' if statistics.median(waste) <= 5 else 'no'}); chose {', '.join(chosen)}"
        )
    auto = statistics.median(times["auto"]) / points
    if compute_bound:
        print(goal_line(f"LossLandscape auto, {name}: limit / ours (median)", limit / auto, 0.9))
    else:
        print(goal_line(f"LossLandscape auto, {name}: classic loop / ours (median)", classic / auto, 5))
    if waste:
        print(
            goal_line(
                f"LossLandscape auto, {name}: cost of deciding", statistics.median(waste), 5, unit=" %", at_most=True
            )
        )


def landscape_table(args: argparse.Namespace) -> None:
    most = max([args.batches] + [nb for _, nb in args.sizes.values()]) * args.batch
    dataset, source = _images(most, None if args.random_images else args.data_dir / NPZ)
    print(
        f"Loss landscape, span {args.span}, on {source}; torch {torch.__version__}, {torch.get_num_threads()} "
        f"threads; {args.rounds} alternating rounds; ratios on the median rounds (limit: the fastest of "
        f"{args.passes} passes per round)"
    )
    for name in args.nets:
        _net_rounds(name, args, dataset)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data-dir", type=data_path, default=None, help="default: $REPROZOO_DATA/cifar10")
    parser.add_argument("--random-images", action="store_true", help=f"seeded random images instead of {NPZ}")
    parser.add_argument("--resolution", type=int, default=21, help="grid points per axis (small nets)")
    parser.add_argument("--span", type=float, default=1.0)
    parser.add_argument("--batches", type=int, default=4, help="batches per point (small nets)")
    parser.add_argument(
        "--sizes",
        nargs="*",
        default=["resnet20=11x2"],
        metavar="NET=RESxBATCHES",
        help="per-net grid and batches (default: resnet20=11x2; the others --resolution and --batches)",
    )
    parser.add_argument("--batch", type=int, default=128)
    parser.add_argument("--chunks", type=int, nargs="+", default=[32], help="vmap chunk sizes (auto: the first)")
    parser.add_argument("--nets", nargs="+", choices=list(NETS), default=list(NETS))
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--passes", type=int, default=5, help="forward passes per round for the limit")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    args.data_dir = args.data_dir or data_root() / "cifar10"
    sizes = {}
    for item in args.sizes:
        net, _, size = item.partition("=")
        res, _, nb = size.partition("x")
        if net not in NETS or not res.isdigit() or not nb.isdigit():
            parser.error(f"--sizes takes NET=RESxBATCHES with NET in {list(NETS)}, got {item!r}")
        sizes[net] = (int(res), int(nb))
    args.sizes = sizes
    if args.threads:
        torch.set_num_threads(args.threads)
    if not args.random_images and not (args.data_dir / NPZ).is_file():
        stop_missing_data("landscape_speed.py", [NPZ], args.data_dir, other_fix="run with --random-images")
    warnings.filterwarnings("ignore", ".*does not have many workers.*")
    for name in ("lightning.pytorch", "lightning.fabric"):
        logging.getLogger(name).setLevel(logging.WARNING)
    landscape_table(args)


if __name__ == "__main__":
    main()
