import hashlib
import io
import urllib.request
import zipfile
from pathlib import Path

import lightning as L
import pytest
import torch
from PIL import Image

from reprozoo.datamodules import AnimalFacesDataModule
from reprozoo.datamodules.animal_faces import CLASSES
from tests.conftest import real_data
from tests.helpers import TinyClassifier

COLOURS = {"cat": (255, 0, 0), "dog": (0, 255, 0), "wild": (0, 0, 255)}


def jpeg_bytes(colour, size: int = 16) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (size, size), colour).save(buf, format="JPEG", quality=95)
    return buf.getvalue()


def make_afhq(data_dir: Path, n_train: int = 4, n_val: int | None = 2, size: int = 16) -> Path:
    """``data_dir/afhq/{train,val}/<class>/*.jpg`` in the official layout; each class a solid colour, official
    file names (``flickr_cat_000001.jpg``), which are unique across classes."""
    for split, n in (("train", n_train), ("val", n_val)):
        if n is None:
            continue
        for cls in CLASSES:
            folder = data_dir / "afhq" / split / cls
            folder.mkdir(parents=True, exist_ok=True)
            data = jpeg_bytes(COLOURS[cls], size)
            for i in range(n):
                (folder / f"flickr_{cls}_{split}{i:06d}.jpg").write_bytes(data)
    return data_dir


def no_network(monkeypatch):
    def fail(*args, **kwargs):
        raise AssertionError("urllib.request.urlopen was called")

    monkeypatch.setattr(urllib.request, "urlopen", fail)


def labels_of(ds) -> list[int]:
    return [ds[i][1] for i in range(len(ds))]


# ------------------------------------------------------------------ items


def test_items_shapes_dtypes_and_normalisation(tmp_path):
    make_afhq(tmp_path, n_train=2, n_val=1)
    dm = AnimalFacesDataModule(data_dir=str(tmp_path), image_size=8)
    dm.setup("fit")
    assert len(dm.splits["train"]) == 6 and len(dm.splits["val"]) == 3
    assert dm.splits["test"] is dm.splits["val"] and dm.val_source == "afhq/val"
    assert dm.classes == ["cat", "dog", "wild"] and dm.input_shape == (3, 8, 8)
    x, y = dm.splits["train"][0]
    assert x.shape == (3, 8, 8) and x.dtype == torch.float32 and isinstance(y, int) and y == 0
    # a solid red cat: about (1, -1, -1) normalised (JPEG is lossy)
    assert torch.allclose(x.mean((1, 2)), torch.tensor([1.0, -1.0, -1.0]), atol=0.05)
    assert x.min() >= -1 and x.max() <= 1

    raw = AnimalFacesDataModule(data_dir=str(tmp_path), image_size=8, normalize=False)
    raw.setup()
    x_raw, _ = raw.splits["train"][0]
    assert x_raw.min() >= 0 and x_raw.max() <= 1
    assert torch.allclose(x, (x_raw - 0.5) / 0.5)

    flat = AnimalFacesDataModule(data_dir=str(tmp_path), image_size=8, flatten=True)
    flat.setup()
    assert flat.input_shape == (192,)
    x_flat, _ = flat.splits["train"][0]
    assert x_flat.shape == (192,) and torch.equal(x_flat, x.reshape(-1))

    xb, yb = next(iter(dm.train_dataloader()))
    assert xb.shape == (6, 3, 8, 8) and yb.dtype == torch.long


def test_images_are_cached_after_first_load(tmp_path):
    make_afhq(tmp_path, n_train=1, n_val=1)
    dm = AnimalFacesDataModule(data_dir=str(tmp_path), image_size=4)
    dm.setup()
    ds = dm.splits["train"]
    first = ds[0][0]
    cached = ds._cache[0]
    assert cached.dtype == torch.uint8 and cached.shape == (3, 4, 4)
    ds.paths[0].unlink()  # a second read would fail: the cache must answer
    assert torch.equal(ds[0][0], first)


# ------------------------------------------------------------------ splits and subsets


def test_class_balanced_seeded_subsets(tmp_path):
    make_afhq(tmp_path, n_train=10, n_val=10)

    def subsets(seed, num_train=6, num_val=7):
        dm = AnimalFacesDataModule(data_dir=str(tmp_path), num_train=num_train, num_val=num_val, seed=seed)
        dm.setup()
        return dm.splits["train"], dm.splits["val"]

    train, val = subsets(0)
    assert torch.bincount(train.labels, minlength=3).tolist() == [2, 2, 2]
    assert sorted(torch.bincount(val.labels, minlength=3).tolist()) == [2, 2, 3]
    again_train, again_val = subsets(0)
    assert again_train.paths == train.paths and again_val.paths == val.paths
    assert {tuple(subsets(s)[0].paths) for s in range(1, 6)} != {tuple(train.paths)}
    with pytest.raises(ValueError, match="num_train"):
        subsets(0, num_train=40)  # 14 per class needed, 10 there


