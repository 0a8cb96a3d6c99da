"""DistillationModule and distillation_loss: the loss against an independent computation, the frozen teacher kept out
of everything the student owns, the teacher-logit cache, runs on the real MNIST test images, and the transfer set of
the paper's section 3 experiments: a left-out class absent from everything the student's run sees, the 7s-and-8s
transfer set, and the logit bias tuned on held-out data, never the test split."""

from __future__ import annotations

import math
import warnings

import lightning as L
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from reprozoo.datamodules import FashionMNISTDataModule
from reprozoo.datamodules.fashion_mnist import TransferSetMNISTDataModule
from reprozoo.methods.distillation import DistillationModule, distillation_loss, load_teacher, tune_logit_bias
from reprozoo.nets import MLP
from reprozoo.zoo.registry import WeightsError
from tests.conftest import real_data
from tests.helpers import tiny_trainer

pytestmark = pytest.mark.filterwarnings("ignore:.*does not have many workers:UserWarning")


# ------------------------------------------------------------------------------------------------------- the loss


def _reference(s: torch.Tensor, t: torch.Tensor, y: torch.Tensor, T: float, alpha: float) -> torch.Tensor:
    """Written out in float64 from the definition, with explicit softmax and sums."""
    s, t = s.double(), t.double()
    p_t = torch.exp(t / T) / torch.exp(t / T).sum(-1, keepdim=True)
    p_s = torch.exp(s / T) / torch.exp(s / T).sum(-1, keepdim=True)
    kl = (p_t * (torch.log(p_t) - torch.log(p_s))).sum(-1).mean()
    q = torch.exp(s) / torch.exp(s).sum(-1, keepdim=True)
    ce = -torch.log(q[torch.arange(len(y)), y]).mean()
    return alpha * T * T * kl + (1 - alpha) * ce


@pytest.mark.parametrize("T, alpha", [(1.0, 0.5), (4.0, 0.5), (20.0, 0.9), (2.5, 1.0), (3.0, 0.0)])
def test_loss_matches_the_definition(T, alpha):
    g = torch.Generator().manual_seed(0)
    s, t = torch.randn(16, 10, generator=g) * 3, torch.randn(16, 10, generator=g) * 3
    y = torch.randint(0, 10, (16,), generator=g)
    got = distillation_loss(s, t, y, temperature=T, alpha=alpha)
    assert got.item() == pytest.approx(_reference(s, t, y, T, alpha).item(), rel=1e-5, abs=1e-6)


def test_t1_alpha0_is_cross_entropy_and_alpha1_needs_no_labels():
    s, t = torch.randn(8, 5), torch.randn(8, 5)
    y = torch.randint(0, 5, (8,))
    assert torch.allclose(distillation_loss(s, t, y, temperature=1.0, alpha=0.0), F.cross_entropy(s, y))
    soft_only = distillation_loss(s, t, None, temperature=2.0, alpha=1.0)
    assert soft_only.item() == pytest.approx(_reference(s, t, y, 2.0, 1.0).item(), rel=1e-5)
    assert distillation_loss(t, t, None, temperature=3.0, alpha=1.0).item() == pytest.approx(0.0, abs=1e-6)


def test_t_squared_keeps_the_soft_gradient_size():
    """Soft-term gradients scale as 1/T^2 (paper, section 2); the T^2 factor undoes it."""
    g = torch.Generator().manual_seed(1)
    s0, t = torch.randn(64, 10, generator=g), torch.randn(64, 10, generator=g)

    def grad_norm(T: float, scaled: bool) -> float:
        s = s0.clone().requires_grad_(True)
        loss = distillation_loss(s, t, None, temperature=T, alpha=1.0)
        (loss if scaled else loss / T**2).backward()
        return s.grad.norm().item()

    with_t2 = [grad_norm(T, True) for T in (4.0, 10.0, 20.0, 40.0)]
    without = [grad_norm(T, False) for T in (4.0, 10.0, 20.0, 40.0)]
    assert max(with_t2) / min(with_t2) < 1.3  # roughly constant
    assert without[0] / without[-1] > 50  # ~ (40/4)^2 = 100 without it


