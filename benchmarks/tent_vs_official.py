"""TENT against the official code (DequanWang/tent), side by side: the same pretrained CIFAR ResNet-20, the same
corrupted batches, the same adapted predictions, and the time each takes.

The batches: ``--images`` random real CIFAR-10 test images (``test_jpeg_q75.npz``) with ``--corruption`` at
``--severity`` (CIFAR-10-C's parameters, ``CIFAR10CDataModule(source="generate")``), batch ``--batch``, read once
from our datamodule and handed to every path below in the same order. Each path starts from the source weights and
adapts through all batches once (one pass = one corruption of the official ``cifar10c.py`` protocol):

* ``official``: the official ``configure_model``, ``collect_params`` and ``Tent`` wrapper with Adam (lr 1e-3,
  betas (0.9, 0.999), no weight decay: its ``cfgs/tent.yaml``), reset, then its ``accuracy`` loop (``no_grad``,
  one forward per batch, errors counted) over the batches held in memory;
* ``ours, Trainer.test``: ``Trainer.test(TentModule(..., write_summary=False), datamodule)``, everything Lightning
  does included (loader, hooks, metrics); ``defaults``: the same with the summary files and PNG written at the end;
  ``channels_last``: ``TentModule(channels_last=True)``; with ``--compile`` also ``compile=True``, alone and with
  ``channels_last`` (compiled during the checks, so not timed; the compile time is printed). These options change
  the order in which the convolutions and BatchNorm sum, so their logits are close to, not equal to, the official
  ones (the differences are printed);
* ``ours, bare adapter``: :class:`TentAdapter` in the official loop;
* ``limit``: the work neither can avoid, one forward and one backward (to the BatchNorm affine parameters) per
  batch of the same model in train-mode BatchNorm, with no optimizer and nothing else;
* ``loader alone``: our batch-indexed test loader, and (``item by item``) a plain DataLoader over the same dataset,
  which collates images one by one.

Checked first (untimed, also the warm-up): the adapted logits of ours (through the Trainer, read by a forward hook,
and bare) against the official ones: the largest absolute difference and the number of differing argmaxes, and the
errors. Timed: ``--rounds`` alternating rounds in one process (the order reversed every other round), same threads;
best and median per path, and official/ours against the goal of 1.2.

    python benchmarks/tent_vs_official.py --official DIR                          # 2,000 images, batch 200
    python benchmarks/tent_vs_official.py --official DIR --images 1000 --rounds 3  # the run_all.py setting
    python benchmarks/tent_vs_official.py --official DIR --compile --threads 1     # + torch.compile, one thread

DIR is a checkout of https://github.com/DequanWang/tent (``tent.py`` is imported from there, never copied here).
Without ``--official`` (or ``$TENT_OFFICIAL``), or without the data (``--data-dir``, default
``$REPROZOO_DATA/cifar10``: ``test_jpeg_q75.npz`` and ``pretrained/resnet20-*.th``), it stops with exit status 2,
which ``run_all.py`` reports as skipped.
"""

from __future__ import annotations

import argparse
import functools
import importlib.util
import os
import statistics
import sys
import tempfile
import time
import warnings
from collections.abc import Callable
from pathlib import Path

import lightning as L
import torch
from _common import MISSING_DATA, cifar10_tent_files, goal_line, quiet_lightning, shown
from torch.utils.data import DataLoader

from reprozoo._files import data_path, data_root
from reprozoo.datamodules.cifar10c import CIFAR10CDataModule
from reprozoo.methods.tent import TentModule
from reprozoo.methods.tent_adapter import TentAdapter, softmax_entropy
from reprozoo.nets import load_legacy_cifar_resnet

GOAL = 1.2  # official / ours, through the Trainer
LIMIT, OFFICIAL, TRAINER = "limit (forward + backward only)", "official Tent", "ours, Trainer.test"


def _stop_missing_peer(message: str) -> None:
    print(f"tent_vs_official.py: {MISSING_DATA} {message}", file=sys.stderr)
    raise SystemExit(2)


def _import_official(folder: Path | None):
    """The official ``tent.py`` module of a DequanWang/tent checkout; exit status 2 when there is none."""
    how = "pass --official DIR (a checkout of DequanWang/tent) or set TENT_OFFICIAL"
    if folder is None:
        _stop_missing_peer(f"a checkout of DequanWang/tent (its tent.py); {how}")
    if not (folder / "tent.py").is_file():
        _stop_missing_peer(f"{shown(folder)} has no tent.py, so it is not a checkout of DequanWang/tent; {how}")
    spec = importlib.util.spec_from_file_location("tent_official", folder / "tent.py")
    module = importlib.util.module_from_spec(spec)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # its softmax_entropy is torch.jit.script-ed, which torch now deprecates
        spec.loader.exec_module(module)
    return module


def official_tent(official, model: torch.nn.Module):
    """The official set-up (``cifar10c.setup_tent`` with ``cfgs/tent.yaml``): configure, collect, Adam, wrap."""
    model = official.configure_model(model)
    params, _ = official.collect_params(model)
    optimizer = torch.optim.Adam(params, lr=1e-3, betas=(0.9, 0.999), weight_decay=0.0)
    official.check_model(model)
    return official.Tent(model, optimizer, steps=1, episodic=False)


