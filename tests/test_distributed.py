"""Every method, and both callbacks, under DDP with two CPU processes through the real CLI (``python cli.py fit ...
--trainer.devices 2 --trainer.strategy ddp`` in a subprocess, ``test`` for TENT), on tiny data whose split sizes two
divides (so DistributedSampler repeats nothing). Each run is checked for:

* samplers that split the data: each rank's training indices per epoch (recorded by :class:`RecordSampler`) are
  disjoint, together exactly the indices one process's sampler gives for that epoch, and shuffled; and the number
  of batches trained is ceil(n_train / 2 / batch) per epoch;
* metrics correct across ranks: what the DDP run logged (CSVLogger's metrics.csv) equals a one-process
  ``validate`` / ``test`` run of the real CLI on the same checkpoint, to float tolerance; for the callbacks, the
  logged Frobenius norm equals the checkpoint's and the landscape equals a one-process computation;
* rank-zero-only side effects: one log version folder, one checkpoint set, one set of figures and files, nothing
  written elsewhere.

And the start-up warning of the methods that are not XLA-ready, with the XLA check faked (no torch_xla here).
"""

from __future__ import annotations

import csv
import json
import math
import os
import subprocess
import sys
import warnings
from pathlib import Path

import lightning as L
import numpy as np
import pytest
import torch
from lightning.pytorch.accelerators import CPUAccelerator
from torch import nn

from reprozoo.cli import run_lightning
from reprozoo.nets import StochasticMLP
from tests.conftest import ROOT, real_data
from tests.helpers import trm_net
from tests.test_configs import HOME, config_args

pytestmark = [
    pytest.mark.slow,  # every test starts 2 processes through the real CLI
    pytest.mark.filterwarnings("ignore:.*does not have many workers:UserWarning"),
    # the one-process runs restore ModelCheckpoint's state from a checkpoint written in another folder
    pytest.mark.filterwarnings("ignore:The dirpath has changed from:UserWarning"),
]

DDP = ["--trainer.accelerator", "cpu", "--trainer.devices", "2", "--trainer.strategy", "ddp"]
ONE = ["--trainer.accelerator", "cpu", "--trainer.devices", "1", "--trainer.strategy", "auto"]
TOL = dict(rel=1e-5, abs=1e-6)


class RecordSampler(L.Callback):
    """Writes, on every rank and at the start of every training epoch, the dataset indices the training sampler
    yields to ``<path>/rank<r>_epoch<e>.json``. Used by the CLI runs below (``--trainer.callbacks+=...``)."""

    def __init__(self, path: str):
        self.path = Path(path)

    def on_train_epoch_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        sampler = _sampler_of(trainer.train_dataloader)
        record = {"sampler": type(sampler).__name__, "indices": [int(i) for i in sampler]}
        self.path.mkdir(parents=True, exist_ok=True)
        (self.path / f"rank{trainer.global_rank}_epoch{trainer.current_epoch}.json").write_text(json.dumps(record))


def _sampler_of(loader):
    batch_sampler = getattr(loader, "batch_sampler", None)
    sampler = getattr(batch_sampler, "sampler", None)
    return sampler if sampler is not None else loader.sampler


# ------------------------------------------------------------------------------------------------------ running


