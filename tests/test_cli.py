import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from reprozoo.cli import main, run_lightning
from reprozoo.zoo import export_checkpoint, registry
from tests.conftest import ROOT
from tests.test_configs import EXPERIMENTS, config_args

TINY = [
    "--trainer.max_epochs",
    "2",
    "--trainer.check_val_every_n_epoch",
    "1",
    "--trainer.enable_progress_bar",
    "false",
    "--data.init_args.n_train",
    "300",
    "--data.init_args.n_val",
    "100",
    "--data.init_args.n_test",
    "100",
    "--data.init_args.batch_size",
    "100",
]
CONFIGS = sorted(EXPERIMENTS)  # every experiment config (run with its base: config_args), not bases or presets


def _cli(*args, cwd):
    return subprocess.run(
        [sys.executable, str(ROOT / "cli.py"), *args], cwd=cwd, capture_output=True, text=True, timeout=600, check=False
    )


@pytest.fixture(scope="module")
def fitted(tmp_path_factory):
    """One real `python cli.py fit` run of the quickstart config, shrunk."""
    work = tmp_path_factory.mktemp("cli")
    (work / "configs").symlink_to(ROOT / "reprozoo" / "configs")
    done = _cli("fit", "--config", "configs/engression/quickstart.yaml", *TINY, cwd=work)
    assert done.returncode == 0, done.stderr[-3000:]
    (version,) = (work / "lightning_logs" / "engression_quickstart").iterdir()
    return work, version, done


@pytest.mark.slow
def test_fit_end_to_end(fitted):
    _, version, done = fitted
    assert "test/energy_score" in done.stdout and "val/crps" in done.stdout  # printed summary
    assert (version / "checkpoints" / "last.ckpt").is_file()
    assert (version / "config.yaml").is_file()
    assert list(version.glob("events.out.tfevents.*"))  # TensorBoard is the default logger


@pytest.mark.slow
@pytest.mark.parametrize("subcommand", ["validate", "test", "predict"])
def test_other_subcommands_from_checkpoint(fitted, subcommand):
    work, version, _ = fitted
    ckpt = version / "checkpoints" / "last.ckpt"
    done = _cli(subcommand, "--config", "configs/engression/quickstart.yaml", *TINY, "--ckpt_path", str(ckpt), cwd=work)
    assert done.returncode == 0, done.stderr[-3000:]
    if subcommand != "predict":
        assert f"{'val' if subcommand == 'validate' else 'test'}/energy_score" in done.stdout
    else:
        (written,) = (work / "lightning_logs" / "engression_quickstart").glob("version_*/predictions.pt")
        saved = torch.load(written, weights_only=True)
        samples = torch.cat(saved["predictions"][0])  # one dataloader: the test grid
        assert samples.shape == (100, 100, 1)  # 100 grid points, eval_samples=100, y is 1-d
        assert sorted(i for batch in saved["batch_indices"][0] for i in batch) == list(range(100))


@pytest.mark.slow
def test_zoo_export_from_cli_checkpoint(fitted, tmp_path, capsys):
    _, version, _ = fitted
    ckpt = version / "checkpoints" / "last.ckpt"
    args = ["export", str(ckpt), "--name", "engression_cli.tiny", "--out", str(tmp_path), "--metric", "test/crps=0.4"]
    code = main(["zoo", *args])
    assert code == 0, capsys.readouterr().err
    card = json.loads((tmp_path / "engression_cli.tiny.json").read_text())
    assert card["module"] == "reprozoo.methods.engression.EngressionRegressor"  # read from the checkpoint
    assert card["metrics"] == {"test/crps": 0.4}
    assert card["hparams"]["generator"]["init_args"]["hidden_dim"] == 100 and card["hparams"]["weights"] is None
    assert main(["zoo", "export", str(ckpt), "--name", "bad name", "--out", str(tmp_path)]) == 2
    assert "method_arch.data" in capsys.readouterr().err


def test_zoo_list_and_info(capsys):
    names = registry.list_weights()
    assert main(["zoo", "list"]) == 0
    out = capsys.readouterr().out
    assert all(name in out for name in names)
    assert main(["zoo", "info", names[0]]) == 0
    assert json.loads(capsys.readouterr().out)["name"] == names[0]
    assert main(["zoo", "info", "nope.nothing"]) == 2
    assert "no zoo entry named 'nope.nothing'" in capsys.readouterr().err


@pytest.mark.slow
def test_console_script_is_installed():
    script = Path(sys.executable).parent / "reprozoo"
    done = subprocess.run([str(script), "zoo", "list"], capture_output=True, text=True, timeout=300, check=False)
    assert done.returncode == 0 and registry.list_weights()[0] in done.stdout


