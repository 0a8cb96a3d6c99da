import copy
import inspect
import os
import sys

import lightning as L
import numpy as np
import pytest
import torch
import torch.nn.functional as F
import yaml
from lightning.pytorch.loggers import TensorBoardLogger
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from reprozoo.methods.tent import TentModule
from reprozoo.methods.tent_adapter import TentAdapter, collect_norm_params, softmax_entropy
from reprozoo.nets import CifarResNet, load_legacy_cifar_resnet
from reprozoo.nets.wide_resnet import WideResNet, load_wide_resnet_checkpoint, wide_resnet28_10
from reprozoo.zoo import _robustbench
from reprozoo.zoo.classifiers import load_classifier
from reprozoo.zoo.registry import WeightsError
from tests.conftest import ROOT, real_data
from tests.helpers import tiny_trainer

RESNET20 = "resnet20-12fca82f.th"


class TinyNet(nn.Module):
    """conv -> BN -> ReLU -> dropout -> global average pool -> linear."""

    def __init__(self, num_classes: int = 3, dropout: float = 0.3):
        super().__init__()
        self.num_classes = num_classes
        self.conv = nn.Conv2d(3, 4, kernel_size=3, padding=1)
        self.bn = nn.BatchNorm2d(4)
        self.drop = nn.Dropout(dropout)
        self.fc = nn.Linear(4, num_classes)
        with torch.no_grad():  # trained-looking statistics and affine parameters, far from the batch's
            self.bn.running_mean.uniform_(-1, 1)
            self.bn.running_var.uniform_(0.5, 3)
            self.bn.weight.uniform_(0.5, 1.5)
            self.bn.bias.uniform_(-0.5, 0.5)

    def forward(self, x):
        h = self.drop(F.relu(self.bn(self.conv(x))))
        return self.fc(h.mean(dim=(2, 3)))


def tiny(seed: int = 0, **kwargs) -> TinyNet:
    torch.manual_seed(seed)
    return TinyNet(**kwargs)


def batch(seed: int = 1, n: int = 16) -> torch.Tensor:
    return torch.randn(n, 3, 6, 6, generator=torch.Generator().manual_seed(seed)) * 2 + 0.5


def clone_state(module: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in module.state_dict().items()}


def by_hand_batch_stats(model: TinyNet, x: torch.Tensor) -> torch.Tensor:
    """``model``'s forward with BatchNorm computed from the batch (biased variance, as BN does) and dropout off."""
    h = model.conv(x)
    mean = h.mean(dim=(0, 2, 3), keepdim=True)
    var = h.var(dim=(0, 2, 3), unbiased=False, keepdim=True)
    w, b = model.bn.weight.view(1, -1, 1, 1), model.bn.bias.view(1, -1, 1, 1)
    h = F.relu((h - mean) / torch.sqrt(var + model.bn.eps) * w + b)
    return model.fc(h.mean(dim=(2, 3)))


# ----------------------------------------------------------------------------------------------- the adapter


def test_one_step_changes_only_the_batchnorm_affine_parameters():
    model = tiny()
    original = clone_state(model)
    adapter = TentAdapter(model)
    # The official configure_model: train mode, running statistics dropped, only BN scale and shift trainable.
    assert model.training and model.drop.training
    assert not model.bn.track_running_stats and model.bn.running_mean is None and model.bn.running_var is None
    assert [n for n, p in model.named_parameters() if p.requires_grad] == ["bn.weight", "bn.bias"]
    assert adapter.adapted_names == ["bn.weight", "bn.bias"]
    assert adapter.adapted_parameters == [model.bn.weight, model.bn.bias]
    before = clone_state(model)
    assert set(before) == set(original) - {"bn.running_mean", "bn.running_var"}
    adapter(batch())
    after = clone_state(model)
    assert set(after) == set(before)
    for key in before:
        if key in ("bn.weight", "bn.bias"):
            assert not torch.equal(after[key], before[key]), key
        else:
            assert torch.equal(after[key], before[key]), key  # other parameters and every buffer, bit for bit
    assert all(p.grad is None for p in model.parameters())
    adapter.eval()  # what Lightning does before testing: the official train mode stays (dropout included)
    assert model.training and model.drop.training


