import functools
import gzip
import hashlib
import http.server
import struct
import threading
import time
import urllib.request
from pathlib import Path

import numpy as np
import pytest
import torch
import torchvision.datasets
import torchvision.datasets.utils
from torch.utils.data import DataLoader

from reprozoo.datamodules import FashionMNISTDataModule
from reprozoo.datamodules.fashion_mnist import MNISTLikeDataset, read_images, read_labels, shift_image
from tests.conftest import real_data
from tests.helpers import TinyClassifier, tiny_trainer

FOLDERS = {"fashion_mnist": "FashionMNIST", "mnist": "MNIST"}
STATS = {"fashion_mnist": (0.2860, 0.3530), "mnist": (0.1307, 0.3081)}
TRAIN_FILES = ("train-images-idx3-ubyte", "train-labels-idx1-ubyte")
TEST_FILES = ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte")


# ------------------------------------------------------------------ the official idx format, written here


def idx_images_bytes(images: np.ndarray) -> bytes:
    """The official layout: magic 2051, then count, rows, cols as big-endian uint32, then the pixels row-major."""
    n, rows, cols = images.shape
    return struct.pack(">4I", 2051, n, rows, cols) + np.ascontiguousarray(images, dtype=np.uint8).tobytes()


def idx_labels_bytes(labels: np.ndarray) -> bytes:
    return struct.pack(">2I", 2049, len(labels)) + np.asarray(labels, dtype=np.uint8).tobytes()


def write_gz(path: Path, data: bytes) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(gzip.compress(data, compresslevel=1))
    return path


