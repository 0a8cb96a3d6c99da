"""Small builders shared by the tests."""

import lightning as L
import torch

from reprozoo.datamodules import SyntheticRegressionDataModule
from reprozoo.methods.engression import EngressionRegressor
from reprozoo.nets import StochasticMLP


def tiny_trainer(tmp_path, **kwargs) -> L.Trainer:
    defaults = dict(
        accelerator="cpu",
        devices=1,
        max_epochs=2,
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        default_root_dir=tmp_path,
    )
    defaults.update(kwargs)
    return L.Trainer(**defaults)


_GENERATOR_ARGS = set(StochasticMLP().config)


def tiny_engression(**kwargs) -> EngressionRegressor:
    """A small EngressionRegressor; generator arguments (``hidden_dim=...``) go to its StochasticMLP."""
    net = dict(hidden_dim=16, noise_dim=4 if kwargs.get("loss", "energy") == "energy" else 0)
    net.update({key: kwargs.pop(key) for key in list(kwargs) if key in _GENERATOR_ARGS})
    return EngressionRegressor(StochasticMLP(**net), **(dict(lr=5e-3, eval_samples=20) | kwargs))


def tiny_data(**kwargs) -> SyntheticRegressionDataModule:
    defaults = dict(n_train=256, n_val=64, n_test=64, batch_size=64)
    defaults.update(kwargs)
    return SyntheticRegressionDataModule(**defaults)


class TinyClassifier(L.LightningModule):
    """A linear classifier that knows nothing of reprozoo: datamodule smoke tests fit, validate and test it."""

    def __init__(self, in_features: int, num_classes: int):
        super().__init__()
        self.net = torch.nn.Linear(in_features, num_classes)

    def training_step(self, batch, batch_idx):
        return torch.nn.functional.cross_entropy(self.net(batch[0]), batch[1])

    def validation_step(self, batch, batch_idx):
        x, y = batch
        self.log("val_loss", torch.nn.functional.cross_entropy(self.net(x), y))

    def test_step(self, batch, batch_idx):
        x, y = batch
        self.log("test_acc", (self.net(x).argmax(-1) == y).float().mean())

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)


def trm_net(**init_args) -> dict:
    """A TinyRecursiveNetwork as TRMModule's ``net`` in config form (a fresh network for every module built)."""
    return {"class_path": "reprozoo.nets.TinyRecursiveNetwork", "init_args": init_args}