def test_norm_mode_predicts_with_batch_statistics_and_changes_nothing():
    model = tiny()
    reference = copy.deepcopy(model).eval()
    x = batch()
    source = TentAdapter(copy.deepcopy(model), mode="source")
    with torch.no_grad():
        assert torch.equal(source(x), reference(x))  # running statistics, dropout off
    adapter = TentAdapter(model, mode="norm")
    assert model.bn.training and not model.drop.training and adapter.optimizer is None
    with torch.no_grad():
        out = adapter(x)
        expected = by_hand_batch_stats(reference, x)
        assert torch.allclose(out, expected, atol=1e-5, rtol=1e-5)
        assert not torch.allclose(out, reference(x), atol=1e-2)
        assert torch.equal(adapter(x), out)  # no state changes between batches
    assert all(p.requires_grad for p in model.parameters())  # norm mode optimises nothing and freezes nothing
    adapter.eval()  # Lightning calls eval() before testing: the configured modes stay
    assert model.bn.training and not model.drop.training


def test_a_step_is_one_adam_step_on_the_entropy_gradient_and_returns_the_logits_before_it():
    model = tiny()
    reference = copy.deepcopy(model)
    x = batch()
    adapter = TentAdapter(model, lr=1e-3)
    torch.manual_seed(123)  # the same dropout mask below: train mode, as the official code
    out = adapter(x)

    # Independently: batch-statistics BN, train mode, entropy, autograd, then Adam by hand and with a fresh Adam.
    for bn in [reference.bn]:
        bn.track_running_stats, bn.running_mean, bn.running_var = False, None, None
    reference.train()
    torch.manual_seed(123)
    logits = reference(x)
    loss = -(F.softmax(logits, 1) * F.log_softmax(logits, 1)).sum(1).mean()
    params = [reference.bn.weight, reference.bn.bias]
    grads = torch.autograd.grad(loss, params)
    assert torch.equal(out, logits.detach())  # what the adapter returns: the predictions before its update
    assert torch.allclose(adapter.last_loss, loss.detach())
    for p, g, new in zip(params, grads, [model.bn.weight, model.bn.bias]):
        # First Adam step: m_hat = g, v_hat = g^2, so p - lr * g / (|g| + eps).
        assert torch.allclose(new, p.detach() - 1e-3 * g / (g.abs() + 1e-8), atol=1e-7, rtol=0)
    fresh = torch.optim.Adam(params, lr=1e-3, betas=(0.9, 0.999), weight_decay=0.0)
    for p, g in zip(params, grads):
        p.grad = g
    fresh.step()
    assert torch.allclose(model.bn.weight, reference.bn.weight, atol=1e-7, rtol=0)
    assert torch.allclose(model.bn.bias, reference.bn.bias, atol=1e-7, rtol=0)
    torch.manual_seed(123)
    assert not torch.allclose(adapter(x), out)  # the next forward sees the updated parameters


def test_sgd_step_is_nesterov_momentum_as_the_official_config():
    model = tiny()
    reference = copy.deepcopy(model)
    adapter = TentAdapter(model, optimizer="sgd", lr=0.01, momentum=0.9, train_mode="norm")
    x = batch()
    adapter(x)
    reference.bn.track_running_stats, reference.bn.running_mean, reference.bn.running_var = False, None, None
    logits = reference.eval()(x)
    w, b = reference.bn.weight, reference.bn.bias
    gw, gb = torch.autograd.grad(softmax_entropy(logits).mean(), [w, b])
    # First step: buf = g; nesterov: g + 0.9 buf = 1.9 g.
    assert torch.allclose(model.bn.weight, w.detach() - 0.01 * 1.9 * gw, atol=1e-7)
    assert torch.allclose(model.bn.bias, b.detach() - 0.01 * 1.9 * gb, atol=1e-7)


def test_reset_restores_weights_and_optimizer_state_and_episodic_forgets_every_batch():
    model = tiny()
    adapter = TentAdapter(model, train_mode="norm")  # dropout off: deterministic outputs to compare
    assert not model.drop.training and model.bn.training
    source = clone_state(model)
    opt_state = copy.deepcopy(adapter.optimizer.state_dict())
    x = batch()
    first = adapter(x)
    for _ in range(3):
        adapter(x)
    assert not torch.equal(model.bn.weight, source["bn.weight"])
    assert adapter.optimizer.state_dict()["state"]  # Adam moments and step counts exist now
    adapter.reset()
    restored = clone_state(model)
    assert all(torch.equal(restored[k], source[k]) for k in source)
    assert adapter.optimizer.state_dict() == opt_state  # empty state, same hyperparameters
    assert torch.equal(adapter(x), first)  # and it behaves as new

    episodic = TentAdapter(tiny(), episodic=True, train_mode="norm")
    outs = [episodic(x) for _ in range(3)]
    assert torch.equal(outs[0], first) and all(torch.equal(o, outs[0]) for o in outs)
    continual = TentAdapter(tiny(), train_mode="norm")
    outs = [continual(x) for _ in range(2)]
    assert not torch.equal(outs[0], outs[1])


