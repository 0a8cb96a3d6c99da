"""LossLandscape on LightningModules written here, which know nothing of reprozoo (BatchNorm, dropout, a frozen
parameter, a shared parameter): the centre of the surface is the module's own loss, an off-centre point is a hand
computation with the saved directions, nothing about the module changes, and every way of running it agrees
(vmap / loop, any logger or none, one process / two DDP processes)."""

from __future__ import annotations

import copy
import logging

import lightning as L
import numpy as np
import pytest
import torch
import torchmetrics
from lightning.pytorch.loggers import CSVLogger, TensorBoardLogger
from torch import nn
from torch.nn import functional as F
from torch.utils.data import DataLoader, TensorDataset

from reprozoo.callbacks import LossLandscape, load_landscape, random_directions

pytestmark = pytest.mark.filterwarnings("ignore:.*does not have many workers:UserWarning")

BATCH = 16


def _data(n: int = 64, seed: int = 0) -> TensorDataset:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 1, 6, 6, generator=g)
    y = (x.mean(dim=(1, 2, 3)) > 0).long() + (x[:, 0, 0, 0] > 0.5).long()  # 3 classes, learnable
    return TensorDataset(x, y)


class SmallNet(L.LightningModule):
    """Conv + BatchNorm + dropout, a frozen parameter (``frozen``) and a shared one (``head_b.weight`` is
    ``head_a.weight``); logs its batch accuracy as a plain tensor."""

    def __init__(self, lr: float = 0.05):
        super().__init__()
        self.lr = lr
        self.conv = nn.Conv2d(1, 4, 3, padding=1)
        self.bn = nn.BatchNorm2d(4)
        self.drop = nn.Dropout(0.3)
        self.fc = nn.Linear(4 * 6 * 6, 12)
        self.head_a = nn.Linear(12, 12)
        self.head_b = nn.Linear(12, 12)
        self.head_b.weight = self.head_a.weight  # one nn.Parameter under two names
        self.out = nn.Linear(12, 3)
        self.frozen = nn.Parameter(torch.full((12,), 0.5), requires_grad=False)

    def forward(self, x):  # (B, 1, 6, 6) -> (B, 3)
        h = self.drop(F.relu(self.bn(self.conv(x)))).flatten(1)
        h = torch.tanh(self.fc(h))
        h = torch.tanh(self.head_b(torch.tanh(self.head_a(h)))) + self.frozen
        return self.out(h)

    def training_step(self, batch, batch_idx):
        x, y = batch
        logits = self(x)
        loss = F.cross_entropy(logits, y)
        self.log("train_loss", loss)
        self.log("train_acc", (logits.argmax(-1) == y).float().mean())
        return loss

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=self.lr, momentum=0.9)


class MetricNet(SmallNet):
    """Updates and logs a torchmetrics object inside ``training_step``: the callback must read the batch's accuracy
    from it and leave the metric's state as it was."""

    def __init__(self):
        super().__init__()
        self.train_acc = torchmetrics.classification.MulticlassAccuracy(num_classes=3, average="micro")

    def training_step(self, batch, batch_idx):
        x, y = batch
        logits = self(x)
        self.train_acc(logits, y)
        self.log("train/acc", self.train_acc, on_step=False, on_epoch=True)
        return F.cross_entropy(logits, y)


class ItemNet(SmallNet):
    """Calls ``.item()`` in its step: data-dependent, so vmap cannot run it and the callback must loop."""

    def training_step(self, batch, batch_idx):
        loss = super().training_step(batch, batch_idx)
        if loss.item() > 1e6:
            raise FloatingPointError("diverged")
        return loss


class LossMethodNet(SmallNet):
    """Defines ``loss(batch)``: preferred over training_step; returns a mapping with accuracy."""

    def loss(self, batch):
        x, y = batch
        logits = self(x)
        return {"loss": F.cross_entropy(logits, y) * 2.0, "accuracy": (logits.argmax(-1) == y).float().mean()}


def _trainer(tmp_path, callbacks, logger=False, **kwargs) -> L.Trainer:
    defaults = {
        "accelerator": "cpu",
        "devices": 1,
        "max_epochs": 2,
        "logger": logger,
        "enable_checkpointing": False,
        "enable_progress_bar": False,
        "enable_model_summary": False,
        "default_root_dir": tmp_path,
        "callbacks": callbacks,
    }
    defaults.update(kwargs)
    return L.Trainer(**defaults)


