"""The package beyond this repository (slow tier): the wheel, installed with pip into a new virtual environment with
nothing else in it, used from an empty folder. The console script runs the quickstart config (shortened), and every
zoo entry loads through ``load_model``, through ``torch.hub.load(..., source="local")``, and through a Hub id from an
offline Hugging Face cache, where a tampered file is refused by its sha256."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from reprozoo.zoo import list_weights
from tests.conftest import ROOT
from tests.test_hub import make_hub_cache

pytestmark = pytest.mark.slow

# In the new environment: each entry three ways, and the result, as JSON on the last line.
CHECK = textwrap.dedent(
    """
    import json, sys
    from pathlib import Path

    import torch

    import reprozoo
    from reprozoo.zoo import HUB_DIR, WeightsError, list_weights, load_model

    names, commits = sys.argv[1].split(","), json.loads(sys.argv[2])
    out = {"package": reprozoo.__file__, "entries": {}}
    for name in names:
        packaged = load_model(name).state_dict()
        hub = torch.hub.load(HUB_DIR, name, source="local").state_dict()
        remote = load_model(f"hf://acme/{name}@{commits[name]}/{name}.json").state_dict()
        same = all(torch.equal(packaged[k], hub[k]) and torch.equal(packaged[k], remote[k]) for k in packaged)
        out["entries"][name] = same and set(packaged) == set(hub) == set(remote)
    try:
        load_model("hf://acme/tampered/nca_linear.rings.json")
        out["tampered"] = "loaded"
    except WeightsError as err:
        out["tampered"] = str(err)
    print(json.dumps(out))
    """
)


def _run(args: list, cwd: Path, env: dict, timeout: int) -> subprocess.CompletedProcess:
    result = subprocess.run([str(a) for a in args], cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)
    assert result.returncode == 0, (
        f"{args[:4]} failed ({result.returncode}):\n{result.stdout[-3000:]}\n{result.stderr[-3000:]}"
    )
    return result


def test_wheel_in_a_clean_venv_runs_the_quickstart_and_loads_every_entry(tmp_path):
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PYTHON", "VIRTUAL_ENV", "REPROZOO", "HF_"))}
    dist, venv, empty = tmp_path / "dist", tmp_path / "venv", tmp_path / "empty"
    empty.mkdir()
    # Built from a copy, so that the build leaves nothing in the checkout.
    source = tmp_path / "source"
    skip = (".*", "*.egg-info", "build", "dist", "lightning_logs", "__pycache__", "tests", "benchmarks", "docs")
    shutil.copytree(ROOT, source, ignore=shutil.ignore_patterns(*skip))
    _run([sys.executable, "-m", "pip", "wheel", "--no-deps", "-q", "-w", dist, source], tmp_path, env, 600)
    (wheel,) = dist.glob("reprozoo-*.whl")
    _run([sys.executable, "-m", "venv", venv], tmp_path, env, 300)
    python, script = venv / "bin" / "python", venv / "bin" / "reprozoo"
    _run([python, "-m", "pip", "install", "-q", wheel], tmp_path, env, 1200)

    env |= {"REPROZOO_OFFLINE": "1", "REPROZOO_DATA": str(tmp_path / "data"), "REPROZOO_CACHE": str(tmp_path / "c")}
    quick = [
        *(
            "fit",
            "--config",
            "configs/quickstart.yaml",
            "--trainer.max_steps",
            "20",
            "--trainer.val_check_interval",
            "10",
        ),
        *("--data.init_args.n_train_generated", "200", "--data.init_args.num_train_puzzles", "150"),
        *("--data.init_args.num_val", "20", "--data.init_args.n_test_generated", "20"),
    ]
    result = _run([script, *quick], empty, env, 900)
    assert "test/exact_acc" in result.stdout and "answer" in result.stdout, result.stdout[-2000:]
    assert (empty / "lightning_logs" / "quickstart" / "version_0" / "checkpoints" / "last.ckpt").is_file()
    listed = _run([script, "configs"], empty, env, 120).stdout.split()
    assert "configs/quickstart.yaml" in listed and "configs/trm/sudoku_extreme.yaml" in listed

    # One Hub repository per entry, as `zoo export NAME --hub-folder` of the installed package writes it, laid out
    # in a Hugging Face cache; a copy of nca_linear.rings with one byte of its weights changed.
    names, commits, cache = list_weights(), {}, tmp_path / "hf"
    for name in names:
        _run([script, "zoo", "export", name, "--hub-folder", tmp_path / "hub" / name], empty, env, 300)
        commits[name] = make_hub_cache(cache, f"acme/{name}", tmp_path / "hub" / name)
    tampered = tmp_path / "hub" / "nca_linear.rings"
    weights = tampered / "nca_linear.rings.safetensors"
    weights.write_bytes(weights.read_bytes()[:-1] + bytes([weights.read_bytes()[-1] ^ 1]))
    make_hub_cache(cache, "acme/tampered", tampered)

    env |= {"HF_HUB_CACHE": str(cache), "HF_HUB_OFFLINE": "1"}
    check = _run([python, "-c", CHECK, ",".join(names), json.dumps(commits)], empty, env, 900)
    out = json.loads(check.stdout.strip().splitlines()[-1])
    assert Path(out["package"]).is_relative_to(venv), out["package"]  # the installed wheel, not this checkout
    assert out["entries"] == dict.fromkeys(names, True)
    assert "sha256 mismatch" in out["tampered"] and "it was not loaded" in out["tampered"], out["tampered"]
    assert sorted(p.name for p in empty.iterdir()) == ["lightning_logs"]  # nothing else written in the folder
