"""What the benchmark scripts share: where the project's real data lies, and a quiet Lightning."""

from __future__ import annotations

import logging
import os
import shlex
import sys
import time
import warnings
from collections.abc import Iterable
from pathlib import Path
from typing import NoReturn

from reprozoo._files import data_root, write_atomic

ROOT = Path(__file__).resolve().parents[1]
# The first words of the message of a benchmark stopped for missing data (exit status 2): run_all.py reports such a
# benchmark as skipped, not failed.
MISSING_DATA = "missing data:"


def shown(path: Path) -> str:
    """``path`` as the benchmarks print and record it: ``$REPROZOO_DATA/...`` under the data root, relative under the
    project, else only its last part (no folder of one machine in a report)."""
    path = Path(path).expanduser().resolve()
    for base, name in ((data_root().expanduser().resolve(), "$REPROZOO_DATA"), (ROOT, "")):
        if path.is_relative_to(base):
            rel = path.relative_to(base).as_posix()
            return "/".join(part for part in (name, "" if rel == "." else rel) if part) or "."
    return f".../{path.name}"


def shown_command(argv: list[str]) -> str:
    """A command line as the benchmarks record it: every absolute path in it shown by :func:`shown`."""
    return shlex.join(shown(Path(word)) if os.path.isabs(word) else word for word in argv)


def stop_missing_data(script: str, files: Iterable[str], folder: Path, *, other_fix: str = "") -> NoReturn:
    """Stop at once (exit status 2, one line on stderr, no traceback): ``files`` are not in ``folder``; the message
    says how to point the script at them, and ``other_fix`` (e.g. ``"run with --download"``) when there is one."""
    fixes = ["set REPROZOO_DATA to the data root that holds them (docs/data.md)", "pass --data-dir DIR"]
    fixes += [other_fix] if other_fix else []
    how = ", ".join(fixes[:-1]) + f" or {fixes[-1]}"
    print(f"{script}: {MISSING_DATA} {', '.join(files)} not found in {folder}; {how}", file=sys.stderr)
    raise SystemExit(2)


def cifar10_tent_files(script: str, data_dir: Path, depth: int) -> tuple[Path, Path]:
    """The TENT benchmarks' inputs in ``data_dir``: the clean test images ``test_jpeg_q75.npz`` and the pretrained
    ``pretrained/resnet<depth>-*.th``; stops (exit status 2, one line) naming the missing ones."""
    clean_npz = data_dir / "test_jpeg_q75.npz"
    weights = next(iter(sorted((data_dir / "pretrained").glob(f"resnet{depth}-*.th"))), None)
    missing = [] if clean_npz.is_file() else [clean_npz.name]
    missing += [] if weights else [f"pretrained/resnet{depth}-*.th"]
    if missing:
        stop_missing_data(script, missing, data_dir)
    return clean_npz, weights


def missing_idx_files(folder: Path, names: Iterable[str], torchvision_name: str) -> list[str]:
    """The official idx files among ``names`` (without ``.gz``) that the MNIST / Fashion-MNIST datamodule would not
    find in ``folder``: [] when all of them are there (flat) or all in torchvision's ``<torchvision_name>/raw``,
    gzipped or not; else those missing from ``folder``."""

    def missing(place: Path) -> list[str]:
        return [f"{n}.gz" for n in names if not any((place / c).is_file() for c in (f"{n}.gz", n))]

    flat = missing(folder)
    return [] if not flat or not missing(folder / torchvision_name / "raw") else flat


MNIST_TEST_FILES = ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte")
MNIST_TRAIN_FILES = ("train-images-idx3-ubyte", "train-labels-idx1-ubyte")


GOAL_PREFIX = "goal: "  # = run_all.GOAL_PREFIX: run_all.py gathers these lines into the report's table of goals


def goal_line(what: str, value: float, goal: float, *, unit: str = "x", at_most: bool = False) -> str:
    """One printed line stating a measured ratio against its goal (``value >= goal``, or ``<=`` with ``at_most``),
    e.g. ``goal: TENT, official / ours through the Trainer = 1.23x (goal >= 1.2x): met``. ``run_all.py`` collects
    such lines from every benchmark's output into the table of goals at the top of REPORT.md."""
    met = value <= goal if at_most else value >= goal
    return f"{GOAL_PREFIX}{what} = {value:.3g}{unit} (goal {'<=' if at_most else '>='} {goal:g}{unit}): " + (
        "met" if met else "NOT met"
    )


def quiet_lightning(offline: bool = True) -> None:
    """Silence Lightning's per-run banners and the warnings that small CPU runs always trigger; by default never
    download (the benchmarks read local data)."""
    for pattern in (
        ".*does not have many workers.*",
        ".*LightningCLI's args parameter.*",
        ".*smaller than the logging.*",
        ".*defined a `validation_step` but have no `val_dataloader`.*",
        ".*isinstance\\(treespec, LeafSpec\\)` is deprecated.*",
    ):
        warnings.filterwarnings("ignore", pattern)
    for name in ("lightning.pytorch", "lightning.fabric"):
        logging.getLogger(name).setLevel(logging.WARNING)
    if offline:
        os.environ.setdefault("REPROZOO_OFFLINE", "1")


def run_grid(run_one, jobs: list, *, workers: int, line, out: Path, stem: str, make_table, make_figure, args) -> None:
    """Run ``run_one`` over ``jobs`` in ``workers`` processes (printing ``line(result)`` as each ends, with its
    number), then write ``out/<stem>.md`` (``make_table(results, args)``) and ``out/<stem>.png``
    (``make_figure(results, args, path)``) and print the table: the shape the grid benchmarks share."""
    from concurrent.futures import ProcessPoolExecutor

    start = time.perf_counter()
    results = []
    with ProcessPoolExecutor(max_workers=workers) as pool:
        for k, result in enumerate(pool.map(run_one, jobs), 1):
            results.append(result)
            print(f"[{k}/{len(jobs)}] {line(result)} ({result['seconds']:.0f} s)", flush=True)
    out.mkdir(parents=True, exist_ok=True)
    table = make_table(results, args)
    write_atomic(out / f"{stem}.md", (table + "\n").encode())
    make_figure(results, args, out / f"{stem}.png")
    print()
    print(table)
    print(f"\nwrote {out / (stem + '.md')} and {out / (stem + '.png')} in {time.perf_counter() - start:.0f} s")
