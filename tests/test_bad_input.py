"""The bad-input matrix (issue 8): every kind of wrong input stops with a clear error naming the thing, and none of
them changes the data, the cache or the checkpoint directory.

Categories, each a section below: unknown or mistyped config keys and values; out-of-range options; missing data
files; malformed dataset files; truncated, tampered or foreign checkpoints; zoo names and zoo files; NaN/Inf
losses. Per-module tests of single checks live in the modules' own test files; this file keeps the matrix in one
place. File-based cases hash the folders involved before and after (:func:`unchanged`).
"""

from __future__ import annotations

import contextlib
import gzip
import hashlib
import json
import shutil
from pathlib import Path

import lightning as L
import numpy as np
import pytest
import torch
from lightning.pytorch.callbacks import ModelCheckpoint
from torch.utils.data import DataLoader

from reprozoo._checks import RECORD_KEY, CheckpointError
from reprozoo.cli import main, run_lightning
from reprozoo.datamodules import (
    AnimalFacesDataModule,
    CIFAR10CDataModule,
    ConcentricRingsDataModule,
    FashionMNISTDataModule,
    SudokuExtremeDataModule,
    SyntheticRegressionDataModule,
)
from reprozoo.methods import TentAdapter, TentModule
from reprozoo.methods.classifier import ClassifierModule
from reprozoo.methods.distillation import DistillationModule
from reprozoo.methods.engression import EngressionRegressor
from reprozoo.methods.nca import NCAModule
from reprozoo.methods.trm import TRMModule
from reprozoo.nets import MLP, StochasticMLP, TinyRecursiveNetwork
from reprozoo.zoo import registry
from reprozoo.zoo.registry import WeightsError, load_model
from tests.conftest import ROOT, real_data
from tests.helpers import tiny_data, tiny_engression, tiny_trainer, trm_net
from tests.test_configs import config_args

NOPE = "nope_none.missing"  # a zoo name that does not exist
TRM_TINY = dict(
    net=trm_net(hidden_size=16, expansion=1.0, puzzle_emb_ndim=16), n=1, T=1, n_sup=2, warmup_steps=1, lr=1e-3
)


# ----------------------------------------------------------------------------------------------- helpers


def digest(path: str | Path) -> dict[str, str]:
    """{relative path: sha256 or '<dir>'} of everything under ``path`` (a file: itself; absent: {})."""
    path = Path(path)
    if path.is_file():
        return {path.name: hashlib.sha256(path.read_bytes()).hexdigest()}
    if not path.exists():
        return {}
    return {
        str(p.relative_to(path)): hashlib.sha256(p.read_bytes()).hexdigest() if p.is_file() else "<dir>"
        for p in sorted(path.rglob("*"))
    }


@contextlib.contextmanager
def unchanged(*paths):
    """The folders / files ``paths`` are byte-identical after the block (absent ones stay absent)."""
    before = [(digest(p), Path(p).exists()) for p in paths]
    yield
    assert [(digest(p), Path(p).exists()) for p in paths] == before


def cli_exit(args: list[str], capsys) -> str:
    """stderr of an in-process CLI call that must stop with a parser error (SystemExit, non-zero)."""
    with pytest.raises(SystemExit) as info:
        run_lightning(args)
    assert info.value.code not in (0, None)
    return capsys.readouterr().err


@pytest.fixture
def work(tmp_path, monkeypatch):
    """A working folder with ``configs/`` linked in, as in the project: in-process CLI runs write nothing into the
    project."""
    work = tmp_path / "work"
    work.mkdir()
    (work / "configs").symlink_to(ROOT / "reprozoo" / "configs")
    monkeypatch.chdir(work)
    return work


def _rings(**kwargs) -> ConcentricRingsDataModule:
    defaults = dict(n_train_per_class=8, n_val_per_class=4, n_test_per_class=4, batch_size=10)
    return ConcentricRingsDataModule(**{**defaults, **kwargs})


def _trm_loader(n: int = 16, b: int = 4) -> DataLoader:
    gen = torch.Generator().manual_seed(0)
    labels = torch.randint(2, 11, (n, 81), generator=gen)
    inputs = torch.where(torch.rand(n, 81, generator=gen) < 0.5, labels, torch.ones_like(labels))
    items = [{"inputs": inputs[i], "labels": labels[i], "puzzle_identifiers": torch.tensor(0)} for i in range(n)]
    return DataLoader(items, batch_size=b)


def _mlp() -> MLP:
    return MLP(3, 5, hidden=(8,))


# Each method, tiny, with its data: (module, datamodule or train loader). Rings have 40 training items (4 batches).
METHODS = {
    "engression": lambda: (tiny_engression(), tiny_data()),
    "classifier": lambda: (ClassifierModule(_mlp(), lr=0.05), _rings()),
    "distillation": lambda: (DistillationModule(_mlp(), _mlp(), lr=0.05), _rings()),
    "nca": lambda: (NCAModule(in_dim=3, out_dim=2, init="random", k=(1,), plot=False), _rings()),
    "trm": lambda: (TRMModule(**TRM_TINY), _trm_loader()),
}
CLASSES = {
    "engression": EngressionRegressor,
    "classifier": ClassifierModule,
    "distillation": DistillationModule,
    "nca": NCAModule,
    "trm": TRMModule,
    "tent": TentModule,
}


def _fit(name: str, root: Path, **trainer_kwargs) -> tuple[L.LightningModule, L.Trainer]:
    torch.manual_seed(0)
    model, data = METHODS[name]()
    trainer = tiny_trainer(root, max_epochs=1, limit_val_batches=0, num_sanity_val_steps=0, **trainer_kwargs)
    if isinstance(data, DataLoader):
        trainer.fit(model, data)
    else:
        trainer.fit(model, datamodule=data)
    return model, trainer


@pytest.fixture(scope="module")
def ckpts(tmp_path_factory) -> dict[str, Path]:
    """One checkpoint per trainable method, 2 optimizer steps each, in one folder."""
    root = tmp_path_factory.mktemp("ckpts")
    out = {}
    for name in METHODS:
        _, trainer = _fit(name, root / f"run-{name}", max_steps=2, enable_checkpointing=False)
        out[name] = root / "ckpt" / f"{name}.ckpt"
        trainer.save_checkpoint(out[name])
    return out


