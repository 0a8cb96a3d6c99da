import functools
import hashlib
import http.server
import io
import pickle
import tarfile
import threading
from pathlib import Path

import lightning as L
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torchvision.datasets import CIFAR10

from reprozoo.datamodules import CIFAR10DataModule
from reprozoo.datamodules.cifar10 import read_batch
from reprozoo.datamodules.cifar10c_files import MEAN, STD
from reprozoo.methods.classifier import ClassifierModule
from tests.conftest import real_data

TRAIN_FILES = [f"data_batch_{k}" for k in range(1, 6)]
CLASSES = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]


# ------------------------------------------------------------------ the official python format, written here


def fake_rows(n: int, seed: int) -> tuple[np.ndarray, list[int]]:
    """n rows of 3072 bytes (red plane, green plane, blue plane), each channel with its own range so that the
    channel statistics differ; labels 0..9 in turn, then shuffled."""
    rng = np.random.default_rng(seed)
    planes = [rng.integers(lo, hi, size=(n, 1024)) for lo, hi in ((0, 256), (40, 200), (100, 140))]
    labels = rng.permutation(np.arange(n) % 10)
    return np.concatenate(planes, axis=1).astype(np.uint8), [int(c) for c in labels]


def write_batch(path: Path, data: np.ndarray, labels, name: str = "batch") -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    batch = {
        b"batch_label": name.encode(),
        b"labels": labels,
        b"data": data,
        b"filenames": [f"img_{i}.png".encode() for i in range(len(data))],
    }
    path.write_bytes(pickle.dumps(batch, protocol=2))


def make_cifar(root: Path, n: int = 60, n_test: int = 60) -> dict:
    """``root/cifar-10-batches-py/`` with five data batches of n images, a test batch of n_test and batches.meta;
    returns {"train": (rows, labels), "test": (rows, labels)}, train being the five batches concatenated."""
    folder = root / "cifar-10-batches-py"
    rows, labels = [], []
    for k, f in enumerate(TRAIN_FILES):
        data, y = fake_rows(n, seed=k)
        write_batch(folder / f, data, y, name=f"training batch {k + 1} of 5")
        rows.append(data)
        labels += y
    test_rows, test_labels = fake_rows(n_test, seed=99)
    write_batch(folder / "test_batch", test_rows, test_labels, name="testing batch 1 of 1")
    meta = {b"num_cases_per_batch": n, b"label_names": [c.encode() for c in CLASSES], b"num_vis": 3072}
    (folder / "batches.meta").write_bytes(pickle.dumps(meta, protocol=2))
    return {"train": (np.concatenate(rows), np.array(labels)), "test": (test_rows, np.array(test_labels))}


def expected_image(row: np.ndarray, normalize: bool = True) -> torch.Tensor:
    """An image straight from its row: the three 32x32 planes, in [0, 1], normalised per channel."""
    x = torch.from_numpy(row.reshape(3, 32, 32).astype(np.float32) / 255.0)
    if normalize:
        x = (x - torch.tensor(MEAN).view(3, 1, 1)) / torch.tensor(STD).view(3, 1, 1)
    return x


def dm_for(tmp_path: Path, **kwargs) -> CIFAR10DataModule:
    dm = CIFAR10DataModule(data_dir=str(tmp_path), **({"val_size": 50, "batch_size": 32} | kwargs))
    dm.setup("fit")
    return dm


def src(ds) -> list[int]:
    return ds.source_index.tolist()


@pytest.fixture
def tiny(tmp_path):
    return make_cifar(tmp_path)


# ------------------------------------------------------------------ reading, items, splits


def test_read_batch_matches_the_rows(tmp_path, tiny):
    images, labels = read_batch(tmp_path / "cifar-10-batches-py" / "data_batch_2")
    rows, y = tiny["train"]
    assert images.dtype == np.uint8 and images.shape == (60, 32, 32, 3)
    assert labels.tolist() == y[60:120].tolist()
    # pixel (h, w) of channel c is byte c * 1024 + h * 32 + w of the row
    assert images[7, 3, 5, 2] == rows[67, 2 * 1024 + 3 * 32 + 5]
    assert images[0, 31, 0, 0] == rows[60, 31 * 32]