def _fit(tmp_path, model=None, logger=False, **cb_kwargs):
    torch.manual_seed(0)
    model = model or SmallNet()
    cb = LossLandscape(**{"resolution": 5, "num_batches": 2, "progress": False, **cb_kwargs})
    trainer = _trainer(tmp_path, [cb], logger=logger)
    trainer.fit(model, DataLoader(_data(), batch_size=BATCH, shuffle=True))
    return trainer, model, cb


def _reference_loss(model: nn.Module, num_batches: int = 2) -> tuple[float, float]:
    """The module's loss and accuracy in eval mode on the first batches in dataset order, weighted by size."""
    model = copy.deepcopy(model).eval()
    loss = acc = n = 0.0
    with torch.no_grad():
        for i, (x, y) in enumerate(DataLoader(_data(), batch_size=BATCH)):
            if i == num_batches:
                break
            logits = model(x)
            loss += F.cross_entropy(logits, y, reduction="sum").item()
            acc += (logits.argmax(-1) == y).sum().item()
            n += len(y)
    return loss / n, acc / n


def test_centre_is_the_module_loss_and_files_are_written(tmp_path):
    _, model, cb = _fit(tmp_path, save_directions=True, mode="vmap")
    path = tmp_path / "loss_landscape" / "epoch_1.npz"  # no logger: default_root_dir
    assert path.exists() and (tmp_path / "loss_landscape" / "epoch_1_contour.png").exists()
    assert (tmp_path / "loss_landscape" / "epoch_1_surface.png").exists()
    data = load_landscape(path)
    assert data["loss"].shape == (5, 5) and data["accuracy"].shape == (5, 5)
    np.testing.assert_allclose(data["x"], np.linspace(-1, 1, 5))
    loss, acc = _reference_loss(model)
    assert data["loss"][2, 2] == pytest.approx(loss, abs=1e-6)
    assert data["accuracy"][2, 2] == pytest.approx(acc, abs=1e-6)
    assert cb.used_mode == "vmap"
    assert cb.history[-1]["center_loss"] == pytest.approx(loss, abs=1e-6)
    assert np.isfinite(data["loss"]).all() and data["loss"].max() > data["loss"][2, 2]


@pytest.mark.parametrize("mode", ["vmap", "loop"])
def test_off_centre_point_is_a_hand_computation(tmp_path, mode):
    _, model, cb = _fit(tmp_path, save_directions=True, span=0.8, mode=mode)
    assert cb.used_mode == mode
    data = load_landscape(tmp_path / "loss_landscape" / "epoch_1.npz")
    d1, d2 = data["directions"]
    names = data["parameter_names"]
    # Frozen and shared parameters: the frozen one is not perturbed, the shared one appears once.
    assert "frozen" not in names and "head_b.weight" not in names and "head_a.weight" in names
    # biasbn: 1-d parameters (biases, BN affine) have zero directions.
    assert all(float(d1[n].abs().max()) == 0 for n in names if n.endswith("bias") or n.startswith("bn."))
    i, j = 0, 3  # y = -0.8, x = 0.4
    a, b = data["x"][j], data["y"][i]
    moved = copy.deepcopy(model)
    params = dict(moved.named_parameters())
    with torch.no_grad():
        for n in names:
            p = params[n]
            p.add_(a * d1[n].reshape(p.shape).to(p.dtype) + b * d2[n].reshape(p.shape).to(p.dtype))
    loss, acc = _reference_loss(moved)
    assert data["loss"][i, j] == pytest.approx(loss, rel=1e-5)
    assert data["accuracy"][i, j] == pytest.approx(acc, abs=1e-6)
    assert data["loss"][i, j] != pytest.approx(data["loss"][2, 2], rel=1e-3)


