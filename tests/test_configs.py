"""The experiment configs under ``configs/``: how they compose, and that each resolves to its recorded config.

Layout (issue 15, "Configs compose"): a folder whose experiments share most settings keeps them in ``base.yaml``,
and each experiment file holds only what it changes. LightningCLI (jsonargparse) takes ``--config`` several times,
each file overriding the ones before it, so an experiment runs as

    python cli.py fit --config configs/<family>/base.yaml --config configs/<family>/<name>.yaml

Self-contained experiments (one ``--config``): the quickstarts, the recipes of zoo entries (a card names one
recipe file, run alone by ``python cli.py test --config <recipe> --model.init_args.weights NAME``), and the folders
whose configs share too little for a base. The trainer presets in ``configs/trainer/`` compose with any experiment
(``--config configs/trainer/gpu.yaml`` first) and are neither experiments nor bases.

Every experiment's header comment shows the command that runs it (``python cli.py <subcommand> --config ...``, the
experiment's own file last): that line is where the tests (here and in test_cli.py, through :func:`config_args`)
read which base an experiment uses. Each experiment's ``fit --print_config`` must equal its golden in
``tests/configs_golden/<folder>__<name>.yaml``, recorded before the configs were split into bases and overrides.
A change that is meant to change a resolved config (a new default, a Lightning upgrade) is accepted by rewriting the
goldens, ``UPDATE_CONFIG_GOLDENS=1 pytest tests/test_configs.py``, and reviewing their diff; a renamed class path or
option goes into :data:`RENAMES` instead.
"""

from __future__ import annotations

import difflib
import os
import re
import shlex
from pathlib import Path

import pytest
import yaml

from reprozoo._checks import current_hparams
from reprozoo.cli import main
from reprozoo.zoo import registry
from tests.conftest import ROOT

CONFIGS = ROOT / "reprozoo" / "configs"
# Configs are named as on the command line, `configs/<folder>/<name>.yaml`: relative to the package, which ships them.
HOME = CONFIGS.parent
PRESETS = "configs/trainer/"  # trainer presets: compose with any experiment, neither experiments nor bases
STUDIES = "configs/studies/"  # grids of runs of the experiments (`cli.py study`, tests/test_study.py), not configs
BASE = "base.yaml"  # the shared settings of the experiments of its folder; not an experiment itself
GOLDEN = Path(__file__).resolve().parent / "configs_golden"
UPDATE = os.environ.get("UPDATE_CONFIG_GOLDENS", "").strip().lower() in {"1", "true", "yes", "on"}

# What was renamed since the goldens were recorded (old string -> new string, e.g. a class path), applied to the
# goldens before comparing. Every rename that changes a resolved config must be listed here AND in the changelog /
# docs: users' own configs, command lines and checkpoints name the old strings.
RENAMES: dict[str, str] = {
    "reprozoo.zoo.classifier.ClassifierModule": "reprozoo.methods.classifier.ClassifierModule",
    "reprozoo.zoo.distillation.DistillationModule": "reprozoo.methods.distillation.DistillationModule",
    "reprozoo.zoo.engression.EngressionRegressor": "reprozoo.methods.engression.EngressionRegressor",
    "reprozoo.zoo.nca.NCAModule": "reprozoo.methods.nca.NCAModule",
    "reprozoo.zoo.tent.TentModule": "reprozoo.methods.tent.TentModule",
    "reprozoo.zoo.trm.TRMModule": "reprozoo.methods.trm.TRMModule",
    "reprozoo.zoo.nets.MLP": "reprozoo.nets.MLP",
}


# What moved since the goldens were recorded, in structure rather than in name (issue 15, "network once"; see
# CHANGELOG.md): TRMModule's and EngressionRegressor's network arguments are those of their `net` / `generator`. The
# goldens go through the same conversion as checkpoints and zoo files of that layout (current_hparams): the TRM
# network also shows the two constants TRMModule never exposed (the values it always used), and the engression L1/L2
# baselines a generator with noise_dim 0 (they always ran without noise).
def _moved(config: dict) -> dict:
    model = config.get("model") or {}
    if "class_path" in model:
        model["init_args"] = current_hparams(model["class_path"], model["init_args"])
    return config


