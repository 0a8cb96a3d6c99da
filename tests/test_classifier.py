import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from reprozoo.cli import run_lightning
from reprozoo.methods.classifier import ClassifierModule
from reprozoo.nets import MLP
from reprozoo.zoo import export_checkpoint, registry
from tests.conftest import ROOT
from tests.helpers import tiny_trainer
from tests.test_animal_faces import make_afhq

FIT_QUIET = dict(enable_checkpointing=False)


def blobs(n: int, seed: int = 0, dim: int = 2) -> TensorDataset:
    """Three Gaussian blobs (std 0.5) around well separated centres; labels 0, 1, 2 in turn."""
    g = torch.Generator().manual_seed(seed)
    centres = torch.tensor([[2.0, 0.0], [-1.0, 1.7], [-1.0, -1.7]])
    if dim > 2:
        centres = torch.cat([centres, torch.zeros(3, dim - 2)], dim=1)
    y = torch.arange(n) % 3
    return TensorDataset(centres[y] + 0.5 * torch.randn(n, dim, generator=g), y)


def loaders(n_train=96, n_val=50, batch_size=32, val_batch_size=20, dim=2):
    train = DataLoader(blobs(n_train, 0, dim), batch_size=batch_size, shuffle=True)
    val = DataLoader(blobs(n_val, 1, dim), batch_size=val_batch_size)
    return train, val


def linear_weights(net: nn.Module) -> list[torch.Tensor]:
    return [m.weight for m in net.modules() if isinstance(m, nn.Linear)]


# ------------------------------------------------------------------ the objective


def test_penalties_equal_a_hand_computation():
    torch.manual_seed(0)
    net = MLP(6, 3, hidden=(5, 4), norm="batch")
    model = ClassifierModule(net, l1=0.1, l2=0.01).eval()
    weights = linear_weights(net)  # the BatchNorm scales are 1-d: not penalised
    expected = sum(0.1 * w.abs().sum() + 0.01 * (w * w).sum() for w in weights)
    assert torch.allclose(model.penalty(), expected)
    assert {id(p) for p in model.penalized_parameters()} == {id(w) for w in weights}

    x, y = torch.randn(8, 6), torch.randint(0, 3, (8,))
    assert torch.allclose(model.loss((x, y))["loss"], F.cross_entropy(net(x), y) + expected)
    assert torch.allclose(model.loss({"x": x, "y": y})["loss"], model.loss((x, y))["loss"])

    model.penalty().backward()  # d/dw (l1 |w| + l2 w^2) = l1 sign(w) + 2 l2 w
    head = net.head.weight
    assert torch.allclose(head.grad, 0.1 * head.sign() + 0.02 * head.detach())
    assert net.head.bias.grad is None

    every = ClassifierModule(net, l1=0.1, penalize="all")
    assert torch.allclose(every.penalty(), sum(0.1 * p.abs().sum() for p in net.parameters()))
    smooth = ClassifierModule(net, label_smoothing=0.2).eval()
    assert torch.allclose(smooth.loss((x, y))["loss"], F.cross_entropy(net(x), y, label_smoothing=0.2))
    assert ClassifierModule(net).penalty().item() == 0.0