# ----------------------------------------------------------------------------------------------- config keys and values

CONFIG_ERRORS = [
    # (config, extra arguments, what the message must name)
    ("engression/quickstart", ["--model.init_args.lrr", "0.1"], ["lrr"]),
    ("engression/quickstart", ["--model.init_args.lr", "fast"], ["lr", "fast"]),
    ("engression/quickstart", ["--data.init_args.n_trian", "5"], ["n_trian"]),
    ("engression/quickstart", ["--trainerr.max_epochs", "5"], ["--trainerr.max_epochs"]),
    ("engression/quickstart", ["--checkpoint.monitr", "val/crps"], ["--checkpoint.monitr"]),
    ("engression/quickstart", ["--model", "reprozoo.methods.engression.EngresionRegressor"], ["EngresionRegressor"]),
    ("trm/sudoku_generated_cpu", ["--model.init_args.net.init_args.mixer", "mlpp"], ["mixer", "mlpp"]),
    ("trm/sudoku_generated_cpu", ["--data.init_args.source", "csvv"], ["source", "csvv"]),
    ("nca/rings", ["--model.init_args.init", "pcaa"], ["init", "pcaa"]),
    ("distillation/distilled", ["--model.init_args.temprature", "3"], ["temprature"]),
    ("regularization/plain", ["--model.init_args.optimizer", "adamm"], ["optimizer", "adamm"]),
    ("tent/resnet20_generated", ["--model.init_args.mode", "tnet"], ["mode", "tnet"]),
    ("memorization/real_labels", ["--data.init_args.image_sise", "32"], ["image_sise"]),
]


@pytest.mark.parametrize("config, extra, names", CONFIG_ERRORS, ids=[f"{c}:{e[0]}" for c, e, _ in CONFIG_ERRORS])
def test_unknown_or_mistyped_key_or_value_names_it(config, extra, names, work, capsys):
    err = cli_exit(["fit", *config_args(f"configs/{config}.yaml"), *extra], capsys)
    assert all(name in err for name in names), err[-1500:]


def test_config_file_with_a_mistyped_key_names_the_key(work, capsys):
    text = (ROOT / "reprozoo" / "configs" / "nca" / "rings.yaml").read_text()
    assert "    out_dim: 2\n" in text
    (work / "typo.yaml").write_text(text.replace("    out_dim: 2\n", "    out_dimm: 2\n"))
    assert "out_dimm" in cli_exit(["fit", "--config", "typo.yaml"], capsys)


def test_missing_config_file_is_named(work, capsys):
    assert "configs/engression/quikstart.yaml" in cli_exit(
        ["fit", "--config", "configs/engression/quikstart.yaml"], capsys
    )


def test_malformed_yaml_names_the_file_and_line(work, capsys):
    (work / "broken.yaml").write_text("model:\n  class_path: [unclosed\n")
    err = cli_exit(["fit", "--config", "broken.yaml"], capsys)
    assert "broken.yaml" in err and "line 2" in err and "not valid YAML" in err


def test_unknown_subcommand_is_named(work, capsys):
    assert "'fitt'" in cli_exit(["fitt", "--config", "configs/nca/rings.yaml"], capsys)


# ----------------------------------------------------------------------------------------------- out-of-range options

