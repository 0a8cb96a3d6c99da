"""Run every benchmark of the repository at a CPU-sized setting and write one report.

Each benchmark runs as its own process (``python benchmarks/<name>.py <arguments>``) with the settings below, its
figures and tables going to ``benchmarks/report/<name>/`` (the full-size results in ``benchmarks/results/`` are left
alone); its printed tables are collected into ``benchmarks/REPORT.md`` with the machine, the date, the command and
the wall time of each, and the lines where a benchmark states a measured ratio against its goal (``goal: ...``,
printed by ``_common.goal_line``) into a table of goals at the top. A benchmark that fails is reported as failed
with the end of its output, and the others still run; the exit status is non-zero when any failed.

Real data comes from the data root, ``$REPROZOO_DATA`` (default ``~/.cache/reprozoo/data``; see docs/data.md),
passed on to every benchmark (as an absolute path). A benchmark whose data is not there stops with a one-line
``missing data:`` message (exit status 2); it is reported as skipped with that reason, and does not make the exit
status non-zero, unless ``REPROZOO_REQUIRE_DATA=1`` (as in CI) makes a skip a failure.

The comparisons with other people's code import it from checkouts named by environment variables (never vendored):
``TRM_OFFICIAL`` (SamsungSAILMontreal/TinyRecursiveModels) and ``TENT_OFFICIAL`` (DequanWang/tent), without which
those benchmarks are skipped, and ``TORCHNCA_DIR`` (the unpacked torchnca 0.1.1 sdist), without which nca_knn leaves
its torchnca row out; the ``engression`` package and ``faiss`` come with the ``dev`` extra.

    python benchmarks/run_all.py                     # all of them, about 10-15 minutes on 2 CPU cores
    python benchmarks/run_all.py --only nca_knn tent_cifar10c
    python benchmarks/run_all.py --list
"""

from __future__ import annotations

import argparse
import os
import platform
import re
import subprocess
import sys
import time
from pathlib import Path

import torch

from reprozoo._files import data_root, write_atomic

ROOT = Path(__file__).resolve().parents[1]
HERE = ROOT / "benchmarks"
MISSING_DATA = "missing data:"  # = _common.MISSING_DATA (tests load this file without benchmarks/ on sys.path)
GOAL_PREFIX = "goal: "  # = _common.GOAL_PREFIX: the lines of goal_line(), gathered into the table of goals
_GOAL = re.compile(r"^goal: (?P<what>.+?) = (?P<value>.+?) \(goal (?P<goal>[^)]+)\): (?P<met>met|NOT met)$")
REQUIRE_DATA = os.environ.get("REPROZOO_REQUIRE_DATA", "").strip().lower() in {"1", "true", "yes", "on"}

# name -> (what it measures, arguments at a CPU-sized setting; "{out}" is the benchmark's output folder)
BENCHMARKS: dict[str, tuple[str, list[str]]] = {
    "engression_fig4": (
        "Engression vs L1 / L2 regression (same network, no noise) outside the training support (paper's Figure 4)",
        ["--functions", "softplus", "cubic", "--seeds", "1", "--epochs", "50", "--out", "{out}"],
    ),
    "engression_study": (
        "Engression: samples per x in the energy score (m) and the noise position (pre/post-additive)",
        ["--m", "2", "8", "--epochs", "30", "--out", "{out}"],
    ),
    "engression_vs_package": (
        "Engression vs the official engression package: time per epoch and energy score, with the limit",
        ["--epochs", "20", "--rounds", "3"],
    ),
    "trm_throughput": ("TRM training throughput and model FLOPs utilisation", ["--steps", "5"]),
    "trm_vs_official": ("TRM vs the official code: weights after 32 carry steps, time per step", ["--steps", "32"]),
    "trm_sample_efficiency": (
        "TRM's streaming carry vs the whole-batch loop: new puzzles per step, accuracy at equal steps",
        ["--steps", "600", "--out", "{out}"],
    ),
    "frobenius_overhead": (
        "FrobeniusNormMonitor overhead per training step, MLPs and CNNs, every 1 and 50 steps",
        ["--steps", "50", "--rounds", "3"],
    ),
    "landscape_speed": (
        "LossLandscape per net: time per grid point against the forward-only limit and the classic point loop",
        ["--resolution", "11", "--batches", "2", "--sizes", "cnn=7x1", "resnet20=3x1", "--rounds", "2"],
    ),
    "memorization": (
        "Memorization: BigAnimalNet on real, partly and fully random AFHQ labels",
        ["--max-epochs", "100", "--out", "{out}"],
    ),
    "distillation": (
        "Distillation on MNIST, with the mythical-3 experiment",
        ["--epochs", "8", "--train", "4000", "--val", "500", "--test", "1000", "--out", "{out}"],
    ),
    "regularization": (
        "Regularisation study: six MLP variants, loss curves and landscape sharpness",
        ["--epochs", "4", "--out", "{out}"],
    ),
    "nca_knn": (
        "NCA + kNN on MNIST, rings NCA vs PCA, loss step vs a straightforward implementation",
        ["--epochs", "4", "--out", "{out}"],
    ),
    "tent_cifar10c": (
        "TENT vs norm vs source on CIFAR-10-C-style corruptions",
        [
            *("--images", "400", "--severities", "1", "3", "5", "--out", "{out}"),
            *("--corruptions", "gaussian_noise", "defocus_blur", "contrast", "fog", "jpeg_compression"),
            *(
                "--curve-images",
                "1000",
                "--curve-corruptions",
                "gaussian_noise",
                "--grid-corruptions",
                "gaussian_noise",
            ),
            *("--grid-lrs", "0.001", "0.01", "--grid-batches", "50", "200"),
        ],
    ),
    "tent_vs_official": (
        "TENT vs the official code: same logits, time through the Trainer vs the official code and the limit",
        ["--images", "1000", "--rounds", "4"],
    ),
    "resume_overhead": (
        "Exact resume: the resumable training loader vs DataLoader, RNG states in checkpoints",
        ["--items", "30000", "--rounds", "3"],
    ),
}