def test_fit_reduces_loss_and_logs_exact_metrics(tmp_path):
    torch.manual_seed(0)
    train, val = loaders()
    model = ClassifierModule(MLP(2, 3, hidden=(16,)), lr=0.05, l1=1e-4, l2=1e-3)
    everything = (train.dataset.tensors[0], train.dataset.tensors[1])
    before = model.eval().loss(everything)["loss"].item()
    model.train()
    trainer = tiny_trainer(tmp_path, max_epochs=12, **FIT_QUIET)
    trainer.fit(model, train, val)
    after = model.eval().loss(everything)["loss"].item()
    assert after < 0.3 * before
    metrics = trainer.callback_metrics
    assert {"train/ce", "train/penalty", "train/loss", "train/acc", "val/loss", "val/acc"} <= set(metrics)
    assert metrics["train/penalty"] > 0 and metrics["train/acc"] > 0.9
    assert torch.allclose(metrics["train/loss"], metrics["train/ce"] + metrics["train/penalty"], atol=1e-5)

    # val metrics are over the whole split, batches weighted by size (50 items in batches of 20, 20, 10)
    xv, yv = val.dataset.tensors
    with torch.no_grad():
        logits = model.eval()(xv)
    assert torch.allclose(metrics["val/loss"], F.cross_entropy(logits, yv), atol=1e-5)
    assert metrics["val/acc"].item() == pytest.approx((logits.argmax(1) == yv).float().mean().item())

    (result,) = trainer.test(model, val, verbose=False)
    assert result["test/acc"] == pytest.approx(metrics["val/acc"].item())
    assert result["test/loss"] == pytest.approx(metrics["val/loss"].item(), abs=1e-5)

    outputs = trainer.predict(model, val)
    assert set(outputs[0]) == {"logits", "probs", "pred"}
    probs = torch.cat([o["probs"] for o in outputs])
    assert probs.shape == (50, 3) and torch.allclose(probs.sum(1), torch.ones(50))
    assert torch.equal(torch.cat([o["pred"] for o in outputs]), logits.argmax(1))
    assert model.predict_step(xv[:4], 0)["logits"].shape == (4, 3)


@pytest.mark.parametrize("accumulate", [1, 2])
def test_max_norm_follows_every_optimizer_step(tmp_path, accumulate):
    torch.manual_seed(0)
    net = MLP(2, 3, hidden=(8,), max_norm=0.5)
    calls = []
    project = net.apply_max_norm
    net.apply_max_norm = lambda: (calls.append(1), project())
    train, _ = loaders(n_train=128, batch_size=32)  # 4 batches per epoch
    model = ClassifierModule(net, optimizer="sgd", lr=1.0)
    trainer = tiny_trainer(tmp_path, max_epochs=2, accumulate_grad_batches=accumulate, **FIT_QUIET)
    trainer.fit(model, train)
    assert trainer.global_step == 8 // accumulate
    assert len(calls) == 8 // accumulate  # once per optimizer step, not per batch
    assert (net.hidden[0].linear.weight.norm(dim=1) <= 0.5 + 1e-5).all()


# ------------------------------------------------------------------ optimizers and schedulers


@pytest.mark.parametrize(
    "kwargs, optimizer_type, lr_after_two_epochs",
    [
        ({"optimizer": "sgd", "nesterov": True, "momentum": 0.8}, torch.optim.SGD, 0.1),
        ({"optimizer": "adam", "scheduler": "step", "step_size": 1, "gamma": 0.5}, torch.optim.Adam, 0.025),
        ({"optimizer": "adamw", "weight_decay": 0.01, "scheduler": "cosine"}, torch.optim.AdamW, 0.0),
    ],
)
def test_optimizers_and_schedulers(tmp_path, kwargs, optimizer_type, lr_after_two_epochs):
    train, _ = loaders(n_train=32)
    model = ClassifierModule(MLP(2, 3, hidden=(4,)), lr=0.1, **kwargs)
    trainer = tiny_trainer(tmp_path, max_epochs=2, **FIT_QUIET)
    trainer.fit(model, train)
    (opt,) = trainer.optimizers
    assert type(opt) is optimizer_type
    group = opt.param_groups[0]
    assert group["lr"] == pytest.approx(lr_after_two_epochs, abs=1e-12)
    assert group["weight_decay"] == kwargs.get("weight_decay", 0.0)
    if kwargs["optimizer"] == "sgd":
        assert group["nesterov"] and group["momentum"] == 0.8


def test_cosine_over_steps_when_only_max_steps_is_set(tmp_path):
    train, _ = loaders(n_train=64, batch_size=8)
    model = ClassifierModule(MLP(2, 3, hidden=(4,)), lr=0.1, scheduler="cosine")
    trainer = tiny_trainer(tmp_path, max_epochs=None, max_steps=4, **FIT_QUIET)
    trainer.fit(model, train)
    (config,) = trainer.lr_scheduler_configs
    assert config.interval == "step" and config.scheduler.T_max == 4
    assert trainer.optimizers[0].param_groups[0]["lr"] == pytest.approx(0.0, abs=1e-12)


