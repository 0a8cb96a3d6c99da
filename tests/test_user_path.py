"""The user's path through ``python cli.py`` (issue items 4 and 5): every user error ends with exit status 2 and one
``error: ...`` line naming the thing and the fix, without a traceback, and leaves the working folder as it was;
``fit --ckpt_path last`` continues the latest run in its own folder, and a config that contradicts the checkpoint
is refused (fit) or applied with a note (predict).

The CLI runs in-process through :func:`reprozoo.cli.main` (as ``python cli.py`` does), in a working folder under
tmp_path with ``configs/`` linked in; the ``slow`` tier runs a few of the cases as real processes.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from reprozoo import cli
from reprozoo.cli import CONFIG_DIR, main
from reprozoo.methods.engression import EngressionRegressor
from reprozoo.zoo import registry
from tests.conftest import ROOT

QUICK = "configs/engression/quickstart.yaml"
RUN = "lightning_logs/engression_quickstart"
TINY = [
    "--trainer.max_epochs",
    "2",
    "--trainer.enable_progress_bar",
    "false",
    "--trainer.enable_model_summary",
    "false",
    "--trainer.num_sanity_val_steps",
    "0",
    "--test_after_fit",
    "false",
    "--data.init_args.n_train",
    "200",
    "--data.init_args.n_val",
    "100",
    "--data.init_args.n_test",
    "100",
    "--data.init_args.batch_size",
    "100",
]  # 2 batches an epoch: 2 epochs = global step 4


# ----------------------------------------------------------------------------------------------- helpers


def digest(folder: Path) -> dict[str, str]:
    """{relative path: sha256 or '<dir>'} of everything under ``folder`` but the ``configs`` link."""
    return {
        str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest() if p.is_file() else "<dir>"
        for p in sorted(folder.rglob("*"))
        if p.relative_to(folder).parts[0] != "configs"
    }


def run(capsys, *args: str) -> tuple[int, str, str]:
    code = main(list(args))
    out, err = capsys.readouterr()
    return code, out, err


def refused(capsys, *args: str) -> str:
    """Runs the CLI, which must stop with exit status 2, one ``error:`` line last on stderr, no traceback; returns
    that line."""
    code, out, err = run(capsys, *args)
    lines = [line for line in err.splitlines() if line.strip()]
    assert code == 2, (code, err[-2000:])
    assert "Traceback" not in out + err, err[-3000:]
    assert lines and lines[-1].startswith("error: "), err[-2000:]
    assert sum(line.startswith("error: ") for line in lines) == 1, err[-2000:]
    return lines[-1]


def step_of(ckpt: Path) -> int:
    return torch.load(ckpt, weights_only=True, map_location="cpu")["global_step"]


@pytest.fixture
def work(tmp_path, monkeypatch):
    work = tmp_path / "work"
    work.mkdir()
    (work / "configs").symlink_to(ROOT / "reprozoo" / "configs")
    monkeypatch.chdir(work)
    return work


@pytest.fixture(scope="module")
def trained(tmp_path_factory) -> Path:
    """One tiny fit of the engression quickstart (2 epochs, global step 4): its version folder, to copy."""
    root = tmp_path_factory.mktemp("trained")
    (root / "configs").symlink_to(ROOT / "reprozoo" / "configs")
    with pytest.MonkeyPatch.context() as mp:
        mp.chdir(root)
        mp.setenv("REPROZOO_CACHE", str(root / "zoo-cache"))
        mp.setenv("REPROZOO_OFFLINE", "1")
        assert main(["fit", "--config", QUICK, *TINY]) == 0
    return root / RUN / "version_0"


@pytest.fixture
def resumable(work, trained) -> Path:
    """The work folder holding that run as ``lightning_logs/engression_quickstart/version_0``."""
    shutil.copytree(trained, work / RUN / "version_0")
    return work / RUN / "version_0"


def _sudoku_csvs(folder: Path) -> tuple[Path, Path]:
    """A good and a bad sudoku CSV in the official format (``source,question,answer,rating``); the bad one's line 4
    has an 80-character question."""
    solution = "".join(str((r * 3 + r // 3 + c) % 9 + 1) for r in range(9) for c in range(9))
    question = "".join(d if i % 3 else "." for i, d in enumerate(solution))
    lines = ["source,question,answer,rating"] + [f"made,{question},{solution},0"] * 8
    good, bad = folder / "good.csv", folder / "bad.csv"
    good.write_text("\n".join(lines) + "\n")
    lines[3] = f"made,{question[:80]},{solution},0"
    bad.write_text("\n".join(lines) + "\n")
    return good, bad


# ----------------------------------------------------------------------------------------------- bad input: one line

PARSE_ERRORS = [
    # (extra arguments, what the line must say)
    (["--data.init_args.batch_size", "abc"], ["error: --data.init_args.batch_size: expected int, got 'abc'"]),
    (["--model.init_args.lrr", "1"], ["--model.init_args.lrr", "has no option 'lrr'", "did you mean 'lr'"]),
    (["--model.init_args.lr", "fast"], ["--model.init_args.lr: expected float, got 'fast'"]),
    (["--data.init_args.function", "sine"], ["--data.init_args.function", "'softplus'", "got 'sine'"]),
    (["--trainerr.max_epochs", "5"], ["--trainerr.max_epochs", "did you mean --trainer.max_epochs"]),
    (["--checkpoint.monitr", "x"], ["--checkpoint.monitr", "did you mean --checkpoint.monitor"]),
    (
        ["--model", "reprozoo.methods.engression.EngresionRegressor"],
        ["--model", "has no attribute 'EngresionRegressor'"],
    ),
    (["--trainer.max_epochs", "many"], ["--trainer.max_epochs: expected int, got 'many'"]),
]


@pytest.mark.parametrize("extra, says", PARSE_ERRORS, ids=[e[0] for e, _ in PARSE_ERRORS])
def test_mistyped_key_or_value_is_one_line(extra, says, work, capsys):
    before = digest(work)
    line = refused(capsys, "fit", "--config", QUICK, *extra)
    assert all(s in line for s in says), line
    assert digest(work) == before


def test_config_file_errors_are_one_line(work, capsys):
    (work / "broken.yaml").write_text("model:\n  class_path: [unclosed\n")
    line = refused(capsys, "fit", "--config", "broken.yaml")
    assert "broken.yaml is not valid YAML" in line and "line 3" in line and "line 2" in line, line
    (work / "typo.yaml").write_text((CONFIG_DIR.parent / QUICK).read_text().replace("    lr: 0.01", "    lrr: 0.01"))
    assert "lrr" in refused(capsys, "fit", "--config", "typo.yaml")
    assert "File does not exist" in refused(capsys, "fit", "--config", "configs/engression/quikstart.yaml")
    line = refused(capsys, "fitt", "--config", QUICK)
    assert "unknown subcommand 'fitt'" in line and "fit, validate, test, predict" in line
    assert sorted(digest(work)) == ["broken.yaml", "typo.yaml"]


@pytest.mark.parametrize(
    "extra, says",
    [
        (["--model.init_args.weights", "nope_x.y"], ["no zoo entry named 'nope_x.y'", "Known entries"]),
        (["--model.init_args.beta", "3.0"], ["error: EngressionRegressor: beta must be in (0, 2)", "got 3.0"]),
        (["--data.init_args.batch_size", "0"], ["SyntheticRegressionDataModule: batch_size must be >= 1, got 0"]),
    ],
    ids=["unknown-zoo-name", "out-of-range-model", "out-of-range-data"],
)
def test_building_errors_are_one_line(extra, says, work, capsys):
    line = refused(capsys, "fit", "--config", QUICK, *extra)
    assert all(s in line for s in says), line
    assert digest(work) == {}


def test_tampered_zoo_file(work, capsys, monkeypatch, tmp_path):
    """A packaged weights file that changed after it was registered (here a copy, in its own registry)."""
    name = "engression_stonet.softplus_pre"
    package = tmp_path / "package"
    package.mkdir()
    for suffix in (".safetensors", ".json"):
        shutil.copyfile(registry.PACKAGE_DIR / f"{name}{suffix}", package / f"{name}{suffix}")
    data = bytearray((package / f"{name}.safetensors").read_bytes())
    data[len(data) // 2] ^= 0xFF
    (package / f"{name}.safetensors").write_bytes(bytes(data))
    monkeypatch.setattr(registry, "PACKAGE_DIR", package)
    monkeypatch.setattr(registry, "_REGISTRY", dict(registry._REGISTRY))
    line = refused(capsys, "fit", "--config", QUICK, *TINY, "--model.init_args.weights", name)
    assert f"sha256 mismatch for {package / name}.safetensors" in line and "it was not loaded" in line, line
    assert digest(work) == {}


def test_missing_data_folder(work, capsys):
    line = refused(
        capsys,
        "fit",
        "--config",
        "configs/quickstart.yaml",
        "--data.init_args.source",
        "csv",
        "--data.init_args.data_dir",
        "nodata",
    )
    assert "nodata/train.csv" in line and "Put train.csv at " in line, line  # (data_dir is under the data root)
    assert digest(work) == {}


def test_malformed_data_file_leaves_no_version_folder(work, capsys, monkeypatch):
    """The CSV is read in the datamodule's setup, after Lightning has created the TensorBoard version folder: the
    refused run removes it again (and lightning_logs, which it had created too)."""
    _sudoku_csvs(work)
    removed = []
    real_remove = cli.RunGuard.remove_output

    def spy(self):
        removed.extend(str(t.path) for t in self._paths if t.path.exists())
        real_remove(self)

    monkeypatch.setattr(cli.RunGuard, "remove_output", spy)
    before = digest(work)
    line = refused(
        capsys,
        "fit",
        "--config",
        "configs/quickstart.yaml",
        "--data.init_args.source",
        "csv",
        "--data.init_args.train_file",
        "bad.csv",
        "--data.init_args.test_file",
        "good.csv",
    )
    assert line == "error: bad.csv, line 4: question has 80 characters, expected 81"
    assert "lightning_logs/quickstart/version_0" in removed  # it existed: the clean-up did the work
    assert digest(work) == before and not (work / "lightning_logs").exists()


@pytest.mark.parametrize("subcommand", ["fit", "test"])
def test_truncated_checkpoint(subcommand, work, trained, capsys):
    data = (trained / "checkpoints" / "last.ckpt").read_bytes()
    (work / "half.ckpt").write_bytes(data[: len(data) // 2])
    before = digest(work)
    line = refused(capsys, subcommand, "--config", QUICK, *TINY, "--ckpt_path", "half.ckpt")
    assert "checkpoint half.ckpt is truncated or corrupt" in line and "Use another checkpoint" in line, line
    assert digest(work) == before


def test_missing_checkpoint(work, capsys):
    line = refused(capsys, "test", "--config", QUICK, "--ckpt_path", "nope.ckpt")
    assert line == "error: --ckpt_path nope.ckpt: no such checkpoint file"
    assert digest(work) == {}


def test_checkpoint_of_another_method(work, trained, capsys):
    shutil.copyfile(trained / "checkpoints" / "last.ckpt", work / "engression.ckpt")
    before = digest(work)
    line = refused(capsys, "test", "--config", "configs/nca/rings.yaml", "--ckpt_path", "engression.ckpt")
    assert "written by reprozoo.methods.engression.EngressionRegressor, but NCAModule" in line, line
    assert "Use that method's config" in line
    assert digest(work) == before


def test_diverging_run_is_one_line_and_keeps_its_logs(work, capsys):
    line = refused(
        capsys,
        "fit",
        "--config",
        QUICK,
        *TINY,
        "--model.init_args.lr",
        "1e30",
        "--model.init_args.generator.init_args.batch_norm",
        "false",
    )
    assert "EngressionRegressor: the training loss is not finite" in line and "lower the learning rate" in line
    kept = digest(work / RUN / "version_0")
    assert "config.yaml" in kept and any(name.startswith("events.out.tfevents") for name in kept)


def test_debug_shows_the_traceback(work, capsys, monkeypatch):
    monkeypatch.setenv(cli.DEBUG_ENV, "1")
    with pytest.raises(ValueError, match="beta must be in"):
        main(["fit", "--config", QUICK, "--model.init_args.beta", "3.0"])
    monkeypatch.setenv(cli.DEBUG_ENV, "0")  # main() sets it for --debug; monkeypatch restores it afterwards
    with pytest.raises(Exception, match="batch_size: expected int"):
        main(["--debug", "fit", "--config", QUICK, "--data.init_args.batch_size", "abc"])
    assert digest(work) == {}


def test_a_bug_keeps_its_traceback(work, capsys, monkeypatch):
    """An exception that is not about the input (here a ValueError from a training step) propagates."""

    def broken(self, batch, batch_idx):
        raise ValueError("a bug in the training step")

    monkeypatch.setattr(EngressionRegressor, "training_step", broken)
    with pytest.raises(ValueError, match="a bug in the training step"):
        main(["fit", "--config", QUICK, *TINY])
    assert (work / RUN / "version_0").is_dir()  # its logs are kept for debugging


@pytest.mark.parametrize(
    "args, says",
    [
        (["zoo", "info"], "required: name"),
        (["zoo", "bogus"], "invalid choice: 'bogus'"),
        (["zoo", "info", "nope_x.y"], "no zoo entry named 'nope_x.y'"),
        (["zoo", "export", "nope.ckpt", "--name", "a_b.c"], "checkpoint nope.ckpt does not exist"),
        (["zoo", "export", "nope.ckpt", "--name", "a_b.c", "--metric", "crps"], "--metric expects KEY=NUMBER"),
    ],
    ids=["missing-argument", "unknown-command", "unknown-name", "missing-checkpoint", "bad-metric"],
)
def test_zoo_errors_are_one_line(args, says, work, capsys):
    code, _, err = run(capsys, *args)
    assert code == 2 and says in err and "Traceback" not in err, err
    assert len(err.strip().splitlines()) == 1, err
    assert digest(work) == {}


# ----------------------------------------------------------------------------------------------- resume


def test_resume_last_with_nothing_to_resume(work, capsys):
    line = refused(capsys, "fit", "--config", QUICK, *TINY, "--ckpt_path", "last")
    assert f"found no {RUN}/version_*/checkpoints/last.ckpt" in line and "drop --ckpt_path" in line, line
    assert digest(work) == {}


def test_resume_last_continues_the_run_in_its_folder(work, capsys, monkeypatch):
    """``fit --ckpt_path last`` run again continues version_0: the logs and checkpoints go on there, the global
    step goes on, and the weights end as those of one uninterrupted run as long."""
    assert main(["fit", "--config", QUICK, *TINY]) == 0
    capsys.readouterr()
    code, _, err = run(capsys, "fit", "--config", QUICK, *TINY, "--trainer.max_epochs", "4", "--ckpt_path", "last")
    assert code == 0, err[-3000:]
    ckpt = f"{RUN}/version_0/checkpoints/last.ckpt"
    assert f"resuming from {ckpt} (epoch 2, global step 4); logs and checkpoints continue in {RUN}/version_0" in err
    assert sorted(p.name for p in (work / RUN).iterdir()) == ["version_0"]
    version = work / RUN / "version_0"
    assert sorted(p.name for p in (version / "checkpoints").iterdir()) == ["last.ckpt"]
    assert len(list(version.glob("events.out.tfevents.*"))) == 2  # TensorBoard reads both as one run
    assert step_of(version / "checkpoints" / "last.ckpt") == 8

    straight = work.parent / "straight"
    straight.mkdir()
    (straight / "configs").symlink_to(ROOT / "reprozoo" / "configs")
    monkeypatch.chdir(straight)
    assert main(["fit", "--config", QUICK, *TINY, "--trainer.max_epochs", "4"]) == 0
    a = torch.load(straight / RUN / "version_0" / "checkpoints" / "last.ckpt", weights_only=True)["state_dict"]
    b = torch.load(version / "checkpoints" / "last.ckpt", weights_only=True)["state_dict"]
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_resume_an_explicit_checkpoint_continues_its_version(resumable, work, capsys):
    shutil.copytree(resumable, work / RUN / "version_1")  # a later run: `last` would pick it, the path does not
    code, _, err = run(
        capsys,
        "fit",
        "--config",
        QUICK,
        *TINY,
        "--trainer.max_epochs",
        "3",
        "--ckpt_path",
        f"{RUN}/version_0/checkpoints/last.ckpt",
    )
    assert code == 0, err[-3000:]
    assert f"logs and checkpoints continue in {RUN}/version_0" in err
    assert sorted(p.name for p in (work / RUN).iterdir()) == ["version_0", "version_1"]
    assert step_of(resumable / "checkpoints" / "last.ckpt") == 6
    assert step_of(work / RUN / "version_1" / "checkpoints" / "last.ckpt") == 4


@pytest.mark.parametrize(
    "extra, says",
    [
        (
            ["--model.init_args.lr", "0.1"],
            [
                "--model.init_args.lr 0.1 differs from the checkpoint's 0.01",
                "Resume with --model.init_args.lr 0.01",
                "drop --ckpt_path",
            ],
        ),
        (
            ["--model.init_args.lr", "0.1", "--model.init_args.m", "4"],
            [
                "--model.init_args.lr 0.1 and --model.init_args.m 4 differs from the checkpoint's 0.01 and 2",
                "Resume with --model.init_args.lr 0.01 --model.init_args.m 2",
            ],
        ),
        (
            ["--data.init_args.batch_size", "50"],
            [
                "--data.init_args.batch_size 50 differs from the checkpoint's batch size 100",
                "Resume with --data.init_args.batch_size 100",
                "drop --ckpt_path",
            ],
        ),
    ],
    ids=["lr", "lr-and-m", "batch_size"],
)
def test_resume_with_other_values_is_refused(extra, says, resumable, work, capsys):
    before = digest(work)
    line = refused(capsys, "fit", "--config", QUICK, *TINY, "--trainer.max_epochs", "4", "--ckpt_path", "last", *extra)
    assert f"cannot resume fit from {RUN}/version_0/checkpoints/last.ckpt" in line, line
    assert all(s in line for s in says), line
    assert digest(work) == before


def test_resume_with_other_data_options_applies_them_with_a_note(resumable, work, capsys):
    code, _, err = run(
        capsys,
        "fit",
        "--config",
        QUICK,
        *TINY,
        "--trainer.max_epochs",
        "3",
        "--ckpt_path",
        "last",
        "--data.init_args.n_train",
        "300",
    )
    assert code == 0, err[-3000:]
    assert "note: fit uses --data.init_args.n_train 300 from the config, not the checkpoint's 200" in err
    assert step_of(resumable / "checkpoints" / "last.ckpt") == 7  # 4, then one epoch of 3 batches


def test_predict_applies_the_configs_value_and_says_so(resumable, work, capsys):
    code, _, err = run(
        capsys, "predict", "--config", QUICK, *TINY, "--ckpt_path", "last", "--model.init_args.eval_samples", "10"
    )
    assert code == 0, err[-3000:]
    assert "note: predict uses --model.init_args.eval_samples 10 from the config, not the checkpoint's 100" in err
    assert f"predicting with {RUN}/version_0/checkpoints/last.ckpt (epoch 2, global step 4)" in err
    saved = torch.load(work / RUN / "version_1" / "predictions.pt", weights_only=True)
    assert torch.cat(saved["predictions"][0]).shape == (100, 10, 1)  # 10 samples per point: the config's value


def _fail_in_module_setup(monkeypatch):
    """The module's setup hook raises a user error: it runs after SaveConfigCallback has written config.yaml."""

    def gone(self, stage):
        raise FileNotFoundError("train.csv is gone")

    monkeypatch.setattr(EngressionRegressor, "setup", gone, raising=False)