def test_items_shapes_dtypes_and_normalisation(tmp_path, tiny):
    dm = dm_for(tmp_path)
    assert dm.num_classes == 10 and dm.classes == CLASSES and dm.input_shape == (3, 32, 32)
    assert {k: len(v) for k, v in dm.splits.items()} == {"train": 250, "val": 50, "test": 60}
    rows, labels = tiny["train"]
    for split in ("train", "val"):
        ds = dm.splits[split]
        for i in (0, 17, len(ds) - 1):
            x, y = ds[i]
            s = int(ds.source_index[i])
            assert x.dtype == torch.float32 and x.shape == (3, 32, 32)
            assert y == labels[s]
            torch.testing.assert_close(x, expected_image(rows[s]), rtol=0, atol=1e-5)
    test_rows, test_labels = tiny["test"]
    assert src(dm.splits["test"]) == list(range(60))
    x, y = dm.splits["test"][5]
    assert y == test_labels[5]
    torch.testing.assert_close(x, expected_image(test_rows[5]), rtol=0, atol=1e-5)
    raw = dm_for(tmp_path, normalize=False)
    x, _ = raw.splits["train"][3]
    torch.testing.assert_close(x, expected_image(rows[int(raw.splits["train"].source_index[3])], False))
    assert 0.0 <= float(x.min()) and float(x.max()) <= 1.0
    batch = next(iter(dm.train_dataloader()))
    assert batch[0].shape == (32, 3, 32, 32) and batch[1].dtype == torch.long and len(batch) == 2
    assert dm.files["test"] == [tmp_path / "cifar-10-batches-py" / "test_batch"]


def test_files_directly_in_data_dir(tmp_path, tiny):
    dm = dm_for(tmp_path / "cifar-10-batches-py")
    assert len(dm.splits["train"]) == 250


def test_splits_disjoint_stratified_seeded(tmp_path, tiny):
    _, labels = tiny["train"]
    dm = dm_for(tmp_path)
    train, val = src(dm.splits["train"]), src(dm.splits["val"])
    assert not set(train) & set(val) and sorted(train + val) == list(range(300))
    assert np.bincount(labels[val], minlength=10).tolist() == [5] * 10  # 50 of 30 per class: 5 each
    again = dm_for(tmp_path)
    assert src(again.splits["val"]) == val and src(again.splits["train"]) == train
    assert src(dm_for(tmp_path, seed=1).splits["val"]) != val
    sub = dm_for(tmp_path, num_train=100, num_test=20)
    assert set(src(sub.splits["train"])) <= set(train)
    assert np.bincount(labels[src(sub.splits["train"])], minlength=10).tolist() == [10] * 10
    assert np.bincount(tiny["test"][1][src(sub.splits["test"])], minlength=10).tolist() == [2] * 10
    assert src(sub.splits["val"]) == val  # subsets never move val


# ------------------------------------------------------------------ memorization options


def labels_of(ds) -> list[int]:
    return [ds[i][1] for i in range(len(ds))]


def test_label_noise_exact_seeded_and_train_only(tmp_path, tiny):
    _, truth = tiny["train"]
    clean = dm_for(tmp_path)
    dm = dm_for(tmp_path, label_noise=0.3)
    train = dm.splits["train"]
    served = torch.tensor(labels_of(train))
    true = dm.true_train_labels
    assert true.tolist() == truth[src(train)].tolist() == labels_of(clean.splits["train"])
    wrong = served != true
    assert int(wrong.sum()) == round(0.3 * 250) == 75
    assert bool(((served >= 0) & (served < 10)).all())
    # resume: the same hyperparameters (as a checkpoint restores them) give the same labels
    resumed = CIFAR10DataModule(**dict(dm.hparams))
    resumed.setup("fit")
    assert labels_of(resumed.splits["train"]) == served.tolist()
    assert labels_of(dm_for(tmp_path, label_noise=0.3, noise_seed=7).splits["train"]) != served.tolist()
    assert labels_of(dm_for(tmp_path, label_noise=0.3, noise_seed=0).splits["train"]) == served.tolist()
    for split in ("val", "test"):
        assert src(dm.splits[split]) == src(clean.splits[split])
        assert labels_of(dm.splits[split]) == labels_of(clean.splits[split])
    assert torch.equal(dm.splits["train"].images, clean.splits["train"].images)
    assert dm.train_groups()["noisy_label"].tolist() == wrong.tolist()
    assert int(dm_for(tmp_path, label_noise=1.0).train_groups()["noisy_label"].sum()) == 250