def test_filter_normalisation_and_seeding():
    torch.manual_seed(1)
    net = nn.Sequential(nn.Conv2d(3, 5, 3), nn.BatchNorm2d(5), nn.Flatten(), nn.Linear(5 * 4 * 4, 2))
    params = dict(net.named_parameters())
    d = random_directions(params, num=2, seed=7)
    again = random_directions(params, num=2, seed=7)
    assert all(torch.equal(d[k][n], again[k][n]) for k in range(2) for n in params)
    assert not torch.equal(d[0]["0.weight"], d[1]["0.weight"])
    w, v = params["0.weight"].detach(), d[0]["0.weight"]
    for f in range(5):  # each filter has the norm of the matching weight filter
        assert v[f].norm().item() == pytest.approx(w[f].norm().item(), rel=1e-5)
    assert d[0]["0.bias"].abs().max() == 0 and d[0]["1.weight"].abs().max() == 0
    # layer / model / none / no ignore
    layer = random_directions(params, num=1, normalization="layer", seed=7)[0]
    assert layer["3.weight"].norm().item() == pytest.approx(params["3.weight"].norm().item(), rel=1e-5)
    model = random_directions(params, num=1, normalization="model", ignore=None, seed=7)[0]

    def total(ts):
        return torch.sqrt(sum(t.detach().square().sum() for t in ts)).item()

    assert total(model.values()) == pytest.approx(total(params.values()), rel=1e-5)
    keep = random_directions(params, num=1, ignore=None, seed=7)[0]
    assert torch.equal(keep["0.bias"], params["0.bias"].detach())  # filter norm on a 1-d tensor: the weight itself
    with pytest.raises(ValueError, match="normalization"):
        random_directions(params, normalization="filters")


def test_weights_modes_and_rng_unchanged_bit_for_bit(tmp_path):
    torch.manual_seed(0)
    model = MetricNet()
    trainer = _trainer(tmp_path, [], max_epochs=1)
    loader = DataLoader(_data(), batch_size=BATCH, shuffle=True)
    trainer.fit(model, loader)
    model.train()
    model.bn.eval()  # a mixed state must come back as it was
    model.train_acc.update(torch.randn(5, 3), torch.tensor([0, 1, 2, 0, 1]))
    metric_before = {k: v.clone() for k, v in model.train_acc.metric_state.items()}
    state = {k: v.clone() for k, v in model.state_dict().items()}
    modes = {n: m.training for n, m in model.named_modules()}
    results = {}
    for mode in ("vmap", "loop"):
        cb = LossLandscape(resolution=3, num_batches=2, mode=mode, progress=False)
        rng = torch.get_rng_state()
        results[mode] = result = cb.compute(trainer, model, dataloader=loader)
        assert torch.equal(torch.get_rng_state(), rng)
        assert cb.used_mode == mode
        assert result["accuracy"][1, 1] == pytest.approx(_reference_loss(model)[1], abs=1e-6)
        assert all(torch.equal(state[k], v) for k, v in model.state_dict().items())
        assert {n: m.training for n, m in model.named_modules()} == modes
        assert all(torch.equal(metric_before[k], v) for k, v in model.train_acc.metric_state.items())
    assert "log" not in model.__dict__ and "log_dict" not in model.__dict__
    np.testing.assert_allclose(results["vmap"]["loss"], results["loop"]["loss"], rtol=1e-5)
    np.testing.assert_allclose(results["vmap"]["accuracy"], results["loop"]["accuracy"], atol=1e-6)


