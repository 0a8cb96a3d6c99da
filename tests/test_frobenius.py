"""FrobeniusNormMonitor on a LightningModule written here, which knows nothing of reprozoo: every logged value is
checked against norms computed independently from snapshots the module takes of its own weights and gradients."""

from __future__ import annotations

import csv
import math
from pathlib import Path

import lightning as L
import pytest
import torch
from lightning.pytorch.loggers import CSVLogger, TensorBoardLogger
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from reprozoo.callbacks import FrobeniusNormMonitor
from reprozoo.callbacks.frobenius import tensor_norms

pytestmark = pytest.mark.filterwarnings("ignore:.*does not have many workers:UserWarning")

TOL = 1e-5
STEPS_PER_EPOCH = 4


class TiedNet(L.LightningModule):
    """BatchNorm, dropout, a frozen parameter (``proj.bias``), a shared one (``body.2.weight`` is ``body.0.weight``)
    and a 0-d parameter of the root module (``scale``). It snapshots its parameters at each epoch end and batch end,
    and its gradients before each optimizer step, keyed by the global step they belong to."""

    def __init__(self):
        super().__init__()
        self.encoder = nn.Linear(8, 16)
        self.bn = nn.BatchNorm1d(16)
        self.drop = nn.Dropout(0.25)
        self.body = nn.Sequential(nn.Linear(16, 16), nn.Tanh(), nn.Linear(16, 16))
        self.body[2].weight = self.body[0].weight  # the same nn.Parameter in two submodules
        self.proj = nn.Linear(16, 16)
        self.proj.bias.requires_grad_(False)
        self.decoder = nn.Linear(16, 8)
        self.scale = nn.Parameter(torch.tensor(1.5))
        self.epoch_weights: dict[int, list] = {}
        self.step_weights: dict[int, list] = {}
        self.step_grads: dict[int, list] = {}

    def forward(self, x):
        h = self.drop(torch.relu(self.bn(self.encoder(x))))
        return self.decoder(self.proj(self.body(h))) * self.scale

    def training_step(self, batch, batch_idx):
        x, y = batch
        return nn.functional.mse_loss(self(x), y)

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1, momentum=0.9)

    def _snapshot(self, grads: bool = False) -> list:
        # remove_duplicate=False: the tests dedup by identity themselves, independently of the callback.
        out = []
        for name, p in self.named_parameters(remove_duplicate=False):
            t = p.grad if grads else p
            if t is not None:
                out.append((name, id(p), t.detach().clone(), p.requires_grad))
        return out

    def on_before_optimizer_step(self, optimizer):
        self.step_grads[self.trainer.global_step + 1] = self._snapshot(grads=True)

    def on_train_start(self):
        self.start_weights = self._snapshot()

    def on_train_batch_end(self, outputs, batch, batch_idx):
        self.step_weights[self.trainer.global_step] = self._snapshot()

    def on_train_epoch_end(self):
        self.epoch_weights[self.current_epoch] = self._snapshot()


def expected(snapshot: list, trainable_only: bool = False, group_by_module: bool = False) -> dict[str, float]:
    per_param: dict[str, torch.Tensor] = {}
    seen: set[int] = set()
    for name, ident, tensor, requires_grad in snapshot:
        if ident in seen:
            continue
        seen.add(ident)
        if trainable_only and not requires_grad:
            continue
        per_param[name] = tensor.double()
    out: dict[str, float] = {}
    if group_by_module:
        squares: dict[str, float] = {}
        for name, t in per_param.items():
            module = name.rsplit(".", 1)[0] if "." in name else name
            squares[module] = squares.get(module, 0.0) + float((t**2).sum())
        out = {module: math.sqrt(s) for module, s in squares.items()}
    else:
        out = {name: float(torch.linalg.vector_norm(t.flatten())) for name, t in per_param.items()}
    out["total"] = math.sqrt(sum(float((t**2).sum()) for t in per_param.values()))
    return out


def assert_close(got: dict[str, float], want: dict[str, float]) -> None:
    assert set(got) == set(want)
    for name, value in want.items():
        assert math.isclose(float(got[name]), value, rel_tol=TOL, abs_tol=TOL), (name, float(got[name]), value)


