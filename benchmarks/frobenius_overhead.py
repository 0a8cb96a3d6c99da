"""Overhead of ``FrobeniusNormMonitor`` per training step, against the goal of at most 2 % when measuring (and
logging) every step, across MLP and CNN sizes and ``every_n_steps``.

For each net, the same training run (random data, SGD, ``--steps`` steps) is timed with and without the callback,
in one process, alternating which goes first over ``--rounds`` rounds, so that drifts of the machine hit both alike.
Three figures per row:

* **hook**: the time spent inside the callback's hooks, timed around each call during the monitored run, per step:
  the callback's cost, free of the run-to-run noise of whole fits; **log** the part of it inside the loggers'
  ``log_metrics`` (TensorBoard writes one event per scalar: the logger's price for the scalars asked for), and
  **ours** the rest (measuring, bookkeeping), which the goal is about;
* **limit**: the norms themselves (``tensor_norms``: one pass over the weights, what any Frobenius norm costs), timed
  inside the same monitored runs: in a training loop the weights come from farther in the memory hierarchy than in a
  tight loop of norms, so this is the machine's limit for the measurement where it happens;
* **fit A/B**: the median wall time of the monitored fit against the plain one (noisier: two whole runs).

Overheads are given as a percentage of the median plain step. The logger is the one users get from ``cli.py``
(TensorBoard, ``--logger tensorboard``) or none; the plain run has the same logger.

    python benchmarks/frobenius_overhead.py                          # MLPs and CNNs, every 1 and 50 steps
    python benchmarks/frobenius_overhead.py --nets mlp-512 --every 1 --steps 300 --rounds 5
    python benchmarks/frobenius_overhead.py --grad                   # also the gradient norms
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time

import lightning as L
import torch
from _common import goal_line, quiet_lightning
from lightning.pytorch.loggers import TensorBoardLogger
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from reprozoo.callbacks import FrobeniusNormMonitor, frobenius
from reprozoo.callbacks.frobenius import tensor_norms

GOAL = 2.0  # % of a step, logging every step (issue 20)
HOOKS = ("on_train_start", "on_train_epoch_start", "on_before_optimizer_step", "on_train_batch_end")
HOOKS += ("on_train_epoch_end",)


def _mlp(width: int, depth: int) -> nn.Module:
    layers: list[nn.Module] = []
    for _ in range(depth):
        layers += [nn.Linear(width, width), nn.ReLU()]
    return nn.Sequential(*layers, nn.Linear(width, 1))


def _cnn(width: int, blocks: int) -> nn.Module:
    """A VGG-like BatchNorm CNN for 32 x 32 inputs: ``blocks`` stages of two 3 x 3 convolutions, then pooling."""
    layers: list[nn.Module] = []
    channels = 3
    for b in range(blocks):
        out = width * 2**b
        for _ in range(2):
            layers += [nn.Conv2d(channels, out, 3, padding=1, bias=False), nn.BatchNorm2d(out), nn.ReLU()]
            channels = out
        layers.append(nn.MaxPool2d(2))
    return nn.Sequential(*layers, nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(channels, 10))


# name -> (network, input shape of one example, batch size)
NETS = {
    "mlp-256": (lambda: _mlp(256, 4), (256,), 256),
    "mlp-512": (lambda: _mlp(512, 4), (512,), 256),
    "mlp-1024": (lambda: _mlp(1024, 8), (1024,), 256),
    "cnn-16": (lambda: _cnn(16, 3), (3, 32, 32), 32),
    "cnn-32": (lambda: _cnn(32, 3), (3, 32, 32), 32),
}


class _Net(L.LightningModule):
    def __init__(self, name: str):
        super().__init__()
        self.net = NETS[name][0]()
        self.classify = len(NETS[name][1]) == 3

    def training_step(self, batch, batch_idx):
        x, y = batch
        out = self.net(x)
        return nn.functional.cross_entropy(out, y) if self.classify else nn.functional.mse_loss(out[:, 0], y.float())

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=1e-3, momentum=0.9)


def _loader(name: str, steps: int) -> DataLoader:
    _, shape, batch = NETS[name]
    g = torch.Generator().manual_seed(0)
    n = batch * min(steps, 50)  # the batches repeat over epochs: data is not what is measured
    x = torch.randn(n, *shape, generator=g)
    y = torch.randint(0, 10, (n,), generator=g)
    return DataLoader(TensorDataset(x, y), batch_size=batch)


def _timed_norms(norms: list[float]):
    """``tensor_norms`` of the monitor's module, timed (synchronous on the CPU: the time is that of the norms)."""

    def wrapper(tensors):
        start = time.perf_counter()
        try:
            return tensor_norms(tensors)
        finally:
            norms.append(time.perf_counter() - start)

    return wrapper


def _timed(monitor: FrobeniusNormMonitor, spent: list[float], logging: list[float]) -> None:
    """Time every call of the callback's hooks, and apart the calls that hand the values to the loggers (Lightning
    looks the hooks up on the instance, and the callback its ``_log``)."""
    for hook, into in [(h, spent) for h in HOOKS] + [("_log", logging)]:
        method = getattr(monitor, hook)

        def wrapper(*args, _method=method, _into=into, **kwargs):
            start = time.perf_counter()
            try:
                return _method(*args, **kwargs)
            finally:
                _into.append(time.perf_counter() - start)

        setattr(monitor, hook, wrapper)