def fake_part(n: int, seed: int, labels: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
    """n images with every pixel in 1..255 (so zero fill shows), labels 0..9 in turn unless given."""
    rng = np.random.default_rng(seed)
    images = rng.integers(1, 256, size=(n, 28, 28), dtype=np.uint8)
    return images, (np.arange(n) % 10 if labels is None else labels).astype(np.uint8)


def make_raw(data_dir: Path, dataset: str = "fashion_mnist", n_train: int | None = 200, n_test: int = 50) -> dict:
    """``data_dir/<Folder>/raw/*.gz`` in torchvision's layout; returns {part: (images, labels)}."""
    raw = data_dir / FOLDERS[dataset] / "raw"
    parts = {}
    for part, n, files, seed in (("train", n_train, TRAIN_FILES, 1), ("test", n_test, TEST_FILES, 2)):
        if n is None:
            continue
        images, labels = fake_part(n, seed)
        write_gz(raw / f"{files[0]}.gz", idx_images_bytes(images))
        write_gz(raw / f"{files[1]}.gz", idx_labels_bytes(labels))
        parts[part] = (images, labels)
    return parts


def link_shared_mnist(data_dir: Path) -> Path:
    """torchvision's layout of symlinks to the real files, which are read in place."""
    raw = data_dir / "MNIST" / "raw"
    raw.mkdir(parents=True)
    for f in sorted(real_data("mnist").glob("*.gz")):
        (raw / f.name).symlink_to(f)
    return raw


def src(ds) -> list[int]:
    return ds.source_index.tolist()


def counts(labels) -> list[int]:
    return torch.bincount(torch.as_tensor(labels), minlength=10).tolist()


# ------------------------------------------------------------------ items


@pytest.mark.parametrize("dataset", ["fashion_mnist", "mnist"])
def test_items_shapes_normalisation_and_flatten(tmp_path, dataset):
    parts = make_raw(tmp_path, dataset)
    dm = FashionMNISTDataModule(dataset, data_dir=str(tmp_path), val_size=20, batch_size=16)
    dm.setup()
    assert {k: len(v) for k, v in dm.splits.items()} == {"train": 180, "val": 20, "test": 50}
    assert dm.num_classes == 10 and dm.input_shape == (1, 28, 28) and dm.deterministic_train_transform
    tv_class = torchvision.datasets.FashionMNIST if dataset == "fashion_mnist" else torchvision.datasets.MNIST
    assert dm.classes == tv_class.classes and (dm.mean, dm.std) == STATS[dataset]
    assert dm.files["train"][0] == tmp_path / FOLDERS[dataset] / "raw" / "train-images-idx3-ubyte.gz"

    mean, std = STATS[dataset]
    for split, part in (("train", "train"), ("val", "train"), ("test", "test")):
        ds = dm.splits[split]
        images, labels = parts[part]
        assert ds.images.dtype == torch.uint8
        for i in (0, len(ds) - 1):
            x, y = ds[i]
            j = int(ds.source_index[i])
            expected = (torch.from_numpy(images[j]).float() / 255 - mean) / std
            assert x.shape == (1, 28, 28) and x.dtype == torch.float32 and isinstance(y, int)
            assert torch.allclose(x[0], expected, atol=1e-5) and y == labels[j]

    raw = FashionMNISTDataModule(dataset, data_dir=str(tmp_path), val_size=20, normalize=False)
    raw.setup()
    x_raw, _ = raw.splits["train"][3]
    assert 0 < x_raw.min() and x_raw.max() <= 1
    assert torch.allclose(dm.splits["train"][3][0], (x_raw - mean) / std, atol=1e-5)

    flat = FashionMNISTDataModule(dataset, data_dir=str(tmp_path), val_size=20, flatten=True)
    flat.setup()
    assert flat.input_shape == (784,)
    assert torch.equal(flat.splits["train"][3][0], dm.splits["train"][3][0].reshape(-1))

    xb, yb = next(iter(dm.train_dataloader()))
    assert xb.shape == (16, 1, 28, 28) and yb.dtype == torch.long
    assert len(dm.val_dataloader()) == 2 and len(dm.test_dataloader()) == 4


def test_uncompressed_files_are_read(tmp_path):
    parts = make_raw(tmp_path, "mnist", n_train=None)
    raw = tmp_path / "MNIST" / "raw"
    for f in TEST_FILES:  # torchvision's extracted copies only
        (raw / f).write_bytes(gzip.decompress((raw / f"{f}.gz").read_bytes()))
        (raw / f"{f}.gz").unlink()
    dm = FashionMNISTDataModule("mnist", data_dir=str(tmp_path), train_source="test", num_test=10)
    dm.setup()
    assert dm.files["test"] == (raw / TEST_FILES[0], raw / TEST_FILES[1])
    test = dm.splits["test"]
    assert torch.equal(test.images, torch.from_numpy(parts["test"][0][test.source_index.numpy()]))


# ------------------------------------------------------------------ splits


def test_official_splits_stratified_balanced_and_seeded(tmp_path):
    make_raw(tmp_path, n_train=200, n_test=100)

    def build(seed=0, **kwargs):
        dm = FashionMNISTDataModule(data_dir=str(tmp_path), seed=seed, **kwargs)
        dm.setup()
        return dm.splits

    s = build(val_size=30)
    assert counts(s["val"].labels) == [3] * 10  # stratified: 30 of 20 per class
    assert not set(src(s["train"])) & set(src(s["val"]))
    assert sorted(src(s["train"]) + src(s["val"])) == list(range(200))
    assert src(s["test"]) == list(range(100))
    again = build(val_size=30)
    assert all(src(again[k]) == src(s[k]) for k in s)
    assert src(build(seed=1, val_size=30)["val"]) != src(s["val"])

    sub = build(val_size=30, num_train=53, num_test=20)
    assert len(sub["train"]) == 53 and sorted(counts(sub["train"].labels)) == [5] * 7 + [6] * 3
    assert counts(sub["test"].labels) == [2] * 10
    assert src(sub["val"]) == src(s["val"])  # val does not depend on num_train
    assert set(src(sub["train"])) <= set(src(s["train"]))

    assert counts(build(val_size=30, num_train=170)["train"].labels) == [17] * 10  # all there is
    with pytest.raises(ValueError, match="num_train=171, but only 170"):
        build(val_size=30, num_train=171)
    with pytest.raises(ValueError, match="num_test=101"):
        build(val_size=30, num_test=101)
    with pytest.raises(ValueError, match="val_size=200"):
        build(val_size=200)


def test_class_balanced_subset_names_the_short_class(tmp_path):
    raw = tmp_path / "FashionMNIST" / "raw"
    labels = np.array([c for c in range(10) for _ in range(2 if c == 7 else 10)])  # class 7 has 2 images
    images, _ = fake_part(len(labels), 0)
    write_gz(raw / f"{TRAIN_FILES[0]}.gz", idx_images_bytes(images))
    write_gz(raw / f"{TRAIN_FILES[1]}.gz", idx_labels_bytes(labels))
    write_gz(raw / f"{TEST_FILES[0]}.gz", idx_images_bytes(images))
    write_gz(raw / f"{TEST_FILES[1]}.gz", idx_labels_bytes(labels))
    dm = FashionMNISTDataModule(data_dir=str(tmp_path), val_size=0, num_test=30)
    short = r"num_test: a class-balanced subset of 30 needs 3 items of class 7 \(Sneaker\)"
    with pytest.raises(ValueError, match=short):
        dm.setup()


def test_test_file_split_when_only_test_files_exist(tmp_path):
    # unbalanced labels: 10 * (c + 1) images of class c, 550 in all
    labels = np.repeat(np.arange(10), 10 * (np.arange(10) + 1))
    np.random.default_rng(0).shuffle(labels)
    images, _ = fake_part(len(labels), 3)
    raw = tmp_path / "MNIST" / "raw"
    write_gz(raw / f"{TEST_FILES[0]}.gz", idx_images_bytes(images))
    write_gz(raw / f"{TEST_FILES[1]}.gz", idx_labels_bytes(labels))

    def build(seed=0, **kwargs):
        dm = FashionMNISTDataModule("mnist", data_dir=str(tmp_path), train_source="test", seed=seed, **kwargs)
        dm.setup()
        return dm.splits

    s = build()  # defaults: a fifth for test, the rest for train/val, a tenth of that for val
    assert {k: len(v) for k, v in s.items()} == {"train": 396, "val": 44, "test": 110}
    assert counts(s["test"].labels) == [2 * (c + 1) for c in range(10)]  # stratified: a fifth of each class
    assert counts(s["train"].labels) == [
        a - b for a, b in zip([8 * (c + 1) for c in range(10)], counts(s["val"].labels))
    ]
    ids = [set(src(s[k])) for k in ("train", "val", "test")]
    assert not ids[0] & ids[1] and not ids[0] & ids[2] and not ids[1] & ids[2]
    assert set().union(*ids) == set(range(550))
    for ds in s.values():
        assert torch.equal(ds.labels, torch.from_numpy(labels[ds.source_index.numpy()]).long())
        assert torch.equal(ds.images, torch.from_numpy(images[ds.source_index.numpy()]))

    s2 = build(num_train=200, num_test=110, val_size=50)
    assert {k: len(v) for k, v in s2.items()} == {"train": 150, "val": 50, "test": 110}
    assert src(s2["test"]) == src(s["test"])  # the test part depends only on seed and num_test
    assert all(abs(n - 200 * 10 * (c + 1) / 550 * 0.25) <= 1 for c, n in enumerate(counts(s2["val"].labels)))
    again = build(num_train=200, num_test=110, val_size=50)
    assert all(src(again[k]) == src(s2[k]) for k in s2)
    other = build(seed=5, num_train=200, num_test=110, val_size=50)
    assert src(other["test"]) != src(s2["test"]) and src(other["train"]) != src(s2["train"])
    assert len(build(num_train=100, val_size=0)["val"]) == 0

    with pytest.raises(ValueError, match="num_train=500 \\+ num_test=110"):
        build(num_train=500, num_test=110)
    with pytest.raises(ValueError, match="val_size=100"):
        build(num_train=100, val_size=100)


# ------------------------------------------------------------------ exclude_classes, jitter, return_index


@pytest.mark.parametrize("train_source", ["train", "test"])
def test_exclude_classes_only_from_train(tmp_path, train_source):
    make_raw(tmp_path, n_train=200, n_test=200)
    options = dict(data_dir=str(tmp_path), train_source=train_source, val_size=40, num_test=50)
    full = FashionMNISTDataModule(**options)
    full.setup()
    dm = FashionMNISTDataModule(**options, exclude_classes=[3, 7])
    dm.setup()
    train = dm.splits["train"]
    assert not ({3, 7} & set(train.labels.tolist())) and len(train) > 0
    # the same items as without exclusion, minus classes 3 and 7
    kept = [i for i, y in zip(src(full.splits["train"]), full.splits["train"].labels.tolist()) if y not in (3, 7)]
    assert src(train) == kept
    for split in ("val", "test"):
        assert {3, 7} <= set(dm.splits[split].labels.tolist())
        assert src(dm.splits[split]) == src(full.splits[split])
    assert dm.exclude_classes == (3, 7)


def find_shift(x: torch.Tensor, original: torch.Tensor, k: int) -> tuple[int, int]:
    matches = [
        (dy, dx) for dy in range(-k, k + 1) for dx in range(-k, k + 1) if torch.equal(x, shift_image(original, dy, dx))
    ]
    assert len(matches) == 1, "not a shift of the original by at most k pixels"
    return matches[0]


def test_shift_image_fills_with_zeros():
    image = torch.arange(1, 17, dtype=torch.uint8).reshape(4, 4)
    down_right = shift_image(image, 1, 2)
    assert down_right[0].eq(0).all() and down_right[:, :2].eq(0).all()
    assert torch.equal(down_right[1:, 2:], image[:3, :2])
    up_left = shift_image(image, -2, -1)
    assert torch.equal(up_left[:2, :3], image[2:, 1:]) and up_left[2:].eq(0).all() and up_left[:, 3].eq(0).all()
    assert torch.equal(shift_image(image, 0, 0), image) and shift_image(image, 4, 0).eq(0).all()


def test_jitter_on_train_only_new_each_access_and_seeded(tmp_path):
    parts = make_raw(tmp_path, n_train=120, n_test=30)
    options = dict(data_dir=str(tmp_path), val_size=20, jitter=2, normalize=False)
    dm = FashionMNISTDataModule(**options)
    assert not dm.deterministic_train_transform and FashionMNISTDataModule().deterministic_train_transform
    dm.setup()
    train = dm.splits["train"]
    images = torch.from_numpy(parts["train"][0])

    def epoch():
        shifts = []
        for i in range(len(train)):
            x, _ = train[i]
            shifts.append(find_shift(torch.round(x[0] * 255).to(torch.uint8), images[train.source_index[i]], 2))
        return shifts

    first, second = epoch(), epoch()
    assert first != second  # new shifts at every access
    assert {dy for dy, _ in first + second} == {dx for _, dx in first + second} == {-2, -1, 0, 1, 2}
    assert any(s != (0, 0) for s in first)
    replay = FashionMNISTDataModule(**options)
    replay.setup()
    replay_train = replay.splits["train"]
    replay_first = [
        find_shift(torch.round(replay_train[i][0][0] * 255).to(torch.uint8), images[replay_train.source_index[i]], 2)
        for i in range(len(replay_train))
    ]
    assert replay_first == first  # seeded: a new datamodule with the same seed replays the shifts

    for split, part in (("val", "train"), ("test", "test")):
        ds = dm.splits[split]
        originals = torch.from_numpy(parts[part][0])
        for i in range(len(ds)):
            assert torch.equal(torch.round(ds[i][0][0] * 255).to(torch.uint8), originals[ds.source_index[i]])


def test_jitter_differs_between_loader_workers():
    image = torch.full((28, 28), 200, dtype=torch.uint8)
    ds = MNISTLikeDataset(image.expand(64, 28, 28).clone(), torch.zeros(64, dtype=torch.long), jitter=3, seed=0)
    batches = [x for x, _ in DataLoader(ds, batch_size=8, num_workers=2)]
    # batches 0 and 1 come from different workers: identical generators would give identical shifts
    assert not torch.equal(batches[0], batches[1])


def test_return_index_on_train_items(tmp_path):
    make_raw(tmp_path, n_train=100, n_test=20)
    dm = FashionMNISTDataModule(
        data_dir=str(tmp_path), val_size=10, return_index=True, exclude_classes=[0], batch_size=32
    )
    dm.setup()
    train = dm.splits["train"]
    for i in (0, 5, len(train) - 1):
        x, y, index = train[i]
        assert index == i and y == int(train.labels[i])
    assert train[-1][2] == len(train) - 1
    assert len(dm.splits["val"][0]) == 2 and len(dm.splits["test"][0]) == 2
    seen = torch.cat([idx for _, _, idx in dm.train_dataloader()])
    assert sorted(seen.tolist()) == list(range(len(train)))
    x, y, idx = next(iter(dm.train_dataloader()))
    assert torch.equal(train.labels[idx], y)
    assert all(torch.equal(x[k], train[int(idx[k])][0]) for k in range(3))  # no jitter: same image again
    with pytest.raises(IndexError):
        train[len(train)]


# ------------------------------------------------------------------ bad files


def corrupt(raw: Path, kind: str) -> Path:
    """Replace one file of a good set by a malformed one; returns its path."""
    images, labels = fake_part(20, 0)
    bad_images, bad_labels = raw / f"{TEST_FILES[0]}.gz", raw / f"{TEST_FILES[1]}.gz"
    if kind == "wrong magic":  # a labels file where the images file should be
        return write_gz(bad_images, idx_labels_bytes(labels))
    if kind == "truncated data":
        return write_gz(bad_images, idx_images_bytes(images)[:-100])
    if kind == "trailing bytes":
        return write_gz(bad_labels, idx_labels_bytes(labels) + b"\0")
    if kind == "truncated header":
        return write_gz(bad_images, idx_images_bytes(images)[:10])
    if kind == "truncated gzip":
        data = gzip.compress(idx_images_bytes(images))
        bad_images.write_bytes(data[: len(data) // 2])
        return bad_images
    if kind == "not gzip":
        bad_labels.write_bytes(idx_labels_bytes(labels))  # uncompressed bytes under a .gz name
        return bad_labels
    if kind == "27x27 images":
        return write_gz(bad_images, idx_images_bytes(images[:, :27, :27]))
    if kind == "label 10":
        return write_gz(bad_labels, idx_labels_bytes(np.r_[labels[:-1], 10]))
    raise AssertionError(kind)


@pytest.mark.parametrize(
    "kind, message",
    [
        ("wrong magic", "magic number 2049"),
        ("truncated data", "is truncated"),
        ("trailing bytes", "longer than its header says"),
        ("truncated header", "truncated"),
        ("truncated gzip", "EOFError"),
        ("not gzip", "BadGzipFile"),
        ("27x27 images", "27x27 images"),
        ("label 10", "the label 10"),
    ],
)
def test_malformed_files_name_the_file(tmp_path, kind, message):
    make_raw(tmp_path, n_train=None, n_test=20)
    bad = corrupt(tmp_path / "FashionMNIST" / "raw", kind)
    dm = FashionMNISTDataModule(data_dir=str(tmp_path), train_source="test")
    with pytest.raises(ValueError, match=message) as err:
        dm.setup()
    assert str(bad) in str(err.value)


def test_count_mismatch_names_both_files(tmp_path):
    make_raw(tmp_path, n_train=None, n_test=20)
    raw = tmp_path / "FashionMNIST" / "raw"
    write_gz(raw / f"{TEST_FILES[1]}.gz", idx_labels_bytes(np.arange(19) % 10))
    with pytest.raises(ValueError, match="has 20 images but .* has 19 labels") as err:
        FashionMNISTDataModule(data_dir=str(tmp_path), train_source="test").setup()
    assert str(raw / f"{TEST_FILES[0]}.gz") in str(err.value) and str(raw / f"{TEST_FILES[1]}.gz") in str(err.value)


def test_read_idx_directly(tmp_path):
    images, labels = fake_part(7, 0)
    assert torch.equal(read_images(write_gz(tmp_path / "i.gz", idx_images_bytes(images))), torch.from_numpy(images))
    read = read_labels(write_gz(tmp_path / "l.gz", idx_labels_bytes(labels)))
    assert read.dtype == torch.long and read.tolist() == labels.tolist()
    with pytest.raises(ValueError, match="l.gz is not an idx images file"):
        read_images(tmp_path / "l.gz")
    (tmp_path / "tiny").write_bytes(b"\0\0")
    with pytest.raises(ValueError, match="fewer than the 4"):
        read_labels(tmp_path / "tiny")
    with pytest.raises(FileNotFoundError):
        read_labels(tmp_path / "absent.gz")


# ------------------------------------------------------------------ missing files and download


def no_network(monkeypatch):
    def fail(*args, **kwargs):
        raise AssertionError("the network was touched")

    monkeypatch.setattr(urllib.request, "urlopen", fail)
    monkeypatch.setattr(torchvision.datasets.utils, "download_url", fail)


def test_missing_files_offline_lists_exactly_what_to_put_where(tmp_path, monkeypatch):
    no_network(monkeypatch)
    dm = FashionMNISTDataModule(data_dir=str(tmp_path / "nothing"))
    with pytest.raises(FileNotFoundError) as err:
        dm.prepare_data()
    msg = str(err.value)
    raw = tmp_path / "nothing" / "FashionMNIST" / "raw"
    for f in TRAIN_FILES + TEST_FILES:
        assert str(raw / f"{f}.gz") in msg
    assert f"into {raw}/" in msg and "REPROZOO_OFFLINE" in msg and "fashion-mnist" in msg
    assert not (tmp_path / "nothing").exists()

    make_raw(tmp_path / "some", "mnist", n_train=None)  # only the test files: enough for train_source="test"
    (tmp_path / "some" / "MNIST" / "raw" / f"{TEST_FILES[1]}.gz").unlink()
    with pytest.raises(FileNotFoundError) as err:
        FashionMNISTDataModule("mnist", data_dir=str(tmp_path / "some"), train_source="test").setup()
    msg = str(err.value)
    assert f"missing {tmp_path / 'some' / 'MNIST' / 'raw' / TEST_FILES[1]}.gz, and offline" in msg
    assert TEST_FILES[0] not in msg.split("Put")[0]


class QuietHandler(http.server.SimpleHTTPRequestHandler):
    def log_message(self, *args):
        pass


@pytest.fixture
def local_mirror(tmp_path):
    """An HTTP server on 127.0.0.1 serving tmp_path/mirror/: torchvision's download code runs unchanged."""
    folder = tmp_path / "mirror"
    folder.mkdir()
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), functools.partial(QuietHandler, directory=folder))
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield folder, f"http://127.0.0.1:{server.server_address[1]}/"
    server.shutdown()
    server.server_close()


def test_download_with_torchvision_md5_and_mirrors(tmp_path, monkeypatch, local_mirror):
    monkeypatch.delenv("REPROZOO_OFFLINE")
    folder, url = local_mirror
    make_raw(tmp_path / "built", n_train=None, n_test=30)
    resources = []
    for f in TEST_FILES:
        data = (tmp_path / "built" / "FashionMNIST" / "raw" / f"{f}.gz").read_bytes()
        (folder / f"{f}.gz").write_bytes(data)
        resources.append((f"{f}.gz", hashlib.md5(data).hexdigest()))
    monkeypatch.setattr(torchvision.datasets.FashionMNIST, "resources", resources)
    # a file whose md5 is not torchvision's is refused and leaves nothing behind
    good = (folder / f"{TEST_FILES[0]}.gz").read_bytes()
    (folder / f"{TEST_FILES[0]}.gz").write_bytes(b"tampered")
    refused = tmp_path / "refused"
    with pytest.raises(FileNotFoundError, match="download failed") as err:
        FashionMNISTDataModule(data_dir=str(refused), train_source="test", mirrors=[url]).prepare_data()
    assert "corrupted" in str(err.value) and str(refused / "FashionMNIST" / "raw" / TEST_FILES[0]) in str(err.value)
    assert list((refused / "FashionMNIST" / "raw").iterdir()) == []
    (folder / f"{TEST_FILES[0]}.gz").write_bytes(good)

    data_dir = tmp_path / "data"
    dm = FashionMNISTDataModule(data_dir=str(data_dir), train_source="test", mirrors=[url + "dead/", url])
    dm.prepare_data()
    raw = data_dir / "FashionMNIST" / "raw"
    assert sorted(p.name for p in raw.iterdir()) == sorted(f"{f}.gz" for f in TEST_FILES)  # nothing else
    dm.setup()
    assert sum(len(ds) for ds in dm.splits.values()) == 30
    no_network(monkeypatch)  # once there, nothing is fetched again
    FashionMNISTDataModule(data_dir=str(data_dir), train_source="test", mirrors=[url]).prepare_data()


# ------------------------------------------------------------------ arguments


@pytest.mark.parametrize(
    "kwargs, field",
    [
        ({"dataset": "cifar10"}, "dataset"),
        ({"train_source": "val"}, "train_source"),
        ({"batch_size": 0}, "batch_size"),
        ({"num_workers": -1}, "num_workers"),
        ({"seed": -1}, "seed"),
        ({"num_train": 0}, "num_train"),
        ({"num_test": 2.5}, "num_test"),
        ({"val_size": -1}, "val_size"),
        ({"jitter": -1}, "jitter"),
        ({"jitter": 28}, "jitter"),
        ({"jitter": 1.5}, "jitter"),
        ({"exclude_classes": [10]}, "exclude_classes"),
        ({"exclude_classes": [-1]}, "exclude_classes"),
        ({"exclude_classes": "3"}, "exclude_classes"),
        ({"exclude_classes": 3}, "exclude_classes"),
        ({"exclude_classes": range(10)}, "exclude_classes"),
        ({"mirrors": "http://example.invalid/"}, "mirrors"),
    ],
)
def test_bad_arguments_name_the_field(kwargs, field):
    with pytest.raises(ValueError, match=field):
        FashionMNISTDataModule(**kwargs)


def test_default_data_dir_is_under_the_data_root(tmp_path):
    dm = FashionMNISTDataModule("mnist")
    assert dm.raw_folder == tmp_path / "data-root" / "mnist" / "MNIST" / "raw"  # where downloads go
    assert dm.mirrors == torchvision.datasets.MNIST.mirrors


# ------------------------------------------------------------------ real data (read in place)


def test_real_mnist_test_images_split_for_benchmarks(tmp_path):
    raw = link_shared_mnist(tmp_path)
    real_images = read_images(raw / "t10k-images-idx3-ubyte.gz")
    real_labels = read_labels(raw / "t10k-labels-idx1-ubyte.gz")
    assert real_images.shape == (10000, 28, 28) and len(real_labels) == 10000
    first20 = np.load(real_data("fashion_mnist", "first20_test_fmnist_mnist_cifar10.npz"))
    assert torch.equal(real_images[:20], torch.from_numpy(first20["mnist_x"]))  # an independent copy agrees
    assert real_labels[:20].tolist() == first20["mnist_y"].tolist()
    pixels = real_images.float() / 255
    assert abs(pixels.mean().item() - 0.1307) < 0.005 and abs(pixels.std().item() - 0.3081) < 0.005

    dm = FashionMNISTDataModule("mnist", data_dir=str(tmp_path), train_source="test", num_train=8000, num_test=2000)
    dm.setup()
    train, val, test = (dm.splits[k] for k in ("train", "val", "test"))
    assert (len(train), len(val), len(test)) == (7200, 800, 2000)
    per_class = counts(real_labels)
    assert all(abs(n - 0.2 * per_class[c]) < 1 for c, n in enumerate(counts(test.labels)))
    assert all(abs(n - 0.08 * per_class[c]) < 1 for c, n in enumerate(counts(val.labels)))
    for ds in (train, val, test):
        assert torch.equal(ds.labels, real_labels[ds.source_index])
        assert torch.equal(ds.images, real_images[ds.source_index])
    assert len(set(src(train)) | set(src(val)) | set(src(test))) == 10000
    x = torch.stack([train[i][0] for i in range(len(train))])
    assert abs(x.mean().item()) < 0.02 and abs(x.std().item() - 1) < 0.02  # normalised with the MNIST constants

    # the official train images are absent here: train_source="train" says exactly which file is missing
    with pytest.raises(FileNotFoundError) as err:
        FashionMNISTDataModule("mnist", data_dir=str(tmp_path)).setup()
    missing = str(err.value).split(", and offline")[0]
    assert missing.endswith(f"missing {raw / 'train-images-idx3-ubyte.gz'}")


def test_real_mnist_epoch_is_fast(tmp_path):
    link_shared_mnist(tmp_path)
    dm = FashionMNISTDataModule(
        "mnist",
        data_dir=str(tmp_path),
        train_source="test",
        num_train=8000,
        num_test=2000,
        val_size=0,
        jitter=2,
        return_index=True,
        batch_size=128,
    )
    dm.setup()
    assert len(dm.splits["train"]) == 8000
    loader = dm.train_dataloader()
    start = time.perf_counter()
    seen = sum(len(batch[0]) for batch in loader)
    elapsed = time.perf_counter() - start
    assert seen == 8000 and elapsed < 1.5, f"an epoch of 8,000 jittered items took {elapsed:.2f} s"


def test_real_fashion_mnist_label_files():
    for name, n in (("train-labels-idx1-ubyte.gz", 60000), ("t10k-labels-idx1-ubyte.gz", 10000)):
        path = real_data("fashion_mnist", name)
        assert hashlib.md5(path.read_bytes()).hexdigest() == dict(torchvision.datasets.FashionMNIST.resources)[name]
        labels = read_labels(path)
        assert len(labels) == n and counts(labels) == [n // 10] * 10


def test_real_fashion_mnist_images_round_trip_through_idx(tmp_path):
    first20 = np.load(real_data("fashion_mnist", "first20_test_fmnist_mnist_cifar10.npz"))
    images, labels = first20["fmnist_x"], first20["fmnist_y"]
    raw = tmp_path / "FashionMNIST" / "raw"
    write_gz(raw / f"{TEST_FILES[0]}.gz", idx_images_bytes(images))
    write_gz(raw / f"{TEST_FILES[1]}.gz", idx_labels_bytes(labels))
    assert torch.equal(read_images(raw / f"{TEST_FILES[0]}.gz"), torch.from_numpy(images))
    dm = FashionMNISTDataModule(data_dir=str(tmp_path), train_source="test", num_test=5, val_size=3, normalize=False)
    dm.setup()
    assert {k: len(v) for k, v in dm.splits.items()} == {"train": 12, "val": 3, "test": 5}
    for ds in dm.splits.values():
        for i in range(len(ds)):
            x, y = ds[i]
            j = int(ds.source_index[i])
            assert torch.equal(torch.round(x[0] * 255).to(torch.uint8), torch.from_numpy(images[j]))
            assert y == labels[j]
    assert dm.classes[labels[0]] == "Ankle boot"


# ------------------------------------------------------------------ Lightning


class IndexedClassifier(TinyClassifier):
    """Checks the batch structure: (x, y, index) in training, (x, y) otherwise."""

    def __init__(self, in_features: int, n_train: int):
        super().__init__(in_features, 10)
        self.register_buffer("seen", torch.zeros(n_train, dtype=torch.long))

    def training_step(self, batch, batch_idx):
        x, y, index = batch
        self.seen[index] += 1
        return super().training_step((x, y), batch_idx)


def test_lightning_fit_and_test(tmp_path):
    make_raw(tmp_path / "data", "mnist", n_train=None, n_test=100)
    dm = FashionMNISTDataModule(
        "mnist",
        data_dir=str(tmp_path / "data"),
        train_source="test",
        flatten=True,
        return_index=True,
        jitter=1,
        batch_size=16,
    )
    dm.prepare_data()
    dm.setup()
    model = IndexedClassifier(dm.input_shape[0], len(dm.splits["train"]))
    trainer = tiny_trainer(tmp_path, max_epochs=2, enable_checkpointing=False)
    trainer.fit(model, datamodule=dm)
    assert model.seen.tolist() == [2] * len(dm.splits["train"])  # every training item, once per epoch
    assert "val_loss" in trainer.callback_metrics
    (result,) = trainer.test(model, datamodule=dm, verbose=False)
    assert 0 <= result["test_acc"] <= 1


def test_flat_folder_of_the_official_files(tmp_path):
    """The real MNIST test files, read in place from their flat folder (no torchvision layout)."""
    dm = FashionMNISTDataModule(
        dataset="mnist", data_dir=str(real_data("mnist")), train_source="test", num_train=500, num_test=100
    )
    dm.setup()
    assert dm.raw_folder == real_data("mnist")
    assert len(dm.splits["test"]) == 100 and dm.files["test"][0].parent == real_data("mnist")
    with pytest.raises(FileNotFoundError, match="MNIST/raw/train-images"):  # no train files there
        FashionMNISTDataModule(dataset="mnist", data_dir=str(real_data("mnist"))).setup()
