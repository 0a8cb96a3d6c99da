"""benchmarks/run_all.py knows every benchmark script, and the cheapest one runs."""

import importlib.util
import subprocess
import sys

import pytest

from tests.conftest import ROOT, real_data

NOT_BENCHMARKS = {"_common", "run_all", "plot_curves"}  # helpers, the runner, a plotting tool for TensorBoard logs


def _run_all():
    spec = importlib.util.spec_from_file_location("run_all", ROOT / "benchmarks" / "run_all.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_run_all_lists_every_benchmark_script():
    scripts = {p.stem for p in (ROOT / "benchmarks").glob("*.py")} - NOT_BENCHMARKS
    assert set(_run_all().BENCHMARKS) == scripts


@pytest.mark.slow
def test_resume_overhead_benchmark_prints_its_tables():
    done = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / "resume_overhead.py"), "--items", "2000", "--rounds", "1"],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr[-2000:]
    assert "ratio resumable / plain" in done.stdout and "+ RNGStateCheckpoint" in done.stdout


@pytest.mark.slow
def test_distillation_benchmark_runs_its_configs(tmp_path):
    """The benchmark drives the distillation configs through the CLI; when the configs were split into a base and
    overrides (issue 15) it kept passing only the override and stopped running, which nothing but run_all showed."""
    mnist = real_data("mnist", "t10k-images-idx3-ubyte.gz").parent
    args = [
        "--data-dir",
        str(mnist),
        "--epochs",
        "1",
        "--train",
        "300",
        "--val",
        "100",
        "--test",
        "200",
        "--out",
        str(tmp_path),
    ]
    done = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / "distillation.py"), *args],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert done.returncode == 0, done.stderr[-2000:]
    rows = [line for line in done.stdout.splitlines() if line.startswith("| ")]
    assert [row.split("|")[1].strip() for row in rows[1:]] == [
        "teacher",
        "small",
        "distilled T=20",
        "distilled T=4",
        "small, no 3s",
        "distilled T=20, no 3s",
        "distilled T=20, no 3s, tuned bias",
        "distilled T=20, no 3s, paper's +3.5",
        "distilled T=4, no 3s",
        "distilled T=4, no 3s, tuned bias",
        "distilled T=20, 7s and 8s only",
        "distilled T=20, 7s and 8s only, tuned bias",
    ]


@pytest.mark.slow
def test_engression_vs_package_benchmark_prints_its_table():
    pytest.importorskip("engression", reason="needs the engression package (the dev extra)")
    done = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / "engression_vs_package.py"), "--epochs", "1", "--rounds", "1"],
        capture_output=True,
        text=True,
        timeout=300,
        cwd=ROOT / "benchmarks",
    )
    assert done.returncode == 0, done.stderr[-2000:]
    assert "parameters: package 10,501, ours 10,501" in done.stdout
    for row in ("| package |", "| ours (Trainer) |", "| limit (torch ops only) |", "package / ours through"):
        assert row in done.stdout


def test_goal_lines_reach_the_table_of_goals():
    sys.path.insert(0, str(ROOT / "benchmarks"))
    try:
        from _common import GOAL_PREFIX, goal_line
    finally:
        sys.path.remove(str(ROOT / "benchmarks"))
    run_all = _run_all()
    assert GOAL_PREFIX == run_all.GOAL_PREFIX
    printed = "\n".join(
        [
            "| a table row |",
            goal_line("speed-up over the peer", 1.234, 1.2),
            goal_line("overhead per step", 2.5, 2.0, unit=" %", at_most=True),
        ]
    )
    assert goal_line("overhead per step", 1.5, 2.0, unit=" %", at_most=True).endswith(": met")
    table = run_all.goals_table({"bench": printed, "quiet": "no goals here"})
    assert table[3:] == [
        "|---|---|---|---|---|",
        "| bench | speed-up over the peer | 1.23x | >= 1.2x | met |",
        "| bench | overhead per step | 2.5 % | <= 2 % | **not met** |",
        "",
    ]
    assert run_all.goals_table({"quiet": "nothing"}) == []