def test_random_labels(tmp_path, tiny):
    clean = dm_for(tmp_path)
    dm = dm_for(tmp_path, random_labels=True)
    served = torch.tensor(labels_of(dm.splits["train"]))
    true = dm.true_train_labels
    assert true.tolist() == labels_of(clean.splits["train"])
    assert set(served.tolist()) <= set(range(10)) and len(set(served.tolist())) == 10
    agree = int((served == true).sum())
    assert 5 <= agree <= 50  # about a tenth of 250 agree by chance
    groups = dm.train_groups()
    assert groups["noisy_label"].tolist() == (served != true).tolist()
    assert groups["clean"].tolist() == (served == true).tolist()
    assert labels_of(dm_for(tmp_path, random_labels=True).splits["train"]) == served.tolist()
    assert labels_of(dm_for(tmp_path, random_labels=True, seed=0, noise_seed=3).splits["train"]) != served.tolist()
    assert labels_of(dm.splits["val"]) == labels_of(clean.splits["val"])


def test_random_inputs_exact_and_others_untouched(tmp_path, tiny):
    clean = dm_for(tmp_path)
    dm = dm_for(tmp_path, random_inputs=0.2)
    train = dm.splits["train"]
    mask = dm.train_groups()["random_input"]
    assert int(mask.sum()) == 50
    assert labels_of(train) == labels_of(clean.splits["train"])
    for i in range(len(train)):
        x, _ = train[i]
        if mask[i]:
            assert not torch.allclose(x, clean.splits["train"][i][0])
            assert torch.equal(x, train[i][0])  # the same noise at every access
        else:
            assert torch.equal(x, clean.splits["train"][i][0])
    again = dm_for(tmp_path, random_inputs=0.2)
    assert torch.equal(again.train_groups()["random_input"], mask)
    i = int(mask.nonzero()[0])
    assert torch.equal(again.splits["train"][i][0], train[i][0])
    assert not torch.equal(dm_for(tmp_path, random_inputs=0.2, noise_seed=5).splits["train"][i][0], train[i][0])
    for split in ("val", "test"):
        assert all(torch.equal(a[0], b[0]) for a, b in zip(dm.splits[split], clean.splits[split]))


def test_random_inputs_noise_statistics(tmp_path):
    make_cifar(tmp_path, n=200, n_test=20)
    dm = dm_for(tmp_path, random_inputs=1.0, normalize=False)
    train = dm.splits["train"]
    assert bool(dm.train_groups()["random_input"].all()) and not dm.train_groups()["clean"].any()
    real = train.images.numpy().astype(np.float64) / 255.0  # (N, 32, 32, 3)
    noise = torch.stack([train[i][0] for i in range(len(train))]).double()  # (N, 3, 32, 32)
    for c in range(3):
        mean, std = real[..., c].mean(), real[..., c].std()
        assert abs(float(noise[:, c].mean()) - mean) < 0.005
        assert abs(float(noise[:, c].std()) - std) < 0.005
        assert train.noise_mean[c] == pytest.approx(mean, abs=1e-9)
        assert train.noise_std[c] == pytest.approx(std, abs=1e-9)
    assert train.noise_std[2] < 0.1 < train.noise_std[0]  # the channels really differ
    # normalised like the real images
    normed = dm_for(tmp_path, random_inputs=1.0).splits["train"][4][0]
    expected = (train[4][0] - torch.tensor(MEAN).view(3, 1, 1)) / torch.tensor(STD).view(3, 1, 1)
    torch.testing.assert_close(normed, expected)