class Run:
    """One finished two-process CLI run in ``work`` (cwd), logging with CSVLogger under ``work/logs``."""

    def __init__(self, work: Path, config: str, shrink: list[str], stdout: str):
        self.work, self.config, self.shrink, self.stdout = work, config, shrink, stdout
        (self.version,) = [p for p in (work / "logs").rglob("version_*") if p.is_dir()]  # exactly one
        self.ckpt = self.version / "checkpoints" / "last.ckpt"

    def files(self, sub: str = "") -> set[str]:
        root = self.version / sub
        return {str(p.relative_to(root)) for p in root.rglob("*") if p.is_file()}

    def rows(self) -> list[dict[str, str]]:
        with open(self.version / "metrics.csv", newline="") as fh:
            return list(csv.DictReader(fh))

    def last(self, key: str) -> float:
        """The last value logged under ``key``."""
        values = [float(r[key]) for r in self.rows() if r.get(key, "") != ""]
        assert values, f"{key} was not logged; logged: {sorted(self.rows()[0])}"
        return values[-1]

    def checkpoint(self) -> dict:
        return torch.load(self.ckpt, map_location="cpu", weights_only=False)

    def one_process(self, subcommand: str, tmp_path: Path, *extra: str) -> dict[str, float]:
        """The same config and sizes run by the real CLI in this process, on one device, from last.ckpt."""
        args = [
            subcommand,
            *config_args(HOME / self.config),  # with its base
            *self.shrink,
            *ONE,
            *extra,
            "--trainer.logger",
            "false",
            "--trainer.enable_progress_bar",
            "false",
            "--trainer.default_root_dir",
            str(tmp_path),
        ]
        if self.ckpt.is_file():  # fit runs; a TENT run has none (its weights are the pretrained ones)
            args += ["--ckpt_path", str(self.ckpt)]
        cwd = os.getcwd()
        os.chdir(tmp_path)
        try:
            cli = run_lightning(args)
        finally:
            os.chdir(cwd)
        return {k: float(v) for k, v in cli.trainer.callback_metrics.items()}


def _ddp(factory, name: str, subcommand: str, config: str, shrink: list[str], *extra: str) -> Run:
    work = factory.mktemp(name)
    (work / "configs").symlink_to(ROOT / "reprozoo" / "configs")
    env = {**os.environ, "REPROZOO_OFFLINE": "1", "REPROZOO_CACHE": str(factory.mktemp(f"{name}-cache"))}
    for key in ("PL_GLOBAL_SEED", "PL_SEED_WORKERS"):  # left by in-process runs' seed_everything: not the CLI's
        env.pop(key, None)
    args = [
        sys.executable,
        str(ROOT / "cli.py"),
        subcommand,
        *config_args(config),  # with its base
        *shrink,
        *DDP,
        *extra,
        "--trainer.enable_progress_bar",
        "false",
        "--trainer.logger",
        "lightning.pytorch.loggers.CSVLogger",
        "--trainer.logger.save_dir",
        "logs",
    ]
    if subcommand == "fit":
        args += [
            "--trainer.callbacks+=tests.test_distributed.RecordSampler",
            f"--trainer.callbacks.path={work / 'samplers'}",
        ]
    done = subprocess.run(args, cwd=work, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-5000:]
    return Run(work, config, shrink, done.stdout)


def _check_one_writer(run: Run, extra_files: set[str]) -> None:
    """Rank zero alone wrote: one version folder (Run checks), one checkpoint set, the callbacks' files once, and
    nothing outside ``logs/`` (``samplers/`` is the test's own per-rank record)."""
    assert {p.name for p in run.work.iterdir()} <= {"configs", "logs", "samplers"}
    files = run.files()
    ckpts = {f for f in files if f.startswith("checkpoints/")}
    assert "checkpoints/last.ckpt" in ckpts and len(ckpts) == 2, ckpts  # last + the one "best" (no monitor)
    assert files - ckpts == {"config.yaml", "hparams.yaml", "metrics.csv"} | extra_files


def _check_split(run: Run, n_train: int, batch_size: int, epochs: int) -> None:
    """The training sampler of each rank yields half of one process's indices, disjoint, shuffled, anew each epoch;
    the checkpoint counts ceil(n_train / 2 / batch) batches per epoch."""
    folder = run.work / "samplers"
    records = {
        (r, e): json.loads((folder / f"rank{r}_epoch{e}.json").read_text()) for r in (0, 1) for e in range(epochs)
    }
    assert len(list((run.work / "samplers").iterdir())) == 2 * epochs
    dm = _datamodule(run)
    one = _sampler_of(dm.train_dataloader())
    for e in range(epochs):
        if hasattr(one, "set_epoch"):
            one.set_epoch(e)
        expected = [int(i) for i in one]
        first, second = records[0, e]["indices"], records[1, e]["indices"]
        assert len(expected) == n_train and len(first) == len(second) == n_train // 2
        assert not set(first) & set(second)
        assert sorted(first + second) == sorted(expected), f"epoch {e}: the ranks together are not one process's data"
        assert first != sorted(first) and second != sorted(second), f"epoch {e}: not shuffled"
    if epochs > 1:
        assert records[0, 0]["indices"] != records[0, 1]["indices"]  # reshuffled per epoch
    progress = run.checkpoint()["loops"]["fit_loop"]["epoch_loop.batch_progress"]["total"]["completed"]
    assert progress == math.ceil(n_train / 2 / batch_size) * epochs