# Options added since the goldens were recorded, with the default that keeps what the experiments did (class name ->
# {option: default}); and the experiments whose recipe changed on purpose (file -> {dotted key: new value}). Each is
# in CHANGELOG.md.
# issue 16: AdamATan2 + sign-SGD next to AdamW; the streaming carry next to the whole-batch loop; torch.compile
ADDED = {
    "TRMModule": {"optimizer": "adamw", "training_loop": "whole_batch", "compile": False},
    "TentModule": {"write_summary": True, "channels_last": False, "compile": False},  # issue 20
}
_CARRY = {"model.init_args.training_loop": "carry"}  # issue 16: the official streaming carry is the default loop
CHANGED = {
    "configs/quickstart.yaml": _CARRY,
    "configs/trm/sudoku_generated_cpu.yaml": _CARRY
    | {  # issue 16: the zoo entry retrained with the carry on harder puzzles, trm_mlp64.sudoku_gen40
        "model.init_args.n_sup": 4,
        "data.init_args.num_givens": 40,
        "trainer.logger.init_args.name": "trm_sudoku_gen40",
    },
    "configs/trm/sudoku_extreme.yaml": _CARRY
    | {  # issue 16: the official recipe (optimizer pair, length in optimizer steps, bf16 + compile)
        "model.init_args.optimizer": "adam_atan2",
        "model.init_args.compile": True,
        "trainer.max_epochs": 50,
        "trainer.check_val_every_n_epoch": 5,
        "data.init_args.train_repeats": 1000,
    },
}


def _changed(experiment: str, config: dict) -> dict:
    model = config.get("model") or {}
    for option, default in ADDED.get(str(model.get("class_path", "")).rpartition(".")[2], {}).items():
        model["init_args"].setdefault(option, default)
    for key, value in CHANGED.get(experiment, {}).items():
        *parents, leaf = key.split(".")
        node = config
        for part in parents:
            node = node[part]
        node[leaf] = value
    return config


_COMMAND = re.compile(r"^#.*?\bpython cli\.py (fit|validate|test|predict)\s(.*)$")


def _rel(path: Path) -> str:
    return path.relative_to(HOME).as_posix()


def _header(path: Path) -> list[str]:
    """The comment lines that open the file."""
    lines = path.read_text().splitlines()
    return lines[: next((i for i, line in enumerate(lines) if not line.startswith("#")), len(lines))]


def _config_files(words: list[str]) -> list[str]:
    files = []
    for i, word in enumerate(words):
        if word == "--config" and i + 1 < len(words):
            files.append(words[i + 1])
        elif word.startswith("--config="):
            files.append(word.split("=", 1)[1])
    return files


def _commands(path: Path) -> list[list[str]]:
    """The config files of each ``python cli.py <subcommand> ...`` line of the header, in order."""
    found = []
    for line in _header(path):
        match = _COMMAND.match(line)
        if match:
            found.append(_config_files(shlex.split(match.group(2), comments=True)))
    return found


def _experiment_files(path: Path) -> list[str] | None:
    """The config files that run the experiment ``path`` (its base first, without trainer presets), read from the
    first header command that ends with ``path`` itself; None where the header shows none."""
    rel = _rel(path)
    for files in _commands(path):
        files = [f for f in files if not f.startswith(PRESETS)]
        if files and files[-1] == rel:
            return files
    return None


ALL_FILES = sorted(f for f in (_rel(p) for p in CONFIGS.rglob("*.yaml")) if not f.startswith(STUDIES))
BASES = [f for f in ALL_FILES if f.endswith("/" + BASE)]
EXPERIMENTS: dict[str, list[str] | None] = {
    f: _experiment_files(HOME / f) for f in ALL_FILES if not f.startswith(PRESETS) and f not in BASES
}