def test_val_held_out_of_train_when_no_val_folder(tmp_path):
    make_afhq(tmp_path, n_train=10, n_val=None)
    dm = AnimalFacesDataModule(data_dir=str(tmp_path), val_fraction=0.2)
    dm.setup()
    train, val = dm.splits["train"], dm.splits["val"]
    assert dm.val_source == "afhq/train (held out)"
    assert torch.bincount(val.labels, minlength=3).tolist() == [2, 2, 2]
    assert len(train) == 24 and not set(train.paths) & set(val.paths)
    assert all("/train/" in p.as_posix() for p in val.paths)
    other = AnimalFacesDataModule(data_dir=str(tmp_path), val_fraction=0.2, seed=1)
    other.setup()
    assert other.splits["val"].paths != val.paths

    none = AnimalFacesDataModule(data_dir=str(tmp_path), val_fraction=0.0)
    none.setup()
    assert len(none.splits["train"]) == 30 and len(none.splits["val"]) == 0 and none.val_source is None


# ------------------------------------------------------------------ label randomisation


def test_label_noise_fixed_across_epochs_and_val_untouched(tmp_path):
    make_afhq(tmp_path, n_train=100, n_val=5, size=4)
    dm = AnimalFacesDataModule(data_dir=str(tmp_path), label_noise=1.0, image_size=4)
    dm.setup()
    train = dm.splits["train"]
    epoch1, epoch2 = labels_of(train), labels_of(train)
    assert epoch1 == epoch2 == train.labels.tolist()
    dm.setup("validate")  # setup again changes nothing
    assert labels_of(dm.splits["train"]) == epoch1
    same = AnimalFacesDataModule(data_dir=str(tmp_path), label_noise=1.0, image_size=4)
    same.setup()
    assert same.splits["train"].labels.tolist() == epoch1
    # labels independent of truth: ~1/3 agree on 300 items, all classes used
    labels = torch.tensor(epoch1)
    assert torch.equal(dm.true_labels, torch.arange(3).repeat_interleave(100))
    assert bool(dm.noisy_mask.all())
    assert abs((labels == dm.true_labels).float().mean().item() - 1 / 3) < 0.1
    assert torch.bincount(labels, minlength=3).min() > 70
    # val untouched
    assert dm.splits["val"].labels.tolist() == [0] * 5 + [1] * 5 + [2] * 5
    assert labels_of(dm.splits["val"]) == dm.splits["val"].labels.tolist()


def test_partial_label_noise_fraction(tmp_path):
    make_afhq(tmp_path, n_train=100, n_val=1, size=4)
    changed = []
    for seed in range(20):
        dm = AnimalFacesDataModule(data_dir=str(tmp_path), label_noise=0.15, seed=seed)
        dm.setup()
        labels = dm.splits["train"].labels
        assert int(dm.noisy_mask.sum()) == 45  # round(0.15 * 300) drawn
        assert bool((labels[~dm.noisy_mask] == dm.true_labels[~dm.noisy_mask]).all())
        changed.append((labels != dm.true_labels).float().mean().item())
    # a drawn label changes with probability 2/3: 0.15 * 2/3 = 0.10 of the labels in expectation
    assert abs(sum(changed) / len(changed) - 0.10) < 0.02

    clean = AnimalFacesDataModule(data_dir=str(tmp_path))
    clean.setup()
    assert not clean.noisy_mask.any() and torch.equal(clean.splits["train"].labels, clean.true_labels)

    sub = AnimalFacesDataModule(data_dir=str(tmp_path), label_noise=0.5, num_train=30)
    sub.setup()
    assert int(sub.noisy_mask.sum()) == 15  # the fraction is of the training items actually used