# ------------------------------------------------------------------ fields


@pytest.mark.parametrize(
    "kwargs, field",
    [
        ({"lr": 0}, "lr"),
        ({"l1": -1e-3}, "l1"),
        ({"l2": -1e-3}, "l2"),
        ({"optimizer": "rmsprop"}, "optimizer"),
        ({"momentum": 1.0}, "momentum"),
        ({"nesterov": True}, "nesterov"),  # adam
        ({"optimizer": "sgd", "nesterov": True, "momentum": 0.0}, "nesterov"),
        ({"weight_decay": -1}, "weight_decay"),
        ({"label_smoothing": 1.0}, "label_smoothing"),
        ({"scheduler": "linear"}, "scheduler"),
        ({"step_size": 0}, "step_size"),
        ({"gamma": 0}, "gamma"),
        ({"penalize": "biases"}, "penalize"),
        ({"num_classes": 4}, "num_classes"),  # the net has 3
        ({"net": nn.Linear(2, 3)}, "num_classes"),  # no num_classes to infer
        ({"net": nn.Linear(2, 1), "num_classes": 1}, "num_classes"),
        ({"net": None}, "net"),
        ({"net": "resnet7"}, "net"),
    ],
)
def test_bad_fields_are_named(kwargs, field):
    kwargs = {"net": MLP(2, 3), **kwargs}
    with pytest.raises(ValueError, match=f"ClassifierModule: {field} must"):
        ClassifierModule(**kwargs)


def test_num_classes_given_for_a_plain_module_and_unknown_zoo_weights():
    model = ClassifierModule(nn.Linear(2, 3), num_classes=3)
    assert model.num_classes == 3 and model(torch.randn(4, 2)).shape == (4, 3)
    with pytest.raises(registry.WeightsError, match="nope.nothing"):
        ClassifierModule("animalnet", weights="nope.nothing")


# ------------------------------------------------------------------ checkpoints


def _saved(tmp_path, model: ClassifierModule, dim: int) -> str:
    train, _ = loaders(n_train=16, batch_size=16, dim=dim)
    trainer = tiny_trainer(tmp_path, max_steps=1, **FIT_QUIET)
    trainer.fit(model, train)
    path = str(tmp_path / "model.ckpt")
    trainer.save_checkpoint(path)
    return path


def test_checkpoint_of_a_named_net_loads_without_arguments(tmp_path):
    model = ClassifierModule("animalnet", lr=0.01)
    assert model.hparams.net == "animalnet" and model.num_classes == 3
    path = _saved(tmp_path, model, dim=3 * 32 * 32)
    loaded = ClassifierModule.load_from_checkpoint(path)
    assert isinstance(loaded.net, MLP) and loaded.hparams.lr == 0.01
    assert all(torch.equal(a, b) for a, b in zip(loaded.state_dict().values(), model.state_dict().values()))


def test_checkpoint_of_a_python_net_needs_the_net_again(tmp_path):
    model = ClassifierModule(MLP(2, 3, hidden=(5,)))
    assert model.hparams.net is None and "net" not in model.hparams_initial  # the module is never pickled
    path = _saved(tmp_path, model, dim=2)
    assert torch.load(path, weights_only=False)["hyper_parameters"]["net"] is None
    with pytest.raises(ValueError, match="ClassifierModule: net must be .*load_from_checkpoint"):
        ClassifierModule.load_from_checkpoint(path)
    loaded = ClassifierModule.load_from_checkpoint(path, net=MLP(2, 3, hidden=(5,)))
    assert torch.equal(loaded.net.head.weight, model.net.head.weight)


def _afhq_args(data_dir) -> list[str]:
    return [
        "--model",
        "reprozoo.methods.classifier.ClassifierModule",
        "--data",
        "reprozoo.datamodules.AnimalFacesDataModule",
        "--data.data_dir",
        str(data_dir),
        "--data.batch_size",
        "6",
        "--trainer.max_epochs",
        "2",
        "--trainer.logger",
        "false",
        "--trainer.enable_progress_bar",
        "false",
        "--trainer.enable_model_summary",
        "false",
    ]


