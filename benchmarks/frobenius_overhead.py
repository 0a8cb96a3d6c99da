"""Overhead of ``FrobeniusNormMonitor(every_n_steps=1)``: its worst case, a measurement (one norm kernel per tensor, one
host sync, one ``log_dict``) after every optimizer step.

The same MLP is trained on random data with and without the callback, in the same process, alternating the two
variants over several rounds so that drifts of the machine (frequency, other load) hit both alike; the table gives
the median wall time of ``trainer.fit`` for each and the relative overhead. It also times the measurement alone
(norms plus the one host copy, outside Lightning) to split the overhead between it and ``log_dict``.

    python benchmarks/frobenius_overhead.py                     # 4 x 512 MLP, batch 256, 300 steps, 3 rounds
    python benchmarks/frobenius_overhead.py --rounds 5 --grad   # also the gradient norms
    python benchmarks/frobenius_overhead.py --every 50          # every 50 steps (Lightning's log_every_n_steps)
"""

from __future__ import annotations

import argparse
import logging
import statistics
import time
import warnings

import lightning as L
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from reprozoo.callbacks import FrobeniusNormMonitor


class MLP(L.LightningModule):
    def __init__(self, width: int, depth: int):
        super().__init__()
        layers: list[nn.Module] = []
        for _ in range(depth):
            layers += [nn.Linear(width, width), nn.ReLU()]
        self.net = nn.Sequential(*layers, nn.Linear(width, 1))

    def training_step(self, batch, batch_idx):
        x, y = batch
        return nn.functional.mse_loss(self.net(x), y)

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=1e-3)


def run(loader: DataLoader, args: argparse.Namespace, monitored: bool) -> float:
    L.seed_everything(0, verbose=False)
    model = MLP(args.width, args.depth)
    monitor = FrobeniusNormMonitor(every_n_steps=args.every, plot=False, log_grad_norm=args.grad)
    callbacks = [monitor] if monitored else []
    trainer = L.Trainer(
        accelerator="cpu",
        devices=1,
        max_steps=args.steps,
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        enable_checkpointing=False,
        callbacks=callbacks,
    )
    start = time.perf_counter()
    trainer.fit(model, loader)
    elapsed = time.perf_counter() - start
    if monitored:
        assert len(monitor.history) == args.steps // args.every
    return elapsed


def measurement_ms(args: argparse.Namespace, repeats: int = 300) -> float:
    """Milliseconds for one measurement of the weights alone: the norms and the single host copy."""
    model, monitor = MLP(args.width, args.depth), FrobeniusNormMonitor()
    named = list(model.named_parameters())
    monitor._measure(named)[1].cpu()
    start = time.perf_counter()
    for _ in range(repeats):
        monitor._measure(named)[1].cpu()
    return 1000 * (time.perf_counter() - start) / repeats


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--width", type=int, default=512)
    parser.add_argument("--depth", type=int, default=4)
    parser.add_argument("--batch", type=int, default=256)
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--every", type=int, default=1, help="every_n_steps of the monitor")
    parser.add_argument("--grad", action="store_true", help="also log the gradient norms")
    args = parser.parse_args()
    warnings.filterwarnings("ignore", ".*does not have many workers.*")
    for name in ("lightning.pytorch", "lightning.fabric"):
        logging.getLogger(name).setLevel(logging.WARNING)

    data = TensorDataset(torch.randn(args.batch * args.steps, args.width), torch.randn(args.batch * args.steps, 1))
    loader = DataLoader(data, batch_size=args.batch)
    run(loader, argparse.Namespace(**{**vars(args), "steps": 20}), monitored=True)  # warm-up (allocator, imports)

    times: dict[bool, list[float]] = {False: [], True: []}
    for r in range(args.rounds):
        order = (False, True) if r % 2 == 0 else (True, False)  # alternate which variant goes first
        for monitored in order:
            times[monitored].append(run(loader, args, monitored))

    base, mon = statistics.median(times[False]), statistics.median(times[True])
    params = sum(p.numel() for p in MLP(args.width, args.depth).parameters())
    print(
        f"MLP {args.depth} x {args.width} ({params:,} parameters, {2 * args.depth + 2} tensors), batch {args.batch}, "
        f"{args.steps} steps, {args.rounds} rounds, torch threads {torch.get_num_threads()}"
        + (", with gradient norms" if args.grad else "")
    )
    label_on = f"FrobeniusNormMonitor(every_n_steps={args.every})"
    print(f"{'variant':<40} {'median s':>9} {'ms/step':>8}   runs (s)")
    for label, key in (("without callback", False), (label_on, True)):
        runs = ", ".join(f"{t:.2f}" for t in times[key])
        median = statistics.median(times[key])
        print(f"{label:<40} {median:>9.2f} {1000 * median / args.steps:>8.2f}   {runs}")
    per_step = 1000 * (mon - base) / args.steps
    print(f"overhead: {100 * (mon - base) / base:+.1f} %  ({per_step:+.2f} ms per step)")
    print(
        f"of which the measurement itself (norms + one host copy): {measurement_ms(args):.2f} ms per call; "
        f"{100 * measurement_ms(args) / (1000 * base / args.steps):.1f} % of a step; the rest is the history "
        "bookkeeping and run-to-run noise (compare the rounds)"
    )


if __name__ == "__main__":
    main()