def test_adapts_under_no_grad_and_inference_mode():
    for context in (torch.no_grad, torch.inference_mode):
        model = tiny()
        adapter = TentAdapter(model, train_mode="norm")
        w0 = model.bn.weight.detach().clone()
        with context():
            x = batch()  # an inference tensor under inference_mode
            out = adapter(x)
            adapter.reset()
            adapter(x)
        assert not out.requires_grad
        assert not torch.equal(model.bn.weight, w0), context.__name__


def test_groupnorm_and_layernorm_models_are_adapted_with_a_warning_and_others_refused():
    gn = nn.Sequential(nn.Conv2d(3, 4, 3), nn.GroupNorm(2, 4), nn.ReLU(), nn.Flatten(), nn.LazyLinear(3))
    gn(batch())  # materialise the lazy layer
    with pytest.warns(UserWarning, match="no BatchNorm.*GroupNorm / LayerNorm"):
        adapter = TentAdapter(gn)
    assert adapter.adapted_names == ["1.weight", "1.bias"]
    w0 = gn[1].weight.detach().clone()
    adapter(batch())
    assert not torch.equal(gn[1].weight, w0) and torch.equal(gn[4].weight, gn[4].weight.detach())
    ln = nn.Sequential(nn.Flatten(), nn.Linear(108, 8), nn.LayerNorm(8), nn.Linear(8, 3))
    with pytest.warns(UserWarning, match="no BatchNorm"):
        assert TentAdapter(ln).adapted_names == ["2.weight", "2.bias"]
    assert collect_norm_params(tiny())[1] == ["bn.weight", "bn.bias"]  # BatchNorm present: only BatchNorm
    with pytest.raises(ValueError, match="TentAdapter: model must be a model with BatchNorm"):
        TentAdapter(nn.Sequential(nn.Flatten(), nn.Linear(108, 3)))
    with pytest.raises(ValueError, match="TentAdapter: mode must be one of"):
        TentAdapter(tiny(), mode="adapt")
    with pytest.raises(ValueError, match="TentAdapter: steps must be"):
        TentAdapter(tiny(), steps=0)


# ----------------------------------------------------------------------------------------------- real data


@pytest.mark.slow
def test_pretrained_resnet20_on_noisy_cifar10_norm_beats_source_and_tent_lowers_entropy():
    model = load_legacy_cifar_resnet(real_data("cifar10", "pretrained", RESNET20))
    data = np.load(real_data("cifar10", "test_jpeg_q75.npz"))
    # The file is sorted by class: a seeded random subset, else every batch is one class (a label shift that
    # batch statistics cannot survive).
    idx = torch.randperm(len(data["y"]), generator=torch.Generator().manual_seed(0))[:400].numpy()
    x = torch.from_numpy(data["x"][idx]).permute(0, 3, 1, 2).float().div(255)  # (400, 3, 32, 32) in [0, 1]
    y = torch.from_numpy(data["y"][idx])
    x = (x + 0.08 * torch.randn(x.shape, generator=torch.Generator().manual_seed(1))).clamp(0, 1)
    batches = [(x[i : i + 200], y[i : i + 200]) for i in range(0, 400, 200)]  # official CIFAR-10-C batch size

    def error(adapter):
        with torch.no_grad():
            wrong = sum((adapter(xb).argmax(1) != yb).sum().item() for xb, yb in batches)
        return wrong / len(y)

    errors = {mode: error(TentAdapter(copy.deepcopy(model), mode=mode)) for mode in ("source", "norm")}
    tent = TentAdapter(copy.deepcopy(model))
    errors["tent"] = error(tent)
    # Measured: source 0.77, norm 0.44, tent 0.44 (tent's first batch is norm's prediction exactly).
    assert errors["source"] > errors["norm"] + 0.15, errors
    assert errors["tent"] < errors["source"] - 0.15, errors
    start = tent.last_loss
    with torch.no_grad():
        tent(batches[1][0])  # the same batch again, after its own update
    assert tent.last_loss < start  # entropy went down