def _datamodule(run: Run):
    """The run's datamodule, rebuilt from the checkpoint's record of it and set up."""
    ckpt = run.checkpoint()
    hparams = {k: v for k, v in ckpt["datamodule_hyper_parameters"].items() if not k.startswith("_")}
    class_path = ckpt["datamodule_hyper_parameters"]["_class_path"]
    module_name, _, name = class_path.rpartition(".")
    dm = getattr(__import__(module_name, fromlist=[name]), name)(**hparams)
    dm.setup("fit")
    return dm


def _compare(ddp: Run, one: dict[str, float], keys: list[str]) -> None:
    assert keys and all(k in one for k in keys), (keys, sorted(one))
    for key in keys:
        assert ddp.last(key) == pytest.approx(one[key], **TOL), key


def _keys(metrics: dict[str, float], prefix: str, skip: tuple[str, ...] = ()) -> list[str]:
    return sorted(k for k in metrics if k.startswith(prefix) and not any(s in k for s in skip))


def _compare_with_one_process(run: Run, tmp_path, skip: tuple[str, ...] = ()) -> dict[str, float]:
    """``test`` and ``validate`` of the run's last.ckpt in one process: every test/ and val/ metric the DDP run
    logged must agree. Returns the one-process test metrics."""
    test = run.one_process("test", tmp_path)
    _compare(run, test, _keys(test, "test/", skip))
    val = run.one_process("validate", tmp_path)
    _compare(run, val, _keys(val, "val/", skip))
    return test


# ------------------------------------------------------------------------------------------------------ engression


ENGRESSION = "configs/engression/quickstart.yaml"
# noise_dim 0: the generator is deterministic, so one process and two draw the same samples (the metric code is
# the same with noise); the energy loss, standardisation and all scores still run.
ENGRESSION_SHRINK = [
    "--trainer.max_epochs",
    "2",
    "--trainer.check_val_every_n_epoch",
    "1",
    "--data.init_args.n_train",
    "300",
    "--data.init_args.n_val",
    "100",
    "--data.init_args.n_test",
    "100",
    "--data.init_args.batch_size",
    "50",
    "--model.init_args.generator.init_args.noise_dim",
    "0",
    "--model.init_args.generator.init_args.hidden_dim",
    "16",
    "--model.init_args.eval_samples",
    "10",
]


@pytest.fixture(scope="module")
def engression_run(tmp_path_factory):
    return _ddp(tmp_path_factory, "engression", "fit", ENGRESSION, ENGRESSION_SHRINK)  # test_after_fit: in the config


def test_engression_ddp(engression_run, tmp_path):
    run = engression_run
    _check_one_writer(run, set())
    _check_split(run, n_train=300, batch_size=50, epochs=2)
    assert run.checkpoint()["global_step"] == 6
    _compare_with_one_process(run, tmp_path)


# ------------------------------------------------------------------------------------------------------ TRM


TRM = "configs/quickstart.yaml"


@pytest.fixture(scope="module")
def trm_run(tmp_path_factory):
    data = tmp_path_factory.mktemp("sudoku")
    shrink = [
        "--trainer.max_steps",
        "-1",
        "--trainer.max_epochs",
        "2",
        "--trainer.val_check_interval",
        "1.0",
        "--trainer.check_val_every_n_epoch",
        "1",
        "--trainer.limit_val_batches",
        "1.0",
        "--data.init_args.n_train_generated",
        "64",
        "--data.init_args.n_test_generated",
        "16",
        "--data.init_args.num_train_puzzles",
        "48",
        "--data.init_args.num_val",
        "16",
        "--data.init_args.batch_size",
        "8",
        "--data.init_args.data_dir",
        str(data),
    ]
    return _ddp(tmp_path_factory, "trm", "fit", TRM, shrink)  # test_after_fit: in the config