def fit(tmp_path, callbacks, logger=False, max_epochs=2, seed=0, ckpt_path=None, **trainer_kwargs):
    L.seed_everything(seed, verbose=False)
    model = TiedNet()
    data = TensorDataset(torch.randn(8 * STEPS_PER_EPOCH, 8), torch.randn(8 * STEPS_PER_EPOCH, 8))
    options = dict(
        accelerator="cpu",
        devices=1,
        max_epochs=max_epochs,
        logger=logger,
        callbacks=callbacks,
        enable_progress_bar=False,
        enable_model_summary=False,
        enable_checkpointing=False,
        default_root_dir=tmp_path,
        log_every_n_steps=1,
    )
    options.update(trainer_kwargs)
    trainer = L.Trainer(**options)
    trainer.fit(model, DataLoader(data, batch_size=8, shuffle=True), ckpt_path=ckpt_path)
    return trainer, model


def csv_rows(logger: CSVLogger, column: str) -> list[dict[str, str]]:
    with open(Path(logger.log_dir) / "metrics.csv", newline="") as fh:
        return [row for row in csv.DictReader(fh) if row.get(column)]


def test_epoch_norms_match_independent_computation(tmp_path):
    logger = CSVLogger(tmp_path, name="csv")
    monitor = FrobeniusNormMonitor()
    trainer, model = fit(tmp_path, [monitor], logger=logger)

    assert [(e["step"], e["epoch"]) for e in monitor.history] == [(4, 0), (8, 1)]
    for entry in monitor.history:
        assert_close(entry["norms"], expected(model.epoch_weights[entry["epoch"]]))
    norms = monitor.history[-1]["norms"]
    assert "body.2.weight" not in norms and "body.0.weight" in norms  # the shared parameter once, first name
    assert "proj.bias" in norms and "scale" in norms  # frozen and 0-d root parameters included by default
    # The total counts the shared tensor once: not the sum over all registered names.
    with_duplicate = math.sqrt(sum(float((t.double() ** 2).sum()) for _, _, t, _ in model.epoch_weights[1]))
    assert norms["total"] < with_duplicate - 1e-3

    assert_close(norms, expected(model.epoch_weights[1]))
    assert not any(k.startswith("frobenius_norm/") for k in trainer.callback_metrics)  # straight to the loggers

    rows = csv_rows(logger, "frobenius_norm/total")
    assert [int(r["step"]) for r in rows] == [4, 8]  # logged at the global step of the measurement
    for row, entry in zip(rows, monitor.history):
        from_csv = {k.split("/", 1)[1]: float(v) for k, v in row.items() if k.startswith("frobenius_norm/") and v}
        assert_close(from_csv, entry["norms"])
    assert (Path(logger.log_dir) / "frobenius_norm" / "norms_epoch1.png").is_file()


def test_norms_at_the_start_are_kept_for_the_before_after_figure(tmp_path):
    monitor = FrobeniusNormMonitor()
    trainer, model = fit(tmp_path, [monitor])
    assert monitor.initial["step"] == 0
    assert_close(monitor.initial["norms"], expected(model.start_weights))
    assert monitor.initial["norms"]["total"] != monitor.history[-1]["norms"]["total"]
    assert [e["step"] for e in monitor.history] == [4, 8]  # not an entry of the logged history
    fig = monitor.figure(monitor.history[-1])
    assert len(fig.axes[0].patches) == 2 * (len(monitor.initial["norms"]) - 1)  # a start and an end bar each
    restored = FrobeniusNormMonitor()
    restored.load_state_dict(monitor.state_dict())
    assert restored.initial == monitor.initial


def test_trainable_only_excludes_frozen(tmp_path):
    monitor = FrobeniusNormMonitor(trainable_only=True, plot=False)
    _, model = fit(tmp_path, [monitor], max_epochs=1)
    norms = monitor.history[-1]["norms"]
    assert "proj.bias" not in norms and "proj.weight" in norms
    assert_close(norms, expected(model.epoch_weights[0], trainable_only=True))
    assert norms["total"] < expected(model.epoch_weights[0])["total"]


def test_group_by_module(tmp_path):
    monitor = FrobeniusNormMonitor(group_by_module=True, plot=False)
    trainer, model = fit(tmp_path, [monitor], max_epochs=1)
    norms = monitor.history[-1]["norms"]
    assert set(norms) == {"encoder", "bn", "body.0", "body.2", "proj", "decoder", "scale", "total"}
    assert_close(norms, expected(model.epoch_weights[0], group_by_module=True))
    # body.2 owns only its bias: its (shared) weight is counted under body.0.
    assert math.isclose(norms["body.2"], float(model.body[2].bias.detach().norm()), rel_tol=TOL)