def test_loss_is_finite_where_naive_softmax_underflows():
    s = torch.tensor([[1000.0, -1000.0, 0.0]], requires_grad=True)
    t = torch.tensor([[-1000.0, 1000.0, 0.0]])
    loss = distillation_loss(s, t, torch.tensor([0]), temperature=1.0, alpha=0.5)
    loss.backward()
    assert torch.isfinite(loss) and torch.isfinite(s.grad).all()


@pytest.mark.parametrize(
    "kwargs, field",
    [
        ({"temperature": 0.0}, "temperature"),
        ({"temperature": -1.0}, "temperature"),
        ({"alpha": 1.5}, "alpha"),
        ({"alpha": -0.1}, "alpha"),
    ],
)
def test_bad_loss_arguments(kwargs, field):
    with pytest.raises(ValueError, match=field):
        distillation_loss(torch.zeros(2, 3), torch.zeros(2, 3), torch.zeros(2, dtype=torch.long), **kwargs)
    with pytest.raises(ValueError, match=field):
        DistillationModule(MLP(4, 3), MLP(4, 3), **kwargs)
    with pytest.raises(ValueError, match="logits"):
        distillation_loss(torch.zeros(2, 3), torch.zeros(2, 4), None, alpha=1.0)


# ------------------------------------------------------------------------------------------------------- the module


class Teacher(nn.Module):
    """BatchNorm + dropout, so that a teacher wrongly put in train mode would change its statistics and outputs."""

    def __init__(self):
        super().__init__()
        self.num_classes = 10
        self.body = nn.Sequential(
            nn.Flatten(), nn.Linear(784, 64), nn.BatchNorm1d(64), nn.ReLU(), nn.Dropout(0.5), nn.Linear(64, 10)
        )
        self.calls = 0  # items seen

    def forward(self, x):
        self.calls += len(x)
        return self.body(x)


class Watch(L.Callback):
    """Records the teacher's mode and gradient flags at every training batch."""

    def __init__(self):
        self.modes: list[bool] = []
        self.grads: list[bool] = []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self.modes.append(pl_module.teacher.training)
        self.grads.append(any(p.grad is not None or p.requires_grad for p in pl_module.teacher.parameters()))


def _real_mnist_args() -> dict:
    """Real MNIST test images, read in place: 600 for training (minus val) and 200 for testing."""
    return dict(
        dataset="mnist",
        data_dir=str(real_data("mnist")),
        train_source="test",
        num_train=600,
        num_test=200,
        val_size=100,
        flatten=True,
        batch_size=100,
    )


def _mnist(**kwargs) -> FashionMNISTDataModule:
    return FashionMNISTDataModule(**(_real_mnist_args() | kwargs))


def _trainer(tmp_path, **kwargs) -> L.Trainer:
    return tiny_trainer(tmp_path, **({"deterministic": True} | kwargs))


def _student() -> MLP:
    return MLP(784, 10, hidden=(32,))


def test_teacher_frozen_in_eval_mode_and_outside_the_checkpoint(tmp_path):
    torch.manual_seed(0)
    teacher = Teacher().eval()
    bn_before = {k: v.clone() for k, v in teacher.state_dict().items()}
    model = DistillationModule(_student(), teacher, temperature=4.0, alpha=0.5, lr=0.05)
    assert all(not p.requires_grad for p in teacher.parameters())
    assert not any(k.startswith("teacher") or "_teacher" in k for k in model.state_dict())
    watch = Watch()
    trainer = _trainer(tmp_path, callbacks=[watch], enable_checkpointing=True)
    trainer.fit(model, datamodule=_mnist())
    assert watch.modes and not any(watch.modes) and not any(watch.grads)
    assert all(torch.equal(bn_before[k], v) for k, v in teacher.state_dict().items())  # running stats untouched
    optimised = {id(p) for group in trainer.optimizers[0].param_groups for p in group["params"]}
    assert optimised == {id(p) for p in model.net.parameters()}
    ckpt = torch.load(trainer.checkpoint_callback.best_model_path, map_location="cpu", weights_only=False)
    assert set(ckpt["state_dict"]) == set(model.state_dict())
    assert ckpt["hyper_parameters"]["teacher"] is None and ckpt["hyper_parameters"]["student"] is None
    assert "net" not in ckpt["hyper_parameters"]
    loaded = DistillationModule.load_from_checkpoint(trainer.checkpoint_callback.best_model_path, student=_student())
    assert loaded.teacher is None and torch.equal(loaded.net.head.weight, model.net.head.weight)
    assert model.to(torch.float64).teacher.body[1].weight.dtype == torch.float64  # moves with the module