# ----------------------------------------------------------------------------------------------- Lightning


class TwoDomains(L.LightningDataModule):
    domains = ["clean", "shifted"]

    def __init__(self):
        super().__init__()
        g = torch.Generator().manual_seed(5)
        self.data = [
            (torch.randn(24, 3, 6, 6, generator=g), torch.randint(0, 3, (24,), generator=g)),
            (torch.randn(24, 3, 6, 6, generator=g) * 3 + 1, torch.randint(0, 3, (24,), generator=g)),
        ]

    def test_dataloader(self):
        return [DataLoader(TensorDataset(x, y), batch_size=8) for x, y in self.data]


class RecordingTent(TentModule):
    """Keeps the BN parameters as they are right after each domain starts (after any reset)."""

    def start_domain(self, dataloader_idx):
        super().start_domain(dataloader_idx)
        self.at_start = getattr(self, "at_start", {})
        bn = self.adapter.model.bn
        self.dropout_on = self.adapter.model.drop.training  # Lightning has called eval() by now
        self.at_start[dataloader_idx] = (bn.weight.detach().clone(), bn.bias.detach().clone())


def expected_error(model: nn.Module, loaders, **kwargs) -> float:
    adapter = TentAdapter(model, train_mode="norm", **kwargs)
    wrong = n = 0
    for x, y in loaders:
        wrong += (adapter(x).argmax(1) != y).sum().item()
        n += len(y)
    return wrong / n


def test_lightning_test_loop_adapts_per_domain_and_resets_between_domains(tmp_path):
    dm = TwoDomains()
    source = tiny()
    module = RecordingTent(copy.deepcopy(source), train_mode="norm")
    logger = TensorBoardLogger(tmp_path, name="tb")
    results = tiny_trainer(tmp_path, logger=logger).test(module, datamodule=dm)
    assert results[0].keys() >= {"test/error/clean", "test/entropy/clean"}
    assert results[1].keys() >= {"test/error/shifted", "test/entropy/shifted"}
    assert "test/error/shifted" not in results[0]
    # Each domain starts from the source weights and adapts batch by batch, exactly as a fresh adapter.
    for i, (name, loader) in enumerate(zip(dm.domains, dm.test_dataloader())):
        assert results[i][f"test/error/{name}"] == pytest.approx(expected_error(copy.deepcopy(source), loader))
        weight, bias = module.at_start[i]
        assert torch.equal(weight, source.bn.weight) and torch.equal(bias, source.bn.bias)
    rows = module.results
    assert [r["domain"] for r in rows] == dm.domains and [r["n"] for r in rows] == [24, 24]
    metrics = module.trainer.callback_metrics
    assert metrics["test/error_mean"].item() == pytest.approx((rows[0]["error"] + rows[1]["error"]) / 2)
    assert all(r["entropy"] > 0 for r in rows)
    out = tmp_path / "tb" / "version_0" / "tent"
    assert "| shifted |" in (out / "summary.md").read_text()
    assert (out / "summary.csv").read_text().splitlines()[0] == "domain,error,entropy,n"
    assert (out / "error_per_domain.png").stat().st_size > 0

    # Continual: no reset, the second domain starts where the first one ended.
    continual = RecordingTent(copy.deepcopy(source), train_mode="norm", reset="never", domains=["a", "b"])
    results = tiny_trainer(tmp_path).test(continual, datamodule=dm)
    assert "test/error/a" in results[0] and "test/error/b" in results[1]
    assert not torch.equal(continual.at_start[1][0], source.bn.weight)
    assert not module.dropout_on and not continual.dropout_on  # train_mode="norm"
    chained = [batch_ for loader in dm.test_dataloader() for batch_ in loader]
    expected = TentAdapter(copy.deepcopy(source), train_mode="norm")
    for x, _ in chained[:3]:
        expected(x)
    wrong = sum((expected(x).argmax(1) != y).sum().item() for x, y in chained[3:])
    assert results[1]["test/error/b"] == pytest.approx(wrong / 24)


class BoundaryRecorder(TentModule):
    """Keeps the BN parameters and Adam's step count at every domain boundary, before and after any reset."""

    def start_domain(self, dataloader_idx):
        bn = self.adapter.model.bn
        self.before = getattr(self, "before", {})
        self.after = getattr(self, "after", {})
        self.before[dataloader_idx] = clone_state(bn)
        super().start_domain(dataloader_idx)
        state = self.adapter.optimizer.state.get(bn.weight, {})
        self.after[dataloader_idx] = (clone_state(bn), int(state["step"]) if "step" in state else 0)


