"""LossLandscape and FrobeniusNormMonitor on LightningModules written here with plain torch and lightning, as a user
would: float32, float64 and bfloat16 parameters (through the Trainer's precision), one module that returns its loss
tensor and logs only that, one with no validation_step whose training_step returns ``{"loss": ...}`` and takes no
batch_idx, one that mixes dtypes; every evaluation mode of the landscape, on a line and on a plane."""

from __future__ import annotations

import csv
import logging
import math
from pathlib import Path

import lightning as L
import numpy as np
import pytest
import torch
from lightning.pytorch.loggers import CSVLogger
from torch import nn
from torch.nn import functional as F
from torch.utils.data import DataLoader, TensorDataset

from reprozoo.callbacks import FrobeniusNormMonitor, LossLandscape, load_landscape

pytestmark = pytest.mark.filterwarnings(
    "ignore:.*does not have many workers:UserWarning",
    "ignore:The number of training batches .* is smaller than the logging interval:UserWarning",
)

N = 8  # examples: one batch

# The Trainer's precision puts the parameters in the dtype (and casts the inputs, as the landscape must too).
PRECISION = {torch.float32: "32-true", torch.float64: "64-true", torch.bfloat16: "bf16-true"}
# The landscape's centre against a plain forward of the module: vmap batches the grid points, which changes the
# order of the sums, so the forward's own rounding (a few units in the last place of the dtype) is the tolerance.
CENTRE_TOL = {torch.float32: 1e-5, torch.float64: 1e-12, torch.bfloat16: 3e-2}
# FrobeniusNormMonitor against float64 norms: float32 and bfloat16 weights are both accumulated in float32.
NORM_TOL = {torch.float32: 1e-6, torch.float64: 1e-12, torch.bfloat16: 1e-6}
MODES = ["loop", "vmap", "auto"]


@pytest.fixture(autouse=True)
def _one_thread():
    """These nets are tiny: on a busy machine, handing each op to a second OpenMP thread costs ten times the op."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


class TinyConv(L.LightningModule):
    """Conv + BatchNorm (buffers) + a frozen parameter; ``training_step`` returns the loss tensor and logs only it;
    a ``validation_step`` too."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(1, 3, 3, padding=1)
        self.bn = nn.BatchNorm2d(3)
        self.fc = nn.Linear(3 * 4 * 4, 3)
        self.offset = nn.Parameter(torch.full((3,), 0.25), requires_grad=False)

    def forward(self, x):
        return self.fc(F.relu(self.bn(self.conv(x))).flatten(1)) + self.offset

    def _loss(self, batch):
        x, y = batch
        return F.cross_entropy(self(x), y)

    def training_step(self, batch, batch_idx):
        loss = self._loss(batch)
        self.log("loss", loss)
        return loss

    def validation_step(self, batch, batch_idx):
        self.log("val_loss", self._loss(batch))

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)


class TinyMLP(L.LightningModule):
    """No ``validation_step``, logs nothing; ``training_step(batch)`` (no batch_idx) returns ``{"loss": ...}``."""

    def __init__(self):
        super().__init__()
        self.net = nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 1))

    def forward(self, x):
        return self.net(x)

    def _loss(self, batch):
        x, y = batch
        return F.mse_loss(self(x), y)

    def training_step(self, batch):
        return {"loss": self._loss(batch)}

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)


class MixedMLP(TinyMLP):
    """A bfloat16 body and a float64 head in one module (run under the default "32-true" precision)."""

    def __init__(self):
        super().__init__()
        self.net[0].to(torch.bfloat16)
        self.net[2].to(torch.float64)

    def forward(self, x):
        return self.net[2](torch.tanh(self.net[0](x.to(torch.bfloat16))).double()).float()


def _loaders(model: L.LightningModule) -> dict:
    g = torch.Generator().manual_seed(0)
    if isinstance(model, TinyConv):
        data = TensorDataset(torch.randn(N, 1, 4, 4, generator=g), torch.randint(0, 3, (N,), generator=g))
        return {"train_dataloaders": DataLoader(data, batch_size=N), "val_dataloaders": DataLoader(data, batch_size=N)}
    data = TensorDataset(torch.randn(N, 4, generator=g), torch.randn(N, 1, generator=g))
    return {"train_dataloaders": DataLoader(data, batch_size=N)}


def _fit(tmp_path, model, callbacks, precision="32-true", max_epochs=2) -> tuple[L.Trainer, CSVLogger]:
    logger = CSVLogger(tmp_path, name="csv")
    trainer = L.Trainer(
        accelerator="cpu",
        devices=1,
        max_epochs=max_epochs,
        precision=precision,
        logger=logger,
        callbacks=callbacks,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        default_root_dir=tmp_path,
    )
    trainer.fit(model, **_loaders(model))
    assert trainer.state.finished and trainer.current_epoch == max_epochs
    return trainer, logger


def _snapshot(model: nn.Module) -> dict:
    return {
        "state": {k: v.clone() for k, v in model.state_dict().items()},  # parameters and buffers
        "objects": {n: id(t) for n, t in [*model.named_parameters(), *model.named_buffers()]},
        "requires_grad": {n: p.requires_grad for n, p in model.named_parameters()},
        "training": {n: m.training for n, m in model.named_modules()},
    }


def _assert_unchanged(model: nn.Module, before: dict) -> None:
    after = _snapshot(model)
    assert after["state"].keys() == before["state"].keys()
    for name, value in after["state"].items():
        old = before["state"][name]
        assert value.dtype == old.dtype and torch.equal(value, old), name
    assert after["objects"] == before["objects"]
    assert after["requires_grad"] == before["requires_grad"]
    assert after["training"] == before["training"]


