"""The distillation and regularisation configs run through the CLI (one short epoch each) on the real MNIST test
images of the data root's mnist/ folder ($REPROZOO_DATA), with their callbacks' outputs written."""

from __future__ import annotations

import warnings
from pathlib import Path

import pytest
import torch

from reprozoo.callbacks import load_landscape
from reprozoo.cli import run_lightning
from tests.conftest import real_data
from tests.test_configs import config_args

pytestmark = pytest.mark.slow  # experiment configs run end to end through the CLI

CONFIGS = Path(__file__).resolve().parents[1] / "reprozoo" / "configs"


@pytest.fixture
def mnist_root(monkeypatch) -> None:
    """The data root set to the real data, as a user sets ``REPROZOO_DATA``: the configs name no folder, the
    datamodule finds ``mnist/`` there (MNIST's test files only, so ``train_source`` is ``test``)."""
    monkeypatch.setenv("REPROZOO_DATA", str(real_data("mnist", "t10k-images-idx3-ubyte.gz").parents[1]))


def _run(tmp_path, config: Path, *extra: str):
    argv = [
        "fit",
        *config_args(config),  # with its base
        "--data.init_args.dataset",
        "mnist",
        "--data.init_args.train_source",
        "test",
        "--data.init_args.num_train",
        "400",
        "--data.init_args.val_size",
        "100",
        "--data.init_args.num_test",
        "100",
        "--trainer.max_epochs",
        "1",
        "--trainer.logger.init_args.save_dir",
        str(tmp_path / "logs"),
        "--checkpoint.dirpath",
        str(tmp_path / "ckpt"),
        "--trainer.enable_progress_bar",
        "false",
        "--trainer.enable_model_summary",
        "false",
        *extra,
    ]
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", ".*does not have many workers.*")
        return run_lightning(argv)


@pytest.mark.parametrize("variant", ["plain", "batchnorm", "layernorm", "dropout", "l1", "l2"])
def test_regularization_config(tmp_path, variant, mnist_root):
    cli = _run(
        tmp_path, CONFIGS / "regularization" / f"{variant}.yaml", "--trainer.callbacks.resolution", "5"
    )  # the last callback: LossLandscape
    log_dir = Path(cli.trainer.logger.log_dir)
    assert (log_dir / "frobenius_norm" / "norms_epoch0.png").exists()
    assert load_landscape(log_dir / "loss_landscape" / "epoch_0.npz")["loss"].shape == (5, 5)
    net = cli.model.net
    assert [h.linear.out_features for h in net.hidden] == [392, 196]
    hp = cli.model.hparams
    assert (hp.optimizer, hp.lr, cli.datamodule.hparams.batch_size) == ("adam", 3e-4, 128)  # the seed's
    assert type(cli.model.optimizers().optimizer).__name__ == "Adam"
    # The Neuromatch tutorial's penalties: 1e-3 times sum |p| (L1) or sum p^2 (L2) over EVERY parameter, biases and
    # normalisation parameters included, checked against a sum of our own.
    params = list(net.parameters())
    expected = {
        "l1": 1e-3 * sum(p.detach().abs().sum() for p in params),
        "l2": 1e-3 * sum(p.detach().pow(2).sum() for p in params),
    }.get(variant)
    if expected is None:
        assert hp.l1 == hp.l2 == 0
    else:
        assert hp.penalize == "all"
        torch.testing.assert_close(cli.model.penalty().detach(), expected, rtol=1e-5, atol=0)


@pytest.mark.parametrize("config", ["teacher", "small", "distilled", "teacher_mnist8k", "distilled_mnist8k"])
def test_distillation_config(tmp_path, config, mnist_root):
    cli = _run(
        tmp_path,
        CONFIGS / "distillation" / f"{config}.yaml",
        "--trainer.limit_train_batches",
        "2",
        "--trainer.limit_val_batches",
        "1",
    )
    assert (tmp_path / "ckpt" / "last.ckpt").exists()
    if config.startswith("distilled"):
        assert cli.model.teacher is not None and not cli.model.teacher.training
        assert cli.model.hparams.teacher == "mlp1200_mnist.teacher"


def test_tent_generated_config_runs(tmp_path, monkeypatch):
    # The config names its files relative to the data root: point it at the real data (the generated corruptions
    # are cached in tmp_path, never there).
    monkeypatch.setenv("REPROZOO_DATA", str(real_data("cifar10", "test_jpeg_q75.npz").parents[1]))
    real_data("cifar10", "pretrained", "resnet20-12fca82f.th")
    monkeypatch.chdir(tmp_path)
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", ".*does not have many workers.*")
        cli = run_lightning(
            [
                "test",
                "--config",
                str(CONFIGS / "tent" / "resnet20_generated.yaml"),
                "--data.init_args.data_dir",
                str(tmp_path / "c"),
                "--data.init_args.num_examples",
                "200",
                "--data.init_args.corruptions",
                "[gaussian_noise, fog]",
                "--data.init_args.batch_size",
                "100",
                "--trainer.logger.init_args.save_dir",
                str(tmp_path / "logs"),
                "--trainer.enable_progress_bar",
                "false",
            ]
        )
    metrics = cli.trainer.callback_metrics
    assert {"test/error/gaussian_noise-5", "test/error/fog-5"} <= set(metrics)


def test_tent_standard_config_parses():
    with pytest.raises(SystemExit) as exit_info:
        run_lightning(["test", "--config", str(CONFIGS / "tent" / "cifar10c_standard.yaml"), "--print_config"])
    assert exit_info.value.code in (0, None)