def test_fallback_is_logged_and_matches_vmap_of_an_equivalent_module(tmp_path, caplog):
    torch.manual_seed(0)
    metric_net = ItemNet()
    plain = SmallNet()
    plain.load_state_dict(metric_net.state_dict())
    trainer = _trainer(tmp_path, [])
    loader = DataLoader(_data(), batch_size=BATCH)
    fallback = LossLandscape(resolution=5, num_batches=2, progress=False)
    with caplog.at_level(logging.WARNING, logger="reprozoo.callbacks.landscape"):
        looped = fallback.compute(trainer, metric_net, dataloader=loader)
    assert "one at a time" in caplog.text and "mode='loop'" in caplog.text
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="reprozoo.callbacks.landscape"):
        fallback.compute(trainer, metric_net, dataloader=loader)
    assert not caplog.records  # the same fallback at the next epoch: not a second warning
    batched_cb = LossLandscape(resolution=5, num_batches=2, chunk_size=7, mode="vmap", progress=False)
    batched = batched_cb.compute(trainer, plain, dataloader=loader)
    assert batched_cb.used_mode == "vmap"
    np.testing.assert_allclose(looped["loss"], batched["loss"], rtol=1e-5)
    np.testing.assert_allclose(looped["accuracy"], batched["accuracy"], atol=1e-6)
    auto = LossLandscape(resolution=5, num_batches=2, chunk_size=7, progress=False)
    chosen = auto.compute(trainer, plain, dataloader=loader)  # vmap can run it: timed against the loop
    assert auto.used_mode in ("vmap", "loop")
    assert set(auto.timings) == {
        "vmap_ms_per_point",
        "loop_ms_per_point",
        "vmap_chunk_size",
        "probe_seconds",
        "wasted_seconds",
    }
    assert 0 <= auto.timings["wasted_seconds"] <= auto.timings["probe_seconds"]
    assert auto.used_mode == min(("vmap", "loop"), key=lambda m: auto.timings[f"{m}_ms_per_point"])
    np.testing.assert_allclose(chosen["loss"], batched["loss"], rtol=1e-5)
    # Decided once: a later compute neither times again nor switches (surfaces of two epochs agree to the bit where
    # the weights do, whatever the machine's load does to the timings).
    timings, other = auto.timings, {"vmap": "loop", "loop": "vmap"}[auto.used_mode]
    auto.used_mode = other
    again = auto.compute(trainer, plain, dataloader=loader)
    assert auto.used_mode == other and auto.timings is timings
    reference = LossLandscape(resolution=5, num_batches=2, chunk_size=7, mode=other, progress=False)
    np.testing.assert_array_equal(again["loss"], reference.compute(trainer, plain, dataloader=loader)["loss"])
    with pytest.raises(RuntimeError):  # mode="vmap" does not fall back
        LossLandscape(resolution=3, mode="vmap", progress=False).compute(trainer, metric_net, dataloader=loader)


def test_loss_method_and_loss_fn_take_precedence(tmp_path):
    torch.manual_seed(0)
    model = LossMethodNet()
    trainer = _trainer(tmp_path, [])
    loader = DataLoader(_data(), batch_size=BATCH)
    by_method = LossLandscape(dim=1, resolution=5, num_batches=2, progress=False).compute(
        trainer, model, dataloader=loader
    )
    loss, acc = _reference_loss(model)
    assert by_method["loss"].shape == (5,) and "y" not in by_method
    assert by_method["loss"][2] == pytest.approx(2 * loss, rel=1e-6)
    assert by_method["accuracy"][2] == pytest.approx(acc, abs=1e-6)
    half = LossLandscape(dim=1, resolution=5, num_batches=2, progress=False, loss_fn=lambda m, b: m.loss(b)["loss"] / 2)
    by_fn = half.compute(trainer, model, dataloader=loader)
    np.testing.assert_allclose(by_fn["loss"], by_method["loss"] / 2, rtol=1e-6)
    assert "accuracy" not in by_fn


@pytest.mark.parametrize("logger_kind", ["csv", "tensorboard", "none"])
def test_any_logger(tmp_path, logger_kind):
    logger = {
        "csv": lambda: CSVLogger(tmp_path, name="csv"),
        "tensorboard": lambda: TensorBoardLogger(tmp_path, name="tb"),
        "none": lambda: False,
    }[logger_kind]()
    _, _, cb = _fit(tmp_path, logger=logger, dim=1, every_n_epochs=1)
    root = tmp_path if logger is False else tmp_path / logger.name / "version_0"
    # every epoch (0, 1), and the end of fit is the last epoch's surface, not computed twice
    assert sorted(p.name for p in (root / "loss_landscape").glob("*.npz")) == ["epoch_0.npz", "epoch_1.npz"]
    assert (root / "loss_landscape" / "epoch_1_line.png").exists()
    assert [h["epoch"] for h in cb.history] == [0, 1]
    if logger_kind == "tensorboard":
        from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

        events = EventAccumulator(str(root), size_guidance={"images": 0}).Reload()
        assert "loss_landscape/line" in events.Tags()["images"]