@pytest.mark.parametrize("every_n_steps, group_by_module", [(1, False), (None, False), (2, True)])
def test_grad_norms(tmp_path, every_n_steps, group_by_module):
    logger = CSVLogger(tmp_path, name="csv")
    monitor = FrobeniusNormMonitor(
        every_n_steps=every_n_steps, group_by_module=group_by_module, log_grad_norm=True, plot=False
    )
    trainer, model = fit(tmp_path, [monitor], logger=logger)

    steps = [e["step"] for e in monitor.history]
    assert steps == {1: list(range(1, 9)), None: [4, 8], 2: [2, 4, 6, 8]}[every_n_steps]
    for entry in monitor.history:
        grads = entry["grad_norms"]
        assert "proj.bias" not in grads and "body.2.weight" not in grads  # no .grad; shared once
        assert_close(grads, expected(model.step_grads[entry["step"]], group_by_module=group_by_module))
        assert_close(entry["norms"], expected(model.step_weights[entry["step"]], group_by_module=group_by_module))
    rows = csv_rows(logger, "frobenius_norm_grad/total")
    assert [float(r["frobenius_norm_grad/total"]) for r in rows] == pytest.approx(
        [e["grad_norms"]["total"] for e in monitor.history], rel=TOL
    )
    assert [int(r["step"]) for r in rows] == steps


def test_every_n_steps_logs_at_the_right_steps(tmp_path):
    logger = CSVLogger(tmp_path, name="csv")
    monitor = FrobeniusNormMonitor(every_n_steps=3, plot=False)
    _, model = fit(tmp_path, [monitor], logger=logger)
    assert [(e["step"], e["epoch"]) for e in monitor.history] == [(3, 0), (6, 1)]
    rows = csv_rows(logger, "frobenius_norm/total")
    assert [int(r["step"]) for r in rows] == [3, 6]
    for row, entry in zip(rows, monitor.history):
        assert float(row["frobenius_norm/total"]) == pytest.approx(
            expected(model.step_weights[entry["step"]])["total"], rel=TOL
        )


def test_every_n_steps_with_gradient_accumulation_logs_each_step_once(tmp_path):
    monitor = FrobeniusNormMonitor(every_n_steps=1, log_grad_norm=True, plot=False)
    _, model = fit(tmp_path, [monitor], accumulate_grad_batches=2)
    assert [e["step"] for e in monitor.history] == [1, 2, 3, 4]
    for entry in monitor.history:
        assert_close(entry["grad_norms"], expected(model.step_grads[entry["step"]]))


def test_tensorboard_logger_gets_the_figure(tmp_path, monkeypatch):
    logger = TensorBoardLogger(tmp_path, name="tb")
    writer = logger.experiment
    calls = []
    original = writer.add_figure

    def recording_add_figure(tag, figure, global_step=None, **kwargs):
        calls.append((tag, global_step))
        return original(tag, figure, global_step=global_step, **kwargs)  # the real one must accept our figure too

    monkeypatch.setattr(writer, "add_figure", recording_add_figure)
    trainer, _ = fit(tmp_path, [FrobeniusNormMonitor(log_scale=True)], logger=logger)
    assert calls == [("frobenius_norm", trainer.global_step)]
    assert (Path(logger.log_dir) / "frobenius_norm" / "norms_epoch1.png").is_file()


def test_without_logger(tmp_path):
    monitor = FrobeniusNormMonitor(every_n_steps=5, group_by_module=True, log_scale=True)
    trainer, model = fit(tmp_path, [monitor])
    assert [e["step"] for e in monitor.history] == [5]
    assert set(monitor.history[0]["norms"]) >= {"encoder", "total"}
    # The last measurement (step 5) is stale at the end: the figure is of the final weights, measured afresh.
    png = tmp_path / "frobenius_norm" / "norms_epoch1.png"
    assert png.is_file() and png.stat().st_size > 1000
    assert_close(monitor._final_entry(trainer, model)["norms"], expected(model.epoch_weights[1], group_by_module=True))


def test_state_survives_a_checkpoint(tmp_path):
    first = FrobeniusNormMonitor(plot=False)
    trainer, _ = fit(tmp_path, [first], max_epochs=1)
    ckpt = tmp_path / "one_epoch.ckpt"
    trainer.save_checkpoint(ckpt)

    resumed = FrobeniusNormMonitor(plot=False)
    fit(tmp_path, [resumed], max_epochs=2, ckpt_path=ckpt)
    assert len(resumed.history) == 2
    assert resumed.history[0] == first.history[0]
    assert (resumed.history[1]["step"], resumed.history[1]["epoch"]) == (8, 1)

    copy = FrobeniusNormMonitor()
    copy.load_state_dict(resumed.state_dict())
    assert copy.history == resumed.history and copy.history is not resumed.history
    # Monitors with different selections keep separate states in one checkpoint.
    assert FrobeniusNormMonitor(trainable_only=True).state_key != copy.state_key