def adapt_pass(model: Callable, batches: list, outputs: list | None = None) -> int:
    """The official ``accuracy`` loop over ``batches`` (no_grad, one call per batch): the number of errors. The logits
    are appended to ``outputs`` when given."""
    wrong = 0
    with torch.no_grad():
        for x, y in batches:
            logits = model(x)
            wrong += int((logits.argmax(1) != y).sum())
            if outputs is not None:
                outputs.append(logits.detach())
    return wrong


def limit_pass(model: torch.nn.Module, params: list, batches: list) -> None:
    """One forward and one backward to ``params`` per batch: what every TENT pass must compute."""
    for x, _ in batches:
        torch.autograd.grad(softmax_entropy(model(x)).mean(0), params)


def compare(name: str, ours: list[torch.Tensor], official: list[torch.Tensor]) -> str:
    a, b = torch.cat(ours), torch.cat(official)
    diff = (a - b).abs().max().item()
    differ = int((a.argmax(1) != b.argmax(1)).sum())
    verdict = "identical" if torch.equal(a, b) else f"max |logit diff| {diff:.3g}"
    return f"{name}: {verdict}; argmax differs on {differ} of {len(a)} images"


def _ratio(a: float, b: float) -> str:
    return f"{a / b:.2f}x" if b > 0 else "-"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--official", type=Path, help="a DequanWang/tent checkout (default: $TENT_OFFICIAL)")
    parser.add_argument("--data-dir", type=data_path, default=None, help="default: $REPROZOO_DATA/cifar10")
    parser.add_argument("--images", type=int, default=2000)
    parser.add_argument("--batch", type=int, default=200)
    parser.add_argument("--corruption", default="gaussian_noise")
    parser.add_argument("--severity", type=int, default=5, choices=[1, 2, 3, 4, 5])
    parser.add_argument("--depth", type=int, default=20, choices=[20, 32, 44])
    parser.add_argument("--rounds", type=int, default=5, help="alternating timed rounds")
    parser.add_argument("--threads", type=int, default=None, help="torch threads for every path (default: torch's)")
    parser.add_argument("--cache", type=Path, default=None, help="where generated corruptions are cached")
    parser.add_argument("--compile", action="store_true", help="also time TentModule(compile=True) (compiles first)")
    args = parser.parse_args()
    if args.official is None and os.environ.get("TENT_OFFICIAL"):
        args.official = Path(os.environ["TENT_OFFICIAL"])
    official = _import_official(args.official)
    args.data_dir = args.data_dir or data_root() / "cifar10"
    clean_npz, weights = cifar10_tent_files("tent_vs_official.py", args.data_dir, args.depth)
    if min(args.images, args.batch, args.rounds, args.threads or 1) < 1:
        parser.error("--images, --batch, --rounds and --threads must be >= 1")
    quiet_lightning()
    if args.threads is not None:
        torch.set_num_threads(args.threads)

    def net() -> torch.nn.Module:
        return load_legacy_cifar_resnet(weights)

    with tempfile.TemporaryDirectory() as tmp:
        dm = CIFAR10CDataModule(
            data_dir=str(args.cache or tmp),
            source="generate",
            clean="npz",
            clean_npz=str(clean_npz),
            corruptions=[args.corruption],
            severities=(args.severity,),
            num_examples=args.images,
            subset="random",  # the source is sorted by class: a random sample mixes the classes of every batch
            batch_size=args.batch,
            seed=0,
        )
        dm.prepare_data()
        dm.setup("test")
        loader = dm.test_dataloader()[0]
        batches = list(loader)  # what every path sees, in this order
        item_loader = DataLoader(dm.datasets[dm.domains[0]], batch_size=args.batch)

        tent_official = official_tent(official, net())
        adapter = TentAdapter(net())
        limit_model = official.configure_model(net())
        limit_params, _ = official.collect_params(limit_model)

        def trainer() -> L.Trainer:
            return L.Trainer(
                accelerator="cpu",
                devices=1,
                logger=False,
                enable_progress_bar=False,
                enable_model_summary=False,
                enable_checkpointing=False,
                default_root_dir=tmp,
            )

        def run_official(outputs=None) -> int:
            tent_official.reset()  # as cifar10c.py does before every corruption
            return adapt_pass(tent_official, batches, outputs)

        def run_bare(outputs=None) -> int:
            adapter.reset()
            return adapt_pass(adapter, batches, outputs)

        # Our Trainer paths: (label, TentModule options); each module and Trainer is made once and reused, as the
        # official Tent is (every test run resets the module to the source state at the start of the domain).
        variants = [(TRAINER, dict(write_summary=False)), (f"{TRAINER}, defaults", {})]
        variants += [(f"{TRAINER}, channels_last", dict(write_summary=False, channels_last=True))]
        if args.compile:
            variants += [(f"{TRAINER}, compile", dict(write_summary=False, compile=True))]
            variants += [
                (f"{TRAINER}, channels_last + compile", dict(write_summary=False, channels_last=True, compile=True))
            ]
        modules = {label: (TentModule(net(), **options), trainer()) for label, options in variants}

        def run_trainer(label: str, outputs: list | None = None) -> None:
            module, runner = modules[label]
            hook = None
            if outputs is not None:  # the adapter's output is what test_step scores
                hook = module.adapter.register_forward_hook(lambda m, i, out: outputs.append(out.detach()))
            runner.test(module, datamodule=dm, verbose=False)
            if hook is not None:
                hook.remove()

        paths: dict[str, Callable[[], object]] = {
            LIMIT: lambda: limit_pass(limit_model, limit_params, batches),
            OFFICIAL: run_official,
            **{label: functools.partial(run_trainer, label) for label in modules},
            "ours, bare adapter": run_bare,
            "loader alone (batch-indexed)": lambda: [b for b in loader],
            "loader alone (item by item)": lambda: [b for b in item_loader],
        }

        # ---- the same predictions (untimed; also every path's warm-up, compilation included)
        start = time.perf_counter()
        logits_official: list[torch.Tensor] = []
        wrong_official = run_official(logits_official)
        lines, errors = [], [f"official {100 * wrong_official / args.images:.2f} %"]
        identical: dict[str, bool] = {}
        for label in modules:
            logits: list[torch.Tensor] = []
            began = time.perf_counter()
            run_trainer(label, logits)
            took = f" (first run {time.perf_counter() - began:.1f} s, compiling included)" if "compile" in label else ""
            lines.append(compare(f"{label} vs official", logits, logits_official) + took)
            identical[label] = torch.equal(torch.cat(logits), torch.cat(logits_official))
            errors.append(f"{label} {100 * modules[label][0].results[0]['error']:.2f} %")
        logits = []
        wrong_bare = run_bare(logits)
        lines.append(compare("ours, bare adapter vs official", logits, logits_official))
        errors.append(f"bare adapter {100 * wrong_bare / args.images:.2f} %")
        lines.append("error: " + ", ".join(errors))
        run_trainer_done = (OFFICIAL, "ours, bare adapter", *modules)  # warmed up by the checks above
        for name, run in paths.items():
            if name not in run_trainer_done:
                run()
        check_s = time.perf_counter() - start

        # ---- timing: alternating rounds
        seconds: dict[str, list[float]] = {name: [] for name in paths}
        for r in range(args.rounds):
            order = list(paths) if r % 2 == 0 else list(reversed(paths))
            for name in order:
                began = time.perf_counter()
                paths[name]()
                seconds[name].append(time.perf_counter() - began)

    best = {k: min(v) for k, v in seconds.items()}
    median = {k: statistics.median(v) for k, v in seconds.items()}
    o, lim = OFFICIAL, LIMIT
    print(
        f"TENT vs the official code ({shown(args.official)}): ResNet-{args.depth} ({weights.name}), {args.images} "
        f"random CIFAR-10 test images (JPEG q75) with {args.corruption} at severity {args.severity}, batch "
        f"{args.batch}, Adam lr 1e-3, 1 step per batch; {torch.get_num_threads()} torch threads, torch "
        f"{torch.__version__}"
    )
    print()
    print("Adapted predictions (first pass of each from the source weights):")
    print()
    print("\n".join(f"- {line}" for line in lines))
    print()
    print(
        f"Seconds per pass over the {len(batches)} batches, {args.rounds} alternating rounds (best, median); "
        "official/this > 1 means this is faster:"
    )
    print()
    print(
        "| path | best (s) | median (s) | images/s (best) | official/this (best) | official/this (median) | "
        "this/limit (best) |"
    )
    print("|---|---:|---:|---:|---:|---:|---:|")
    for name in paths:
        loader_row = name.startswith("loader")
        print(
            f"| {name} | {best[name]:.3f} | {median[name]:.3f} | {args.images / best[name]:.0f} | "
            + (
                "- | - | -"
                if loader_row
                else f"{_ratio(best[o], best[name])} | {_ratio(median[o], median[name])} | {_ratio(best[name], best[lim])}"
            )
            + " |"
        )
    print()
    fastest = min(modules, key=lambda k: median[k])
    goals: list[str] = []
    for label in dict.fromkeys([TRAINER, fastest]):
        b, m = best[o] / best[label], median[o] / median[label]
        same = "the same logits" if identical[label] else "close logits, see above"
        print(
            f"Goal: official/ours through the Trainer >= {GOAL}, {label} ({same}): {b:.2f}x best, {m:.2f}x median: "
            + ("met." if min(b, m) >= GOAL else "not met.")
        )
        goals.append(goal_line(f"TENT, official / ours through the Trainer, {label} ({same}; median)", m, GOAL))
    print(
        f"The official path takes {best[o] / best[lim]:.2f}x the limit (forward + backward alone, best): a path that "
        f"does the same arithmetic in the same order can gain at most that factor over it. (Checks, warm-up and "
        f"compilation: {check_s:.1f} s.)"
    )
    print("\n".join(["", *goals]))


if __name__ == "__main__":
    main()