def test_train_groups_consistent(tmp_path, tiny):
    plain = dm_for(tmp_path)
    groups = plain.train_groups()
    assert list(groups) == ["clean"] and bool(groups["clean"].all())
    dm = dm_for(tmp_path, label_noise=0.2, random_inputs=0.4)
    groups = dm.train_groups()
    assert set(groups) == {"clean", "noisy_label", "random_input"}
    assert all(g.dtype == torch.bool and g.shape == (250,) for g in groups.values())
    assert int(groups["noisy_label"].sum()) == 50 and int(groups["random_input"].sum()) == 100
    assert groups["clean"].tolist() == (~(groups["noisy_label"] | groups["random_input"])).tolist()
    served = torch.tensor(labels_of(dm.splits["train"]))
    assert groups["noisy_label"].tolist() == (served != dm.true_train_labels).tolist()


def test_train_eval_dataloader_order_and_augmentation(tmp_path, tiny):
    rows, _ = tiny["train"]
    dm = dm_for(tmp_path, augment=True, return_index=True, label_noise=0.1)
    train = dm.splits["train"]
    x, y, index = train[9]
    assert index == 9 and x.shape == (3, 32, 32)
    # an augmented item is one of the 9 x 9 crops of the image padded by 4 black pixels, perhaps flipped
    base = expected_image(rows[int(train.source_index[9])], normalize=False)
    padded = F.pad(base, (4, 4, 4, 4))
    mean, std = torch.tensor(MEAN).view(3, 1, 1), torch.tensor(STD).view(3, 1, 1)
    crops = [
        (c.flip(-1) if f else c)
        for c in (padded[:, i : i + 32, j : j + 32] for i in range(9) for j in range(9))
        for f in (0, 1)
    ]
    seen = set()
    for _ in range(20):
        raw = train[9][0] * std + mean
        match = [k for k, c in enumerate(crops) if torch.allclose(raw, c, atol=1e-5)]
        assert match
        seen.add(match[0])
    assert len(seen) > 1  # new crops at every access
    loader = dm.train_eval_dataloader()
    assert loader.batch_size == 32
    xs, ys, idx = (torch.cat(parts) for parts in zip(*loader))
    assert idx.tolist() == list(range(250))
    assert ys.tolist() == labels_of(train)  # the labels trained on
    for i in (0, 100, 249):
        torch.testing.assert_close(xs[i], expected_image(rows[int(train.source_index[i])]), rtol=0, atol=1e-5)
    assert dm.deterministic_train_transform is False and dm_for(tmp_path).deterministic_train_transform is True


# ------------------------------------------------------------------ bad input


@pytest.mark.parametrize(
    "kwargs, field",
    [
        (dict(label_noise=1.5), "label_noise"),
        (dict(label_noise=-0.1), "label_noise"),
        (dict(label_noise="0.2"), "label_noise"),
        (dict(random_inputs=2.0), "random_inputs"),
        (dict(random_inputs=True), "random_inputs"),
        (dict(random_labels="yes"), "random_labels"),
        (dict(random_labels=True, label_noise=0.1), "random_labels"),
        (dict(augment=1), "augment"),
        (dict(normalize=None), "normalize"),
        (dict(return_index="no"), "return_index"),
        (dict(val_size=-1), "val_size"),
        (dict(num_train=0), "num_train"),
        (dict(num_test=2.5), "num_test"),
        (dict(noise_seed=-1), "noise_seed"),
        (dict(batch_size=0), "batch_size"),
        (dict(num_workers=-1), "num_workers"),
        (dict(seed=1.0), "seed"),
        (dict(images_npz=""), "images_npz"),
        (dict(data_dir=3), "data_dir"),
    ],
)
def test_bad_arguments(kwargs, field):
    with pytest.raises(ValueError, match=rf"^CIFAR10DataModule: {field} must be") as info:
        CIFAR10DataModule(**kwargs)
    assert "\n" not in str(info.value)


def test_too_large_splits_name_the_field(tmp_path, tiny):
    with pytest.raises(ValueError, match="CIFAR10DataModule: val_size=300"):
        dm_for(tmp_path, val_size=300)
    with pytest.raises(ValueError, match="CIFAR10DataModule: num_train=251"):
        dm_for(tmp_path, num_train=251)
    with pytest.raises(ValueError, match="CIFAR10DataModule: num_test=61"):
        dm_for(tmp_path, num_test=61)