@pytest.mark.parametrize("bad", [0, -3, 1.5, True, "2"])
def test_bad_every_n_steps(bad):
    with pytest.raises(ValueError, match="every_n_steps"):
        FrobeniusNormMonitor(every_n_steps=bad)


def test_weights_unchanged_by_the_callback(tmp_path):
    _, plain = fit(tmp_path / "plain", [])
    monitors = [FrobeniusNormMonitor(), FrobeniusNormMonitor(every_n_steps=1, group_by_module=True, log_grad_norm=True)]
    _, watched = fit(tmp_path / "watched", monitors)
    assert all(m.history for m in monitors)
    reference = plain.state_dict()
    for name, value in watched.state_dict().items():  # parameters and BatchNorm buffers
        assert torch.equal(value, reference[name]), name


def test_tensor_norms_match_an_independent_computation():
    tensors = [torch.randn(3, 4), torch.tensor(2.5), torch.randn(7, dtype=torch.float64), torch.randn(5) * 300]
    want = torch.stack([torch.sqrt((t.double().flatten() ** 2).sum()) for t in tensors])
    norms = tensor_norms(tensors)
    assert norms.dtype == torch.float64 and torch.allclose(norms.double(), want, rtol=1e-6)
    # Half precision: a float32 result, no float16 overflow (this norm is above 65504).
    half = [torch.full((100,), 1000.0, dtype=torch.float16)]
    assert tensor_norms(half).dtype == torch.float32 and tensor_norms(half).item() == pytest.approx(10000.0)


@pytest.mark.parametrize("foreach", [True, False])
def test_tensor_norms_of_mixed_dtypes_keep_the_order(monkeypatch, foreach):
    # Grouped by dtype for the multi-tensor kernel, the norms must come back in the order of the tensors; the
    # per-tensor fallback (a torch without torch._foreach_norm) gives the same values.
    monkeypatch.setattr("reprozoo.callbacks.frobenius._FOREACH", foreach)
    tensors = [
        torch.randn(4, 4).t(),  # not contiguous
        torch.randn(6, dtype=torch.float64),
        torch.randn(3, dtype=torch.bfloat16),
        torch.randn(2, 2),
        torch.randn(5, dtype=torch.complex64),
        torch.randn(10, 3).to_sparse(),  # a sparse gradient
    ]
    want = [
        torch.linalg.vector_norm(t.to_dense().to(torch.complex128 if t.is_complex() else torch.float64))
        for t in tensors
    ]
    got = tensor_norms(tensors)
    assert got.shape == (len(tensors),)
    assert torch.allclose(got.double(), torch.stack(want).double(), rtol=1e-5)  # bfloat16 summed in float32


def test_history_is_stored_as_rows_and_reads_checkpoints_of_the_list_form(tmp_path):
    monitor = FrobeniusNormMonitor(every_n_steps=1, log_grad_norm=True, plot=False)
    fit(tmp_path, [monitor], max_epochs=1)
    state = monitor.state_dict()["history"]
    # One label tuple for the weights and one for the gradients, shared by all rows: no dict of keys per step.
    assert len(state["labels"]) == 2 and len(state["rows"]) == STEPS_PER_EPOCH
    entries = list(monitor.history)
    assert monitor.history[-2:] == entries[-2:] and monitor.history[-1] == entries[-1]
    # A checkpoint written when the history was a list of dicts loads into the same history.
    old = FrobeniusNormMonitor(every_n_steps=1, log_grad_norm=True)
    old.load_state_dict({"history": entries, "initial": None})
    assert old.history == monitor.history and list(old.history) == entries
    assert old.history != entries[:-1]


def test_trainable_only_follows_unfreezing_between_measurements(tmp_path):
    class Unfreeze(L.Callback):
        def on_train_epoch_start(self, trainer, pl_module):
            pl_module.proj.bias.requires_grad_(trainer.current_epoch == 1)

    monitor = FrobeniusNormMonitor(trainable_only=True, plot=False)
    _, model = fit(tmp_path, [Unfreeze(), monitor])
    assert "proj.bias" not in monitor.history[0]["norms"] and "proj.bias" in monitor.history[1]["norms"]
    assert_close(monitor.history[1]["norms"], expected(model.epoch_weights[1], trainable_only=True))