def test_refused_resume_restores_the_folder_it_continued(resumable, work, capsys, monkeypatch):
    """A run that continues version_0 and is then refused leaves version_0 as it was: its config.yaml back (the
    refused run had written its own), no new event file."""
    _fail_in_module_setup(monkeypatch)
    before = digest(work)
    line = refused(capsys, "fit", "--config", QUICK, *TINY, "--trainer.max_epochs", "4", "--ckpt_path", "last")
    assert line == "error: train.csv is gone"
    assert digest(work) == before


def test_refused_run_without_a_logger_leaves_no_config_file(work, capsys, monkeypatch):
    """Without a logger, SaveConfigCallback writes config.yaml into the working folder: removed again."""
    _fail_in_module_setup(monkeypatch)
    assert refused(capsys, "fit", "--config", QUICK, *TINY, "--trainer.logger", "false") == "error: train.csv is gone"
    assert digest(work) == {}


# ----------------------------------------------------------------------------------------------- real processes


def _cli(work: Path, *args: str, env: dict | None = None) -> subprocess.CompletedProcess:
    environment = {k: v for k, v in os.environ.items() if k != cli.DEBUG_ENV}
    environment.update({"REPROZOO_OFFLINE": "1", **(env or {})})
    return subprocess.run(
        [sys.executable, "cli.py", *args],
        cwd=work,
        env=environment,
        capture_output=True,
        text=True,
        timeout=600,
        check=False,
    )


