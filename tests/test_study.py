"""Studies (``python cli.py study``): the CNN architecture study's grid, run names and networks, the study file's
checks, and the MetricsHistory callback that each run's results file is made of."""

from __future__ import annotations

import json
import os
from pathlib import Path

import lightning as L
import numpy as np
import pytest
import torch
import yaml
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from reprozoo.callbacks import MetricsHistory
from reprozoo.cli import main
from reprozoo.cli._study import load_study, select
from reprozoo.methods.classifier import ClassifierModule
from reprozoo.nets import ConvNet
from tests.conftest import ROOT, real_data

CONFIGS = ROOT / "reprozoo" / "configs"

# The course's run names (exp<experiment>_L<L>_K<K>, the widths of K joined by "-"), in the course's order.
COURSE_NAMES = (
    [f"exp1_1_L{L}_K{K}" for K in (32, 64) for L in (2, 4, 8, 16)]
    + [f"exp1_2_L{L}_K{K}" for L in (2, 4, 8) for K in (32, 64, 128)]
    + [f"exp1_3_L{L}_K64-128" for L in (2, 3, 4)]
    + [f"exp1_4_L{L}_K32" for L in (8, 16, 32)]
    + [f"exp1_4_L{L}_K64-128-256" for L in (2, 4, 8)]
)


def test_cnn_study_runs_have_the_course_names_in_order():
    for study in ("cnn_architecture", "cnn_architecture_cpu"):
        _, runs = load_study(study)
        assert [r.name for r in runs] == COURSE_NAMES


def test_cpu_study_is_the_full_grid_with_its_options_added():
    _, full = load_study("cnn_architecture")
    spec, cpu = load_study("cnn_architecture_cpu")
    assert spec["study"] == "cnn_architecture_cpu"
    for a, b in zip(full, cpu):
        assert b.options[: len(a.options)] == a.options and b.configs == a.configs
        assert "--data.init_args.images_npz" in b.options[len(a.options) :]


def _net_args(run) -> dict:
    """The ConvNet arguments of a run, merged by hand from its YAML files and grid values (not through the CLI)."""
    args: dict = {}
    for config in run.configs:
        data = yaml.safe_load((CONFIGS / config.removeprefix("configs/")).read_text()) or {}
        net = (((data.get("model") or {}).get("init_args") or {}).get("net") or {}).get("init_args") or {}
        args.update(net)
    args["layers_per_block"] = run.params["L"]
    args["channels"] = run.params["K"]
    return args


def _expected_parameters(a: dict) -> tuple[int, int]:
    """(parameters, classifier input width) of a ConvNet, counted from the homework's layout by hand."""
    k, bn = a["kernel_size"], a["batch_norm"]
    pad = k // 2 if a.get("padding") is None else a["padding"]
    widths = [w for w in a["channels"] for _ in range(a["layers_per_block"])]
    P = a["pool_every"]
    total, side, c_in = 0, 32, 3
    for start in range(0, len(widths), P):
        group = widths[start : start + P]
        c = c_in
        for w in group:
            total += k * k * c * w + (2 * w if bn else w)  # conv (a bias only without BN) + BN scale and shift
            c = w
        if a.get("residual") and c_in != group[-1]:
            total += c_in * group[-1] + (2 * group[-1] if bn else group[-1])  # 1x1 projection shortcut
        side += len(group) * (2 * pad - k + 1)
        if len(group) == P:
            side //= 2
        c_in = group[-1]
    features = c_in * side * side
    hidden = a["hidden"][0]
    return total + features * hidden + hidden + hidden * 10 + 10, features


def test_every_network_of_the_cnn_study_has_the_expected_size_and_shape():
    _, runs = load_study("cnn_architecture")
    for run in runs:
        args = _net_args(run)
        net = ConvNet(**args)
        expected, features = _expected_parameters(args)
        assert sum(p.numel() for p in net.parameters()) == expected, run.name
        assert net.num_features == features, run.name
        with torch.no_grad():
            assert net.eval()(torch.zeros(2, 3, 32, 32)).shape == (2, 10), run.name
        pools = [m for m in net.features if isinstance(m, (nn.AvgPool2d, nn.MaxPool2d))]
        assert all(isinstance(p, nn.AvgPool2d) for p in pools), run.name
        assert len(pools) == len(args["channels"]) * args["layers_per_block"] // args["pool_every"], run.name