def test_premade_randomised_folders_are_used(tmp_path):
    make_afhq(tmp_path, n_train=4, n_val=2, size=4)
    # the tutorial's copies: same files, labels moved around (cat -> dog -> wild -> cat)
    for folder in ("afhq_random", "afhq_random_15"):
        for k, cls in enumerate(CLASSES):
            target = tmp_path / folder / "train" / CLASSES[(k + 1) % 3]
            target.mkdir(parents=True, exist_ok=True)
            for src in sorted((tmp_path / "afhq" / "train" / cls).iterdir()):
                (target / src.name).write_bytes(src.read_bytes())

    for noise, folder in ((1.0, "afhq_random"), (0.15, "afhq_random_15")):
        dm = AnimalFacesDataModule(data_dir=str(tmp_path), label_noise=noise)
        dm.setup()
        train = dm.splits["train"]
        assert dm.train_source == folder
        assert all(p.parent.parent.parent.name == folder for p in train.paths)
        assert [CLASSES[y] for y in train.labels.tolist()] == [p.parent.name for p in train.paths]
        assert torch.equal(dm.true_labels, (train.labels - 1) % 3)
        assert bool(dm.noisy_mask.all())
        assert dm.splits["val"].labels.tolist() == [0, 0, 1, 1, 2, 2]

    own = AnimalFacesDataModule(data_dir=str(tmp_path), label_noise=0.15, use_premade=False)
    own.setup()
    assert own.train_source == "afhq/train" and int(own.noisy_mask.sum()) == 2  # round(0.15 * 12)
    other = AnimalFacesDataModule(data_dir=str(tmp_path), label_noise=0.3)  # no afhq_random_30: randomised here
    other.setup()
    assert other.train_source == "afhq/train"


# ------------------------------------------------------------------ the real sample


def test_real_shared_images_load():
    root = real_data("afhq")
    before = sorted(p.relative_to(root) for p in root.rglob("*"))
    dm = AnimalFacesDataModule(data_dir=str(root.parent), num_workers=0)
    dm.prepare_data()
    dm.setup()
    train, val = dm.splits["train"], dm.splits["val"]
    assert len(train) + len(val) == 41 and dm.val_source == "afhq/train (held out)"
    assert set(val.labels.tolist()) == {0, 1, 2}
    for ds in (train, val):
        for i in range(len(ds)):
            x, y = ds[i]
            assert x.shape == (3, 32, 32) and x.dtype == torch.float32 and -1 <= x.min() and x.max() <= 1
            assert CLASSES[y] == ds.paths[i].parent.name
    assert sorted(p.relative_to(root) for p in root.rglob("*")) == before
    assert not (root.parent / "afhq.zip.sha256").exists()


# ------------------------------------------------------------------ download and errors


def test_offline_missing_data_names_folders_and_never_downloads(tmp_path, monkeypatch):
    no_network(monkeypatch)
    dm = AnimalFacesDataModule(data_dir=str(tmp_path / "nothing"))
    with pytest.raises(FileNotFoundError) as err:
        dm.prepare_data()
    msg = str(err.value)
    for cls in CLASSES:
        assert str(tmp_path / "nothing" / "afhq" / "train" / cls) in msg
    assert "REPROZOO_OFFLINE" in msg and "afhq.zip" in msg
    with pytest.raises(FileNotFoundError):
        dm.setup()
    assert not (tmp_path / "nothing").exists()


def test_default_data_dir_is_the_data_root(tmp_path):
    assert AnimalFacesDataModule().data_dir == tmp_path / "data-root"  # images in <root>/afhq/train/<class>/


def build_zip(path: Path, members: dict[str, bytes]) -> Path:
    with zipfile.ZipFile(path, "w") as zf:
        for name, data in members.items():
            zf.writestr(name, data)
    return path


@pytest.mark.parametrize("prefix", ["afhq/", ""])
def test_file_url_download(tmp_path, monkeypatch, prefix):
    monkeypatch.delenv("REPROZOO_OFFLINE")
    members = {
        f"{prefix}{split}/{cls}/flickr_{cls}_{i:06d}.jpg": jpeg_bytes(COLOURS[cls])
        for split in ("train", "val")
        for cls in CLASSES
        for i in range(2)
    }
    archive = build_zip(tmp_path / "afhq.zip", members)
    data_dir = tmp_path / "data"
    dm = AnimalFacesDataModule(data_dir=str(data_dir), url=archive.as_uri(), image_size=8)
    dm.prepare_data()
    dm.setup()
    assert len(dm.splits["train"]) == 6 and dm.val_source == "afhq/val"
    assert sorted(p.name for p in data_dir.iterdir()) == ["afhq", "afhq.zip.sha256"]  # no temp files, no archive
    recorded = (data_dir / "afhq.zip.sha256").read_text().split()
    assert recorded[0] == hashlib.sha256(archive.read_bytes()).hexdigest() and recorded[2] == archive.as_uri()
    no_network(monkeypatch)  # once there, nothing is downloaded again
    AnimalFacesDataModule(data_dir=str(data_dir), url=archive.as_uri()).prepare_data()