def test_online_variant_starts_each_domain_from_the_previous_domains_adapted_state(tmp_path):
    dm = TwoDomains()  # 3 batches of 8 per domain
    source = tiny()
    online = BoundaryRecorder(copy.deepcopy(source), train_mode="norm", reset="never")
    tiny_trainer(tmp_path).test(online, datamodule=dm)
    # Independent computation: one adapter fed the first domain's batches, then nothing else.
    reference = TentAdapter(copy.deepcopy(source), train_mode="norm")
    for x, _ in dm.test_dataloader()[0]:
        reference(x)
    adapted = clone_state(reference.model.bn)
    state, steps = online.after[1]
    assert all(torch.equal(state[k], adapted[k]) for k in ("weight", "bias"))  # no reset at the boundary
    assert all(torch.equal(state[k], online.before[1][k]) for k in state)
    assert not torch.equal(state["weight"], source.bn.weight)
    assert steps == 3  # Adam's moments and step count carry over too
    # A second trainer.test goes on from where the first ended (6 batches seen).
    tiny_trainer(tmp_path).test(online, datamodule=dm)
    assert online.after[0][1] == 6 and not torch.equal(online.after[0][0]["weight"], adapted["weight"])

    offline = BoundaryRecorder(copy.deepcopy(source), train_mode="norm")  # the default, reset per domain
    tiny_trainer(tmp_path).test(offline, datamodule=dm)
    assert torch.equal(offline.before[1]["weight"], adapted["weight"])  # it adapted as far, then forgot
    for i in (0, 1):
        state, steps = offline.after[i]
        assert torch.equal(state["weight"], source.bn.weight) and torch.equal(state["bias"], source.bn.bias)
        assert steps == 0


def test_defaults_and_configs_are_the_papers_protocol():
    defaults = {k: p.default for k, p in inspect.signature(TentModule).parameters.items()}
    assert defaults["mode"] == "tent" and defaults["lr"] == 1e-3 and defaults["steps"] == 1
    assert defaults["optimizer"] == "adam" and defaults["betas"] == (0.9, 0.999) and defaults["weight_decay"] == 0
    assert defaults["episodic"] is False and defaults["reset"] == "each_domain"
    configs = ROOT / "reprozoo" / "configs" / "tent"
    paper = yaml.safe_load((configs / "cifar10c_standard.yaml").read_text())
    online = yaml.safe_load((configs / "cifar10c_standard_online.yaml").read_text())
    model, data = paper["model"]["init_args"], paper["data"]["init_args"]
    assert model["model"] == "robustbench:Standard" and model["reset"] == "each_domain"
    assert (model["lr"], model["steps"], model["optimizer"]) == (0.001, 1, "adam")
    # One pass over each corruption's whole test set (no subset), batch 200, severity 5, the published files.
    assert data == {"source": "official", "severities": [5], "batch_size": 200}
    assert online["model"]["init_args"] == {**model, "episodic": False, "reset": "never"}
    assert online["data"] == paper["data"]
    generated = yaml.safe_load((configs / "resnet20_generated.yaml").read_text())
    generated_online = yaml.safe_load((configs / "resnet20_generated_online.yaml").read_text())
    assert generated_online["model"]["init_args"] == {
        **generated["model"]["init_args"],
        "episodic": False,
        "reset": "never",
    }
    assert generated_online["data"] == generated["data"]


def test_lightning_module_refuses_to_fit_and_names_its_fields(tmp_path):
    module = TentModule(tiny())
    loader = DataLoader(TensorDataset(batch(n=8), torch.zeros(8, dtype=torch.long)), batch_size=4)
    with pytest.raises(RuntimeError, match="TentModule does not train"):
        tiny_trainer(tmp_path, max_epochs=1).fit(module, loader)
    with pytest.raises(ValueError, match="TentModule: reset must be"):
        TentModule(tiny(), reset="sometimes")
    with pytest.raises(ValueError, match="TentModule: model must be"):
        TentModule("no-such-model")
    # One unnamed test dataloader: domain0; predictions through predict adapt too.
    default = RecordingTent(tiny())
    results = tiny_trainer(tmp_path).test(default, dataloaders=loader)
    assert "test/error/domain0" in results[0]
    assert default.dropout_on  # train_mode="all" survives Lightning's eval()
    preds = tiny_trainer(tmp_path).predict(TentModule(tiny()), dataloaders=loader)
    assert preds[0]["logits"].shape == (4, 3)