@pytest.fixture
def shell(work):
    (work / "cli.py").symlink_to(ROOT / "cli.py")
    return work


@pytest.mark.slow
@pytest.mark.parametrize(
    "args, says",
    [
        (["--data.init_args.batch_size", "abc"], "error: --data.init_args.batch_size: expected int, got 'abc'"),
        (["--ckpt_path", "last"], "error: --ckpt_path last: no checkpoint to resume"),
        (["--model.init_args.weights", "nope_x.y"], "error: no zoo entry named 'nope_x.y'"),
    ],
    ids=["parse", "resume", "build"],
)
def test_real_process_exit_status_and_one_line(args, says, shell):
    before = digest(shell)
    done = _cli(shell, "fit", "--config", QUICK, *TINY, *args)
    assert done.returncode == 2, done.stderr[-3000:]
    assert "Traceback" not in done.stdout + done.stderr
    assert done.stderr.strip().splitlines()[-1].startswith(says), done.stderr[-2000:]
    assert digest(shell) == before
    debug = _cli(shell, "fit", "--config", QUICK, *TINY, *args, env={cli.DEBUG_ENV: "1"})
    assert debug.returncode == 1 and "Traceback" in debug.stderr


@pytest.mark.slow
def test_real_process_resume_last_twice(shell):
    """The user's report: the same command run twice. The second continues the first (same folder, step 4 -> 8)."""
    first = _cli(shell, "fit", "--config", QUICK, *TINY, "--ckpt_path", "last")
    assert first.returncode == 2 and "no checkpoint to resume" in first.stderr  # nothing yet: it says so
    assert _cli(shell, "fit", "--config", QUICK, *TINY).returncode == 0
    again = _cli(shell, "fit", "--config", QUICK, *TINY, "--trainer.max_epochs", "4", "--ckpt_path", "last")
    assert again.returncode == 0, again.stderr[-3000:]
    assert f"resuming from {RUN}/version_0/checkpoints/last.ckpt (epoch 2, global step 4)" in again.stderr
    assert "exists and is not empty" not in again.stderr  # ModelCheckpoint's warning: continuing there is the point
    assert sorted(p.name for p in (shell / RUN).iterdir()) == ["version_0"]
    assert step_of(shell / RUN / "version_0" / "checkpoints" / "last.ckpt") == 8