def test_distillation_logs_per_class_accuracy_and_applies_the_logit_bias(tmp_path):
    torch.manual_seed(0)
    teacher = Teacher().eval()
    model = DistillationModule(_student(), teacher, temperature=2.0, alpha=0.7, lr=0.1, logit_bias={3: 2.0})
    trainer = _trainer(tmp_path, max_epochs=3)
    dm = _mnist()
    trainer.fit(model, datamodule=dm)
    assert "train/distill_epoch" in trainer.callback_metrics
    metrics = trainer.validate(model, datamodule=dm, verbose=False)[0]
    assert {f"val/acc_class/{k}" for k in range(10)} <= set(metrics)
    x = torch.stack([dm.splits["test"][i][0] for i in range(8)])
    with torch.no_grad():
        shift = model.eval_logits(x) - model.net(x)
    assert torch.allclose(shift[:, 3], torch.full((8,), 2.0)) and shift[:, [0, 1, 2, 4]].abs().max() == 0


def test_teacher_cache_computes_each_example_once_and_changes_nothing(tmp_path):
    results = {}
    for cache in (False, True):
        L.seed_everything(0, verbose=False)
        teacher = Teacher().eval()
        model = DistillationModule(_student(), teacher, cache_teacher=cache, lr=0.05)
        dm = _mnist(return_index=True)
        _trainer(tmp_path, max_epochs=3, num_sanity_val_steps=0, limit_val_batches=0, enable_checkpointing=False).fit(
            model, datamodule=dm
        )
        results[cache] = (teacher.calls, [p.detach().clone() for p in model.net.parameters()])
        n = len(dm.splits["train"])
    assert results[False][0] == 3 * n and results[True][0] == n
    assert all(torch.allclose(a, b, atol=1e-6) for a, b in zip(results[False][1], results[True][1]))


@pytest.mark.parametrize(
    "data_kwargs, message",
    [({"jitter": 2, "return_index": True}, "deterministic_train_transform"), ({"return_index": False}, "return_index")],
)
def test_teacher_cache_refused_when_invalid(tmp_path, data_kwargs, message):
    model = DistillationModule(_student(), Teacher(), cache_teacher=True)
    with pytest.raises(RuntimeError, match=message):
        _trainer(tmp_path, max_epochs=1).fit(model, datamodule=_mnist(**data_kwargs))


def test_teacher_from_a_cli_checkpoint_and_errors(tmp_path):
    from reprozoo.cli import run_lightning

    with warnings.catch_warnings():
        warnings.filterwarnings("ignore")
        run_lightning(
            [
                "fit",
                "--model",
                "reprozoo.methods.classifier.ClassifierModule",
                "--model.net",
                "mlp_fmnist",
                "--data",
                "reprozoo.datamodules.FashionMNISTDataModule",
                "--data.dataset",
                "mnist",
                "--data.data_dir",
                str(real_data("mnist")),
                "--data.train_source",
                "test",
                "--data.num_train",
                "300",
                "--data.num_test",
                "100",
                "--data.flatten",
                "true",
                "--trainer.max_epochs",
                "1",
                "--trainer.logger",
                "false",
                "--trainer.enable_progress_bar",
                "false",
                "--trainer.default_root_dir",
                str(tmp_path),
                "--checkpoint.dirpath",
                str(tmp_path / "ckpt"),
            ]
        )
    teacher = load_teacher(tmp_path / "ckpt" / "last.ckpt")
    assert teacher.net.hidden[0].linear.out_features == 392
    model = DistillationModule(_student(), str(tmp_path / "ckpt" / "last.ckpt"))
    assert model.hparams.teacher == str(tmp_path / "ckpt" / "last.ckpt") and not model.teacher.training
    with pytest.raises(WeightsError, match="neither a zoo entry"):
        load_teacher("no_such_teacher")
    with pytest.raises(RuntimeError, match="needs a teacher"):
        _trainer(tmp_path, max_epochs=1).fit(DistillationModule(_student(), None), datamodule=_mnist())


