import functools
import hashlib
import io
import json
import pickle
import sys
import tarfile
import urllib.error
import urllib.request
import warnings
from pathlib import Path

import lightning as L
import numpy as np
import pytest
import torch
import torchvision.datasets
from PIL import Image

import reprozoo.datamodules.cifar10c as cifar10c
import reprozoo.datamodules.cifar10c_files as cifar10c_files
from reprozoo.datamodules import CIFAR10CDataModule
from reprozoo.datamodules.cifar10c import CIFAR10CDataset
from reprozoo.datamodules.cifar10c_files import CIFAR10C_MD5, CIFAR10C_URL, generation_key
from reprozoo.transforms import _image_ops as ops
from reprozoo.transforms import corruptions as C
from reprozoo.transforms import frost_textures as FT
from tests.conftest import REAL_DATA, real_data
from tests.helpers import tiny_trainer

REAL = ("cifar10", "test_jpeg_q75.npz")
PACKAGE_FROST_DIR = FT.package_frost_dir  # the real lookup: the fixture below hides the package from the others


@pytest.fixture(autouse=True)
def _no_package_textures(monkeypatch):
    """Frost's textures come only from what a test puts in place: an installed imagecorruptions (a dev
    dependency) would make them available everywhere."""
    monkeypatch.setattr(FT, "package_frost_dir", lambda: None)


# ------------------------------------------------------------------ the official layout, written here


def official_arrays(n: int, corruptions, seed: int = 0) -> tuple[dict[str, np.ndarray], np.ndarray]:
    """{corruption: uint8 (5 n, 32, 32, 3)} and labels (5 n,) uint8 as the official files are laid out; pixel
    (0, 0) of each row encodes (severity, image index, corruption number) so that tests can tell rows apart."""
    rng = np.random.default_rng(seed)
    arrays = {}
    for k, name in enumerate(corruptions):
        a = rng.integers(0, 256, size=(5 * n, 32, 32, 3), dtype=np.uint8)
        for s in range(1, 6):
            rows = slice((s - 1) * n, s * n)
            a[rows, 0, 0, 0] = s
            a[rows, 0, 0, 1] = np.arange(n)
            a[rows, 0, 0, 2] = k
        arrays[name] = a
    labels = np.tile(np.arange(n) % 10, 5).astype(np.uint8)  # the official labels.npy is uint8
    return arrays, labels


def make_official(data_dir: Path, n: int = 4, corruptions=("gaussian_noise", "fog")) -> dict:
    folder = data_dir / "CIFAR-10-C"
    folder.mkdir(parents=True, exist_ok=True)
    arrays, labels = official_arrays(n, corruptions)
    for name, a in arrays.items():
        np.save(folder / f"{name}.npy", a)
    np.save(folder / "labels.npy", labels)
    return {"labels": labels, **arrays}


def as_uint8(x: torch.Tensor) -> np.ndarray:
    return torch.round(x * 255).to(torch.uint8).permute(1, 2, 0).numpy()


def no_network(monkeypatch):
    def fail(*args, **kwargs):
        raise AssertionError("the network was touched")

    monkeypatch.setattr(urllib.request, "urlopen", fail)
    monkeypatch.setattr(torchvision.datasets.utils, "download_url", fail)


# ------------------------------------------------------------------ official files


def test_official_layout_rows_domains_labels_and_mmap(tmp_path):
    data = make_official(tmp_path, n=4)
    dm = CIFAR10CDataModule(
        data_dir=str(tmp_path), corruptions=["fog", "gaussian_noise"], severities=[5, 2], batch_size=3
    )
    dm.prepare_data()
    dm.setup()
    assert dm.domains == ["fog-5", "gaussian_noise-5", "fog-2", "gaussian_noise-2"]
    assert list(dm.datasets) == dm.domains and dm.files["fog-2"] == tmp_path / "CIFAR-10-C" / "fog.npy"
    for domain, ds in dm.datasets.items():
        name, s = domain.rsplit("-", 1)
        s = int(s)
        assert len(ds) == 4 and isinstance(ds.images, np.memmap)  # read through a memory map
        for i in range(4):
            x, y = ds[i]
            assert x.shape == (3, 32, 32) and x.dtype == torch.float32 and 0 <= x.min() and x.max() <= 1
            assert np.array_equal(as_uint8(x), data[name][(s - 1) * 4 + i])  # exactly the official row
            assert y == int(data["labels"][(s - 1) * 4 + i]) == i % 10
        assert ds.source_index.tolist() == [0, 1, 2, 3]
    loaders = dm.test_dataloader()
    assert len(loaders) == 4 and [len(b[0]) for b in loaders[1]] == [3, 1]
    assert len(dm.predict_dataloader()) == 4
    with pytest.raises(IndexError):
        dm.datasets["fog-5"][4]


def test_default_batch_size_data_dir_and_single_values(tmp_path):
    dm = CIFAR10CDataModule(corruptions="contrast", severities=3)
    assert dm.hparams.batch_size == 200 and dm.domains == ["contrast-3"]
    assert dm.folder == tmp_path / "data-root" / "CIFAR-10-C"
    assert CIFAR10CDataModule().domains == [f"{c}-5" for c in C.BENCHMARK_CORRUPTIONS]
    generated = CIFAR10CDataModule(source="generate").corruptions  # offline and frost's textures nowhere
    assert generated == tuple(c for c in C.BENCHMARK_CORRUPTIONS if c != "frost")


def test_generate_defaults_to_all_15_when_frost_textures_can_be_had(tmp_path, monkeypatch):
    no_network(monkeypatch)  # deciding never downloads: that waits for the data
    monkeypatch.delenv("REPROZOO_OFFLINE")
    assert CIFAR10CDataModule(source="generate").corruptions == C.BENCHMARK_CORRUPTIONS  # downloadable
    monkeypatch.setenv("REPROZOO_OFFLINE", "1")
    assert "frost" not in CIFAR10CDataModule(source="generate").corruptions
    textures = make_frost_dir(tmp_path / "mine", monkeypatch)
    assert CIFAR10CDataModule(source="generate", frost_dir=str(textures)).corruptions == C.BENCHMARK_CORRUPTIONS
    monkeypatch.setattr(FT, "package_frost_dir", lambda: textures)  # as an installed imagecorruptions
    assert CIFAR10CDataModule(source="generate").corruptions == C.BENCHMARK_CORRUPTIONS
    monkeypatch.setattr(FT, "package_frost_dir", lambda: None)
    make_frost_dir(tmp_path / "data-root" / "frost", monkeypatch)  # the data root's frost/
    assert CIFAR10CDataModule(source="generate").corruptions == C.BENCHMARK_CORRUPTIONS