def test_missing_files_offline(tmp_path, monkeypatch):
    monkeypatch.setenv("REPROZOO_OFFLINE", "1")
    write_batch(tmp_path / "cifar-10-batches-py" / "data_batch_1", *fake_rows(10, 0))
    dm = CIFAR10DataModule(data_dir=str(tmp_path))
    with pytest.raises(FileNotFoundError) as info:
        dm.setup("fit")
    message = str(info.value)
    assert str(tmp_path / "cifar-10-batches-py") in message
    for f in ["data_batch_2", "data_batch_5", "test_batch"]:
        assert f in message
    assert "missing data_batch_1" not in message and "offline" in message and CIFAR10.url in message


def test_failed_download_says_where_to_put_the_files(tmp_path, monkeypatch):
    monkeypatch.delenv("REPROZOO_OFFLINE")
    url = (tmp_path / "nowhere" / "cifar-10-python.tar.gz").as_uri()
    monkeypatch.setattr(CIFAR10, "url", url)
    with pytest.raises(FileNotFoundError, match="the download of .* failed") as info:
        CIFAR10DataModule(data_dir=str(tmp_path / "root")).setup("fit")
    assert str(tmp_path / "root" / "cifar-10-batches-py") in str(info.value)
    assert [p.name for p in (tmp_path / "root").iterdir()] == []  # no half-download left behind


class _Quiet(http.server.SimpleHTTPRequestHandler):
    def log_message(self, *args):
        pass


@pytest.fixture
def served_folder(tmp_path):
    """A folder served over HTTP on the loopback interface (torchvision's downloader needs http), and its URL."""
    folder = tmp_path / "served"
    folder.mkdir()
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), functools.partial(_Quiet, directory=folder))
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield folder, f"http://127.0.0.1:{server.server_address[1]}/"
    server.shutdown()
    server.server_close()


def test_download_from_the_archive(tmp_path, monkeypatch, served_folder):
    monkeypatch.delenv("REPROZOO_OFFLINE")
    parts = make_cifar(tmp_path / "src")
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w:gz") as archive:
        archive.add(tmp_path / "src" / "cifar-10-batches-py", arcname="cifar-10-batches-py")
    folder, url = served_folder
    (folder / "cifar-10-python.tar.gz").write_bytes(buffer.getvalue())
    monkeypatch.setattr(CIFAR10, "url", url + "cifar-10-python.tar.gz")
    root = tmp_path / "root"
    monkeypatch.setattr(CIFAR10, "tgz_md5", "0" * 32)  # an archive that is not the official one is refused
    with pytest.raises(FileNotFoundError, match="the download of .* failed"):
        dm_for(root)
    assert [p.name for p in root.iterdir()] == []
    monkeypatch.setattr(CIFAR10, "tgz_md5", hashlib.md5(buffer.getvalue()).hexdigest())
    dm = dm_for(root)
    assert sorted(p.name for p in root.iterdir()) == ["cifar-10-batches-py"]
    assert (root / "cifar-10-batches-py" / "test_batch").is_file()
    assert labels_of(dm.splits["test"]) == parts["test"][1].tolist()


def corrupt(path: Path, how: str) -> None:
    data, labels = fake_rows(60, 3)
    if how == "garbage":
        path.write_bytes(b"not a pickle at all")
    elif how == "truncated":
        path.write_bytes(path.read_bytes()[:500])
    elif how == "shape":
        write_batch(path, data[:, :3000], labels)
    elif how == "dtype":
        write_batch(path, data.astype(np.int16), labels)
    elif how == "labels":
        write_batch(path, data, [12] + labels[1:])
    elif how == "count":
        write_batch(path, data, labels[:59])
    elif how == "no_data":
        path.write_bytes(pickle.dumps({b"labels": labels}, protocol=2))
    elif how == "foreign":
        path.write_bytes(pickle.dumps({b"data": Path("x"), b"labels": labels}))