def test_checkpoint_state_and_bad_arguments(tmp_path):
    _, _, cb = _fit(tmp_path, resolution=3)
    fresh = LossLandscape(resolution=3)
    fresh.load_state_dict(cb.state_dict())
    assert fresh.history == cb.history
    for kwargs, field in [
        ({"dim": 3}, "dim"),
        ({"resolution": 4}, "resolution"),
        ({"resolution": 0}, "resolution"),
        ({"span": -1.0}, "span"),
        ({"num_batches": 0}, "num_batches"),
        ({"dataloader": "test"}, "dataloader"),
        ({"mode": "fast"}, "mode"),
        ({"normalization": "batch"}, "normalization"),
        ({"chunk_size": 0}, "chunk_size"),
        ({"every_n_epochs": 0}, "every_n_epochs"),
    ]:
        with pytest.raises(ValueError, match=field):
            LossLandscape(**kwargs)


class ManualNet(SmallNet):
    def __init__(self):
        super().__init__()
        self.automatic_optimization = False

    def training_step(self, batch, batch_idx):
        opt = self.optimizers()
        loss = F.cross_entropy(self(batch[0]), batch[1])
        opt.zero_grad()
        self.manual_backward(loss)
        opt.step()


def test_manual_optimisation_needs_a_loss(tmp_path):
    model = ManualNet()
    trainer = _trainer(tmp_path, [])
    with pytest.raises(RuntimeError, match="manual optimisation"):
        LossLandscape(resolution=3, progress=False).compute(
            trainer, model, dataloader=DataLoader(_data(), batch_size=8)
        )


class IterStepNet(SmallNet):
    def training_step(self, dataloader_iter):
        x, y = next(dataloader_iter)
        return F.cross_entropy(self(x), y)


def test_dataloader_iter_step_needs_a_loss(tmp_path):
    with pytest.raises(RuntimeError, match="dataloader_iter.*loss_fn"):
        LossLandscape(resolution=3, progress=False).compute(
            _trainer(tmp_path, []), IterStepNet(), dataloader=DataLoader(_data(), batch_size=8)
        )


class CountingNet(SmallNet):
    """Writes a buffer in every forward, also in eval mode."""

    def __init__(self):
        super().__init__()
        self.register_buffer("calls", torch.zeros((), dtype=torch.long))

    def forward(self, x):
        self.calls += 1
        return super().forward(x)


@pytest.mark.parametrize("mode", ["vmap", "loop"])
def test_buffers_written_by_the_objective_are_restored(tmp_path, mode):
    torch.manual_seed(0)
    model = CountingNet()
    state = {k: v.clone() for k, v in model.state_dict().items()}
    calls = model.calls
    cb = LossLandscape(resolution=3, mode=mode, progress=False)
    cb.compute(_trainer(tmp_path, []), model, dataloader=DataLoader(_data(), batch_size=BATCH))
    assert cb.used_mode == mode
    assert model.calls is calls and all(torch.equal(state[k], v) for k, v in model.state_dict().items())


@pytest.mark.slow
def test_ddp_two_processes_give_the_one_process_surface(tmp_path):
    torch.manual_seed(0)
    model = SmallNet()
    cb = LossLandscape(resolution=5, num_batches=3, chunk_size=4, progress=False)
    trainer = _trainer(tmp_path, [cb], strategy="ddp_spawn", devices=2, max_epochs=1)
    trainer.fit(model, DataLoader(_data(), batch_size=BATCH, shuffle=True))
    ddp = load_landscape(tmp_path / "loss_landscape" / "epoch_0.npz")
    # ddp_spawn hands rank zero's final weights and buffers back to this process's model.
    single = LossLandscape(resolution=5, num_batches=3, progress=False)
    result = single.compute(_trainer(tmp_path / "single", []), model, dataloader=DataLoader(_data(), batch_size=BATCH))
    np.testing.assert_allclose(ddp["loss"], result["loss"], rtol=1e-6)
    np.testing.assert_allclose(ddp["accuracy"], result["accuracy"], atol=1e-6)


def test_weights_restored_when_the_objective_raises(tmp_path):
    torch.manual_seed(0)
    model = SmallNet()
    state = {k: v.clone() for k, v in model.state_dict().items()}
    calls = []

    def failing(module, batch):
        calls.append(1)
        if len(calls) == 4:  # mid-grid, with some point's weights written into the parameters
            raise FloatingPointError("diverged at call 4")
        return F.cross_entropy(module(batch[0]), batch[1])

    cb = LossLandscape(resolution=3, mode="loop", loss_fn=failing, progress=False)
    with pytest.raises(FloatingPointError, match="call 4"):
        cb.compute(_trainer(tmp_path, []), model, dataloader=DataLoader(_data(), batch_size=BATCH))
    assert all(torch.equal(state[k], v) for k, v in model.state_dict().items())
    assert model.training and "log" not in model.__dict__