def test_num_examples_subsets_shuffle_and_normalize(tmp_path):
    data = make_official(tmp_path, n=10, corruptions=("snow",))

    def served(**kwargs):
        dm = CIFAR10CDataModule(data_dir=str(tmp_path), corruptions=["snow"], severities=[1, 3], **kwargs)
        dm.setup()
        return dm

    first = served(num_examples=3)
    assert [first.datasets[d].source_index.tolist() for d in first.domains] == [[0, 1, 2]] * 2
    random = served(num_examples=4, subset="random", seed=1)
    picked = random.datasets["snow-1"].source_index.tolist()
    assert len(set(picked)) == 4 and picked == random.datasets["snow-3"].source_index.tolist()
    assert picked != sorted(picked)  # served in the order drawn, so that classes mix
    assert picked == served(num_examples=4, subset="random", seed=1).datasets["snow-1"].source_index.tolist()
    assert picked != served(num_examples=4, subset="random", seed=2).datasets["snow-1"].source_index.tolist()
    ds = random.datasets["snow-3"]
    x, y = ds[1]
    assert np.array_equal(as_uint8(x), data["snow"][20 + picked[1]]) and y == picked[1] % 10
    shuffled = served(shuffle=True)
    order = shuffled.datasets["snow-1"].source_index.tolist()
    assert sorted(order) == list(range(10)) and order != list(range(10))
    assert order == shuffled.datasets["snow-3"].source_index.tolist()  # one order for every domain
    assert [shuffled.datasets["snow-1"][i][1] for i in range(10)] == [j % 10 for j in order]
    norm = served(normalize=True, mean=(0.5, 0.25, 0.0), std=(0.5, 0.25, 1.0))
    x, _ = norm.datasets["snow-1"][0]
    raw = torch.from_numpy(data["snow"][0]).permute(2, 0, 1).float() / 255
    expected = (raw - torch.tensor([0.5, 0.25, 0.0]).view(3, 1, 1)) / torch.tensor([0.5, 0.25, 1.0]).view(3, 1, 1)
    assert torch.allclose(x, expected, atol=1e-6)
    with pytest.raises(ValueError, match="num_examples=11"):
        served(num_examples=11)


@pytest.mark.parametrize(
    "kwargs, field",
    [
        ({"source": "zenodo"}, "source"),
        ({"corruptions": ["gaussian_nois"]}, "gaussian_noise, shot_noise"),  # lists the valid names
        ({"corruptions": ["fog", "fog"]}, "corruptions"),
        ({"corruptions": [3]}, "corruptions"),
        ({"severities": [6]}, "severities"),
        ({"severities": [0, 1]}, "severities"),
        ({"severities": [True]}, "severities"),
        ({"severities": [2.0]}, "severities"),
        ({"severities": [1, 1]}, "severities"),
        ({"corruptions": [], "severities": [5]}, "no domain"),
        ({"num_examples": 0}, "num_examples"),
        ({"subset": "last"}, "subset"),
        ({"shuffle": 1}, "shuffle"),
        ({"clean": "npz"}, "clean_npz"),
        ({"clean": "cifar"}, "clean"),
        ({"clean": "torchvision", "clean_npz": "x.npz"}, "clean"),
        ({"mean": (0.5, 0.5)}, "mean"),
        ({"std": (0.5, 0.0, 0.5)}, "std"),
        ({"md5": "abc"}, "md5"),
        ({"batch_size": 0}, "batch_size"),
        ({"num_workers": -1}, "num_workers"),
        ({"seed": -1}, "seed"),
        ({"source": "generate", "corruptions": ["frost"]}, "frost_dir"),  # unavailable without its textures
    ],
)
def test_bad_arguments_name_the_field(kwargs, field):
    with pytest.raises(ValueError, match=field):
        CIFAR10CDataModule(**kwargs)


def save_raw_npy(path: Path, array: np.ndarray) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    np.save(path, array)