def test_select_by_experiment_run_and_task_id():
    _, runs = load_study("cnn_architecture")
    assert [r.name for r in select(runs, ["exp1_3"], None)] == COURSE_NAMES[17:20]
    assert [r.name for r in select(runs, ["exp1_3"], 2)] == ["exp1_3_L4_K64-128"]
    assert [r.name for r in select(runs, ["exp1_1_L2_K32", "exp1_4"], None)] == [COURSE_NAMES[0], *COURSE_NAMES[20:]]
    with pytest.raises(ValueError, match="--task-id 3: the selection has runs 0..2"):
        select(runs, ["exp1_3"], 3)
    with pytest.raises(ValueError, match="--only: no experiment or run named 'exp9'"):
        select(runs, ["exp9"], None)


def test_study_list_command(capsys):
    assert main(["study", "list", "cnn_architecture", "--only", "exp1_4"]) == 0
    out = capsys.readouterr().out
    assert "exp1_4_L8_K64-128-256" in out and "--array=0-5" in out
    assert "--model.init_args.net.init_args.channels '[64,128,256]'" in out  # shell-quoted, ready to paste


@pytest.mark.parametrize(
    "text, message",
    [
        ("[1, 2]", "expected a mapping"),
        ("study: s\nname: x\nset: {}\nexperiments: 3", "'experiments' must be a dict"),
        (
            "study: s\nname: '{experiment}'\nset: {L: a.b}\nexperiments: {e: {configs: [], grids: [{L: [1]}]}}",
            "experiments.e.configs must be a non-empty list",
        ),
        (
            "study: s\nname: '{experiment}'\nset: {L: a.b}\nexperiments: {e: {configs: [c.yaml], grids: [{M: [1]}]}}",
            "variable 'M' is not in 'set'",
        ),
        (
            "study: s\nname: '{experiment}'\nset: {L: a.b}\nexperiments: {e: {configs: [c.yaml], grids: [{L: [1, 2]}]}}",
            "several runs the name 'e'",
        ),
        (
            "study: s\nname: '{experiment}_{Q}'\nset: {L: a.b}\nexperiments: {e: {configs: [c.yaml], grids: [{L: [1]}]}}",
            "the run name uses 'Q'",
        ),
        ("study: s\nextends: s\n", "'extends' must name another study"),
        ("study: s\nextends: cnn_architecture\noptions: [3]\n", "'options' must be a list of command-line words"),
    ],
)
def test_bad_study_files_are_one_line_errors(tmp_path, capsys, text, message):
    path = tmp_path / "study.yaml"
    path.write_text(text)
    assert main(["study", "list", str(path)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and message in err and str(path) in err and "\n" not in err


def test_unknown_study_is_a_one_line_error(capsys):
    assert main(["study", "list", "no_such_study"]) == 2
    err = capsys.readouterr().err
    assert "no such study in configs/studies/" in err and "cnn_architecture" in err


# ----------------------------------------------------------------------------------------- MetricsHistory


def _loaders(n: int = 64) -> tuple[DataLoader, DataLoader]:
    g = torch.Generator().manual_seed(0)
    x = torch.randn(n, 8, generator=g)
    y = (x[:, 0] > 0).long()
    return DataLoader(TensorDataset(x, y), batch_size=16), DataLoader(TensorDataset(x[:32], y[:32]), batch_size=16)


def _module() -> ClassifierModule:
    torch.manual_seed(0)
    return ClassifierModule(nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 2)), num_classes=2, lr=0.05)


def _trainer(tmp_path, epochs: int, history: MetricsHistory, **kwargs) -> L.Trainer:
    return L.Trainer(
        max_epochs=epochs,
        default_root_dir=tmp_path,
        logger=False,
        callbacks=[history],
        enable_progress_bar=False,
        enable_model_summary=False,
        **kwargs,
    )