def _centre_loss(model: L.LightningModule, trainer: L.Trainer) -> float:
    """The module's own loss on the landscape's batch, in eval mode, with the trainer's input conversion."""
    batch = trainer.precision_plugin.convert_input(next(iter(_loaders(model)["train_dataloaders"])))
    training = model.training
    model.eval()
    try:
        with torch.no_grad():
            return float(model._loss(batch))
    finally:
        model.train(training)


def _logged_norms(logger: CSVLogger) -> dict[str, float]:
    """The last logged ``frobenius_norm/*`` values, read back from the CSV file."""
    with open(Path(logger.log_dir) / "metrics.csv", newline="") as fh:
        rows = [r for r in csv.DictReader(fh) if r.get("frobenius_norm/total")]
    assert rows, "FrobeniusNormMonitor logged nothing"
    prefix = "frobenius_norm/"
    return {k[len(prefix) :]: float(v) for k, v in rows[-1].items() if k.startswith(prefix) and v != ""}


def _expected_norms(model: nn.Module) -> dict[str, float]:
    """Independently of the callback: float64 norms of the parameters as they are now."""
    norms = {n: torch.linalg.vector_norm(p.detach().double()).item() for n, p in model.named_parameters()}
    norms["total"] = math.sqrt(sum(v * v for v in norms.values()))
    return norms


def _assert_norms(logged: dict[str, float], expected: dict[str, float], tol: float) -> None:
    assert logged.keys() == expected.keys()
    for name, value in expected.items():
        assert logged[name] == pytest.approx(value, rel=tol), name


def _no_reprozoo_warnings(caplog) -> None:
    # These modules are plain and vmappable: nothing for the user to act on, so nothing may be warned about.
    assert not [r for r in caplog.records if r.name.startswith("reprozoo") and r.levelno >= logging.WARNING]


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("dtype", list(PRECISION), ids=lambda d: str(d).removeprefix("torch."))
@pytest.mark.parametrize("net", [TinyConv, TinyMLP], ids=["conv-loss-only", "mlp-no-validation-step"])
def test_any_dtype_mode_and_module(tmp_path, caplog, net, dtype, mode):
    torch.manual_seed(0)
    model = net()
    dim = 2 if net is TinyConv else 1  # a plane and a line
    landscape = LossLandscape(dim=dim, resolution=3, num_batches=1, mode=mode, plot=mode == "auto", progress=False)
    monitor = FrobeniusNormMonitor(plot=mode == "auto")
    caplog.set_level(logging.WARNING)
    trainer, logger = _fit(tmp_path, model, [monitor, landscape], precision=PRECISION[dtype])
    assert all(p.dtype == dtype for p in model.parameters())

    # The landscape written at the end of fit: finite everywhere, readable, centred on the module's own loss.
    folder = Path(logger.log_dir) / "loss_landscape"
    data = load_landscape(folder / "epoch_1.npz")
    assert data["loss"].shape == (3,) * dim and np.isfinite(data["loss"]).all()
    assert "accuracy" not in data  # nothing logged one
    np.testing.assert_array_equal(data["loss"], landscape.last_result["loss"])
    centre = data["loss"][(1,) * dim]
    assert centre == pytest.approx(_centre_loss(model, trainer), rel=CENTRE_TOL[dtype])
    assert landscape.used_mode == mode if mode != "auto" else landscape.used_mode in ("vmap", "loop")
    expected_files = {"epoch_1.npz"}
    if mode == "auto":  # plotted in one mode only: the figures cost more than the rest of the test
        expected_files |= {"epoch_1_contour.png", "epoch_1_surface.png"} if dim == 2 else {"epoch_1_line.png"}
    assert {p.name for p in folder.iterdir()} == expected_files  # written atomically: no temporary files left

    # The logged norms are those of the final weights (the landscape left them as they were).
    _assert_norms(_logged_norms(logger), _expected_norms(model), NORM_TOL[dtype])
    figures = Path(logger.log_dir) / "frobenius_norm"
    assert not figures.exists() if mode != "auto" else {p.name for p in figures.iterdir()} == {"norms_epoch1.png"}

    # On demand, from a mixed train/eval state: weights, buffers, modes and requires_grad come back bit for bit.
    model.train()
    next(m for m in model.modules() if m is not model).eval()
    before = _snapshot(model)
    again = landscape.compute(trainer, model)
    _assert_unchanged(model, before)
    np.testing.assert_array_equal(again["loss"], data["loss"])
    _no_reprozoo_warnings(caplog)


@pytest.mark.parametrize("mode", MODES)
def test_mixed_dtypes_in_one_module(tmp_path, caplog, mode):
    torch.manual_seed(0)
    model = MixedMLP()
    landscape = LossLandscape(dim=2, resolution=3, num_batches=1, mode=mode, plot=False, progress=False)
    monitor = FrobeniusNormMonitor(plot=False)
    caplog.set_level(logging.WARNING)
    trainer, logger = _fit(tmp_path, model, [monitor, landscape], max_epochs=1)
    assert {p.dtype for p in model.parameters()} == {torch.bfloat16, torch.float64}
    data = load_landscape(Path(logger.log_dir) / "loss_landscape" / "epoch_0.npz")
    assert np.isfinite(data["loss"]).all()
    assert data["loss"][1, 1] == pytest.approx(_centre_loss(model, trainer), rel=CENTRE_TOL[torch.bfloat16])
    # bfloat16 norms accumulated in float32, float64 ones in float64: float32's tolerance covers both.
    _assert_norms(_logged_norms(logger), _expected_norms(model), NORM_TOL[torch.float32])
    before = _snapshot(model)
    landscape.compute(trainer, model)
    _assert_unchanged(model, before)
    _no_reprozoo_warnings(caplog)
