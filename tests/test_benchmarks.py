"""benchmarks/run_all.py knows every benchmark script, and the cheapest one runs."""

import importlib.util
import subprocess
import sys

import pytest

from tests.conftest import ROOT

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