def test_metrics_history_records_every_epoch_and_the_test(tmp_path):
    train, val = _loaders()
    history = MetricsHistory()
    trainer = _trainer(tmp_path, 3, history, enable_checkpointing=False)
    model = _module()
    trainer.fit(model, train, val)
    record = json.loads((tmp_path / "metrics_history.json").read_text())
    assert [e["epoch"] for e in record["epochs"]] == [0, 1, 2]
    assert [e["step"] for e in record["epochs"]] == [4, 8, 12]
    for entry in record["epochs"]:
        assert {"train/loss", "train/acc", "val/loss", "val/acc"} <= set(entry)
        assert not any(k.endswith("_step") or k.endswith("_epoch") for k in entry)
    # the last epoch's validation loss is what the module computes on the val loader
    with torch.no_grad():
        x, y = val.dataset.tensors
        expected = nn.functional.cross_entropy(model(x), y).item()
    assert record["epochs"][-1]["val/loss"] == pytest.approx(expected, rel=1e-5)
    assert record["num_parameters"] == 8 * 16 + 16 + 16 * 2 + 2
    trainer.test(model, val)
    record = json.loads((tmp_path / "metrics_history.json").read_text())
    assert set(record["test"]) == {"test/loss", "test/acc"} and len(record["epochs"]) == 3


def test_metrics_history_resumes_with_the_epochs_before(tmp_path):
    train, val = _loaders()
    first = MetricsHistory()
    _trainer(tmp_path, 2, first).fit(_module(), train, val)
    ckpt = next((tmp_path / "checkpoints").glob("*.ckpt"))
    second = MetricsHistory()
    _trainer(tmp_path, 4, second).fit(_module(), train, val, ckpt_path=ckpt)
    record = json.loads((tmp_path / "metrics_history.json").read_text())
    assert [e["epoch"] for e in record["epochs"]] == [0, 1, 2, 3]
    assert record["epochs"][:2] == first.epochs
    assert record["best_model_path"].endswith(".ckpt")


def test_metrics_history_prefixes_and_non_finite_values(tmp_path):
    history = MetricsHistory(prefixes=["val/"])

    class Trainer:  # what the callback reads, and nothing else
        sanity_checking = False
        current_epoch, global_step = 0, 5
        callback_metrics = {"val/loss": torch.tensor(float("nan")), "train/loss": torch.tensor(1.0)}
        log_dir, default_root_dir = str(tmp_path), str(tmp_path)

    history.on_train_epoch_end(Trainer(), None)
    record = json.loads((tmp_path / "metrics_history.json").read_text())
    assert record["epochs"] == [{"epoch": 0, "step": 5, "val/loss": None}]


# ----------------------------------------------------------------------------------------- a study end to end


def _tiny_npz(root: Path, n: int = 120) -> Path:
    """An .npz of n CIFAR-shaped images (x uint8 (n, 32, 32, 3), y balanced), in the data root."""
    rng = np.random.default_rng(0)
    path = root / "cifar10" / "tiny.npz"
    path.parent.mkdir(parents=True)
    np.savez(path, x=rng.integers(0, 256, (n, 32, 32, 3), dtype=np.uint8), y=np.arange(n) % 10)
    return path


def _in_process(monkeypatch) -> list[list[str]]:
    """Run the study's cli.py calls in this process (the same words), and keep them."""
    calls = []

    def cli(words):
        calls.append(list(words))
        status = main(list(words))
        if status:
            raise SystemExit(status)

    monkeypatch.setattr("reprozoo.cli._study._cli", cli)
    return calls