def _fit(name: str, loader: DataLoader, args: argparse.Namespace, every: int | None, log_dir: str) -> tuple:
    """Seconds of ``trainer.fit``, inside the monitor's hooks, of those inside the loggers, and inside the norms
    (``every=None``: no monitor)."""
    L.seed_everything(0, verbose=False)
    model = _Net(name)
    spent: list[float] = []
    logging: list[float] = []
    norms: list[float] = []
    frobenius.tensor_norms = _timed_norms(norms)
    callbacks = []
    if every is not None:
        monitor = FrobeniusNormMonitor(every_n_steps=every, plot=False, log_grad_norm=args.grad)
        _timed(monitor, spent, logging)
        callbacks.append(monitor)
    logger = TensorBoardLogger(log_dir, name=name) if args.logger == "tensorboard" else False
    trainer = L.Trainer(
        accelerator="cpu",
        devices=1,
        max_steps=args.steps,
        logger=logger,
        log_every_n_steps=50,
        enable_progress_bar=False,
        enable_model_summary=False,
        enable_checkpointing=False,
        callbacks=callbacks,
    )
    start = time.perf_counter()
    trainer.fit(model, loader)
    elapsed = time.perf_counter() - start
    if every is not None:
        assert len(monitor.history) == args.steps // every, "the monitor measured the wrong number of times"
    frobenius.tensor_norms = tensor_norms
    return elapsed, sum(spent), sum(logging), sum(norms)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--nets", nargs="+", choices=sorted(NETS), default=["mlp-256", "mlp-512", "cnn-16"])
    parser.add_argument("--every", nargs="+", type=int, default=[1, 50], help="every_n_steps values of the monitor")
    parser.add_argument("--steps", type=int, default=100, help="optimizer steps per fit (a multiple of each --every)")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--logger", choices=("tensorboard", "none"), default="tensorboard")
    parser.add_argument("--grad", action="store_true", help="also log the gradient norms")
    args = parser.parse_args()
    if any(args.steps % e for e in args.every):
        parser.error(f"--steps {args.steps} must be a multiple of every --every value {args.every}")
    quiet_lightning()

    print(
        f"FrobeniusNormMonitor{'(log_grad_norm=True)' if args.grad else ''}, {args.steps} steps per fit, "
        f"{args.rounds} rounds alternating with the plain run, logger {args.logger}, "
        f"torch {torch.__version__}, {torch.get_num_threads()} threads; goal <= {GOAL:g} % of a step every step"
    )
    header = (
        f"{'net':<9} {'params':>10} {'tensors':>7} {'every':>5} {'step ms':>8} {'hook ms':>8} {'log ms':>7} "
        f"{'limit ms':>8} {'ours %':>7} {'limit %':>7} {'beyond %':>8} {'fit A/B %':>9}  goal (ours <= {GOAL:g} %)"
    )
    print(header)
    goals: list[str] = []
    with tempfile.TemporaryDirectory() as log_dir:
        for name in args.nets:
            loader = _loader(name, args.steps)
            params = list(NETS[name][0]().parameters())
            _fit(name, loader, argparse.Namespace(**{**vars(args), "steps": 10}), 1, log_dir)  # warm-up
            for every in args.every:
                runs: dict[str, list[float]] = {"plain": [], "watched": [], "hook": [], "log": [], "norms": []}
                for r in range(args.rounds):
                    for variant in (None, every) if r % 2 == 0 else (every, None):
                        elapsed, spent, logged, normed = _fit(name, loader, args, variant, log_dir)
                        if variant is None:
                            runs["plain"].append(elapsed)
                        else:
                            for key, value in zip(
                                ("watched", "hook", "log", "norms"), (elapsed, spent, logged, normed)
                            ):
                                runs[key].append(value)
                ms = {k: 1000 * statistics.median(v) / args.steps for k, v in runs.items()}  # per step
                ours = 100 * (ms["hook"] - ms["log"]) / ms["plain"]
                limit = 100 * ms["norms"] / ms["plain"]
                ab = 100 * (ms["watched"] - ms["plain"]) / ms["plain"]
                print(
                    f"{name:<9} {sum(p.numel() for p in params):>10,} {len(params):>7} {every:>5} {ms['plain']:>8.2f} "
                    f"{ms['hook']:>8.3f} {ms['log']:>7.3f} {ms['norms']:>8.3f} {ours:>6.2f}% {limit:>6.2f}% "
                    f"{ours - limit:>7.2f}% {ab:>+8.1f}%  " + ("met" if ours <= GOAL else "NOT met")
                )
                if every == 1:
                    goals.append(
                        goal_line(f"FrobeniusNormMonitor, {name}, every step", ours, GOAL, unit=" %", at_most=True)
                    )
    print(
        "Per step, medians of the rounds. hook: time inside the callback's hooks; log: of which inside the loggers' "
        "log_metrics (the logger's price for the scalars asked for: one per tensor plus the total); limit: of which "
        "inside the norms themselves (one pass over the weights); ours: hook - log, as % of the plain step (the "
        "goal); beyond: ours - limit, the callback's own bookkeeping; fit A/B: whole monitored fit vs plain fit, "
        "which also carries run-to-run noise"
    )
    print("\n".join(["", *goals]))


if __name__ == "__main__":
    main()