@pytest.mark.parametrize(
    "file, content, message",
    [
        ("fog.npy", np.zeros((20, 32, 32, 3), np.float32), "must hold uint8 images"),
        ("fog.npy", np.zeros((20, 32, 32, 1), np.uint8), "must hold uint8 images"),
        ("fog.npy", np.zeros((21, 32, 32, 3), np.uint8), "has 21 images; expected 20"),
        ("fog.npy", b"\x93NUMPY truncated", "cannot read the image file"),
        ("labels.npy", np.zeros(19, np.uint8), "has 19 labels"),
        ("labels.npy", np.zeros((5, 4), np.uint8), "1-D integer array"),
        ("labels.npy", np.zeros(20, np.float32), "1-D integer array"),
        ("labels.npy", np.full(20, 10, np.uint8), "outside 0..9"),
        ("labels.npy", np.arange(20, dtype=np.uint8) % 10, "severity blocks differ"),
    ],
)
def test_malformed_files_name_the_file(tmp_path, file, content, message):
    make_official(tmp_path, n=4, corruptions=("fog",))
    path = tmp_path / "CIFAR-10-C" / file
    if isinstance(content, bytes):
        good = path.read_bytes()
        path.write_bytes(good[: len(good) // 2])  # a truncated download
    else:
        save_raw_npy(path, content)
    dm = CIFAR10CDataModule(data_dir=str(tmp_path), corruptions=["fog"], severities=[1])
    with pytest.raises(ValueError, match=message) as err:
        dm.setup()
    assert str(path) in str(err.value)


def test_missing_files_offline_say_what_to_put_where(tmp_path, monkeypatch):
    no_network(monkeypatch)
    make_official(tmp_path / "some", n=2, corruptions=("fog",))
    dm = CIFAR10CDataModule(data_dir=str(tmp_path / "some"), corruptions=["fog", "frost", "zoom_blur"])
    with pytest.raises(FileNotFoundError) as err:
        dm.prepare_data()
    msg = str(err.value)
    folder = tmp_path / "some" / "CIFAR-10-C"
    assert msg.split(", and offline")[0].endswith(f"missing {folder / 'frost.npy'}, {folder / 'zoom_blur.npy'}")
    assert f"into {folder}/" in msg and "REPROZOO_OFFLINE" in msg and "source='generate'" in msg
    assert "2535967" in msg and CIFAR10C_MD5 in msg and CIFAR10C_URL in msg
    with pytest.raises(FileNotFoundError, match="labels.npy"):
        CIFAR10CDataModule(data_dir=str(tmp_path / "nothing")).setup()
    assert not (tmp_path / "nothing").exists()  # nothing created offline


# ------------------------------------------------------------------ download and extraction


def build_tar(path: Path, members: dict[str, bytes], symlink: str | None = None) -> Path:
    with tarfile.open(path, "w") as tar:
        for name, data in members.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
        if symlink:
            info = tarfile.TarInfo(symlink)
            info.type = tarfile.SYMTYPE
            info.linkname = "/etc/passwd"
            tar.addfile(info)
    return path


def npy_bytes(a: np.ndarray) -> bytes:
    buf = io.BytesIO()
    np.save(buf, a)
    return buf.getvalue()


def official_members(n: int = 3) -> tuple[dict[str, bytes], dict]:
    arrays, labels = official_arrays(n, ("gaussian_noise", "pixelate"))
    members = {"CIFAR-10-C/labels.npy": npy_bytes(labels)}
    members.update({f"CIFAR-10-C/{k}.npy": npy_bytes(v) for k, v in arrays.items()})
    return members, {"labels": labels, **arrays}


def md5_of(path: Path) -> str:
    return hashlib.md5(path.read_bytes()).hexdigest()


def test_download_checks_md5_extracts_and_moves_into_place(tmp_path, monkeypatch):
    monkeypatch.delenv("REPROZOO_OFFLINE")
    members, data = official_members()
    archive = build_tar(tmp_path / "CIFAR-10-C.tar", members)
    data_dir = tmp_path / "data"
    dm = CIFAR10CDataModule(
        data_dir=str(data_dir), url=archive.as_uri(), md5=md5_of(archive), corruptions=["pixelate"], severities=[4]
    )
    dm.prepare_data()
    assert sorted(p.name for p in data_dir.iterdir()) == ["CIFAR-10-C"]  # no archive, no temp files
    assert sorted(p.name for p in (data_dir / "CIFAR-10-C").iterdir()) == [
        "gaussian_noise.npy",
        "labels.npy",
        "pixelate.npy",
    ]
    dm.setup()
    x, y = dm.datasets["pixelate-4"][2]
    assert np.array_equal(as_uint8(x), data["pixelate"][3 * 3 + 2]) and y == 2
    no_network(monkeypatch)  # once there, nothing is downloaded again
    CIFAR10CDataModule(data_dir=str(data_dir), url=archive.as_uri(), corruptions=["gaussian_noise"]).setup()


def test_download_refuses_wrong_md5_and_unsafe_archives(tmp_path, monkeypatch):
    monkeypatch.delenv("REPROZOO_OFFLINE")
    members, _ = official_members()
    archive = build_tar(tmp_path / "good.tar", members)
    data_dir = tmp_path / "data"
    with pytest.raises(FileNotFoundError, match="download failed: OSError: the md5") as err:
        CIFAR10CDataModule(data_dir=str(data_dir), url=archive.as_uri(), md5="0" * 32).prepare_data()
    assert str(data_dir / "CIFAR-10-C" / "labels.npy") in str(err.value)
    assert list(data_dir.iterdir()) == []  # the temporary archive is gone
    for evil, link in (
        ("../evil.npy", None),
        ("CIFAR-10-C/../../evil.npy", None),
        ("/abs/evil.npy", None),
        (None, "CIFAR-10-C/fog.npy"),
    ):
        extra = {evil: b"x"} if evil else {}
        bad = build_tar(tmp_path / "bad.tar", {**members, **extra}, symlink=link)
        with pytest.raises(ValueError, match="refused the archive") as err:
            CIFAR10CDataModule(data_dir=str(data_dir), url=bad.as_uri(), md5=md5_of(bad)).prepare_data()
        assert repr(evil or link) in str(err.value)
        assert list(data_dir.iterdir()) == [] and not (tmp_path / "evil.npy").exists()
    with pytest.raises(FileNotFoundError, match="could not|download failed"):
        CIFAR10CDataModule(data_dir=str(data_dir), url=(tmp_path / "absent.tar").as_uri()).prepare_data()


# ------------------------------------------------------------------ corruptions


def test_severity_constants_are_the_cifar_ones():
    p = C.SEVERITY_PARAMS
    assert set(p) == set(C.CORRUPTIONS) and all(len(v) == 5 for v in p.values())
    assert p["gaussian_noise"] == (0.04, 0.06, 0.08, 0.09, 0.10)  # make_cifar_c.py, not ImageNet-C's .08-.38
    assert p["shot_noise"] == (500, 250, 100, 75, 50) and p["jpeg_compression"] == (80, 65, 58, 50, 40)
    assert p["motion_blur"][4] == (9, 2.5) and p["contrast"][4] == 0.15 and p["glass_blur"][3] == (0.25, 1, 2)
    assert [len(z) for z in p["zoom_blur"]] == [7, 12, 16, 21, 26]  # np.arange's floating-point ends included
    assert C.CORRUPTIONS[:15] == C.BENCHMARK_CORRUPTIONS and len(C.CORRUPTIONS) == 19


def stand_in_textures() -> dict[str, bytes]:
    """Stand-in texture photographs, as file bytes: smooth, bright, large enough, of several sizes."""
    rng = np.random.default_rng(3)
    out = {}
    for k, name in enumerate(C.FROST_FILES):
        small = (200 + 55 * rng.random((12, 16, 3))).astype(np.uint8)
        buf = io.BytesIO()
        Image.fromarray(small).resize((240 + 10 * k, 180), Image.BILINEAR).save(buf, name[-3:].replace("jpg", "jpeg"))
        out[name] = buf.getvalue()
    return out


def make_frost_dir(folder: Path, monkeypatch) -> Path:
    """A folder of stand-in textures, made the "official" ones for this test (their sha256 replace the real ones)."""
    folder.mkdir(parents=True, exist_ok=True)
    textures = stand_in_textures()
    for name, data in textures.items():
        (folder / name).write_bytes(data)
    monkeypatch.setattr(FT, "FROST_SHA256", {k: hashlib.sha256(v).hexdigest() for k, v in textures.items()})
    return folder


def test_availability_and_unknown_names(tmp_path, monkeypatch):
    assert C.available_corruptions() == tuple(c for c in C.CORRUPTIONS if c != "frost")  # offline, nowhere
    assert "frost1.png" in C.unavailable_corruptions()["frost"]
    with pytest.raises(ValueError, match="'frost' is unavailable.*REPROZOO_OFFLINE.*frost_dir"):
        C.check_corruption("frost")
    monkeypatch.delenv("REPROZOO_OFFLINE")
    assert C.available_corruptions() == C.CORRUPTIONS  # it would be downloaded
    monkeypatch.setenv("REPROZOO_OFFLINE", "1")
    with pytest.raises(ValueError, match="unknown corruption 'fogg'.*gaussian_noise, shot_noise"):
        C.corrupt(np.zeros((1, 32, 32, 3), np.uint8), "fogg", 1)
    with pytest.raises(ValueError, match="severity"):
        C.corrupt(np.zeros((1, 32, 32, 3), np.uint8), "fog", 6)
    with pytest.raises(ValueError, match="uint8"):
        C.corrupt(np.zeros((1, 28, 28, 3), np.uint8), "fog", 1)
    partial = make_frost_dir(tmp_path / "partial", monkeypatch)
    (partial / "frost3.png").unlink()
    assert f"{partial / 'frost3.png'} is missing" in C.unavailable_corruptions(partial)["frost"]
    assert C.available_corruptions(make_frost_dir(tmp_path / "frost", monkeypatch)) == C.CORRUPTIONS
    (tmp_path / "frost" / "frost4.jpg").write_bytes(b"another photograph")
    why = C.unavailable_corruptions(tmp_path / "frost")["frost"]
    assert f"{tmp_path / 'frost' / 'frost4.jpg'} has sha256 {hashlib.sha256(b'another photograph').hexdigest()}" in why
    unused = make_frost_dir(tmp_path / "five", monkeypatch)
    (unused / "frost6.jpg").unlink()  # never drawn by the script, so not needed
    assert C.available_corruptions(unused) == C.CORRUPTIONS


RANDOM = {
    "gaussian_noise",
    "shot_noise",
    "impulse_noise",
    "speckle_noise",
    "glass_blur",
    "motion_blur",
    "snow",
    "frost",
    "fog",
    "elastic_transform",
    "spatter",
}


@pytest.fixture(scope="module")
def images() -> np.ndarray:
    """6 synthetic images: smooth ramps with texture, so that blurs and noises all act."""
    rng = np.random.default_rng(0)
    ramp = np.linspace(0, 1, 32)
    base = 40 + 170 * (ramp[None, :, None, None] * ramp[None, None, :, None]) * rng.random((6, 1, 1, 3))
    return np.clip(base + rng.normal(0, 12, (6, 32, 32, 3)), 0, 255).astype(np.uint8)


@pytest.mark.parametrize("name", C.CORRUPTIONS)
def test_every_corruption_is_seeded_shape_preserving_and_order_free(name, images, tmp_path, monkeypatch):
    frost_dir = make_frost_dir(tmp_path / "frost", monkeypatch) if name == "frost" else None
    out = C.corrupt(images, name, 3, seed=0, frost_dir=frost_dir)
    assert out.shape == images.shape and out.dtype == np.uint8 and not np.array_equal(out, images)
    assert C.corrupt(images, name, 3, seed=0, frost_dir=frost_dir).tobytes() == out.tobytes()
    again = C.corrupt(images[[4, 2]], name, 3, seed=0, indices=[4, 2], frost_dir=frost_dir, chunk_size=1)
    assert np.array_equal(again, out[[4, 2]])  # each image depends on its index only, not on order or batching
    other = C.corrupt(images, name, 3, seed=1, frost_dir=frost_dir)
    assert (not np.array_equal(other, out)) == (name in RANDOM)


def mean_abs_diff(name: str, x: np.ndarray) -> list[float]:
    return [float(np.abs(C.corrupt(x, name, s).astype(float) - x).mean()) for s in range(1, 6)]


MONOTONE = (
    "gaussian_noise",
    "shot_noise",
    "impulse_noise",
    "speckle_noise",
    "defocus_blur",
    "zoom_blur",
    "snow",
    "fog",
    "brightness",
    "contrast",
    "pixelate",
    "jpeg_compression",
    "gaussian_blur",
)


def test_severity_grows_as_the_official_parameters_say_on_real_images():
    x = np.load(real_data(*REAL))["x"][::157][:48]  # every 157th: all classes (the file is sorted by class)
    diffs = {name: mean_abs_diff(name, x) for name in C.available_corruptions()}
    for name in MONOTONE:
        assert np.all(np.diff(diffs[name]) > 0), (name, diffs[name])
    for name in ("glass_blur", "motion_blur", "spatter", "saturate"):  # not monotone step by step, but 5 > 1
        assert diffs[name][4] > diffs[name][0], (name, diffs[name])
    # elastic_transform: its affine jitter shrinks with severity (0.08 .. 0.03 of the size) while the elastic
    # field grows finer; pixel differences fall from severity 1 to 5 with the official parameters
    assert diffs["elastic_transform"][0] > diffs["elastic_transform"][4] > 0
    for name in ("gaussian_noise", "shot_noise", "speckle_noise", "impulse_noise"):  # severity 1 noise is mild
        assert diffs[name][0] < 10, (name, diffs[name])
    assert 5 < diffs["gaussian_noise"][0] and 15 < diffs["gaussian_noise"][4] < 25  # std 0.04 and 0.10 of 255


def test_glass_blur_copies_as_the_script_s_numpy_swap_does(images):
    """The script's x[h, w], x[h', w'] = x[h', w'], x[h, w] on views copies; the vectorised pass must agree."""
    c = C.SEVERITY_PARAMS["glass_blur"][4]
    out = C.corrupt(images[:2], "glass_blur", 5, seed=4)
    for k in range(2):
        rng = C.image_rng(4, "glass_blur", 5, k)
        x = ops.to_uint8(ops.gaussian(images[k][None] / 255.0, c[0]) * 255)[0]
        for _ in range(c[2]):
            shifts = rng.integers(-c[1], c[1], size=(30, 30, 2))
            for h in range(32 - c[1], c[1], -1):
                for w in range(32 - c[1], c[1], -1):
                    dx, dy = shifts[h - 2, w - 2]
                    x[h, w], x[h + dy, w + dx] = x[h + dy, w + dx], x[h, w]
        expected = ops.to_uint8(np.clip(ops.gaussian(x[None] / 255.0, c[0]), 0, 1) * 255)[0]
        assert np.array_equal(out[k], expected)


def test_motion_blur_kernel_follows_imagemagick():
    flat = np.full((2, 32, 32, 3), 77, np.uint8)
    assert np.array_equal(ops.motion_blur(flat, 9, 2.5, np.array([10.0, -40.0])), flat)  # weights sum to 1
    dot = np.zeros((1, 32, 32), np.uint8)
    dot[0, 16, 16] = 255
    right = ops.motion_blur(dot, 6, 2, np.array([0.0]))[0]  # angle 0: the pixel takes from its right
    assert right[16, 16] > right[16, 15] > right[16, 14] > 0 and right[16, 17] == 0 and right[15].sum() == 0
    down = ops.motion_blur(dot, 6, 2, np.array([90.0]))[0]  # angle 90: from below (image rows grow downwards)
    assert down[15, 16] > 0 and down[17, 16] == 0 and down[16, 15] == 0


# ------------------------------------------------------------------ frost's textures


def serve(monkeypatch, files: dict[str, bytes], asked: list[str] | None = None):
    """urllib.request.urlopen answering FROST_URL with ``files`` (by name), recording the URLs asked."""

    def urlopen(url, timeout=None):
        if asked is not None:
            asked.append(url)
        name = url.rsplit("/", 1)[-1]
        if name not in files:
            raise urllib.error.URLError("unreachable")
        return io.BytesIO(files[name])

    monkeypatch.setattr(urllib.request, "urlopen", urlopen)


def test_frost_textures_resolve_in_order_explicit_data_root_package(tmp_path, monkeypatch):
    no_network(monkeypatch)
    package = make_frost_dir(tmp_path / "site-packages" / "imagecorruptions" / "frost", monkeypatch)
    monkeypatch.setattr(FT, "package_frost_dir", lambda: package)
    assert FT.resolve_frost_dir() == package  # the data root has none
    root = make_frost_dir(tmp_path / "data-root" / "frost", monkeypatch)
    assert FT.default_frost_dir() == root and FT.resolve_frost_dir() == root  # the data root comes first
    (root / "frost2.png").unlink()
    assert FT.resolve_frost_dir() == package  # an incomplete data root: the package's, complete
    mine = make_frost_dir(tmp_path / "mine", monkeypatch)
    assert FT.resolve_frost_dir(mine) == mine
    (mine / "frost5.jpg").write_bytes(b"not the photograph")
    with pytest.raises(FileNotFoundError, match=f"{mine / 'frost5.jpg'} has sha256"):
        FT.resolve_frost_dir(mine)  # a named folder is the only one tried
    with pytest.raises(ValueError, match="frost5.jpg has sha256"):
        FT.read_frost_texture(mine, "frost5.jpg")  # checked again when read, the bytes used are the bytes checked
    assert C.load_frost_textures(package)[3].shape == (36, 54, 3)  # 180 x 270 shrunk by 5


def test_frost_textures_are_downloaded_checked_and_written_atomically(tmp_path, monkeypatch):
    files = stand_in_textures()
    make_frost_dir(tmp_path / "unused", monkeypatch)  # the stand-ins' sha256 become the official ones
    folder = tmp_path / "data-root" / "frost"
    with pytest.raises(FileNotFoundError, match="REPROZOO_OFFLINE") as err:
        FT.resolve_frost_dir()
    assert f"into {folder}/" in str(err.value) and "pip install imagecorruptions" in str(err.value)
    assert not folder.exists()  # nothing done offline
    monkeypatch.delenv("REPROZOO_OFFLINE")
    serve(monkeypatch, {**files, "frost2.png": b"a tampered file"})
    with pytest.raises(FileNotFoundError, match="download from .* failed: OSError: the sha256") as err:
        FT.resolve_frost_dir()
    msg = str(err.value)
    assert "Put the files frost1.png, frost2.png, frost3.png, frost4.jpg, frost5.jpg of hendrycks/robustness" in msg
    assert f"into {folder}/" in msg
    assert sorted(p.name for p in folder.iterdir()) == ["frost1.png"]  # the refused file was never written
    serve(monkeypatch, {})
    with pytest.raises(FileNotFoundError, match="URLError"):
        FT.resolve_frost_dir()
    asked = []
    serve(monkeypatch, files, asked)
    assert FT.resolve_frost_dir() == folder
    url = "https://raw.githubusercontent.com/hendrycks/robustness/" + FT.FROST_COMMIT + "/ImageNet-C/create_c/"
    assert asked == [url + n for n in ("frost2.png", "frost3.png", "frost4.jpg", "frost5.jpg")]  # only the missing
    assert sorted(p.name for p in folder.iterdir()) == list(C.FROST_FILES[:5])  # no temporary files, no frost6
    assert all((folder / n).read_bytes() == files[n] for n in C.FROST_FILES[:5])
    no_network(monkeypatch)
    assert FT.resolve_frost_dir() == folder  # once there, never downloaded again
    (folder / "frost3.png").write_bytes(b"edited")
    with pytest.raises(FileNotFoundError, match="frost3.png has sha256 .*Delete or replace"):
        FT.resolve_frost_dir()  # a wrong file is reported, never overwritten
    assert (folder / "frost3.png").read_bytes() == b"edited"


def test_package_frost_dir_locates_imagecorruptions_without_importing_it(tmp_path, monkeypatch):
    package = tmp_path / "site" / "imagecorruptions"
    (package / "frost").mkdir(parents=True)
    (package / "__init__.py").write_text("raise ImportError('imported')\n")
    monkeypatch.delitem(sys.modules, "imagecorruptions", raising=False)
    monkeypatch.syspath_prepend(str(tmp_path / "site"))
    assert PACKAGE_FROST_DIR() == package / "frost" and "imagecorruptions" not in sys.modules
    monkeypatch.setattr(sys, "path", [p for p in sys.path if p != str(tmp_path / "site")])
    monkeypatch.setattr(FT, "PACKAGE", "imagecorruptions_not_installed_here")
    assert PACKAGE_FROST_DIR() is None


def test_generate_frost_downloads_its_textures_once_when_online(tmp_path, monkeypatch):
    files = stand_in_textures()
    make_frost_dir(tmp_path / "unused", monkeypatch)
    x = np.random.default_rng(5).integers(0, 256, (4, 32, 32, 3), dtype=np.uint8)
    clean = tmp_path / "clean.npz"
    np.savez(clean, x=x, y=np.arange(4))
    monkeypatch.delenv("REPROZOO_OFFLINE")
    asked = []
    serve(monkeypatch, files, asked)
    dm = CIFAR10CDataModule(source="generate", clean_npz=str(clean), severities=[2])
    assert dm.corruptions == C.BENCHMARK_CORRUPTIONS and asked == []  # decided without the network
    dm.prepare_data()
    assert len(asked) == 5 and (tmp_path / "data-root" / "frost" / "frost5.jpg").is_file()
    dm.setup()
    assert len(dm.domains) == 15 and dm.files["frost-2"].name == f"frost-{FT.frost_textures_sha256()[:12]}-s2.npy"
    assert np.array_equal(np.load(dm.files["frost-2"]), C.corrupt(x, "frost", 2))
    assert np.array_equal(as_uint8(dm.datasets["frost-2"][1][0]), np.load(dm.files["frost-2"])[1])
    assert len(asked) == 5  # the second look found them in the data root


def test_shrink_is_cv2_resize_on_odd_sizes():
    import cv2  # a dev dependency (opencv): the reference of make_cifar_c.py

    rng = np.random.default_rng(8)
    for h, w in ((165, 171), (163, 177), (168, 999), (37, 42), (1003, 1001)):
        a = rng.integers(0, 256, (h, w, 3), dtype=np.uint8)
        assert np.array_equal(C.shrink_frost_texture(a), cv2.resize(a, (0, 0), fx=0.2, fy=0.2)), (h, w)


def real_frost_dir() -> Path:
    """The official textures as the dev dependencies install them (the imagecorruptions package's copies), or
    ``$REPROZOO_DATA/frost`` of the real data; each checked against its official sha256."""
    for folder in (PACKAGE_FROST_DIR(), REAL_DATA / "frost" if REAL_DATA else None):
        if folder is not None and FT.find_frost_dir(folder) == folder:
            return folder
    pytest.fail(
        "needs frost's official textures: install the dev dependencies (imagecorruptions ships them)", pytrace=False
    )


def test_real_frost_textures_are_read_and_shrunk_as_cv2_does():
    import cv2

    folder = real_frost_dir()
    textures = C.load_frost_textures(folder)
    for name, texture in zip(C.FROST_FILES, textures):
        expected = cv2.resize(cv2.imread(str(folder / name)), (0, 0), fx=0.2, fy=0.2)[..., ::-1]
        assert texture.shape == expected.shape and np.array_equal(texture, expected), name
    assert [t.shape[:2] for t in textures] == [(120, 180), (63, 112), (63, 112), (70, 105), (99, 132)]


def test_frost_is_make_cifar_c_s_byte_for_byte_on_real_images():
    """make_cifar_c.py's own frost(x, severity) lines, run with OpenCV, its three np.random draws replaced by ours,
    on real CIFAR-10 test images: the same bytes at every severity, from every texture, crops up to the edges."""
    x = np.load(real_data(*REAL))["x"][::50]  # 200 images of every class (the file is sorted by class)
    import cv2

    folder = real_frost_dir()
    files = [str(folder / name) for name in C.FROST_FILES]

    @functools.cache
    def script_texture(idx):  # frost = cv2.imread(filename); frost = cv2.resize(frost, (0, 0), fx=0.2, fy=0.2)
        return cv2.resize(cv2.imread(files[idx]), (0, 0), fx=0.2, fy=0.2)

    def script_frost(img, severity, idx, x_start, y_start):  # then the script's np.uint8(corruption(img))
        c = [(1, 0.2), (1, 0.3), (0.9, 0.4), (0.85, 0.4), (0.75, 0.45)][severity - 1]
        frost = script_texture(idx)
        frost = frost[x_start : x_start + 32, y_start : y_start + 32][..., [2, 1, 0]]
        return np.uint8(np.clip(c[0] * np.array(img) + c[1] * frost, 0, 255))

    textures = C.load_frost_textures(folder)
    for severity in C.SEVERITIES:
        out = C.corrupt(x, "frost", severity, seed=0, frost_dir=folder)
        draws = C.frost_draws([C.image_rng(0, "frost", severity, i) for i in range(len(x))], textures)
        assert set(draws[:, 0]) == set(range(5))  # every texture drawn
        for i, d in enumerate(draws):  # the script's randint(5), randint(0, h - 32), randint(0, w - 32), in order
            r = C.image_rng(0, "frost", severity, i)
            idx = int(r.integers(5))
            h, w = script_texture(idx).shape[:2]
            assert tuple(d) == (idx, r.integers(0, h - 32), r.integers(0, w - 32))
        expected = np.stack([script_frost(Image.fromarray(img), severity, *d) for img, d in zip(x, draws)])
        assert np.array_equal(out, expected), severity
        for idx, tex in enumerate(textures):  # crops at the four corners the script's randint can reach
            h, w = tex.shape[0] - 33, tex.shape[1] - 33
            corners = np.array([(idx, 0, 0), (idx, h, w), (idx, h, 0), (idx, 0, w)])
            got = ops.to_uint8(C.frost_blend(x[:4], C.SEVERITY_PARAMS["frost"][severity - 1], textures, corners))
            want = np.stack([script_frost(Image.fromarray(img), severity, *d) for img, d in zip(x[:4], corners)])
            assert np.array_equal(got, want), (severity, idx)


# ------------------------------------------------------------------ generation from real images


def test_generate_from_the_real_shared_images_and_reuse_the_cache(tmp_path, monkeypatch):
    real = real_data(*REAL)
    clean = np.load(real)
    x, y = clean["x"], clean["y"]
    names = ["gaussian_noise", "contrast", "motion_blur"]

    def module(**kwargs):
        args = dict(
            data_dir=str(tmp_path),
            source="generate",
            clean_npz=str(real),
            corruptions=names,
            severities=[5],
            num_examples=200,
            include_clean=True,
        )
        args.update(kwargs)
        return CIFAR10CDataModule(**args)

    dm = module()
    with pytest.warns(UserWarning, match="sorted by class"):  # the shared file is grouped by class
        dm.prepare_data()
    dm.setup()
    assert dm.domains == ["clean", "gaussian_noise-5", "contrast-5", "motion_blur-5"]
    folder = dm.generated_dir
    assert folder.parent == tmp_path / "CIFAR-10-C-generated"
    sha = hashlib.sha256(real.read_bytes()).hexdigest()
    assert folder.name == generation_key(sha, 0)
    meta = json.loads((folder / "meta.json").read_text())
    assert meta["source_sha256"] == sha and meta["seed"] == 0 and meta["corruptions_version"] == C.CORRUPTIONS_VERSION
    assert np.array_equal(np.load(folder / "labels.npy"), y)
    for name in names:
        stored = np.load(folder / f"{name}-s5.npy")
        assert stored.shape == (200, 32, 32, 3) and stored.dtype == np.uint8  # only the rows needed
        assert np.array_equal(stored, C.corrupt(x[:200], name, 5, seed=0))
        xi, yi = dm.datasets[f"{name}-5"][7]
        assert np.array_equal(as_uint8(xi), stored[7]) and yi == y[7]
        assert dm.files[f"{name}-5"] == folder / f"{name}-s5.npy"
    assert np.array_equal(as_uint8(dm.datasets["clean"][5][0]), x[5]) and dm.files["clean"] == real
    assert abs(np.abs(np.load(folder / "gaussian_noise-s5.npy").astype(float) - x[:200]).mean() - 19) < 4
    mtimes = {p.name: p.stat().st_mtime_ns for p in folder.iterdir()}

    def fail(*args, **kwargs):
        raise AssertionError("regenerated a cached corruption")

    monkeypatch.setattr(cifar10c, "corrupt", fail)
    again = module(num_examples=150, shuffle=True)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # shuffled: no class-sorted warning
        again.setup()
    assert again.generated_dir == folder and {p.name: p.stat().st_mtime_ns for p in folder.iterdir()} == mtimes
    assert sorted(again.datasets["contrast-5"].source_index.tolist()) == list(range(150))
    monkeypatch.undo()

    longer = module(num_examples=260, corruptions=["gaussian_noise"], shuffle=True)
    longer.setup()  # the cached 200 rows are kept, 60 more are made
    grown = np.load(folder / "gaussian_noise-s5.npy")
    assert len(grown) == 260 and np.array_equal(grown, C.corrupt(x[:260], "gaussian_noise", 5, seed=0))

    reseeded = module(seed=1, corruptions=["gaussian_noise", "contrast"], shuffle=True)
    reseeded.setup()
    assert reseeded.generated_dir != folder and reseeded.generated_dir.name == generation_key(sha, 1)
    new = reseeded.generated_dir
    assert not np.array_equal(np.load(new / "gaussian_noise-s5.npy"), grown[:200])
    assert np.array_equal(np.load(new / "contrast-s5.npy"), np.load(folder / "contrast-s5.npy"))  # no randomness

    monkeypatch.setattr(cifar10c_files, "CORRUPTIONS_VERSION", "a changed corruption code")
    assert generation_key(sha, 0) != folder.name  # a new code version never reuses the old cache


def test_generated_cache_that_is_unreadable_is_redone(tmp_path):
    real = real_data(*REAL)
    kwargs = dict(
        data_dir=str(tmp_path),
        source="generate",
        clean_npz=str(real),
        corruptions=["brightness"],
        severities=[2],
        num_examples=20,
        shuffle=True,
    )
    dm = CIFAR10CDataModule(**kwargs)
    dm.setup()
    path = dm.files["brightness-2"]
    path.write_bytes(path.read_bytes()[:100])
    redo = CIFAR10CDataModule(**kwargs)
    redo.setup()
    assert np.load(path).shape == (20, 32, 32, 3)


def test_generate_with_bad_clean_sources(tmp_path, monkeypatch):
    no_network(monkeypatch)
    bad = tmp_path / "bad.npz"
    np.savez(bad, x=np.zeros((4, 32, 32, 3), np.float32), y=np.zeros(4, np.int64))
    with pytest.raises(ValueError, match=f"{bad}: x must be uint8"):
        CIFAR10CDataModule(source="generate", clean_npz=str(bad), corruptions=["fog"]).setup()
    np.savez(bad, images=np.zeros((4, 32, 32, 3), np.uint8))
    with pytest.raises(ValueError, match="no array 'x' or 'y'"):
        CIFAR10CDataModule(source="generate", clean_npz=str(bad), corruptions=["fog"]).setup()
    with pytest.raises(FileNotFoundError, match="absent.npz does not exist"):
        CIFAR10CDataModule(source="generate", clean_npz=str(tmp_path / "absent.npz")).setup()
    root = tmp_path / "tv"
    with pytest.raises(FileNotFoundError) as err:
        CIFAR10CDataModule(source="generate", clean_root=str(root), corruptions=["fog"]).prepare_data()
    msg = str(err.value)
    assert f"{root / 'cifar-10-batches-py'}/" in msg and "REPROZOO_OFFLINE" in msg and "clean_npz" in msg


def fake_torchvision_cifar10(root: Path, monkeypatch, n: int = 6) -> tuple[np.ndarray, np.ndarray]:
    """torchvision's own files (pickled batches), with the md5 lists pointed at them."""
    folder = root / "cifar-10-batches-py"
    folder.mkdir(parents=True)
    rng = np.random.default_rng(7)
    x = rng.integers(0, 256, (n, 32, 32, 3), dtype=np.uint8)
    y = rng.integers(0, 10, n)
    batch = {"data": x.transpose(0, 3, 1, 2).reshape(n, -1), "labels": y.tolist()}
    (folder / "test_batch").write_bytes(pickle.dumps(batch))
    (folder / "batches.meta").write_bytes(pickle.dumps({"label_names": list(cifar10c.CLASSES)}))
    md5 = {f: hashlib.md5((folder / f).read_bytes()).hexdigest() for f in ("test_batch", "batches.meta")}
    monkeypatch.setattr(torchvision.datasets.CIFAR10, "train_list", [])
    monkeypatch.setattr(torchvision.datasets.CIFAR10, "test_list", [["test_batch", md5["test_batch"]]])
    meta = dict(torchvision.datasets.CIFAR10.meta, md5=md5["batches.meta"])
    monkeypatch.setattr(torchvision.datasets.CIFAR10, "meta", meta)
    return x, y


def test_generate_from_torchvision_cifar10(tmp_path, monkeypatch):
    no_network(monkeypatch)
    x, y = fake_torchvision_cifar10(tmp_path / "tv", monkeypatch)
    dm = CIFAR10CDataModule(
        data_dir=str(tmp_path / "d"),
        source="generate",
        clean_root=str(tmp_path / "tv"),
        corruptions=["pixelate"],
        severities=[1, 5],
        include_clean=True,
    )
    dm.setup()
    test_batch = tmp_path / "tv" / "cifar-10-batches-py" / "test_batch"
    assert dm.generated_dir.name == generation_key(hashlib.sha256(test_batch.read_bytes()).hexdigest(), 0)
    assert dm.files["clean"] == test_batch and len(dm.datasets["pixelate-5"]) == 6
    assert np.array_equal(as_uint8(dm.datasets["clean"][3][0]), x[3]) and dm.datasets["clean"][3][1] == y[3]
    assert np.array_equal(as_uint8(dm.datasets["pixelate-5"][3][0]), C.corrupt(x, "pixelate", 5)[3])


def test_include_clean_with_official_files(tmp_path):
    data = make_official(tmp_path, n=4, corruptions=("fog",))
    clean_x = np.random.default_rng(1).integers(0, 256, (4, 32, 32, 3), dtype=np.uint8)
    good = tmp_path / "clean.npz"
    np.savez(good, x=clean_x, y=data["labels"][:4].astype(np.int64))
    dm = CIFAR10CDataModule(
        data_dir=str(tmp_path),
        corruptions=["fog"],
        severities=[2],
        include_clean=True,
        clean_npz=str(good),
        num_examples=3,
    )
    dm.setup()
    assert dm.domains == ["clean", "fog-2"] and [len(d) for d in dm.datasets.values()] == [3, 3]
    assert np.array_equal(as_uint8(dm.datasets["clean"][2][0]), clean_x[2])
    wrong = tmp_path / "wrong.npz"
    np.savez(wrong, x=clean_x, y=np.array([3, 1, 2, 0]))
    with pytest.raises(ValueError, match="does not match"):
        CIFAR10CDataModule(
            data_dir=str(tmp_path), corruptions=["fog"], include_clean=True, clean_npz=str(wrong)
        ).setup()


def test_dataset_pickles_without_its_memory_map(tmp_path):
    data = make_official(tmp_path, n=4, corruptions=("fog",))
    ds = CIFAR10CDataset(tmp_path / "CIFAR-10-C" / "fog.npy", [5, 6], data["labels"][[5, 6]])
    assert ds[1][1] == 2 and isinstance(ds.images, np.memmap)
    blob = pickle.dumps(ds)
    assert len(blob) < 10_000  # not the 20 x 3 KB images
    copy = pickle.loads(blob)
    assert torch.equal(copy[0][0], ds[0][0])


def test_loaders_read_each_batch_at_once_and_equal_the_items_collated(tmp_path, monkeypatch):
    from torch.utils.data import DataLoader

    make_official(tmp_path, n=10, corruptions=("fog",))
    clean = {"x": np.random.default_rng(0).integers(0, 256, (10, 32, 32, 3), dtype=np.uint8), "y": np.arange(10) % 10}
    np.savez(tmp_path / "clean.npz", **clean)
    for kwargs in ({}, {"num_examples": 7, "subset": "random", "shuffle": True}, {"normalize": True}):
        dm = CIFAR10CDataModule(
            data_dir=str(tmp_path),
            corruptions=["fog"],
            severities=[2],
            batch_size=3,
            include_clean=True,
            clean_npz=str(tmp_path / "clean.npz"),
            **kwargs,
        )
        dm.setup()
        for domain, loader in zip(dm.domains, dm.test_dataloader()):  # a memory-mapped file and an in-memory array
            expected = list(DataLoader(dm.datasets[domain], batch_size=3))  # default_collate of the items
            got = list(loader)
            assert len(got) == len(expected)
            for (x, y), (ex, ey) in zip(got, expected):
                assert torch.equal(x, ex) and x.is_contiguous() and torch.equal(y, ey) and y.dtype == ey.dtype
    ds = dm.datasets["fog-2"]
    with pytest.raises(IndexError, match="index 10"):
        ds.get_batch([0, 10])
    monkeypatch.setattr(CIFAR10CDataset, "__getitem__", lambda self, i: pytest.fail("read item by item"))
    assert [len(y) for _, y in dm.test_dataloader()[1]] == [3, 3, 3, 1]


# ------------------------------------------------------------------ Lightning


class PerDomain(L.LightningModule):
    def __init__(self, domains):
        super().__init__()
        self.net = torch.nn.Linear(3 * 32 * 32, 10)
        self.domains = domains
        self.seen = {d: 0 for d in domains}

    def test_step(self, batch, batch_idx, dataloader_idx=0):
        x, y = batch
        self.seen[self.domains[dataloader_idx]] += len(y)
        self.log("acc", (self.net(x.flatten(1)).argmax(-1) == y).float().mean())


def test_lightning_test_loop_maps_dataloader_idx_to_domains(tmp_path):
    make_official(tmp_path / "data", n=6, corruptions=("fog", "snow"))
    dm = CIFAR10CDataModule(
        data_dir=str(tmp_path / "data"), corruptions=["snow", "fog"], severities=[1, 5], num_examples=5, batch_size=2
    )
    model = PerDomain(dm.domains)
    results = tiny_trainer(tmp_path).test(model, datamodule=dm, verbose=False)
    assert len(results) == 4 and all(0 <= r[f"acc/dataloader_idx_{i}"] <= 1 for i, r in enumerate(results))
    assert model.seen == {"snow-1": 5, "fog-1": 5, "snow-5": 5, "fog-5": 5}