def machine() -> str:
    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "none"
    return (
        f"{platform.platform()}; Python {platform.python_version()}; torch {torch.__version__}; "
        f"{os.cpu_count()} CPU cores ({torch.get_num_threads()} torch threads); GPU: {gpu}"
    )


def run(name: str, args: list[str], out: Path) -> tuple[str, float, str]:
    """Run one benchmark: ("ok" | "skipped" | "failed", seconds, its output; for a skip, the one-line reason)."""
    out.mkdir(parents=True, exist_ok=True)
    command = [sys.executable, str(HERE / f"{name}.py"), *[a.replace("{out}", str(out)) for a in args]]
    # The data root as an absolute path: a relative REPROZOO_DATA would otherwise be read from ROOT, not from here.
    env = {**os.environ, "REPROZOO_DATA": str(data_root().expanduser().resolve())}
    start = time.perf_counter()
    proc = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, check=False)
    seconds = time.perf_counter() - start
    text, stderr = proc.stdout.strip(), proc.stderr.strip()
    last = stderr.splitlines()[-1] if stderr else ""
    if proc.returncode == 2 and MISSING_DATA in last:
        status, text = "skipped", last
    elif proc.returncode != 0:
        status, text = "failed", (text + "\n" + stderr[-3000:]).strip()
    else:
        status = "ok"
    # Paths relative to the project, the data root named as such: no folder of this machine in the report.
    return status, seconds, text.replace(str(ROOT) + os.sep, "").replace(env["REPROZOO_DATA"], "$REPROZOO_DATA")


def goals_table(outputs: dict[str, str]) -> list[str]:
    """The report's table of goals: one row per ``goal: ...`` line a benchmark printed (see _common.goal_line)."""
    rows = []
    for name, text in outputs.items():
        for line in text.splitlines():
            match = _GOAL.match(line.strip())
            if match:
                rows.append(
                    f"| {name} | {match['what']} | {match['value']} | {match['goal']} | "
                    + ("met" if match["met"] == "met" else "**not met**")
                    + " |"
                )
    if not rows:
        return []
    return ["## Goals", "", "| benchmark | measured | value | goal | |", "|---|---|---|---|---|", *rows, ""]


def _demote_headings(text: str) -> str:
    """A benchmark's own markdown headings become subsections of its section."""
    return "\n".join("###" + line.lstrip("#") if line.startswith("#") else line for line in text.splitlines())


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--only", nargs="+", choices=list(BENCHMARKS), default=None)
    parser.add_argument("--list", action="store_true")
    parser.add_argument("--report", type=Path, default=HERE / "REPORT.md")
    parser.add_argument("--out", type=Path, default=HERE / "report")
    args = parser.parse_args()
    if args.list:
        for name, (what, bench_args) in BENCHMARKS.items():
            print(f"{name:<20} {what}\n{'':<20} {' '.join(bench_args)}")
        return 0
    names = args.only or list(BENCHMARKS)
    started = time.strftime("%Y-%m-%d %H:%M")
    sections, failed, skipped = [], [], []
    outputs: dict[str, str] = {}
    for name in names:
        what, bench_args = BENCHMARKS[name]
        out = args.out / name
        print(f"[run_all] {name} ...", flush=True)
        status, seconds, text = run(name, bench_args, out)
        if status == "skipped":
            print(f"[run_all] {name}: skipped, {text}", flush=True)
            skipped.append(name)
        else:
            print(f"[run_all] {name}: {'ok' if status == 'ok' else 'FAILED'} in {seconds:.0f} s", flush=True)
        if status == "failed":
            failed.append(name)
        elif status == "ok":
            outputs[name] = text
        shown_args = " ".join(a.replace("{out}", f"benchmarks/report/{name}") for a in bench_args)
        # A skipped benchmark wrote nothing: figures in its folder are an older run's.
        figures = [] if status == "skipped" else sorted(p.relative_to(args.report.parent) for p in out.glob("*.png"))
        outcome = {"ok": "ok", "skipped": "**skipped** (its data is missing)", "failed": "**failed**"}[status]
        sections += [
            f"## {name}: {what}",
            "",
            f"`python benchmarks/{name}.py {shown_args}`: {outcome}, {seconds:.0f} s.",
            "",
            _demote_headings(text) if status == "ok" else "```\n" + text + "\n```",
            "",
            *([("Figures: " + ", ".join(f"[{f.name}]({f.as_posix()})" for f in figures)), ""] if figures else []),
        ]
    header = [
        "# Benchmark report",
        "",
        f"Made by `python benchmarks/run_all.py` on {started}, CPU-sized settings (the full-size runs, where they",
        "differ, are in `benchmarks/results/`).",
        "",
        f"Machine: {machine()}.",
        "",
        f"Benchmarks: {len(names)}, failed: {', '.join(failed) if failed else 'none'}"
        + (f", skipped for missing data: {', '.join(skipped)}." if skipped else "."),
        "",
    ]
    write_atomic(args.report, ("\n".join(header + goals_table(outputs) + sections) + "\n").encode())
    print(f"[run_all] wrote {args.report}")
    if skipped and REQUIRE_DATA:
        print(f"[run_all] REPROZOO_REQUIRE_DATA is set: the skipped {', '.join(skipped)} count as failures")
    return 1 if failed or (skipped and REQUIRE_DATA) else 0


if __name__ == "__main__":
    sys.exit(main())
