"""What exact resume costs: the resumable training loader against a plain shuffled DataLoader (time per epoch of
loading), and RNGStateCheckpoint's share of a checkpoint (bytes, and time to save).

    python benchmarks/resume_overhead.py [--items 60000 --batch-size 128 --rounds 5]

Both loaders read the same in-memory dataset (MNIST-sized: 784 floats and a label per item) in the main process;
rounds alternate between them and the fastest round of each is compared, so one slow round (another process on the
machine) does not decide the ratio.
"""

from __future__ import annotations

import argparse
import io
import time

import torch
from torch.utils.data import DataLoader, TensorDataset

from reprozoo.callbacks import RNGStateCheckpoint
from reprozoo.datamodules import ResumableDataLoader, ResumableSampler, SeededRandomSampler


def _epoch_seconds(loader) -> float:
    start = time.perf_counter()
    for _ in loader:
        pass
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--items", type=int, default=60000)
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--rounds", type=int, default=5)
    args = parser.parse_args()

    torch.manual_seed(0)
    data = TensorDataset(torch.randn(args.items, 784), torch.randint(0, 10, (args.items,)))
    plain = DataLoader(data, batch_size=args.batch_size, shuffle=True)
    sampler = SeededRandomSampler(data, seed=0)
    resumable = ResumableDataLoader(data, sampler=ResumableSampler(sampler), batch_size=args.batch_size)

    times: dict[str, list[float]] = {"DataLoader(shuffle=True)": [], "ResumableDataLoader": []}
    for epoch in range(args.rounds):
        times["DataLoader(shuffle=True)"].append(_epoch_seconds(plain))
        resumable.set_epoch(epoch)
        times["ResumableDataLoader"].append(_epoch_seconds(resumable))
    # resuming half-way: the skipped half costs index batches only, no data is read
    halves = []
    for _ in range(args.rounds):
        resumable.load_state_dict({"epoch": 0, "batches": len(resumable) // 2})
        halves.append(_epoch_seconds(resumable))
    half = min(halves)

    print(
        f"{args.items} items of 784 floats, batch {args.batch_size}, {len(plain)} batches an epoch, main process, "
        f"fastest of {args.rounds} alternating rounds"
    )
    print()
    print("| loader | seconds per epoch (fastest) | median |")
    print("|---|---|---|")
    for name, values in times.items():
        print(f"| {name} | {min(values):.3f} | {sorted(values)[len(values) // 2]:.3f} |")
    ratio = min(times["ResumableDataLoader"]) / min(times["DataLoader(shuffle=True)"])
    print()
    print(f"ratio resumable / plain: {ratio:.3f}; the second half of an epoch after a mid-epoch resume: {half:.3f} s")

    # A small model's checkpoint with and without the callback's state
    model = torch.nn.Sequential(torch.nn.Linear(784, 1200), torch.nn.ReLU(), torch.nn.Linear(1200, 10))
    base = {"state_dict": model.state_dict()}
    callback = RNGStateCheckpoint()
    rows = []
    for name, checkpoint in (("weights only", base), ("+ RNGStateCheckpoint", {**base, "rng": callback.state_dict()})):
        buffer = io.BytesIO()
        start = time.perf_counter()
        torch.save(checkpoint, buffer)
        rows.append((name, buffer.tell(), time.perf_counter() - start))
    print()
    print("| checkpoint of a 784-1200-10 MLP | bytes | save seconds |")
    print("|---|---|---|")
    for name, size, seconds in rows:
        print(f"| {name} | {size:,} | {seconds:.4f} |")
    print()
    print(f"RNG states add {rows[1][1] - rows[0][1]:,} bytes per process")


if __name__ == "__main__":
    main()