@pytest.mark.parametrize("config", CONFIGS)
@pytest.mark.parametrize("preset", [None, "cpu", "gpu", "multi_gpu", "tpu"])
def test_every_config_parses_and_composes_with_presets(config, preset, capsys, monkeypatch):
    monkeypatch.chdir(ROOT)
    args = ["fit"] + (["--config", f"configs/trainer/{preset}.yaml"] if preset else []) + config_args(config)
    with pytest.raises(SystemExit) as info:
        run_lightning(args + ["--print_config"])
    assert info.value.code == 0
    printed = capsys.readouterr().out
    assert "class_path: reprozoo." in printed
    if preset == "multi_gpu":
        assert "strategy: ddp" in printed


@pytest.mark.parametrize(
    "override, message",
    [
        (["--model.init_args.loss", "huber"], "loss"),
        (["--model.init_args.betta", "1.0"], "betta"),
        (["--data.init_args.function", "sine"], "function"),
        (["--trainer.max_epochs", "many"], "max_epochs"),
    ],
)
def test_bad_config_values_name_the_field(override, message, capsys, monkeypatch):
    monkeypatch.chdir(ROOT)
    with pytest.raises(SystemExit) as info:
        run_lightning(["fit", "--config", "configs/engression/quickstart.yaml", *override])
    assert info.value.code != 0
    err = capsys.readouterr().err
    assert message in err
    assert "usage:" not in err and err.strip().splitlines()[-1].startswith("error: ")  # one line, no usage dump


def test_out_of_range_value_names_the_field(monkeypatch):
    monkeypatch.chdir(ROOT)
    with pytest.raises(ValueError, match="EngressionRegressor: beta must be in \\(0, 2\\)"):
        run_lightning(["fit", "--config", "configs/engression/quickstart.yaml", "--model.init_args.beta", "3.0"])


def test_head_mode_from_config_trains_exports_and_reloads(tmp_path, monkeypatch):
    """A backbone given by class_path survives checkpoint -> zoo export -> load_model (hparams stay plain data)."""
    monkeypatch.chdir(ROOT)
    cli = run_lightning(
        [
            "fit",
            "--config",
            "configs/engression/quickstart.yaml",
            *TINY,
            "--test_after_fit",
            "false",
            "--model.init_args.generator.init_args.in_dim",
            "8",
            "--model.init_args.backbone",
            '{"class_path": "torch.nn.Linear", "init_args": {"in_features": 1, "out_features": 8}}',
            "--trainer.logger",
            "false",
            "--trainer.default_root_dir",
            str(tmp_path),
            "--checkpoint.dirpath",
            str(tmp_path / "ckpt"),
        ]
    )
    assert cli.model.hparams.backbone["class_path"] == "torch.nn.Linear"
    _, card = export_checkpoint(tmp_path / "ckpt" / "last.ckpt", "engression_head.tiny", tmp_path / "zoo")
    model = registry.load_model(card)
    assert torch.equal(model.backbone.weight, cli.model.backbone.weight)


@pytest.mark.slow
def test_trm_quickstart_end_to_end_shrunk(tmp_path):
    """The TRM quickstart through the real CLI, shrunk: trains, tests, prints a grid, writes predictions.csv;
    its checkpoint exports to a zoo file that loads and solves."""
    (tmp_path / "configs").symlink_to(ROOT / "reprozoo" / "configs")
    shrink = [
        "--trainer.max_steps",
        "4",
        "--trainer.val_check_interval",
        "2",
        "--trainer.limit_val_batches",
        "1",
        "--trainer.enable_progress_bar",
        "false",
        "--data.init_args.n_train_generated",
        "64",
        "--data.init_args.n_test_generated",
        "16",
        "--data.init_args.num_train_puzzles",
        "48",
        "--data.init_args.num_val",
        "16",
        "--data.init_args.batch_size",
        "16",
        "--data.init_args.data_dir",
        str(tmp_path / "sudoku"),
    ]
    done = _cli("fit", "--config", "configs/quickstart.yaml", *shrink, cwd=tmp_path)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "test/exact_acc" in done.stdout and "val/exact_acc" in done.stdout
    assert "puzzle" in done.stdout and "answer (" in done.stdout  # the printed grid
    (version,) = (tmp_path / "lightning_logs" / "quickstart").iterdir()
    ckpt = version / "checkpoints" / "last.ckpt"
    done = _cli("predict", "--config", "configs/quickstart.yaml", *shrink, "--ckpt_path", str(ckpt), cwd=tmp_path)
    assert done.returncode == 0, done.stderr[-3000:]
    import csv

    with open(next(version.parent.glob("version_*/predictions.csv"))) as fh:
        rows = list(csv.DictReader(fh))
    assert len(rows) == 16 and {"question", "solution", "valid", "confidence"} <= set(rows[0])
    assert all(len(r["solution"]) == 81 and r["valid"] in ("True", "False") for r in rows)

    weights_file, card = export_checkpoint(ckpt, "trm_tiny.test", tmp_path / "zoo")
    state = registry.read_weights(registry.get_weights(card), weights_file)
    assert all(k.startswith("net.") for k in state)  # EMA weights only, no optimizer, no copy
    model = registry.load_model(card)
    # strict=False: a 4-step model rarely solves a puzzle, and solve() raises for unsolved ones by default
    assert len(model.solve([r["question"] for r in rows[:3]], strict=False)) == 3