def test_study_run_resume_skip_and_plot(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("REPROZOO_DATA", str(tmp_path / "data"))
    _tiny_npz(tmp_path / "data")
    study = tmp_path / "tiny.yaml"
    options = "--data.init_args.images_npz cifar10/tiny.npz --data.init_args.num_train 80 --data.init_args.val_size 20"
    options += " --data.init_args.num_test 20 --trainer.max_epochs 2 --trainer.log_every_n_steps 1"
    study.write_text("study: tiny\nextends: cnn_architecture\noptions: " + json.dumps(options.split()) + "\n")
    calls = _in_process(monkeypatch)
    out = tmp_path / "out"
    quiet = ["--", "--trainer.enable_progress_bar", "false", "--trainer.enable_model_summary", "false"]
    # an interrupted run: one epoch of exp1_1_L2_K32 done, no results file
    _, runs = load_study(str(study))
    first = runs[0]
    assert main([*first.fit_args(out / "logs", quiet[1:]), "--trainer.max_epochs", "1"]) == 0
    assert (
        main(["study", "run", str(study), "--out", str(out), "--only", "exp1_1_L2_K32", "exp1_2_L2_K64", *quiet]) == 0
    )
    assert calls[0][-2:] == ["--ckpt_path", "last"]  # resumed, not started again
    assert [c[0] for c in calls] == ["fit", "test", "fit", "test"]
    record = json.loads((out / "exp1_1_L2_K32.json").read_text())
    assert record["run"] == "exp1_1_L2_K32" and record["params"] == {"K": [32], "L": 2}
    assert [e["epoch"] for e in record["epochs"]] == [0, 1]  # the epoch before the resume is kept
    assert {"train/loss", "train/acc", "val/loss", "val/acc"} <= set(record["epochs"][-1])
    assert set(record["test"]) == {"test/loss", "test/acc"}
    expected, _ = _expected_parameters(_net_args(runs[0]))
    assert record["num_parameters"] == expected
    assert (
        record["command"][:3] == ["python", "cli.py", "fit"]
        and "--model.init_args.net.init_args.channels" in record["command"]
    )
    other = json.loads((out / "exp1_2_L2_K64.json").read_text())
    assert other["params"] == {"L": 2, "K": [64]} and len(other["epochs"]) == 2
    # done runs are skipped; --rerun runs them again
    calls.clear()
    assert main(["study", "run", str(study), "--out", str(out), "--only", "exp1_1_L2_K32", *quiet]) == 0
    assert calls == [] and "done before" in capsys.readouterr().out
    # the figures and the table
    assert main(["study", "plot", str(study), "--out", str(out), "--only", "exp1_1", "exp1_2"]) == 0
    assert (out / "exp1_1_K32.png").stat().st_size > 0 and (out / "exp1_2_L2.png").exists()
    table = (out / "tiny.md").read_text()
    assert f"| exp1_1_L2_K32 | {expected:,} | 2 |" in table and "| exp1_1_L4_K32 | not run |" in table


def test_study_plot_without_results_is_a_one_line_error(tmp_path, capsys):
    assert main(["study", "plot", "cnn_architecture", "--out", str(tmp_path)]) == 2
    assert "no results file of this study" in capsys.readouterr().err


# ----------------------------------------------------------------------------------------- as the docs run them


@pytest.mark.slow
@pytest.mark.parametrize(
    "study, run, metrics",
    [
        ("cnn_architecture_cpu", "exp1_4_L8_K32", {"val/acc", "train/acc"}),
        ("memorization_cifar_cpu", "mem_noise0.4", {"fitted/clean", "fitted/noisy_label"}),
    ],
)
def test_cpu_studies_run_from_the_command_line_on_real_data(tmp_path, monkeypatch, study, run, metrics):
    """`python cli.py study run <study>_cpu` and `study plot`, as docs/studies.md shows them (one run, 2 epochs), in
    a subprocess from an empty folder, on the real CIFAR-10 test images of the data root."""
    import subprocess
    import sys

    root = real_data("cifar10", "test_jpeg_q75.npz").parents[1]
    env = {**os.environ, "REPROZOO_DATA": str(root)}
    cli = [sys.executable, str(ROOT / "cli.py"), "study"]
    quiet = ["--", "--trainer.max_epochs", "2", "--trainer.enable_progress_bar", "false"]
    for words in (["run", study, "--only", run, "--out", "out", *quiet], ["plot", study, "--out", "out"]):
        proc = subprocess.run([*cli, *words], cwd=tmp_path, env=env, capture_output=True, text=True, check=False)
        assert proc.returncode == 0, proc.stderr[-3000:]
    record = json.loads((tmp_path / "out" / f"{run}.json").read_text())
    assert len(record["epochs"]) == 2 and metrics <= set(record["epochs"][-1])
    assert 0.0 <= record["test"]["test/acc"] <= 1.0
    assert list((tmp_path / "out").glob("*.png")) and (tmp_path / "out" / f"{study}.md").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]  # nothing written beside the output folder