OUT_OF_RANGE = [
    # (class, arguments, "Class: field must")
    (EngressionRegressor, dict(beta=2.0), "EngressionRegressor: beta must"),
    (EngressionRegressor, dict(m=1), "EngressionRegressor: m must"),
    (EngressionRegressor, dict(lr=0.0), "EngressionRegressor: lr must"),
    (EngressionRegressor, dict(eval_samples=1), "EngressionRegressor: eval_samples must"),
    (EngressionRegressor, dict(interval=1.0), "EngressionRegressor: interval must"),
    (EngressionRegressor, dict(loss="huber"), "EngressionRegressor: loss must"),
    (StochasticMLP, dict(hidden_dim=0), "StochasticMLP: hidden_dim must"),
    (StochasticMLP, dict(num_layer=1), "StochasticMLP: num_layer must"),
    (EngressionRegressor, dict(loss="l1"), "EngressionRegressor: generator.noise_dim must be 0"),
    (EngressionRegressor, dict(generator=torch.nn.Linear(1, 1)), "EngressionRegressor: generator must"),
    (TRMModule, dict(n=0), "TRMModule: n must"),
    (TRMModule, dict(n_sup=0), "TRMModule: n_sup must"),
    (TRMModule, dict(ema_decay=1.0), "TRMModule: ema_decay must"),
    (TRMModule, dict(lr=-1e-4), "TRMModule: lr must"),
    (TRMModule, dict(halt_exploration_prob=1.5), "TRMModule: halt_exploration_prob must"),
    (TRMModule, dict(curriculum=[[0, 1]]), "TRMModule: curriculum must"),
    (TinyRecursiveNetwork, dict(mixer="conv"), "TinyRecursiveNetwork: mixer must"),
    (TinyRecursiveNetwork, dict(hidden_size=0), "TinyRecursiveNetwork: hidden_size must"),
    (TRMModule, dict(net=torch.nn.Linear(2, 2)), "TRMModule: net must"),
    (TRMModule, dict(warmup_steps=-1), "TRMModule: warmup_steps must"),
    (NCAModule, dict(in_dim=3, k=[0]), "NCAModule: k must"),
    (NCAModule, dict(in_dim=3, k=[]), "NCAModule: k must"),
    (NCAModule, dict(in_dim=0), "NCAModule: in_dim must"),
    (NCAModule, dict(in_dim=3, lr=0.0), "NCAModule: lr must"),
    (NCAModule, dict(in_dim=3, margin=-1.0), "NCAModule: margin must"),
    (NCAModule, dict(in_dim=3, margin_weight=-1.0), "NCAModule: margin_weight must"),
    (ClassifierModule, dict(net="animalnet", lr=0.0), "ClassifierModule: lr must"),
    (ClassifierModule, dict(net="animalnet", momentum=1.0), "ClassifierModule: momentum must"),
    (ClassifierModule, dict(net="animalnet", label_smoothing=1.0), "ClassifierModule: label_smoothing must"),
    (ClassifierModule, dict(net="animalnet", l2=-0.1), "ClassifierModule: l2 must"),
    (DistillationModule, dict(student="animalnet", temperature=0.0), "DistillationModule: temperature must be > 0"),
    (DistillationModule, dict(student="animalnet", temperature=-2.0), "DistillationModule: temperature must be > 0"),
    (DistillationModule, dict(student="animalnet", alpha=1.5), "DistillationModule: alpha must be in [0, 1]"),
    (DistillationModule, dict(student="animalnet", alpha=-0.1), "DistillationModule: alpha must be in [0, 1]"),
    (TentAdapter, dict(model=torch.nn.BatchNorm1d(3), lr=0.0), "TentAdapter: lr must"),
    (TentAdapter, dict(model=torch.nn.BatchNorm1d(3), steps=0), "TentAdapter: steps must"),
    (TentAdapter, dict(model=torch.nn.BatchNorm1d(3), betas=(1.0, 0.9)), "TentAdapter: betas must"),
    (TentModule, dict(model="animalnet", reset="sometimes"), "TentModule: reset must"),
    (CIFAR10CDataModule, dict(severities=[6]), "CIFAR10CDataModule: severities must be integers in 1..5"),
    (CIFAR10CDataModule, dict(severities=[0]), "CIFAR10CDataModule: severities must be integers in 1..5"),
    (CIFAR10CDataModule, dict(corruptions=["gaussian_nois"]), "CIFAR10CDataModule: corruptions"),
    (CIFAR10CDataModule, dict(batch_size=0), "CIFAR10CDataModule: batch_size must"),
    (FashionMNISTDataModule, dict(batch_size=0), "FashionMNISTDataModule: batch_size must"),
    (FashionMNISTDataModule, dict(exclude_classes=[10]), "FashionMNISTDataModule: exclude_classes must"),
    (FashionMNISTDataModule, dict(jitter=28), "FashionMNISTDataModule: jitter must"),
    (SudokuExtremeDataModule, dict(num_givens=16), "SudokuExtremeDataModule: num_givens must"),
    (SudokuExtremeDataModule, dict(batch_size=0), "SudokuExtremeDataModule: batch_size must"),
    (SyntheticRegressionDataModule, dict(batch_size=0), "SyntheticRegressionDataModule: batch_size must"),
    (
        SyntheticRegressionDataModule,
        dict(train_support=(2.0, 0.0)),
        "SyntheticRegressionDataModule: train_support must",
    ),
    (SyntheticRegressionDataModule, dict(num_workers=-1), "SyntheticRegressionDataModule: num_workers must"),
    (ConcentricRingsDataModule, dict(batch_size=0), "ConcentricRingsDataModule: batch_size must"),
    (ConcentricRingsDataModule, dict(num_classes=1), "ConcentricRingsDataModule: num_classes must"),
    (ConcentricRingsDataModule, dict(num_workers=-1), "ConcentricRingsDataModule: num_workers must"),
    (AnimalFacesDataModule, dict(batch_size=0), "AnimalFacesDataModule: batch_size must"),
    (AnimalFacesDataModule, dict(label_noise=1.5), "AnimalFacesDataModule: label_noise must"),
    (AnimalFacesDataModule, dict(image_size=0), "AnimalFacesDataModule: image_size must"),
]


@pytest.mark.parametrize(
    "cls, kwargs, message", OUT_OF_RANGE, ids=[f"{c.__name__}-{list(k)[-1]}" for c, k, _ in OUT_OF_RANGE]
)
def test_out_of_range_option_names_class_field_and_value(cls, kwargs, message):
    with pytest.raises(ValueError) as info:
        cls(**kwargs)
    text = str(info.value)
    assert text.startswith(message), text
    value = list(kwargs.values())[-1]
    shown = [value, *value] if isinstance(value, list) else [value]
    assert any(str(v) in text or repr(v) in text for v in shown), text  # ... and says what it got


@pytest.mark.parametrize(
    "config, extra, message",
    [
        ("nca/rings", ["--model.init_args.k", "[0]"], "NCAModule: k must"),
        # (a net name for the model: the config's pretrained file is under the real data root, not in this test's)
        (
            "tent/resnet20_generated",
            ["--model.init_args.model", "resnet20", "--data.init_args.severities", "[6]"],
            "CIFAR10CDataModule: severities must",
        ),
        ("distillation/distilled", ["--model.init_args.temperature", "0"], "DistillationModule: temperature must"),
        (
            "engression/quickstart",
            ["--data.init_args.batch_size", "0"],
            "SyntheticRegressionDataModule: batch_size must",
        ),
    ],
)
def test_out_of_range_option_from_the_cli(config, extra, message, work):
    with pytest.raises(ValueError, match=message):
        run_lightning(["fit", *config_args(f"configs/{config}.yaml"), *extra])
    assert sorted(p.name for p in work.iterdir()) == ["configs"]  # the run stopped while building: nothing written


# ----------------------------------------------------------------------------------------------- missing data files