@pytest.mark.slow
def test_ddp_two_processes_train(tmp_path):
    torch.manual_seed(0)
    model = DistillationModule(_student(), Teacher().eval(), lr=0.05)
    trainer = _trainer(
        tmp_path, strategy="ddp_spawn", devices=2, max_epochs=1, deterministic=False, enable_checkpointing=True
    )
    trainer.fit(model, datamodule=_mnist())
    ckpt = torch.load(trainer.checkpoint_callback.best_model_path, map_location="cpu", weights_only=False)
    assert set(ckpt["state_dict"]) == set(model.state_dict())
    assert math.isfinite(float(trainer.callback_metrics["val/acc"]))


def test_a_small_cnn_student_learns_from_an_mlp_teacher(tmp_path):
    from reprozoo.nets import ConvNet

    torch.manual_seed(0)
    student = ConvNet(
        in_channels=1, num_classes=10, channels=(8, 16), layers_per_block=1, pool_every=1, hidden=(32,), image_size=28
    )
    model = DistillationModule(student, Teacher().eval(), temperature=4.0, alpha=0.5, lr=0.05)
    dm = _mnist(flatten=False)
    trainer = _trainer(tmp_path, max_epochs=1)
    before = trainer.validate(model, datamodule=dm, verbose=False)[0]["val/loss"]
    trainer.fit(model, datamodule=dm)
    after = trainer.validate(model, datamodule=dm, verbose=False)[0]["val/loss"]
    assert after < before


# ------------------------------------------------------------------------------ the transfer set and the tuned bias


def _transfer(**kwargs) -> TransferSetMNISTDataModule:
    """``_mnist``'s split of the real MNIST test images, as a transfer set."""
    return TransferSetMNISTDataModule(**(_real_mnist_args() | kwargs))


class SeenLabels(L.Callback):
    """Every label of every batch the module trains on and validates (selects its checkpoint) on."""

    def __init__(self):
        self.train: list[int] = []
        self.val: list[int] = []

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        self.train += batch[1].tolist()

    def on_validation_batch_start(self, trainer, pl_module, batch, batch_idx, dataloader_idx=0):
        self.val += batch[1].tolist()


@pytest.mark.parametrize(
    "data_kwargs, allowed",
    [({"exclude_classes": [3]}, set(range(10)) - {3}), ({"transfer_classes": [7, 8]}, {7, 8})],
    ids=["mythical-3", "7s-and-8s"],
)
def test_a_left_out_class_never_reaches_training_or_selection(tmp_path, data_kwargs, allowed):
    torch.manual_seed(0)
    dm = _transfer(return_index=True, **data_kwargs)
    seen = SeenLabels()
    model = DistillationModule(_student(), Teacher().eval(), cache_teacher=True, lr=0.05)
    _trainer(tmp_path, max_epochs=2, callbacks=[seen], enable_checkpointing=True).fit(model, datamodule=dm)
    assert set(seen.train) == allowed and set(seen.val) == allowed  # every allowed class seen, no other
    assert len(seen.train) == 2 * len(dm.splits["train"]) and len(seen.val) >= len(dm.splits["val"])
    # The held-out tune split keeps every class (for the bias), and none of it is a test or training image.
    assert set(dm.splits["tune"].labels.tolist()) == set(range(10))
    tune = set(dm.splits["tune"].source_index.tolist())
    assert set(dm.splits["val"].source_index.tolist()) <= tune
    assert not tune & set(dm.splits["test"].source_index.tolist())
    assert not tune & set(dm.splits["train"].source_index.tolist())
    assert set(dm.splits["test"].labels.tolist()) == set(range(10))


def test_the_7s_and_8s_transfer_set_holds_only_7s_and_8s():
    dm = _transfer(transfer_classes=[7, 8], return_index=True)
    dm.setup("fit")
    labels = [y for _, y, _ in dm.splits["train"]]
    assert set(labels) == {7, 8} and set(dm.splits["val"].labels.tolist()) == {7, 8}
    # Exactly the 7s and 8s the same seed puts in the full training split: filtered, not re-drawn.
    full = _transfer()
    full.setup("fit")
    sevens_eights = full.splits["train"].labels.ge(7) & full.splits["train"].labels.le(8)
    assert dm.splits["train"].source_index.tolist() == full.splits["train"].source_index[sevens_eights].tolist()
    assert [i for _, _, i in dm.splits["train"]] == list(range(len(labels)))  # indices for the teacher cache
    # Without exclusions the splits are FashionMNISTDataModule's (the teacher's and the zoo recipes' data).
    parent = _mnist(num_train=600, num_test=200, val_size=100)
    parent.setup("fit")
    for name in ("train", "val", "test"):
        assert torch.equal(parent.splits[name].source_index, full.splits[name].source_index)
    kept = _transfer(exclude_classes=[3], exclude_from_val=False)
    kept.setup("fit")
    assert 3 in kept.splits["val"].labels.tolist() and 3 not in kept.splits["train"].labels.tolist()