class MixedNet(L.LightningModule):
    """A float32 layer and a bfloat16 one: the loop writes each point's weights per dtype."""

    def __init__(self):
        super().__init__()
        self.a = nn.Linear(36, 8)
        self.b = nn.Linear(8, 3).to(torch.bfloat16)

    def forward(self, x):
        return self.b(torch.tanh(self.a(x.flatten(1))).bfloat16()).float()

    def training_step(self, batch, batch_idx):
        return F.cross_entropy(self(batch[0]), batch[1])


def test_loop_writes_the_hand_built_weights_bit_for_bit(tmp_path):
    """Every point's weights as the objective sees them in the loop are ``theta + a d1 + b d2`` computed by hand in
    float32 and rounded to the parameter's dtype once; the loss at each point is the module's loss at those weights;
    the weights are the saved ones afterwards."""
    torch.manual_seed(0)
    model = MixedNet()
    theta = {n: p.detach().clone() for n, p in model.named_parameters()}
    seen = []

    def recording(module, batch):
        seen.append({n: p.detach().clone() for n, p in module.named_parameters()})
        return F.cross_entropy(module(batch[0]), batch[1])

    cb = LossLandscape(resolution=3, span=0.7, num_batches=1, mode="loop", loss_fn=recording, progress=False)
    loader = DataLoader(_data(), batch_size=BATCH)
    result = cb.compute(_trainer(tmp_path, []), model, dataloader=loader)
    d1, d2 = result["directions"]
    assert len(seen) == 9 and all(torch.equal(theta[n], p.detach()) for n, p in model.named_parameters())
    x, y = next(iter(loader))
    for i, (yy, xx) in enumerate((yy, xx) for yy in result["y"] for xx in result["x"]):
        a, b = torch.tensor(xx, dtype=torch.float32), torch.tensor(yy, dtype=torch.float32)
        moved = copy.deepcopy(model)
        for n, p in moved.named_parameters():
            w = theta[n].float() + a * d1[n].float()
            w = w + b * d2[n].float()
            assert torch.equal(seen[i][n], w.to(theta[n].dtype)), (i, n)
            p.data.copy_(w.to(p.dtype))
        with torch.no_grad():
            expected = F.cross_entropy(moved.eval()(x), y).item()
        assert result["loss"].reshape(-1)[i] == pytest.approx(expected, rel=1e-6)


class _FakeClock:
    """Stands in for ``time`` in the evaluation module: the objective advances it, by ``vmap_cost`` per vmapped call
    and by 1 per point of the loop, so the "auto" probe sees chosen speeds."""

    def __init__(self, vmap_cost: float):
        self.now, self.vmap_cost, self.calls = 0.0, vmap_cost, {"vmap": 0, "loop": 0}

    def perf_counter(self) -> float:
        return self.now

    def objective(self, reference: torch.Tensor):
        def fn(module, batch):
            kind = "loop" if module.out.weight is reference else "vmap"  # functional_call swaps the parameter
            self.calls[kind] += 1
            self.now += 1.0 if kind == "loop" else self.vmap_cost
            return F.cross_entropy(module(batch[0]), batch[1])

        return fn