def _missing_cases():
    s = real_data  # called inside the builders: only the cases that read real files need them
    return [
        # (builder(tmp), names that the message must hold, folders that must stay as they are)
        (
            "sudoku-csv",
            lambda t: SudokuExtremeDataModule(source="csv", data_dir=str(t / "none")),
            ["none/train.csv", "none/test.csv"],
            lambda t: [t],
        ),
        (
            "sudoku-train_file",
            lambda t: SudokuExtremeDataModule(
                source="csv", train_file=str(s("sudoku") / "nope.csv"), test_file=str(s("sudoku", "seventeen_clue.csv"))
            ),
            ["sudoku/nope.csv"],
            lambda t: [s("sudoku")],
        ),
        (
            "sudoku-hub-offline",
            lambda t: SudokuExtremeDataModule(source="hub", data_dir=str(t / "none")),
            ["none/train.csv", "offline"],
            lambda t: [t],
        ),
        (
            "fashion_mnist-images",
            lambda t: FashionMNISTDataModule(data_dir=str(s("fashion_mnist"))),
            ["train-images-idx3-ubyte.gz", "t10k-images-idx3-ubyte.gz", "offline"],
            lambda t: [s("fashion_mnist")],
        ),
        (
            "mnist-train-images",
            lambda t: FashionMNISTDataModule(dataset="mnist", data_dir=str(s("mnist"))),
            ["train-images-idx3-ubyte.gz"],
            lambda t: [s("mnist")],
        ),
        (
            "cifar10c-official",
            lambda t: CIFAR10CDataModule(data_dir=str(t / "none"), corruptions=["fog"]),
            ["none/CIFAR-10-C/labels.npy", "none/CIFAR-10-C/fog.npy"],
            lambda t: [t],
        ),
        (
            "cifar10c-clean_npz",
            lambda t: CIFAR10CDataModule(
                source="generate",
                clean="npz",
                clean_npz=str(t / "nope.npz"),
                data_dir=str(t / "gen"),
                corruptions=["fog"],
            ),
            ["nope.npz"],
            lambda t: [t],
        ),
        (
            "afhq",
            lambda t: AnimalFacesDataModule(data_dir=str(t / "none")),
            ["none/afhq/train", "offline"],
            lambda t: [t],
        ),
    ]


MISSING = [
    "sudoku-csv",
    "sudoku-train_file",
    "sudoku-hub-offline",
    "fashion_mnist-images",
    "mnist-train-images",
    "cifar10c-official",
    "cifar10c-clean_npz",
    "afhq",
]


@pytest.mark.parametrize("case", MISSING)
def test_missing_data_file_is_named_and_nothing_is_written(case, tmp_path):
    cases = {c[0]: c for c in _missing_cases()}
    assert sorted(cases) == sorted(MISSING)
    _, build, names, folders = cases[case]
    dm = build(tmp_path)
    with unchanged(*folders(tmp_path)), pytest.raises(FileNotFoundError) as info:
        dm.prepare_data()
        dm.setup("fit")
    assert all(name in str(info.value) for name in names), str(info.value)


def test_missing_data_file_from_the_cli(work):
    empty = work / "empty"
    empty.mkdir()
    with unchanged(empty), pytest.raises(FileNotFoundError, match=f"{empty}/train.csv"):
        run_lightning(
            [
                "fit",
                "--config",
                "configs/trm/sudoku_generated_cpu.yaml",
                "--trainer.logger",
                "false",
                "--data.init_args.source",
                "csv",
                "--data.init_args.data_dir",
                str(empty),
            ]
        )
    assert not list(work.glob("lightning_logs"))


# ----------------------------------------------------------------------------------------------- malformed data files


def _sudoku_lines() -> list[str]:
    with open(real_data("sudoku", "forum_hardest_1905.csv")) as fh:
        return [next(fh).rstrip("\n") for _ in range(6)]  # the header and 5 puzzles


def _set_field(line: str, field: int, value: str) -> str:
    parts = line.split(",")
    parts[field] = value
    return ",".join(parts)


def _blank_cell_changed(line: str) -> str:
    """The answer changed at a blank cell of the question: no longer a valid grid."""
    _, question, answer, _ = line.split(",")
    pos = question.index(".")
    digit = str(int(answer[pos]) % 9 + 1)
    return _set_field(line, 2, answer[:pos] + digit + answer[pos + 1 :])


SUDOKU_ROWS = [
    # (line number, how the line is changed, what the message says)
    (1, lambda line: "source,question,solution,rating", "line 1: header is"),
    (3, lambda line: line.rsplit(",", 1)[0], "line 3: 3 columns"),
    (2, lambda line: _set_field(line, 1, line.split(",")[1][:80]), "line 2: question has 80 characters"),
    (4, lambda line: _set_field(line, 2, "x" + line.split(",")[2][1:]), "line 4: answer has character 'x'"),
    (5, _blank_cell_changed, "line 5: answer is not a valid sudoku solution"),
    (6, lambda line: _set_field(line, 3, "hard"), "line 6: rating 'hard'"),
]


@pytest.mark.parametrize("line_no, change, message", SUDOKU_ROWS, ids=[m.split(": ")[1][:20] for *_, m in SUDOKU_ROWS])
def test_malformed_sudoku_csv_names_file_and_line(line_no, change, message, tmp_path):
    lines = _sudoku_lines()
    good = tmp_path / "good.csv"
    good.write_text("\n".join(lines) + "\n")
    lines[line_no - 1] = change(lines[line_no - 1])
    bad = tmp_path / "bad.csv"
    bad.write_text("\n".join(lines) + "\n")
    dm = SudokuExtremeDataModule(
        source="csv", train_file=str(bad), test_file=str(good), num_train_puzzles=None, num_val=0
    )
    with unchanged(tmp_path), pytest.raises(ValueError) as info:
        dm.setup("fit")
    assert f"{bad}, {message}" in str(info.value), str(info.value)


def test_stale_generated_sudoku_cache_is_named_and_kept(tmp_path):
    dm = SudokuExtremeDataModule(
        source="generate",
        data_dir=str(tmp_path),
        num_givens=45,
        n_train_generated=5,
        n_test_generated=5,
        num_train_puzzles=None,
        num_val=0,
    )
    for split in ("train", "test"):  # real puzzles, but with 20-37 givens instead of the 45 the file name promises
        dm.generated_path(split).write_text("\n".join(_sudoku_lines()) + "\n")
    with unchanged(tmp_path), pytest.raises(ValueError, match="expected num_givens=45; delete the file") as info:
        dm.setup("fit")
    assert str(dm.generated_path("train")) in str(info.value)


def test_downloaded_sudoku_file_that_changed_is_refused(tmp_path):
    text = "\n".join(_sudoku_lines()) + "\n"
    for name in ("train.csv", "test.csv"):
        (tmp_path / name).write_text(text)
    (tmp_path / "train.csv.sha256").write_text("0" * 64 + "\n")  # recorded at download; the file is another now
    dm = SudokuExtremeDataModule(source="hub", data_dir=str(tmp_path))
    with unchanged(tmp_path), pytest.raises(ValueError) as info:
        dm.prepare_data()
    assert f"{tmp_path / 'train.csv'} has sha256" in str(info.value) and "train.csv.sha256" in str(info.value)