def test_trm_ddp_manual_optimisation_and_ema(trm_run, tmp_path):
    run = trm_run
    _check_one_writer(run, set())
    _check_split(run, n_train=48, batch_size=8, epochs=2)
    assert run.checkpoint()["global_step"] == 6  # the carry: one supervision (optimizer) step per batch
    _check_carries_are_per_rank(run)
    assert run.stdout.count("answer (") == 1  # PrintSolvedSudoku: rank zero only
    _compare_with_one_process(run, tmp_path)  # evaluation uses the EMA weights: the same on both ranks


def _check_carries_are_per_rank(run: Run) -> None:
    """The checkpoint holds one carry per rank, and each rank's slots hold puzzles of its own share of the data
    (the training items of the keys its sampler yielded), none of the other rank's."""
    carry = run.checkpoint()["trm_carry"]
    inputs = carry["slots"]["data.inputs"]
    assert carry["world_size"] == 2 and inputs.shape == (2, 8, 81)
    train = _datamodule(run).splits["train"]
    shares = []
    for rank in (0, 1):
        keys = [
            k
            for e in (0, 1)
            for k in json.loads((run.work / "samplers" / f"rank{rank}_epoch{e}.json").read_text())["indices"]
        ]
        shares.append({tuple(train[k]["inputs"].tolist()) for k in keys})
    assert not shares[0] & shares[1]
    for rank in (0, 1):
        assert {tuple(row.tolist()) for row in inputs[rank]} <= shares[rank], (
            f"rank {rank} holds another rank's puzzles"
        )


# ------------------------------------------------------------------------------------------------------ classifier


def _mnist_shrink() -> list[str]:
    return [
        "--trainer.max_epochs",
        "2",
        "--data.init_args.dataset",
        "mnist",
        "--data.init_args.data_dir",
        str(real_data("mnist")),
        "--data.init_args.train_source",
        "test",
        "--data.init_args.num_train",
        "440",
        "--data.init_args.val_size",
        "40",
        "--data.init_args.num_test",
        "100",
        "--data.init_args.batch_size",
        "50",
    ]


CLASSIFIER = "configs/regularization/plain.yaml"  # FrobeniusNormMonitor and LossLandscape (4 train batches)


@pytest.fixture(scope="module")
def classifier_run(tmp_path_factory):
    shrink = _mnist_shrink() + [
        "--model.init_args.net.init_args.hidden",
        "[32]",
        "--model.init_args.per_class_metrics",
        "true",
    ]
    return _ddp(tmp_path_factory, "classifier", "fit", CLASSIFIER, shrink, "--test_after_fit", "true")