def config_args(config: str | Path) -> list[str]:
    """The ``--config`` words that run the experiment ``config`` (``configs/<folder>/<name>.yaml`` relative to the
    repository root, or absolute), its base first, as its header command shows. Relative in, relative out."""
    path = Path(config)
    rel = _rel(path) if path.is_absolute() else path.as_posix()
    files = EXPERIMENTS[rel] or [rel]
    return [word for f in files for word in ("--config", str(HOME / f) if path.is_absolute() else f)]


def _golden_path(experiment: str) -> Path:
    return GOLDEN / ("__".join(Path(experiment).relative_to("configs").with_suffix("").parts) + ".yaml")


def _renamed(text: str) -> str:
    for old, new in RENAMES.items():
        text = text.replace(old, new)
    return text


@pytest.mark.parametrize("experiment", sorted(EXPERIMENTS))
def test_experiment_resolves_to_its_golden_config(experiment, capsys, monkeypatch):
    files = EXPERIMENTS[experiment]
    assert files, f"{experiment}: its header shows no `python cli.py ... --config {experiment}` command"
    monkeypatch.chdir(ROOT)
    assert main(["fit", *config_args(experiment), "--print_config"]) == 0, capsys.readouterr().err[-2000:]
    printed = capsys.readouterr().out
    golden = _golden_path(experiment)
    if UPDATE:
        golden.write_text(printed)
    assert golden.is_file(), f"no golden for {experiment}: record it with UPDATE_CONFIG_GOLDENS=1 (see module docs)"
    expected = _changed(experiment, _moved(yaml.safe_load(_renamed(golden.read_text()))))
    if yaml.safe_load(printed) != expected:
        diff = difflib.unified_diff(
            yaml.safe_dump(expected, sort_keys=False).splitlines(),
            yaml.safe_dump(yaml.safe_load(printed), sort_keys=False).splitlines(),
            str(golden.name),
            experiment,
            lineterm="",
        )
        pytest.fail(f"{experiment} resolves differently from its golden:\n" + "\n".join(diff), pytrace=False)


@pytest.mark.parametrize("experiment", sorted(EXPERIMENTS))
def test_experiment_header_shows_the_command_that_runs_it(experiment):
    files = EXPERIMENTS[experiment]
    assert files, (
        f"{experiment}: the header comment must show the command that runs it, e.g. "
        f"`#   python cli.py fit --config {experiment}` (after its base's --config where it has one)"
    )
    assert all((HOME / f).is_file() for f in files), files
    bases = files[:-1]
    folder = Path(experiment).parent.as_posix()
    assert bases in ([], [f"{folder}/{BASE}"]), f"{experiment}: composes with {bases}, not with its own folder's base"


def test_every_config_file_is_an_experiment_a_used_base_or_a_preset():
    used = {f for files in EXPERIMENTS.values() if files for f in files[:-1]}
    unused = sorted(set(BASES) - used)
    assert not unused, f"bases that no experiment's header command uses: {unused}"
    not_run = sorted(e for e, files in EXPERIMENTS.items() if not files)
    assert not not_run, f"configs that are neither an experiment (a header command runs them) nor a base: {not_run}"
    stale = sorted(p.name for p in GOLDEN.glob("*.yaml") if p not in {_golden_path(e) for e in EXPERIMENTS})
    assert not stale, f"goldens without an experiment (a removed or renamed config?): {stale}"


def test_zoo_recipes_are_self_contained():
    """A zoo card names one recipe file, run alone (``--config <recipe>``): no base."""
    for name in registry.list_weights():
        recipe = registry.get_weights(name).recipe
        assert recipe in EXPERIMENTS and EXPERIMENTS[recipe] == [recipe], f"{name}: recipe {recipe}"
