"""FittedExamplesMonitor: the fraction of training examples fitted per group, against an independent count, the
first-learned epochs, its figure, resume, and its one requirement on the datamodule."""

from __future__ import annotations

import lightning as L
import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader, TensorDataset

from reprozoo.callbacks import FittedExamplesMonitor
from reprozoo.datamodules import CIFAR10DataModule
from reprozoo.methods.classifier import ClassifierModule
from reprozoo.nets import ConvNet


def _datamodule(tmp_path, **kwargs) -> CIFAR10DataModule:
    rng = np.random.default_rng(0)
    path = tmp_path / "tiny.npz"
    if not path.exists():
        np.savez(path, x=rng.integers(0, 256, (150, 32, 32, 3), dtype=np.uint8), y=np.arange(150) % 10)
    args = dict(images_npz=str(path), num_train=110, val_size=10, num_test=40, batch_size=25, label_noise=0.5)
    return CIFAR10DataModule(**{**args, **kwargs})


def _model() -> ClassifierModule:
    torch.manual_seed(0)
    net = ConvNet(channels=(8,), layers_per_block=1, pool_every=1, hidden=(64,), batch_norm=False)
    return ClassifierModule(net, optimizer="adam", lr=3e-3)


def _trainer(tmp_path, epochs: int, monitor: FittedExamplesMonitor, **kwargs) -> L.Trainer:
    return L.Trainer(
        max_epochs=epochs,
        default_root_dir=tmp_path,
        logger=False,
        callbacks=[monitor],
        enable_progress_bar=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
        **kwargs,
    )


def test_fitted_fractions_first_learned_and_figure(tmp_path):
    dm = _datamodule(tmp_path)
    monitor = FittedExamplesMonitor()
    model = _model()
    trainer = _trainer(tmp_path, 6, monitor, enable_checkpointing=False)
    trainer.fit(model, datamodule=dm)
    groups = dm.train_groups()
    assert set(groups) == {"clean", "noisy_label"} and groups["noisy_label"].sum() == 50
    # the last measurement against an independent count of the final model's predictions
    model.eval()
    with torch.no_grad():
        x = torch.stack([dm.splits["train"].with_options(augment=False)[i][0] for i in range(100)])
        y = torch.stack([torch.as_tensor(dm.splits["train"][i][1]) for i in range(100)])
        fitted = model(x).argmax(1) == y
    last = monitor.curves[-1]
    assert last["epoch"] == 5
    for name in ("clean", "noisy_label"):
        assert last[name] == pytest.approx(fitted[groups[name]].float().mean().item())
    assert trainer.callback_metrics["fitted/clean"].item() == pytest.approx(last["clean"])
    # an example fitted now was first fitted at some measured epoch; one never fitted has -1
    first = monitor.first_learned
    assert first.shape == (100,) and bool((first[fitted] >= 0).all())
    assert set(first.tolist()) <= {-1, 0, 1, 2, 3, 4, 5}
    assert len(monitor.curves) == 6
    assert (tmp_path / "fitted_examples.png").stat().st_size > 0


def test_every_n_epochs_and_resume_keep_the_record(tmp_path):
    dm = _datamodule(tmp_path)
    first = FittedExamplesMonitor(every_n_epochs=2)
    _trainer(tmp_path, 3, first).fit(_model(), datamodule=dm)
    assert [c["epoch"] for c in first.curves] == [1, 2]  # every 2nd epoch, and the last
    ckpt = next((tmp_path / "checkpoints").glob("*.ckpt"))
    second = FittedExamplesMonitor(every_n_epochs=2)
    _trainer(tmp_path, 4, second).fit(_model(), datamodule=_datamodule(tmp_path), ckpt_path=ckpt)
    assert [c["epoch"] for c in second.curves] == [1, 2, 3]
    kept = first.first_learned >= 0
    assert torch.equal(second.first_learned[kept], first.first_learned[kept])


def test_needs_a_datamodule_with_the_training_set_in_order(tmp_path):
    loader = DataLoader(TensorDataset(torch.randn(8, 3, 32, 32), torch.arange(8) % 10), batch_size=4)
    with pytest.raises(ValueError, match="FittedExamplesMonitor needs a datamodule with train_eval_dataloader"):
        _trainer(tmp_path, 1, FittedExamplesMonitor()).fit(_model(), loader)
    with pytest.raises(ValueError, match="every_n_epochs must be an integer >= 1"):
        FittedExamplesMonitor(every_n_epochs=0)