def _gz(data: bytes) -> bytes:
    return gzip.compress(data, mtime=0)


IDX_DAMAGE = [
    # (file, how its bytes are changed, what the message says)
    ("t10k-labels-idx1-ubyte.gz", lambda raw: raw[: len(raw) // 2], "cannot read the idx file"),
    ("t10k-labels-idx1-ubyte.gz", lambda raw: _gz(gzip.decompress(raw)[:5000]), "is truncated"),
    (
        "t10k-labels-idx1-ubyte.gz",
        lambda raw: _gz(b"\x00\x00\x08\x03" + gzip.decompress(raw)[4:]),
        "is not an idx labels file",
    ),
    ("t10k-labels-idx1-ubyte.gz", lambda raw: _gz(gzip.decompress(raw)[:-1] + b"\x0a"), "has the label 10"),
    ("t10k-images-idx3-ubyte.gz", lambda raw: raw[:-100], "cannot read the idx file"),
    ("t10k-images-idx3-ubyte.gz", lambda raw: b"not gzip at all", "cannot read the idx file"),
]


@pytest.mark.parametrize("file, damage, message", IDX_DAMAGE, ids=[f"{f[:11]}-{m}" for f, _, m in IDX_DAMAGE])
def test_malformed_idx_file_is_named(file, damage, message, tmp_path):
    for name in ("t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz"):
        shutil.copyfile(real_data("mnist", name), tmp_path / name)
    (tmp_path / file).write_bytes(damage((tmp_path / file).read_bytes()))
    dm = FashionMNISTDataModule(dataset="mnist", data_dir=str(tmp_path), train_source="test")
    with unchanged(tmp_path, real_data("mnist")), pytest.raises(ValueError) as info:
        dm.prepare_data()
        dm.setup("fit")
    assert str(tmp_path / file) in str(info.value) and message in str(info.value), str(info.value)


def _npy_bytes(array: np.ndarray) -> bytes:
    import io

    buf = io.BytesIO()
    np.save(buf, array)
    return buf.getvalue()


N = 4  # images per severity in the fake CIFAR-10-C files
CIFAR_DAMAGE = [
    # (file, its content, what the message says)
    ("fog.npy", lambda: _npy_bytes(np.zeros((5 * N, 32, 32), np.uint8)), "must hold uint8 images (N, 32, 32, 3)"),
    ("fog.npy", lambda: _npy_bytes(np.zeros((5 * N, 32, 32, 3), np.float32)), "must hold uint8 images (N, 32, 32, 3)"),
    (
        "fog.npy",
        lambda: _npy_bytes(np.zeros((5 * N - 1, 32, 32, 3), np.uint8)),
        f"has {5 * N - 1} images; expected {5 * N}",
    ),
    ("fog.npy", lambda: _npy_bytes(np.zeros((5 * N, 32, 32, 3), np.uint8))[:-500], "cannot read the image file"),
    ("labels.npy", lambda: _npy_bytes(np.zeros((5 * N, 2), np.uint8)), "must hold a 1-D integer array"),
    ("labels.npy", lambda: _npy_bytes(np.full(5 * N, 10, np.uint8)), "has labels outside 0..9"),
    ("labels.npy", lambda: b"garbage", "cannot read the labels file"),
]


@pytest.mark.parametrize("file, content, message", CIFAR_DAMAGE, ids=[f"{f}-{m[:24]}" for f, _, m in CIFAR_DAMAGE])
def test_malformed_cifar10c_file_is_named(file, content, message, tmp_path):
    folder = tmp_path / "CIFAR-10-C"
    folder.mkdir()
    np.save(folder / "labels.npy", np.tile(np.arange(N) % 10, 5).astype(np.uint8))
    np.save(folder / "fog.npy", np.zeros((5 * N, 32, 32, 3), np.uint8))
    (folder / file).write_bytes(content())
    dm = CIFAR10CDataModule(data_dir=str(tmp_path), corruptions=["fog"], severities=[1, 5], batch_size=2)
    with unchanged(tmp_path), pytest.raises(ValueError) as info:
        dm.prepare_data()
        dm.setup("test")
    assert str(folder / file) in str(info.value) and message in str(info.value), str(info.value)


def test_malformed_clean_npz_names_file_and_array(tmp_path):
    np.savez(tmp_path / "clean.npz", x=np.zeros((4, 32, 32, 3), np.uint8), labels=np.zeros(4, np.int64))
    dm = CIFAR10CDataModule(
        source="generate",
        clean="npz",
        clean_npz=str(tmp_path / "clean.npz"),
        data_dir=str(tmp_path / "gen"),
        corruptions=["fog"],
    )
    with unchanged(tmp_path), pytest.raises(ValueError, match="has no array 'y'") as info:
        dm.prepare_data()
        dm.setup("test")
    assert str(tmp_path / "clean.npz") in str(info.value)


def _afhq(root: Path, extra: dict[str, bytes]) -> Path:
    from PIL import Image

    for cls in ("cat", "dog", "wild"):
        (root / "afhq" / "train" / cls).mkdir(parents=True)
        for i in range(3):
            Image.new("RGB", (8, 8), (40 * i, 80, 120)).save(root / "afhq" / "train" / cls / f"{cls}{i}.png")
    for name, data in extra.items():
        path = root / "afhq" / "train" / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(data)
    return root


@pytest.mark.parametrize(
    "extra, error, message",
    [
        (
            {"cat/broken.jpg": b"this is text, not a JPEG"},
            ValueError,
            "cannot read the image {root}/afhq/train/cat/broken.jpg",
        ),
        (
            {"dog/half.png": b"\x89PNG\r\n\x1a\n\x00\x00"},
            ValueError,
            "cannot read the image {root}/afhq/train/dog/half.png",
        ),
        ({"cats/a.png": b""}, ValueError, "{root}/afhq/train has the folder(s) cats, which are not AFHQ classes"),
    ],
    ids=["text-as-jpg", "truncated-png", "unknown-class-folder"],
)
def test_malformed_afhq_folder_is_named(extra, error, message, tmp_path):
    root = _afhq(tmp_path, extra)
    dm = AnimalFacesDataModule(data_dir=str(root), image_size=8, val_fraction=0.0)
    with unchanged(tmp_path), pytest.raises(error) as info:
        dm.prepare_data()
        dm.setup("fit")
        for split in ("train", "val"):
            for i in range(len(dm.splits[split])):
                dm.splits[split][i]
    assert message.format(root=root) in str(info.value), str(info.value)


# ----------------------------------------------------------------------------------------------- checkpoints


def _truncated(src: Path, dst: Path) -> Path:
    data = src.read_bytes()
    dst.write_bytes(data[: len(data) // 2])
    return dst


def _tampered(src: Path, dst: Path) -> Path:
    """One byte of a tensor changed: torch.load would read it without noticing."""
    import zipfile

    data = bytearray(src.read_bytes())
    with zipfile.ZipFile(src) as archive:
        member = max(archive.infolist(), key=lambda m: m.file_size)  # the largest tensor
        offset = member.header_offset + 30 + len(member.filename.encode()) + len(member.extra)
    data[offset + member.file_size // 2] ^= 0xFF
    dst.write_bytes(bytes(data))
    return dst


DAMAGE = {
    "truncated": (_truncated, "is truncated or corrupt"),
    "tampered": (_tampered, "CRC-32 of its member"),
    "empty": (lambda src, dst: (dst.write_bytes(b""), dst)[1], "is empty"),
    "garbage": (lambda src, dst: (dst.write_bytes(b"hello, not a checkpoint"), dst)[1], "is not a PyTorch checkpoint"),
}


@pytest.mark.parametrize("method", ["engression", "trm"])
@pytest.mark.parametrize("damage", list(DAMAGE))
def test_damaged_checkpoint_is_named_by_load_from_checkpoint(damage, method, ckpts, tmp_path):
    make, message = DAMAGE[damage]
    bad = make(ckpts[method], tmp_path / "bad.ckpt")
    with unchanged(tmp_path, ckpts[method].parent), pytest.raises(CheckpointError) as info:
        CLASSES[method].load_from_checkpoint(bad)
    assert str(bad) in str(info.value) and message in str(info.value), str(info.value)


@pytest.mark.parametrize("subcommand", ["fit", "test"])
@pytest.mark.parametrize("damage", ["truncated", "tampered"])
def test_damaged_checkpoint_is_named_by_the_cli(damage, subcommand, ckpts, work):
    make, message = DAMAGE[damage]
    bad = make(ckpts["engression"], work / "bad.ckpt")
    with unchanged(work / "bad.ckpt"), pytest.raises(CheckpointError, match=message) as info:
        run_lightning(
            [
                subcommand,
                "--config",
                "configs/engression/quickstart.yaml",
                "--trainer.logger",
                "false",
                "--ckpt_path",
                str(bad),
            ]
        )
    assert str(bad) in str(info.value)
    assert not list(work.glob("lightning_logs")) and not list(work.glob("checkpoints"))


def test_missing_checkpoint_is_named_by_the_cli(work):
    with pytest.raises(FileNotFoundError, match="nope.ckpt"):
        run_lightning(
            [
                "test",
                "--config",
                "configs/engression/quickstart.yaml",
                "--trainer.logger",
                "false",
                "--ckpt_path",
                str(work / "nope.ckpt"),
            ]
        )


def test_damaged_checkpoint_as_teacher_or_zoo_export(ckpts, tmp_path, capsys):
    bad = _truncated(ckpts["classifier"], tmp_path / "bad.ckpt")
    with unchanged(tmp_path), pytest.raises(CheckpointError, match="is truncated or corrupt"):
        DistillationModule(_mlp(), str(bad))
    with unchanged(tmp_path):
        assert main(["zoo", "export", str(bad), "--name", "cls_mlp.bad", "--out", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert str(bad) in err and "truncated or corrupt" in err


PAIRS = [(w, r) for w in METHODS for r in CLASSES if w != r]


@pytest.mark.parametrize("writer, reader", PAIRS, ids=[f"{w}-into-{r}" for w, r in PAIRS])
def test_checkpoint_of_another_method_names_both_classes(writer, reader, ckpts):
    with unchanged(ckpts[writer].parent), pytest.raises(CheckpointError) as info:
        CLASSES[reader].load_from_checkpoint(ckpts[writer])
    text = str(info.value)
    assert f"written by {CLASSES[writer].__module__}.{CLASSES[writer].__name__}" in text, text
    assert f"but {CLASSES[reader].__name__}" in text and str(ckpts[writer]) in text


@pytest.mark.parametrize("method", list(METHODS))
def test_checkpoint_of_the_same_method_still_loads(method, ckpts):
    extra = {"classifier": dict(net=_mlp()), "distillation": dict(student=_mlp())}.get(method, {})
    model = CLASSES[method].load_from_checkpoint(ckpts[method], **extra)
    saved = torch.load(ckpts[method], weights_only=False)
    assert saved[RECORD_KEY] == f"{CLASSES[method].__module__}.{CLASSES[method].__name__}"
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in saved["state_dict"].items())


class MyEngression(EngressionRegressor):
    """A user's subclass (outside reprozoo): it may continue from its base class's checkpoints, not vice versa."""


def test_checkpoint_of_a_base_class_loads_into_a_users_subclass(ckpts, tmp_path):
    model = MyEngression.load_from_checkpoint(ckpts["engression"])
    trainer = tiny_trainer(tmp_path, max_steps=1, limit_val_batches=0, enable_checkpointing=False)
    trainer.fit(model, datamodule=tiny_data())
    trainer.save_checkpoint(tmp_path / "mine.ckpt")
    with pytest.raises(CheckpointError, match=r"written by tests.test_bad_input.MyEngression, but EngressionRegressor"):
        EngressionRegressor.load_from_checkpoint(tmp_path / "mine.ckpt")


def test_checkpoint_of_another_method_in_trainer_test(ckpts, tmp_path):
    model = NCAModule(in_dim=3, out_dim=2, k=(1,), plot=False)
    with unchanged(ckpts["engression"].parent), pytest.raises(CheckpointError) as info:
        tiny_trainer(tmp_path).test(model, datamodule=_rings(), ckpt_path=str(ckpts["engression"]))
    assert "EngressionRegressor" in str(info.value) and "but NCAModule" in str(info.value)
    assert str(ckpts["engression"]) in str(info.value)


def test_checkpoint_of_another_method_from_the_cli(ckpts, work):
    with unchanged(ckpts["engression"].parent), pytest.raises(CheckpointError) as info:
        run_lightning(
            [
                "test",
                "--config",
                "configs/nca/rings.yaml",
                "--trainer.logger",
                "false",
                "--trainer.default_root_dir",
                str(work / "run"),
                "--ckpt_path",
                str(ckpts["engression"]),
            ]
        )
    assert "written by reprozoo.methods.engression.EngressionRegressor, but NCAModule" in str(info.value)


def test_checkpoint_without_a_record_is_compared_by_its_weights(ckpts, tmp_path):
    saved = torch.load(ckpts["engression"], weights_only=False)
    del saved[RECORD_KEY]
    stripped = tmp_path / "old.ckpt"
    torch.save(saved, stripped)
    with pytest.raises(CheckpointError, match=r"does not name the class that wrote it.*\['generator'"):
        NCAModule.load_from_checkpoint(stripped, in_dim=1)  # built as asked, then its weights are compared
    EngressionRegressor.load_from_checkpoint(stripped)  # its own class still loads it


# ----------------------------------------------------------------------------------------------- zoo names and files


@pytest.mark.parametrize(
    "build, error",
    [
        (lambda: load_model(NOPE), WeightsError),
        (lambda: EngressionRegressor(weights=NOPE), WeightsError),
        (lambda: EngressionRegressor(backbone=NOPE), WeightsError),
        (lambda: NCAModule(in_dim=3, weights=NOPE), WeightsError),
        (lambda: NCAModule(in_dim=3, encoder=NOPE), WeightsError),
        (lambda: ClassifierModule(_mlp(), weights=NOPE), WeightsError),
        (lambda: DistillationModule(_mlp(), teacher=NOPE), WeightsError),
        (lambda: DistillationModule(_mlp(), weights=NOPE), WeightsError),
        (lambda: TRMModule(**TRM_TINY, weights=NOPE), WeightsError),
        (lambda: TentModule(model=NOPE), ValueError),
    ],
    ids=[
        "load_model",
        "engression",
        "engression-backbone",
        "nca",
        "nca-encoder",
        "classifier",
        "distillation-teacher",
        "distillation",
        "trm",
        "tent",
    ],
)
def test_unknown_zoo_name_is_named(build, error):
    with pytest.raises(error, match=NOPE):
        build()


def test_unknown_zoo_name_suggests_the_close_ones(capsys):
    with pytest.raises(WeightsError, match="Did you mean 'engression_stonet.softplus_pre'"):
        load_model("engression_stonet.softplus_pree")
    assert main(["zoo", "info", NOPE]) == 2
    assert f"no zoo entry named '{NOPE}'" in capsys.readouterr().err


@pytest.fixture
def private_registry(tmp_path, monkeypatch):
    """A copy of the packaged nca_linear.rings entry in its own package folder and registry."""
    pkg = tmp_path / "pkg"
    pkg.mkdir()
    for suffix in (".safetensors", ".json"):
        shutil.copyfile(registry.PACKAGE_DIR / f"nca_linear.rings{suffix}", pkg / f"nca_linear.rings{suffix}")
    monkeypatch.setattr(registry, "PACKAGE_DIR", pkg)
    monkeypatch.setattr(registry, "_REGISTRY", dict(registry._REGISTRY))
    return pkg


@pytest.mark.parametrize("damage", ["truncated", "tampered"])
def test_damaged_packaged_zoo_file_is_refused(damage, private_registry):
    real = ROOT / "reprozoo" / "zoo" / "weights"
    weights = private_registry / "nca_linear.rings.safetensors"
    data = bytearray(weights.read_bytes())
    if damage == "truncated":
        data = data[: len(data) // 2]
    else:
        data[len(data) // 2] ^= 0xFF
    weights.write_bytes(bytes(data))
    with unchanged(private_registry, real), pytest.raises(WeightsError) as info:
        load_model("nca_linear.rings")
    assert f"sha256 mismatch for {weights}" in str(info.value) and "it was not loaded" in str(info.value)


def test_damaged_cached_zoo_file_is_refused_and_kept(private_registry, tmp_path):
    good = private_registry / "nca_linear.rings.safetensors"
    card = json.loads((private_registry / "nca_linear.rings.json").read_text())
    card.update(
        name="nca_linear.cached", file="nca_linear.cached.safetensors", url="https://example.invalid/nca.safetensors"
    )
    registry.register_weights(registry.WeightsEntry.from_card(card))
    cache = tmp_path / "zoo-cache"  # conftest: $REPROZOO_CACHE, offline
    cache.mkdir(exist_ok=True)
    cached = cache / "nca_linear.cached.safetensors"
    _truncated(good, cached)
    with unchanged(cache), pytest.raises(WeightsError, match=f"sha256 mismatch for {cached}"):
        load_model("nca_linear.cached")


def test_zoo_file_of_another_method_is_refused(private_registry):
    card = json.loads((private_registry / "nca_linear.rings.json").read_text())
    card.update(name="engression_fake.rings", module="reprozoo.methods.engression.EngressionRegressor")
    registry.register_weights(registry.WeightsEntry.from_card(card))
    with pytest.raises(
        WeightsError, match="holds a reprozoo.methods.nca.NCAModule, but zoo entry 'engression_fake.rings'"
    ):
        load_model("engression_fake.rings")
    with pytest.raises(
        WeightsError, match="zoo entry 'nca_linear.rings' holds a reprozoo.methods.nca.NCAModule, not a"
    ):
        EngressionRegressor(weights="nca_linear.rings")


def test_bad_zoo_card_names_file_and_key(tmp_path):
    card = json.loads((registry.PACKAGE_DIR / "nca_linear.rings.json").read_text())
    card["sha265"] = card.pop("sha256")
    path = tmp_path / "bad.json"
    path.write_text(json.dumps(card))
    with pytest.raises(
        WeightsError, match=r"bad.json: bad card \(unknown keys \['sha265'\], missing keys \['sha256'\]\)"
    ):
        registry.register_weights(path)
    path.write_text("{not json")
    with pytest.raises(WeightsError, match=f"cannot read card {path}"):
        registry.register_weights(path)


def test_checkpoint_is_not_a_zoo_weights_file(ckpts, tmp_path):
    with pytest.raises(WeightsError, match="is a weights or checkpoint file, not a zoo name"):
        load_model(ckpts["nca"])
    # A card whose file is a Lightning checkpoint under another name (its sha256 right) is refused too.
    data = Path(ckpts["nca"]).read_bytes()
    (tmp_path / "x.y.safetensors").write_bytes(data)
    card = json.loads((registry.PACKAGE_DIR / "nca_linear.rings.json").read_text())
    card.update(name="x.y", file="x.y.safetensors", sha256=hashlib.sha256(data).hexdigest())
    (tmp_path / "x.y.json").write_text(json.dumps(card))
    with pytest.raises(WeightsError, match="x.y.safetensors is not a readable safetensors file"):
        load_model(tmp_path / "x.y.json")


# ----------------------------------------------------------------------------------------------- NaN / Inf loss


def _hook_output(get_module, value: float):
    def poison(model, batch):
        get_module(model).register_forward_hook(lambda mod, inp, out: out * value)

    return poison


def _fill_batch(index: int, value: float):
    def poison(model, batch):
        batch[index].fill_(value)

    return poison


POISONS = {
    # method: (how batch 2 is poisoned, extra module arguments, what the loss becomes)
    "engression": (_hook_output(lambda m: m.generator, float("nan")), {}, "nan"),
    "engression-inf": (_fill_batch(1, 1e30), {"loss": "l2", "batch_norm": False}, "inf"),
    "classifier": (_hook_output(lambda m: m.net, float("nan")), {}, "nan"),
    "distillation": (_hook_output(lambda m: m.net, float("inf")), {}, "nan"),
    "nca": (_fill_batch(0, float("nan")), {}, "nan"),
    "trm": (_hook_output(lambda m: m.net.lm_head, float("nan")), {}, "nan"),
}


class _PoisonAt(L.Callback):
    """At training batch ``at``: remember the checkpoint folder, the parameters and the step, then poison."""

    def __init__(self, at: int, poison, ckpt_dir: Path):
        self.at, self.poison, self.ckpt_dir = at, poison, ckpt_dir
        self.snapshot = None

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        if batch_idx == self.at:
            self.snapshot = dict(
                ckpt=digest(self.ckpt_dir),
                step=trainer.global_step,
                params={k: p.detach().clone() for k, p in pl_module.named_parameters()},
            )
            self.poison(pl_module, batch)


@pytest.mark.parametrize("case", list(POISONS))
def test_non_finite_loss_stops_with_step_epoch_and_batch(case, tmp_path):
    method = case.split("-")[0]
    poison, extra, shown = POISONS[case]
    torch.manual_seed(0)
    model, data = (tiny_engression(**extra), tiny_data()) if extra else METHODS[method]()
    ckpt_dir = tmp_path / "ckpt"
    spy = _PoisonAt(2, poison, ckpt_dir)
    every_step = ModelCheckpoint(dirpath=ckpt_dir, every_n_train_steps=1, save_top_k=-1, save_last=True)
    trainer = tiny_trainer(
        tmp_path, max_epochs=1, limit_val_batches=0, num_sanity_val_steps=0, callbacks=[every_step, spy]
    )
    with pytest.raises(FloatingPointError) as info:
        trainer.fit(model, data) if isinstance(data, DataLoader) else trainer.fit(model, datamodule=data)
    step, text = spy.snapshot["step"], str(info.value)
    assert text.startswith(f"{type(model).__name__}: the training loss is not finite ({shown}"), text
    assert f"at global step {step} (epoch 0, batch 2" in text, text
    assert step == 2  # TRM too: its carry takes one supervision (optimizer) step per batch
    # No optimizer step took the bad loss; no checkpoint was written for the bad batch and none was changed.
    assert trainer.global_step == step
    assert all(torch.equal(p, spy.snapshot["params"][k]) for k, p in model.named_parameters())
    assert spy.snapshot["ckpt"] and digest(ckpt_dir) == spy.snapshot["ckpt"]


def test_diverging_cli_run_stops_and_keeps_its_checkpoints(work):
    """A real divergence (learning rate 1e30) through the CLI and its default callbacks: it stops at the first
    non-finite loss; the checkpoints already written are the last good step's, and nothing is written after."""
    ckpt_dir = work / "ck"
    with pytest.raises(FloatingPointError, match=r"EngressionRegressor: .* at global step 1 \(epoch 0, batch 1\)"):
        run_lightning(
            [
                "fit",
                "--config",
                "configs/engression/quickstart.yaml",
                "--trainer.logger",
                "false",
                "--trainer.max_epochs",
                "2",
                "--trainer.enable_progress_bar",
                "false",
                "--test_after_fit",
                "false",
                "--trainer.limit_val_batches",
                "0",
                "--trainer.num_sanity_val_steps",
                "0",
                "--data.init_args.n_train",
                "300",
                "--data.init_args.batch_size",
                "100",
                "--model.init_args.lr",
                "1e30",
                "--model.init_args.generator.init_args.batch_norm",
                "false",
                "--checkpoint.dirpath",
                str(ckpt_dir),
                "--checkpoint.every_n_train_steps",
                "1",
                "--checkpoint.save_top_k",
                "-1",
            ]
        )
    assert sorted(p.name for p in ckpt_dir.iterdir()) == ["epoch=0-step=1.ckpt", "last.ckpt"]
    assert torch.load(ckpt_dir / "last.ckpt", weights_only=False)["global_step"] == 1