@pytest.mark.parametrize("how", ["garbage", "truncated", "shape", "dtype", "labels", "count", "no_data", "foreign"])
def test_corrupt_batch_file_is_named(tmp_path, tiny, how):
    path = tmp_path / "cifar-10-batches-py" / "data_batch_3"
    corrupt(path, how)
    with pytest.raises(ValueError, match="CIFAR10DataModule: .*data_batch_3"):
        dm_for(tmp_path)


# ------------------------------------------------------------------ images_npz


def test_images_npz_is_split_like_train_source_test(tmp_path, monkeypatch):
    rng = np.random.default_rng(0)
    x = rng.integers(0, 256, size=(100, 32, 32, 3), dtype=np.uint8)
    y = np.arange(100) % 10
    root = tmp_path / "data-root"  # the test's data root (conftest): a relative images_npz is looked up there
    (root / "cifar10").mkdir(parents=True)
    np.savez(root / "cifar10" / "tiny.npz", x=x, y=y)
    monkeypatch.chdir(tmp_path)
    dm = CIFAR10DataModule(images_npz="cifar10/tiny.npz", batch_size=16)
    dm.setup("fit")
    sizes = {k: len(v) for k, v in dm.splits.items()}
    assert sizes == {"train": 72, "val": 8, "test": 20}
    parts = [set(src(dm.splits[k])) for k in ("train", "val", "test")]
    assert not (parts[0] & parts[1] or parts[0] & parts[2] or parts[1] & parts[2])
    assert np.bincount(y[src(dm.splits["test"])]).tolist() == [2] * 10
    i = 3
    s = int(dm.splits["train"].source_index[i])
    expected = (torch.from_numpy(x[s]).permute(2, 0, 1).float() / 255 - torch.tensor(MEAN).view(3, 1, 1)) / (
        torch.tensor(STD).view(3, 1, 1)
    )
    torch.testing.assert_close(dm.splits["train"][i][0], expected)
    assert dm.splits["train"][i][1] == y[s]
    assert dm.files["test"] == [root / "cifar10" / "tiny.npz"]
    noisy = CIFAR10DataModule(images_npz="cifar10/tiny.npz", label_noise=0.5, num_train=50, num_test=10)
    noisy.setup("fit")
    assert {k: len(v) for k, v in noisy.splits.items()} == {"train": 45, "val": 5, "test": 10}
    assert int(noisy.train_groups()["noisy_label"].sum()) == round(0.5 * 45)
    with pytest.raises(FileNotFoundError, match="images_npz .*missing.npz"):
        CIFAR10DataModule(images_npz="cifar10/missing.npz").setup("fit")


def test_real_jpeg_test_set_split():
    path = real_data("cifar10", "test_jpeg_q75.npz")
    dm = CIFAR10DataModule(images_npz=str(path))
    dm.setup("fit")
    assert {k: len(v) for k, v in dm.splits.items()} == {"train": 7200, "val": 800, "test": 2000}
    for split, per_class in (("train", 720), ("val", 80), ("test", 200)):
        labels = dm.splits[split].labels.numpy()
        assert np.bincount(labels, minlength=10).tolist() == [per_class] * 10
    x, y = dm.splits["test"][0]
    assert x.shape == (3, 32, 32) and x.dtype == torch.float32 and 0 <= y < 10
    assert abs(float(x.mean())) < 3


# ------------------------------------------------------------------ Lightning


def test_lightning_fit_with_convnet(tmp_path, tiny):
    L.seed_everything(0)
    dm = CIFAR10DataModule(
        data_dir=str(tmp_path),
        val_size=50,
        batch_size=16,
        augment=True,
        return_index=True,
        label_noise=0.2,
        random_inputs=0.1,
    )
    model = ClassifierModule(net="convnet")
    trainer = L.Trainer(
        max_epochs=1,
        limit_train_batches=2,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        default_root_dir=tmp_path,
    )
    trainer.fit(model, datamodule=dm)
    assert trainer.global_step == 2
    assert torch.isfinite(trainer.callback_metrics["train/loss"])
    assert "val/acc" in trainer.callback_metrics
