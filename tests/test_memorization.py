"""The memorization configs run end to end through the CLI on the 41 real AFHQ images of $REPROZOO_DATA/afhq: labels
randomised as configured, the Frobenius and loss-landscape outputs written, early stopping once memorised."""

from __future__ import annotations

import warnings
from pathlib import Path

import numpy as np
import pytest
import torch

from reprozoo.callbacks import FrobeniusNormMonitor, LossLandscape, load_landscape
from reprozoo.cli import run_lightning
from tests.conftest import real_data
from tests.test_configs import config_args

pytestmark = pytest.mark.slow  # experiment configs run end to end through the CLI

CONFIGS = Path(__file__).resolve().parents[1] / "reprozoo" / "configs" / "memorization"


def _run(tmp_path, config: str, *extra: str):
    data_dir = real_data("afhq").parent
    argv = [
        "fit",
        *config_args(CONFIGS / f"{config}.yaml"),  # with its base
        "--data.init_args.data_dir",
        str(data_dir),
        "--data.init_args.num_train",
        "null",
        "--data.init_args.num_val",
        "null",
        "--trainer.logger.init_args.save_dir",
        str(tmp_path / "logs"),
        "--checkpoint.dirpath",
        str(tmp_path / "ckpt"),
        "--trainer.enable_progress_bar",
        "false",
        "--trainer.enable_model_summary",
        "false",
        "--trainer.callbacks.resolution",
        "5",  # the last callback of the list: LossLandscape
        *extra,
    ]
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", ".*does not have many workers.*")
        return run_lightning(argv)


@pytest.mark.parametrize("config, noise", [("real_labels", 0.0), ("partly_random", 0.15), ("fully_random", 1.0)])
def test_memorization_config_runs_on_real_afhq(tmp_path, config, noise):
    cli = _run(tmp_path, config, "--trainer.max_epochs", "3")
    data = cli.datamodule
    train = data.splits["train"]
    assert data.hparams.label_noise == noise
    assert int(data.noisy_mask.sum()) == round(noise * len(train))  # drawn for randomisation, seeded
    assert len(train) + len(data.splits["val"]) == 41
    if noise == 0:
        assert torch.equal(torch.as_tensor(train.labels), data.true_labels)
    log_dir = Path(cli.trainer.logger.log_dir)
    monitor = next(c for c in cli.trainer.callbacks if isinstance(c, FrobeniusNormMonitor))
    assert monitor.initial is not None and [e["epoch"] for e in monitor.history] == [0, 1, 2]
    assert (log_dir / "frobenius_norm" / "norms_epoch2.png").exists()
    landscape = load_landscape(log_dir / "loss_landscape" / "epoch_2.npz")
    assert landscape["loss"].shape == (5, 5) and np.isfinite(landscape["loss"]).all()
    assert "accuracy" in landscape  # ClassifierModule.loss gives it
    assert (tmp_path / "ckpt" / "last.ckpt").exists()


def test_early_stopping_once_the_training_set_is_memorised(tmp_path):
    cli = _run(tmp_path, "real_labels", "--trainer.max_epochs", "150")
    trainer = cli.trainer
    assert trainer.callback_metrics["train/acc_epoch"] == 1.0
    assert trainer.current_epoch < 150  # stopped by EarlyStopping's threshold, not by max_epochs
    landscape = next(c for c in trainer.callbacks if isinstance(c, LossLandscape))
    assert landscape.history[-1]["epoch"] == trainer.current_epoch - 1