class NoTestSplit(TransferSetMNISTDataModule):
    """A datamodule whose test split raises on any read: what tunes the bias must not touch it."""

    def setup(self, stage=None):
        super().setup(stage)
        self.splits["test"] = _Raises()

    def test_dataloader(self):
        raise AssertionError("the test split was read")


class _Raises(torch.utils.data.Dataset):
    def __len__(self):
        raise AssertionError("the test split was read")

    def __getitem__(self, index):
        raise AssertionError("the test split was read")


class _LowThree(nn.Module):
    """Logits that know the digit but hold the 3's logit too low by ``shift`` (a student that never saw a 3); each
    image's logits are fixed in advance (``rows``), whatever the batch it comes in."""

    def __init__(self, rows: dict[bytes, torch.Tensor], shift: float):
        super().__init__()
        self.num_classes = 10
        self.rows, self.shift = rows, shift
        self.dummy = nn.Parameter(torch.zeros(()))

    def forward(self, x):
        z = torch.stack([self.rows[row.numpy().tobytes()] for row in x])  # (B, 10)
        z[:, 3] -= self.shift
        return z


def test_the_bias_is_tuned_on_held_out_data_and_never_reads_the_test_split():
    dm = NoTestSplit(**(dict(_transfer().hparams) | {"exclude_classes": [3]}))
    dm.setup("fit")
    tune = dm.splits["tune"]
    g = torch.Generator().manual_seed(0)
    rows = {}
    for i in range(len(tune)):
        z = torch.randn(10, generator=g)
        z[int(tune.labels[i])] += 2.5
        rows[tune[i][0].numpy().tobytes()] = z
    model = DistillationModule(_LowThree(rows, shift=6.0), None)
    got = tune_logit_bias(model, dm, [3])
    assert model.logit_bias[3].item() == pytest.approx(got["amount"])  # applied
    assert model.logit_bias[[0, 1, 2, 4, 5, 6, 7, 8, 9]].abs().max() == 0
    # Independently: the accuracy of the module's own evaluation path (eval_logits) at each amount, on the tune split.
    x = torch.stack([tune[i][0] for i in range(len(tune))])
    accuracy = {}
    for amount in torch.arange(-150, 151).tolist():
        model.logit_bias[3] = amount / 10
        with torch.no_grad():
            accuracy[amount / 10] = (model.eval_logits(x).argmax(-1) == tune.labels).double().mean().item()
    best = max(accuracy.values())
    assert got["accuracy"] == pytest.approx(best) and accuracy[got["amount"]] == pytest.approx(best)
    assert got["amount"] == min((a for a, v in accuracy.items() if v == best), key=abs)
    assert got["accuracy_without"] == pytest.approx(accuracy[0.0]) and got["accuracy"] > got["accuracy_without"]
    assert 3.0 < got["amount"] < 9.0  # it undoes most of the 6.0 the 3's logit was held down by
    with pytest.raises(AssertionError, match="test split was read"):
        dm.test_dataloader()  # the guard is live: tune_logit_bias would have failed had it read the test split


@pytest.mark.parametrize(
    "kwargs, field",
    [
        ({"transfer_classes": "78"}, "transfer_classes"),
        ({"transfer_classes": [7, 10]}, "transfer_classes"),
        ({"transfer_classes": [3], "exclude_classes": [3]}, "leaves no class"),
        ({"exclude_from_val": "yes"}, "exclude_from_val"),
    ],
)
def test_bad_transfer_set_arguments(kwargs, field):
    with pytest.raises(ValueError, match=field):
        TransferSetMNISTDataModule(**kwargs)


def test_bad_tune_arguments():
    model = DistillationModule(_student(), None)
    with pytest.raises(ValueError, match="tune_logit_bias: classes"):
        tune_logit_bias(model, None, [10])
    with pytest.raises(ValueError, match="tune_logit_bias: classes"):
        tune_logit_bias(model, None, [])
