"""The memorization configs run end to end through the CLI on the 41 real AFHQ images of $REPROZOO_DATA/afhq: labels
randomised as configured, the Frobenius and loss-landscape outputs written, every epoch run (no early stopping); and
the benchmark's views of a small sample: held out by source image, the crops and mirror images they claim to be."""

from __future__ import annotations

import importlib.util
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch

from reprozoo.callbacks import FrobeniusNormMonitor, LossLandscape, load_landscape
from reprozoo.cli import run_lightning
from tests.conftest import ROOT, real_data
from tests.test_configs import config_args

CONFIGS = ROOT / "reprozoo" / "configs" / "memorization"


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


@pytest.mark.slow  # an experiment config end to end through the CLI
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


@pytest.mark.slow  # an experiment config end to end through the CLI
def test_the_curves_go_on_after_memorisation(tmp_path):
    # The seed's curves run for all epochs: nothing may stop a run once train/acc reaches 1.
    cli = _run(tmp_path, "real_labels", "--trainer.max_epochs", "120")
    trainer = cli.trainer
    assert trainer.current_epoch == 120 and not trainer.should_stop
    assert trainer.callback_metrics["train/acc_epoch"] == 1.0  # memorised well before the end (batch 128: 1 step)
    assert cli.datamodule.hparams.batch_size == 128
    landscape = next(c for c in trainer.callbacks if isinstance(c, LossLandscape))
    assert landscape.history[-1]["epoch"] == 119


# ---------------------------------------------------------------------------------------------- the benchmark's views


@pytest.fixture(scope="module")
def bench(request):
    import sys

    sys.path.insert(0, str(ROOT / "benchmarks"))  # the script imports its sibling _common
    request.addfinalizer(lambda: sys.path.remove(str(ROOT / "benchmarks")))
    spec = importlib.util.spec_from_file_location("memorization_bench", ROOT / "benchmarks" / "memorization.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _sample(folder: Path, per_class: dict[str, int], size: int = 96) -> None:
    from PIL import Image

    rng = np.random.default_rng(0)
    for cls, n in per_class.items():
        (folder / cls).mkdir(parents=True)
        for k in range(n):
            pixels = rng.integers(0, 256, size=(size, size, 3), dtype=np.uint8)
            Image.fromarray(pixels).save(folder / cls / f"{cls}_{k}.png")


def test_views_hold_out_whole_source_images(tmp_path, bench):
    _sample(tmp_path / "src", {"cat": 5, "dog": 4, "wild": 6})
    sources = bench.make_views(tmp_path / "src", tmp_path / "out", n_views=18, seed=3)
    # 20 % of each class (at least one) held out: 1 + 1 + 1
    assert sources == {"train": 12, "val": 3}
    split_of = {}
    for split in ("train", "val"):
        for path in (tmp_path / "out" / "afhq" / split).glob("*/*.png"):
            stem = path.stem.rsplit("_v", 1)[0]
            assert split_of.setdefault(stem, split) == split  # no source image gives views to both splits
    assert len(split_of) == 15
    assert len(list((tmp_path / "out" / "afhq" / "train").glob("*/*.png"))) == 12 * 18
    assert len(list((tmp_path / "out" / "afhq" / "val").glob("*/*.png"))) == 3 * 18
    again = bench.make_views(tmp_path / "src", tmp_path / "again", n_views=18, seed=3)
    assert again == sources
    assert sorted(p.name for p in (tmp_path / "again" / "afhq" / "val").glob("*/*.png")) == sorted(
        p.name for p in (tmp_path / "out" / "afhq" / "val").glob("*/*.png")
    )
    # and the datamodule reads the folder as AFHQ with its own val split
    from reprozoo.datamodules import AnimalFacesDataModule

    data = AnimalFacesDataModule(data_dir=tmp_path / "out", image_size=32, flatten=True)
    data.setup("fit")
    assert (len(data.splits["train"]), len(data.splits["val"])) == (12 * 18, 3 * 18)


def test_views_are_half_size_crops_and_their_mirror_images(bench):
    from PIL import Image

    side = 4 * bench.VIEW_SIZE  # crops of half the side, resized by a factor 2 exactly
    pixels = np.random.default_rng(1).integers(0, 256, size=(side, side, 3), dtype=np.uint8)
    views = [np.asarray(v) for v in bench.views(Image.fromarray(pixels), 18)]
    assert len(views) == 18 and all(v.shape == (bench.VIEW_SIZE, bench.VIEW_SIZE, 3) for v in views)
    half = side // 2
    for j in range(3):
        for i in range(3):
            crop = Image.fromarray(pixels[j * side // 4 : j * side // 4 + half, i * side // 4 : i * side // 4 + half])
            expected = np.asarray(crop.resize((bench.VIEW_SIZE,) * 2, Image.Resampling.BILINEAR, reducing_gap=None))
            np.testing.assert_array_equal(views[3 * j + i], expected)
            np.testing.assert_array_equal(views[9 + 3 * j + i], expected[:, ::-1])
    assert len(bench.views(Image.fromarray(pixels), 5)) == 5