@pytest.mark.slow
def test_cli_fit_then_load_from_checkpoint_without_arguments(tmp_path):
    """A net given by class_path on the command line is recorded in the checkpoint's hyperparameters."""
    make_afhq(tmp_path / "data", n_train=4, n_val=2)
    net = '{"class_path": "reprozoo.nets.MLP", "init_args": {"in_features": 192, "num_classes": 3, "hidden": [16], "max_norm": 3.0}}'
    args = [
        "fit",
        *_afhq_args(tmp_path / "data"),
        "--data.image_size",
        "8",
        "--model.net",
        net,
        "--model.l2",
        "0.001",
        "--model.optimizer",
        "sgd",
        "--model.lr",
        "0.05",
        "--trainer.default_root_dir",
        str(tmp_path),
        "--checkpoint.dirpath",
        str(tmp_path / "ckpt"),
    ]
    done = subprocess.run(
        [sys.executable, str(ROOT / "cli.py"), *args], cwd=tmp_path, capture_output=True, text=True, timeout=600
    )
    assert done.returncode == 0, done.stderr[-3000:]
    ckpt = tmp_path / "ckpt" / "last.ckpt"
    saved = torch.load(ckpt, map_location="cpu", weights_only=False)
    assert saved["hyper_parameters"]["net"]["class_path"] == "reprozoo.nets.MLP"
    model = ClassifierModule.load_from_checkpoint(ckpt)
    assert isinstance(model.net, MLP) and model.net.max_norm == 3.0 and model.hparams.l2 == 0.001
    for key, value in model.state_dict().items():
        assert torch.equal(value, saved["state_dict"][key]), key
    assert model.eval()(torch.randn(5, 3, 8, 8)).shape == (5, 3)
    # and on to a zoo file, which rebuilds the net from the recorded class_path
    _, card = export_checkpoint(ckpt, "classifier_mlp.tiny", tmp_path / "zoo")
    rebuilt = registry.load_model(card)
    assert torch.equal(rebuilt.net.head.weight, model.net.head.weight)


def test_cli_accepts_a_registered_net_name(tmp_path, monkeypatch):
    make_afhq(tmp_path / "data", n_train=2, n_val=1)
    monkeypatch.chdir(tmp_path)
    cli = run_lightning(
        [
            "fit",
            *_afhq_args(tmp_path / "data"),
            "--model.net",
            "animalnet",
            "--trainer.max_epochs",
            "1",
            "--checkpoint.dirpath",
            str(tmp_path / "ckpt"),
        ]
    )
    assert cli.model.hparams.net == "animalnet" and isinstance(cli.model.net, MLP)
    loaded = ClassifierModule.load_from_checkpoint(tmp_path / "ckpt" / "last.ckpt")
    assert torch.equal(loaded.net.head.weight, cli.model.net.head.weight)


def test_loss_is_usable_by_callbacks_outside_training():
    """Other callbacks (e.g. loss-landscape probes) evaluate ``module.loss(batch)`` on their own."""
    torch.manual_seed(0)
    model = ClassifierModule(MLP(2, 3, hidden=(4,)), l2=0.1).eval()
    batch = blobs(12)[:]
    with torch.no_grad():
        out = model.loss(batch)
    value = out["loss"]
    assert value.dim() == 0 and value.item() > model.penalty().item() > 0
    assert out["loss"] == out["ce"] + out["penalty"]
    x, y = batch
    assert out["accuracy"] == (model(x).argmax(-1) == y).float().mean()


def test_validate_before_fit_then_fit(tmp_path):
    """trainer.validate resets the metrics under inference mode; fit must still update them afterwards."""
    torch.manual_seed(0)
    model = ClassifierModule(MLP(2, 3, hidden=(8,)), lr=0.05, per_class_metrics=True)
    train, val = loaders()
    trainer = tiny_trainer(tmp_path, max_epochs=2, enable_checkpointing=False)
    before = trainer.validate(model, val, verbose=False)[0]["val/loss"]
    trainer.fit(model, train, val)
    assert trainer.callback_metrics["val/loss"] < before
    assert "val/acc_class/2" in trainer.callback_metrics