@pytest.mark.parametrize("evil", ["../evil.txt", "afhq/../../evil.txt", "/abs/evil.txt"])
def test_download_rejects_unsafe_zip(tmp_path, monkeypatch, evil):
    monkeypatch.delenv("REPROZOO_OFFLINE")
    archive = build_zip(tmp_path / "afhq.zip", {"afhq/train/cat/a.jpg": jpeg_bytes(COLOURS["cat"]), evil: b"x"})
    data_dir = tmp_path / "data"
    dm = AnimalFacesDataModule(data_dir=str(data_dir), url=archive.as_uri())
    with pytest.raises(ValueError, match="unsafe member") as err:
        dm.prepare_data()
    assert repr(evil) in str(err.value)
    assert not (tmp_path / "evil.txt").exists()
    assert list(data_dir.iterdir()) == []  # nothing extracted, no temp files left


def test_failed_download_is_file_not_found(tmp_path, monkeypatch):
    monkeypatch.delenv("REPROZOO_OFFLINE")
    url = (tmp_path / "no-such.zip").as_uri()
    with pytest.raises(FileNotFoundError, match="could not download") as err:
        AnimalFacesDataModule(data_dir=str(tmp_path / "data"), url=url).prepare_data()
    assert str(tmp_path / "data" / "afhq" / "train" / "wild") in str(err.value)


@pytest.mark.parametrize("how", ["garbage", "truncated"])
def test_corrupt_jpeg_names_the_file(tmp_path, how):
    make_afhq(tmp_path, n_train=2, n_val=1, size=64)
    bad = tmp_path / "afhq" / "train" / "dog" / "broken.jpg"
    good = jpeg_bytes(COLOURS["dog"], 64)
    bad.write_bytes(b"this is not a jpeg" if how == "garbage" else good[: len(good) // 2])
    dm = AnimalFacesDataModule(data_dir=str(tmp_path))
    dm.setup()
    with pytest.raises(ValueError, match="broken.jpg"):
        for _ in dm.train_dataloader():
            pass


def test_folder_errors(tmp_path):
    make_afhq(tmp_path, n_train=1, n_val=None)
    train = tmp_path / "afhq" / "train"
    (train / ".ipynb_checkpoints").mkdir()  # hidden folders and files are ignored
    (train / "cat" / ".DS_Store").write_bytes(b"")
    AnimalFacesDataModule(data_dir=str(tmp_path)).setup()

    (train / "horse").mkdir()
    with pytest.raises(ValueError, match="horse"):
        AnimalFacesDataModule(data_dir=str(tmp_path)).setup()
    (train / "horse").rmdir()

    for f in (train / "wild").iterdir():
        f.unlink()
    with pytest.raises(ValueError, match=r"wild/ has no images"):
        AnimalFacesDataModule(data_dir=str(tmp_path)).setup()
    (train / "wild").rmdir()
    with pytest.raises(FileNotFoundError, match="wild"):
        AnimalFacesDataModule(data_dir=str(tmp_path)).setup()

    only_val = tmp_path / "other"
    (only_val / "afhq" / "val").mkdir(parents=True)
    with pytest.raises(FileNotFoundError, match="has no train/ folder"):
        AnimalFacesDataModule(data_dir=str(only_val)).setup()


@pytest.mark.parametrize(
    "kwargs, field",
    [
        ({"label_noise": 1.5}, "label_noise"),
        ({"label_noise": -0.1}, "label_noise"),
        ({"label_noise": float("nan")}, "label_noise"),
        ({"image_size": 0}, "image_size"),
        ({"val_fraction": 1.0}, "val_fraction"),
        ({"num_train": 0}, "num_train"),
        ({"batch_size": 0}, "batch_size"),
    ],
)
def test_bad_arguments(kwargs, field):
    with pytest.raises(ValueError, match=field):
        AnimalFacesDataModule(**kwargs)


# ------------------------------------------------------------------ Lightning


def test_lightning_smoke(tmp_path):
    make_afhq(tmp_path / "data", n_train=4, n_val=2, size=8)
    dm = AnimalFacesDataModule(
        data_dir=str(tmp_path / "data"), image_size=8, flatten=True, batch_size=4, label_noise=0.5
    )
    model = TinyClassifier(dm.input_shape[0], 3)
    trainer = L.Trainer(
        accelerator="cpu",
        max_epochs=1,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        default_root_dir=tmp_path,
    )
    trainer.fit(model, datamodule=dm)
    assert trainer.current_epoch == 1 and "val_loss" in trainer.callback_metrics
    (result,) = trainer.test(model, datamodule=dm, verbose=False)
    assert 0 <= result["test_acc"] <= 1