def test_classifier_and_both_callbacks_ddp(classifier_run, tmp_path):
    from reprozoo.callbacks import LossLandscape, load_landscape
    from reprozoo.methods.classifier import ClassifierModule

    run = classifier_run
    landscape = {f"loss_landscape/epoch_1{end}" for end in (".npz", "_contour.png", "_surface.png")}
    _check_one_writer(run, landscape | {"frobenius_norm/norms_epoch1.png"})
    _check_split(run, n_train=400, batch_size=50, epochs=2)
    assert run.checkpoint()["global_step"] == 8
    test = _compare_with_one_process(run, tmp_path)  # loss, accuracy and the 10 per-class accuracies
    assert len(_keys(test, "test/acc_class/")) == 10

    # FrobeniusNormMonitor (rank zero logs): the norm of the final weights.
    model = ClassifierModule.load_from_checkpoint(run.ckpt, map_location="cpu")
    total = torch.sqrt(sum(p.detach().double().square().sum() for p in model.parameters())).item()
    assert run.last("frobenius_norm/total") == pytest.approx(total, rel=1e-5)
    # LossLandscape (grid points split over the ranks and gathered): the one-process surface of the final weights.
    ddp = load_landscape(run.version / "loss_landscape" / "epoch_1.npz")
    loader = _datamodule(run).train_dataloader()
    trainer = L.Trainer(
        accelerator="cpu",
        devices=1,
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        default_root_dir=tmp_path,
    )
    single = LossLandscape(num_batches=4, dataloader="train", progress=False).compute(trainer, model, dataloader=loader)
    np.testing.assert_allclose(ddp["loss"], single["loss"], rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(ddp["accuracy"], single["accuracy"], atol=1e-6)


# ------------------------------------------------------------------------------------------------------ distillation


DISTILLATION = "configs/distillation/distilled_mnist8k.yaml"  # teacher: the packaged zoo entry, cache_teacher on


@pytest.fixture(scope="module")
def distillation_run(tmp_path_factory):
    shrink = _mnist_shrink() + ["--model.init_args.student.init_args.hidden", "[32]"]
    return _ddp(tmp_path_factory, "distillation", "fit", DISTILLATION, shrink, "--test_after_fit", "true")


def test_distillation_ddp(distillation_run, tmp_path):
    run = distillation_run
    _check_one_writer(run, set())
    _check_split(run, n_train=400, batch_size=50, epochs=2)
    assert run.checkpoint()["global_step"] == 8
    assert not any("teacher" in k for k in run.checkpoint()["state_dict"])
    _compare_with_one_process(run, tmp_path)


# ------------------------------------------------------------------------------------------------------ NCA


NCA = "configs/nca/rings.yaml"


@pytest.fixture(scope="module")
def nca_run(tmp_path_factory):
    shrink = [
        "--trainer.max_epochs",
        "2",
        "--trainer.check_val_every_n_epoch",
        "1",
        "--data.init_args.n_train_per_class",
        "20",
        "--data.init_args.n_val_per_class",
        "20",
        "--data.init_args.n_test_per_class",
        "20",
        "--data.init_args.batch_size",
        "25",
    ]
    # Unseeded: the ranks must still agree on the shuffle, or their shards overlap.
    return _ddp(tmp_path_factory, "nca", "fit", NCA, shrink, "--test_after_fit", "true", "--seed_everything", "false")


def test_nca_ddp(nca_run, tmp_path):
    run = nca_run
    _check_one_writer(run, {"nca/embedding_epoch0.png", "nca/embedding_epoch1.png"})  # one per validation epoch
    _check_split(run, n_train=100, batch_size=25, epochs=2)
    assert run.checkpoint()["global_step"] == 4
    _compare_with_one_process(run, tmp_path, skip=("_ms_",))  # k-NN accuracies and reference sizes; not timings


# ------------------------------------------------------------------------------------------------------ TENT


TENT = "configs/tent/resnet20_generated.yaml"
TENT_DOMAINS = ("gaussian_noise-5", "contrast-5")


def _tent_shrink(data_dir: Path, mode: str) -> list[str]:
    return [
        "--model.init_args.model",
        str(real_data("cifar10", "pretrained", "resnet20-12fca82f.th")),
        "--model.init_args.mode",
        mode,
        "--data.init_args.clean_npz",
        str(real_data("cifar10", "test_jpeg_q75.npz")),
        "--data.init_args.data_dir",
        str(data_dir),
        "--data.init_args.corruptions",
        "[gaussian_noise, contrast]",
        "--data.init_args.num_examples",
        "40",
        "--data.init_args.subset",
        "first",
        "--data.init_args.shuffle",
        "true",
        "--data.init_args.batch_size",
        "10",
    ]


@pytest.fixture(scope="module")
def tent_data(tmp_path_factory):
    return tmp_path_factory.mktemp("cifar10c")


@pytest.fixture(scope="module")
def tent_source_run(tmp_path_factory, tent_data):
    return _ddp(tmp_path_factory, "tent_source", "test", TENT, _tent_shrink(tent_data, "source"))


@pytest.fixture(scope="module")
def tent_run(tmp_path_factory, tent_data):
    return _ddp(tmp_path_factory, "tent", "test", TENT, _tent_shrink(tent_data, "tent"))


def _check_tent_files(run: Run) -> dict[str, dict[str, str]]:
    assert {p.name for p in run.work.iterdir()} <= {"configs", "logs"}
    summary = {"tent/summary.md", "tent/summary.csv", "tent/error_per_domain.png"}
    assert run.files() == {"config.yaml", "hparams.yaml", "metrics.csv"} | summary  # no checkpoint: test only
    with open(run.version / "tent" / "summary.csv", newline="") as fh:
        rows = {r["domain"]: r for r in csv.DictReader(fh)}
    assert {d: int(rows[d]["n"]) for d in TENT_DOMAINS} == {d: 40 for d in TENT_DOMAINS}  # both ranks' items counted
    return rows


def test_tent_source_mode_ddp_equals_one_process(tent_source_run, tmp_path):
    """In source mode the predictions do not depend on which items share a batch, so two processes must give one
    process's numbers."""
    run = tent_source_run
    rows = _check_tent_files(run)
    one = run.one_process("test", tmp_path)
    keys = [f"test/{m}/{d}" for m in ("error", "entropy") for d in TENT_DOMAINS]
    keys += ["test/error_mean", "test/entropy_mean"]
    _compare(run, one, keys)
    assert float(rows["mean"]["error"]) == pytest.approx(one["test/error_mean"], **TOL)


def test_tent_mode_ddp_runs_and_logs(tent_run):
    """In tent mode each rank adapts on its own stream (results differ from one process by design): it runs, logs
    every domain and writes one summary."""
    rows = _check_tent_files(tent_run)
    for d in TENT_DOMAINS:
        assert 0 <= tent_run.last(f"test/error/{d}") <= 1 and tent_run.last(f"test/entropy/{d}") >= 0
        assert float(rows[d]["error"]) == pytest.approx(tent_run.last(f"test/error/{d}"), **TOL)


# ------------------------------------------------------------------------------------------------------ XLA


def _trm():
    from reprozoo.methods.trm import TRMModule

    return TRMModule(net=trm_net(hidden_size=16, puzzle_emb_ndim=0, expansion=1.0), n=1, T=1, n_sup=1)


def _nca():
    from reprozoo.methods.nca import NCAModule

    return NCAModule(in_dim=3)


def _distillation(cache: bool):
    from reprozoo.methods.distillation import DistillationModule
    from reprozoo.nets import MLP

    return lambda: DistillationModule(MLP(4, 3, hidden=[8]), teacher=MLP(4, 3, hidden=[8]), cache_teacher=cache)


def _tent(mode: str):
    from reprozoo.methods.tent import TentModule

    net = nn.Sequential(nn.Linear(4, 8), nn.BatchNorm1d(8), nn.ReLU(), nn.Linear(8, 3))
    return lambda: TentModule(net, mode=mode)


def _classifier():
    from reprozoo.methods.classifier import ClassifierModule
    from reprozoo.nets import MLP

    return ClassifierModule(MLP(4, 3, hidden=[8]))


def _engression():
    from reprozoo.methods.engression import EngressionRegressor

    return EngressionRegressor(StochasticMLP(hidden_dim=8, noise_dim=2))


NOT_XLA_READY = [
    (_trm, "fit", "TRMModule"),
    (_nca, "fit", "NCAModule"),
    (_distillation(True), "fit", "DistillationModule"),
    (_tent("tent"), "test", "TentModule"),
]
XLA_READY = [
    (_classifier, "fit"),
    (_engression, "fit"),
    (_distillation(False), "fit"),
    (_tent("source"), "test"),
    (_tent("norm"), "test"),
]


def _set_up(make, stage: str) -> None:
    module = make()
    module.trainer = L.Trainer(
        accelerator="cpu", devices=1, logger=False, enable_progress_bar=False, enable_model_summary=False
    )
    module.setup(stage)


@pytest.fixture
def fake_xla(monkeypatch):
    """The CPU accelerator passes for an XLA one in the methods' start-up check (torch_xla is not installed)."""
    from reprozoo import _xla

    monkeypatch.setattr(_xla, "XLAAccelerator", CPUAccelerator)


@pytest.mark.parametrize("make, stage, name", NOT_XLA_READY)
def test_methods_that_are_not_xla_ready_say_so_at_start_up(make, stage, name, fake_xla):
    with pytest.warns(UserWarning, match=f"{name} is not XLA-ready: .+") as record:
        _set_up(make, stage)
    assert "tpu.yaml" in str(record[-1].message)


@pytest.mark.parametrize("make, stage", XLA_READY + [(m, s) for m, s, _ in NOT_XLA_READY])
def test_no_xla_warning_where_it_does_not_apply(make, stage, request):
    """XLA-ready methods never warn; the others not on CPU (the check is not faked here) ..."""
    xla_ready = (make, stage) in XLA_READY
    if xla_ready:
        request.getfixturevalue("fake_xla")  # ... and the XLA-ready ones not even on (fake) XLA
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        _set_up(make, stage)
    assert not [w for w in caught if "XLA-ready" in str(w.message)]