def test_load_classifier_reads_legacy_resnets_and_wide_resnet_files(tmp_path):
    net = load_classifier(str(real_data("cifar10", "pretrained", RESNET20)))
    assert isinstance(net, CifarResNet) and net.depth == 20 and net.normalize
    wrn = WideResNet(depth=16, widen_factor=2, num_classes=5).eval()
    path = tmp_path / "wrn.pt"
    torch.save({"state_dict": {"module." + k: v for k, v in wrn.state_dict().items()}}, path)
    loaded = load_classifier(str(path))
    assert isinstance(loaded, WideResNet) and (loaded.depth, loaded.widen_factor, loaded.num_classes) == (16, 2, 5)
    x = torch.rand(2, 3, 32, 32)
    with torch.no_grad():
        assert torch.equal(loaded(x), wrn(x))
    torch.save({"state_dict": {"conv.weight": torch.zeros(1)}}, path)
    with pytest.raises(WeightsError, match="wrn.pt holds neither"):
        load_classifier(str(path))


# ----------------------------------------------------------------------------------------------- WRN and RobustBench


def test_wide_resnet28_10_has_robustbench_standard_size_and_keys():
    torch.manual_seed(0)
    wrn = wide_resnet28_10()
    assert sum(p.numel() for p in wrn.parameters()) == 36_479_194  # RobustBench's Standard
    keys = set(wrn.state_dict())
    assert {
        "conv1.weight",
        "block1.layer.0.bn1.weight",
        "block1.layer.0.convShortcut.weight",
        "block3.layer.3.conv2.weight",
        "bn1.running_var",
        "fc.weight",
        "fc.bias",
    } <= keys
    assert "block1.layer.1.convShortcut.weight" not in keys
    assert sum(isinstance(m, nn.BatchNorm2d) for m in wrn.modules()) == 25
    small = WideResNet(depth=10, widen_factor=1)
    assert small(torch.rand(2, 3, 32, 32)).shape == (2, 10)
    with pytest.raises(ValueError, match="WideResNet: depth must"):
        WideResNet(depth=27)


def _robustbench_or_skip():
    """robustbench is in the dev extra: an error in CI, a skip only in a clone installed without it."""
    try:
        return _robustbench.import_robustbench()
    except ImportError as err:
        if os.environ.get("CI"):
            raise
        pytest.skip(f"robustbench is not installed ({_robustbench.PIP_INSTALL}): {err}")