@pytest.mark.parametrize("vmap_cost, chosen", [(1.5, "vmap"), (10.0, "loop")])
def test_auto_probe_is_reused_and_capped(tmp_path, monkeypatch, vmap_cost, chosen):
    """``auto`` chooses by the probe's timings, keeps the chosen path's probe values (no point and batch of it is
    evaluated twice), spends on the other path at most the budget (5 % of the grid at the loop's speed), and its
    surface is the chosen mode's."""
    from reprozoo.callbacks import _landscape_eval

    torch.manual_seed(0)
    model = SmallNet()
    clock = _FakeClock(vmap_cost)
    monkeypatch.setattr(_landscape_eval, "time", clock)
    trainer, loader = _trainer(tmp_path, []), DataLoader(_data(), batch_size=BATCH)
    settings = dict(resolution=11, num_batches=2, progress=False, loss_fn=clock.objective(model.out.weight))
    auto = LossLandscape(**settings)
    result = auto.compute(trainer, model, dataloader=loader)
    assert auto.used_mode == chosen
    t = auto.timings
    assert t["loop_ms_per_point"] == pytest.approx(1000.0)
    points, batches = 121, 2
    if chosen == "loop":  # the vmap warm-up (10) fits the budget (0.05 * 121 * 2 = 12.1), a second call would not
        assert t["vmap_ms_per_point"] == pytest.approx(10000.0) and t["wasted_seconds"] == pytest.approx(10.0)
        assert clock.calls == {"vmap": 1, "loop": points * batches}
    else:  # 1.5 s per call: vmap wins at a chunk of 2 (0.75 s per point), then doubles to chunk_size for free
        assert auto._vmap_bounds == [0, 3, 4, 6, 10, 18, 34, 66] and t["vmap_chunk_size"] == 32
        assert t["vmap_ms_per_point"] == pytest.approx(1500.0 / 32) and t["wasted_seconds"] == pytest.approx(3.0)
        probe_chunks, rest = 6, len(range(66, points, 32))
        # each probe chunk once per batch; the loop's three points and the rest of the grid on every batch
        assert clock.calls == {"vmap": probe_chunks * batches + (1 + rest) * batches, "loop": 3}
    assert t["wasted_seconds"] <= 0.05 * points * batches * 1.0
    reference = LossLandscape(**{**settings, "mode": chosen}).compute(trainer, model, dataloader=loader)
    if chosen == "loop":  # one point at a time: the same values whatever the chunks
        np.testing.assert_array_equal(result["loss"], reference["loss"])
    else:
        np.testing.assert_allclose(result["loss"], reference["loss"], rtol=1e-6)
    again = auto.compute(trainer, model, dataloader=loader)  # decided: same chunks, same values
    np.testing.assert_array_equal(again["loss"], result["loss"])


def test_stochastic_objective_sees_the_same_noise_at_every_point(tmp_path):
    """Common random numbers: the objective's draws restart from ``seed`` at every point and batch, in both modes,
    so a loss plus a random draw is the loss plus the seed's first draw; the global RNG is left as it was."""
    torch.manual_seed(0)
    model = SmallNet()
    noise = torch.Generator().manual_seed(3)
    expected_noise = torch.rand((), generator=noise).item()

    def noisy(module, batch):
        return F.cross_entropy(module(batch[0]), batch[1]) + torch.rand(())

    loader = DataLoader(_data(), batch_size=BATCH)
    surfaces = {}
    for mode in ("loop", "vmap"):
        rng = torch.get_rng_state()
        cb = LossLandscape(dim=1, resolution=3, num_batches=2, seed=3, mode=mode, loss_fn=noisy, progress=False)
        surfaces[mode] = cb.compute(_trainer(tmp_path, []), model, dataloader=loader)["loss"]
        assert torch.equal(torch.get_rng_state(), rng)
    plain = LossLandscape(dim=1, resolution=3, num_batches=2, seed=3, mode="loop", progress=False)
    clean = plain.compute(_trainer(tmp_path, []), model, dataloader=loader)["loss"]
    np.testing.assert_allclose(surfaces["loop"], clean + expected_noise, rtol=1e-6)
    np.testing.assert_allclose(surfaces["vmap"], clean + expected_noise, rtol=1e-6)


def test_auto_on_a_small_grid_loops_without_probing_vmap(tmp_path, monkeypatch):
    """Fewer than 40 points x batches cannot pay for vmap's first point within 5 % of the grid: the loop, which has
    evaluated its probe points already, goes on; vmap is never called and every point and batch is evaluated once."""
    from reprozoo.callbacks import _landscape_eval

    torch.manual_seed(0)
    model = SmallNet()
    clock = _FakeClock(vmap_cost=0.1)
    monkeypatch.setattr(_landscape_eval, "time", clock)
    auto = LossLandscape(resolution=3, num_batches=2, progress=False, loss_fn=clock.objective(model.out.weight))
    result = auto.compute(_trainer(tmp_path, []), model, dataloader=DataLoader(_data(), batch_size=BATCH))
    assert auto.used_mode == "loop" and auto.timings is None
    assert clock.calls == {"vmap": 0, "loop": 9 * 2}
    assert np.isfinite(result["loss"]).all()