@pytest.mark.slow
def test_robustbench_shim_loads_a_local_standard_checkpoint_offline(tmp_path):
    _robustbench_or_skip()
    assert "autoattack" not in sys.modules or sys.modules["autoattack"].__name__ == "autoattack"  # no alias left
    with pytest.raises(WeightsError, match="not in the cache and offline.*Standard.pt"):
        _robustbench.load_robustbench_model("Standard", model_dir=tmp_path / "empty", offline=True)
    torch.manual_seed(0)
    wrn = wide_resnet28_10().eval()
    with torch.no_grad():
        for m in wrn.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.running_mean.uniform_(-0.1, 0.1)
                m.running_var.uniform_(0.5, 2.0)
    path = _robustbench.robustbench_checkpoint_path("Standard", "cifar10", "corruptions", tmp_path)
    assert path == tmp_path / "cifar10" / "corruptions" / "Standard.pt"
    path.parent.mkdir(parents=True)
    torch.save({"state_dict": wrn.state_dict()}, path)  # RobustBench's layout
    model = _robustbench.load_robustbench_model("Standard", model_dir=tmp_path, offline=True)
    assert type(model).__module__.startswith("robustbench.") and not model.training
    x = torch.rand(2, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert torch.allclose(model(x), wrn(x), atol=1e-4)
        assert torch.allclose(load_wide_resnet_checkpoint(path)(x), wrn(x), atol=1e-4)
    module = TentModule("robustbench:Standard", robustbench_dir=str(tmp_path))
    assert module.num_classes == 10 and len(module.adapter.adapted_names) == 50


def test_write_summary_false_writes_no_files_and_changes_no_result(tmp_path):
    dm, source = TwoDomains(), tiny()
    results, rows = {}, {}
    for write in (True, False):
        root = tmp_path / str(write)
        module = TentModule(copy.deepcopy(source), train_mode="norm", write_summary=write)
        results[write] = tiny_trainer(root).test(module, datamodule=dm, verbose=False)
        rows[write] = module.results
        written = sorted(p.name for p in root.rglob("*") if p.is_file())
        assert written == (["error_per_domain.png", "summary.csv", "summary.md"] if write else [])
    assert results[False] == results[True] and rows[False] == rows[True]
    with pytest.raises(ValueError, match="TentModule: write_summary must be"):
        TentModule(tiny(), write_summary="no")


def _adapted(adapter: TentAdapter, seeds=(1, 2, 3)) -> torch.Tensor:
    with torch.no_grad():
        return torch.cat([adapter(batch(seed)) for seed in seeds])


def test_channels_last_converts_model_and_inputs_and_adapts_as_the_default_layout(tmp_path):
    source = tiny(dropout=0.0)
    plain = TentAdapter(copy.deepcopy(source), train_mode="norm")
    fast = TentAdapter(copy.deepcopy(source), train_mode="norm", channels_last=True)
    assert fast.model.conv.weight.is_contiguous(memory_format=torch.channels_last)
    seen = []
    fast.model.conv.register_forward_pre_hook(lambda m, args: seen.append(args[0]))
    expected, got = _adapted(plain), _adapted(fast)
    assert all(x.is_contiguous(memory_format=torch.channels_last) for x in seen)
    # Another summation order, the same method: close logits, the same predictions, the same adapted weights.
    assert torch.allclose(got, expected, rtol=1e-4, atol=1e-5) and torch.equal(got.argmax(1), expected.argmax(1))
    assert torch.allclose(fast.model.bn.weight, plain.model.bn.weight, atol=1e-5)
    fast.reset()
    assert torch.equal(fast.model.bn.weight, source.bn.weight)
    assert fast.model.conv.weight.is_contiguous(memory_format=torch.channels_last)
    for mode in ("norm", "source"):
        a, b = (TentAdapter(copy.deepcopy(source), mode=mode, channels_last=cl) for cl in (False, True))
        assert torch.allclose(_adapted(a), _adapted(b), rtol=1e-4, atol=1e-5)
    # Through the Trainer: the option reaches the adapter, the errors are the default layout's.
    dm = TwoDomains()
    results = [
        tiny_trainer(tmp_path).test(
            TentModule(copy.deepcopy(source), train_mode="norm", write_summary=False, channels_last=cl),
            datamodule=dm,
            verbose=False,
        )
        for cl in (False, True)
    ]
    for default, fast_row in zip(*results):
        assert default.keys() == fast_row.keys()
        for key in default:
            same = pytest.approx(default[key], abs=1e-6) if "entropy" in key else default[key]
            assert fast_row[key] == same
    with pytest.raises(ValueError, match="TentAdapter: channels_last must be"):
        TentAdapter(tiny(), channels_last=1)


@pytest.mark.slow
def test_compile_adapts_as_eager_and_resets(tmp_path):
    source = tiny(dropout=0.0)
    eager = TentAdapter(copy.deepcopy(source), train_mode="norm")
    compiled = TentAdapter(copy.deepcopy(source), train_mode="norm", compile=True)
    assert torch.allclose(_adapted(compiled), _adapted(eager), rtol=1e-4, atol=1e-5)
    assert set(compiled.model.state_dict()) == set(eager.model.state_dict())  # no _orig_mod. prefix: reset works
    compiled.reset()
    assert torch.equal(compiled.model.bn.weight, source.bn.weight)
    eager.reset()
    assert torch.allclose(_adapted(compiled), _adapted(eager), rtol=1e-4, atol=1e-5)
    module = TentModule(copy.deepcopy(source), train_mode="norm", write_summary=False, compile=True)
    results = tiny_trainer(tmp_path).test(module, datamodule=TwoDomains(), verbose=False)
    for i, (name, loader) in enumerate(zip(TwoDomains.domains, TwoDomains().test_dataloader())):
        assert results[i][f"test/error/{name}"] == pytest.approx(expected_error(copy.deepcopy(source), loader))
    with pytest.raises(ValueError, match="TentAdapter: compile must be"):
        TentAdapter(tiny(), compile="yes")
