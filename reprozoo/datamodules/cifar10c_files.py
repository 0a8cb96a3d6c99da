"""The files of CIFAR-10-C: robustbench's layout (``CIFAR-10-C/<corruption>.npy``, ``labels.npy``), its download
from Zenodo, the clean CIFAR-10 test sources, and the keys of generated corruptions."""

from __future__ import annotations

import hashlib
import io
import json
import os
import shutil
import tarfile
import tempfile
import urllib.request
from pathlib import Path

import numpy as np

from reprozoo._files import data_root, offline, publish
from reprozoo.transforms.corruptions import CORRUPTIONS_VERSION

# Zenodo record 2535967 ("CIFAR-10-C and CIFAR-10-P", Hendrycks), the file robustbench downloads
ZENODO_RECORD = "2535967"
ARCHIVE_NAME = "CIFAR-10-C.tar"
CIFAR10C_URL = f"https://zenodo.org/records/{ZENODO_RECORD}/files/{ARCHIVE_NAME}?download=1"
CIFAR10C_MD5 = "56bf5dcef84df0e2308c6dcbcbbd8499"  # as Zenodo lists it
CIFAR10C_BYTES = 2_918_471_680
FOLDER = "CIFAR-10-C"
GENERATED_FOLDER = "CIFAR-10-C-generated"
NUM_SEVERITIES = 5
IMAGE_SHAPE = (32, 32, 3)
CLASSES = ("airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck")
# per-channel mean and std of the 50,000 CIFAR-10 training images, in [0, 1]
MEAN = (0.4914, 0.4822, 0.4465)
STD = (0.2470, 0.2435, 0.2616)


def default_data_dir() -> Path:
    """The data root itself (:func:`reprozoo._files.data_root`): it holds ``CIFAR-10-C/`` (robustbench's layout)
    and ``CIFAR-10-C-generated/``."""
    return data_root()


def default_clean_root() -> Path:
    """``<data root>/cifar10``: torchvision's root for its CIFAR10 (``cifar-10-batches-py/``)."""
    return data_root() / "cifar10"


# ----------------------------------------------------------------------------------------------- files


def read_labels_file(path: str | os.PathLike, severities: int = NUM_SEVERITIES) -> np.ndarray:
    """int64 labels of an official ``labels.npy``: 1-D integers in 0..9, ``severities`` equal blocks of n labels
    (the test labels once per severity). Anything else is a ValueError naming the file."""
    path = Path(path)
    try:
        labels = np.load(path, allow_pickle=False)
    except FileNotFoundError:
        raise
    except (OSError, ValueError, EOFError) as err:
        raise ValueError(f"cannot read the labels file {path}: {type(err).__name__}: {err}") from err
    if labels.ndim != 1 or labels.dtype.kind not in "iu":
        raise ValueError(f"{path} must hold a 1-D integer array of labels, got {labels.dtype} {labels.shape}")
    if len(labels) == 0 or len(labels) % severities:
        raise ValueError(
            f"{path} has {len(labels)} labels; CIFAR-10-C files hold {severities} severities of the same n images "
            f"(50000 = {severities} x 10000)"
        )
    if labels.min() < 0 or labels.max() >= len(CLASSES):
        raise ValueError(f"{path} has labels outside 0..{len(CLASSES) - 1} ({labels.min()}..{labels.max()})")
    blocks = labels.reshape(severities, -1)
    if not (blocks == blocks[0]).all():
        raise ValueError(f"{path}: its {severities} severity blocks differ; expected the same labels repeated")
    return labels.astype(np.int64)


def open_images_file(path: str | os.PathLike, rows: int | None = None) -> np.ndarray:
    """The memory-mapped uint8 (rows, 32, 32, 3) array of an ``.npy`` file; a file that numpy cannot map, another
    dtype or shape, or another number of rows than ``rows`` is a ValueError naming the file."""
    path = Path(path)
    try:
        images = np.load(path, mmap_mode="r", allow_pickle=False)
    except FileNotFoundError:
        raise
    except (OSError, ValueError, EOFError) as err:  # truncated, not .npy, object arrays, ...
        raise ValueError(f"cannot read the image file {path}: {type(err).__name__}: {err}") from err
    if images.dtype != np.uint8 or images.ndim != 4 or images.shape[1:] != IMAGE_SHAPE:
        raise ValueError(f"{path} must hold uint8 images (N, 32, 32, 3), got {images.dtype} {images.shape}")
    if rows is not None and len(images) != rows:
        raise ValueError(f"{path} has {len(images)} images; expected {rows}")
    return images


def load_clean_npz(path: str | os.PathLike) -> tuple[np.ndarray, np.ndarray]:
    """(x uint8 (N, 32, 32, 3), y int64 (N,)) of an ``.npz`` with the arrays ``x`` and ``y`` (other arrays are
    ignored); ValueError naming the file and the array when anything is off."""
    path = Path(path)
    try:
        with np.load(path, allow_pickle=False) as archive:
            missing = [k for k in ("x", "y") if k not in archive.files]
            if missing:
                raise ValueError(
                    f"{path} has no array {' or '.join(repr(k) for k in missing)} (it has {archive.files}); "
                    "expected x uint8 (N, 32, 32, 3) and y (N,) labels"
                )
            x, y = archive["x"], archive["y"]
    except FileNotFoundError:
        raise
    except ValueError:
        raise
    except (OSError, EOFError) as err:
        raise ValueError(f"cannot read the clean images {path}: {type(err).__name__}: {err}") from err
    if x.dtype != np.uint8 or x.ndim != 4 or x.shape[1:] != IMAGE_SHAPE:
        raise ValueError(f"{path}: x must be uint8 (N, 32, 32, 3), got {x.dtype} {x.shape}")
    if y.ndim != 1 or y.dtype.kind not in "iu" or len(y) != len(x):
        raise ValueError(f"{path}: y must be {len(x)} integer labels (N,), got {y.dtype} {y.shape}")
    if len(y) and (y.min() < 0 or y.max() >= len(CLASSES)):
        raise ValueError(f"{path}: y has labels outside 0..{len(CLASSES) - 1}")
    return x, y.astype(np.int64)


def load_torchvision_test_set(root: str | os.PathLike) -> tuple[np.ndarray, np.ndarray, Path]:
    """(x, y, path of ``test_batch``) of torchvision's CIFAR10 test set in ``root``, downloaded by torchvision
    unless ``REPROZOO_OFFLINE``; FileNotFoundError saying what to put where when it cannot be had."""
    from torchvision.datasets import CIFAR10

    root = Path(root)
    folder = root / CIFAR10.base_folder
    try:
        ds = CIFAR10(str(root), train=False, download=not offline())
    except Exception as err:  # RuntimeError (not found / corrupted) or any network error
        why = (
            "offline mode is on (REPROZOO_OFFLINE), so nothing was downloaded"
            if offline()
            else f"torchvision's download of {CIFAR10.url} failed: {type(err).__name__}: {err}"
        )
        raise FileNotFoundError(
            f"torchvision's CIFAR-10 test set is not in {folder}/ ({CIFAR10.test_list[0][0]}, "
            f"{CIFAR10.meta['filename']} and the five data_batch_* files, md5-checked by torchvision) and {why}. "
            f"Extract {CIFAR10.filename} ({CIFAR10.url}) into {root}/, or give clean_npz, an .npz with x uint8 "
            "(N, 32, 32, 3) and y (N,) labels."
        ) from err
    x = np.asarray(ds.data, dtype=np.uint8)
    y = np.asarray(ds.targets, dtype=np.int64)
    return x, y, folder / CIFAR10.test_list[0][0]


def check_tar_members(archive: tarfile.TarFile) -> None:
    """ValueError unless every member is a plain file or folder that stays inside the extraction folder: no
    absolute path, drive letter or ``..`` part, no link, device or fifo."""
    for member in archive.getmembers():
        name = member.name
        parts = name.replace("\\", "/").split("/")
        if name.startswith(("/", "\\")) or (len(parts[0]) >= 2 and parts[0][1] == ":") or ".." in parts:
            raise ValueError(
                f"the archive has the unsafe member {name!r} (absolute path or '..'); nothing was extracted"
            )
        if not (member.isfile() or member.isdir()):
            raise ValueError(
                f"the archive has the member {name!r}, which is not a plain file or folder; nothing was extracted"
            )


def download_cifar10c(
    data_dir: str | os.PathLike, url: str = CIFAR10C_URL, md5: str = CIFAR10C_MD5, progress: bool = True
) -> Path:
    """Download ``CIFAR-10-C.tar`` from ``url`` (a ``file://`` URL works) and extract it to
    ``data_dir/CIFAR-10-C``; returns that folder.

    The archive goes to a temporary file in ``data_dir`` (tqdm bar when ``progress`` and on a terminal), its md5
    must be ``md5`` (else OSError), its members are checked (:func:`check_tar_members`, else ValueError), it is
    extracted into a temporary folder of ``data_dir`` and moved into place: the whole folder with one rename, or,
    when ``CIFAR-10-C/`` exists already, each file it lacks. The archive may hold ``CIFAR-10-C/*.npy`` (the
    official one) or the ``.npy`` files at its top. The archive and temporary folder are always removed.
    """
    data_dir = Path(data_dir)
    data_dir.mkdir(parents=True, exist_ok=True)
    dest = data_dir / FOLDER
    fd, tmp_tar = tempfile.mkstemp(prefix=ARCHIVE_NAME + ".", suffix=".part", dir=data_dir)
    tmp_dir = tempfile.mkdtemp(prefix=".cifar10c-extract-", dir=data_dir)
    digest = hashlib.md5()
    try:
        with os.fdopen(fd, "wb") as out, urllib.request.urlopen(url, timeout=60) as response:
            from tqdm.auto import tqdm

            length = response.headers.get("Content-Length")
            total = int(length) if length and length.isdigit() else None
            disable = None if progress else True  # None: a bar on terminals only
            with tqdm(total=total, unit="B", unit_scale=True, desc=ARCHIVE_NAME, disable=disable) as bar:
                for block in iter(lambda: response.read(1 << 20), b""):
                    out.write(block)
                    digest.update(block)
                    bar.update(len(block))
        if digest.hexdigest() != md5.lower():
            raise OSError(
                f"the md5 of what {url} sent is {digest.hexdigest()}, not {md5}: corrupted or not the archive"
            )
        if not tarfile.is_tarfile(tmp_tar):
            raise ValueError(f"what {url} sent is not a tar archive")
        with tarfile.open(tmp_tar) as archive:
            check_tar_members(archive)
            if hasattr(tarfile, "data_filter"):
                archive.extractall(tmp_dir, filter="data")
            else:  # pragma: no cover - Python without extraction filters; members were checked above
                archive.extractall(tmp_dir)
        tmp = Path(tmp_dir)
        root = tmp / FOLDER if (tmp / FOLDER).is_dir() else tmp
        files = sorted(p for p in root.glob("*.npy") if p.is_file())
        if not files:
            raise ValueError(f"the archive from {url} has no {FOLDER}/*.npy (or *.npy) files")
        if not dest.exists():
            publish(root, dest)  # one rename: CIFAR-10-C/ appears complete or not at all
        else:
            for f in files:
                if not (dest / f.name).exists():
                    os.replace(f, dest / f.name)
    finally:
        Path(tmp_tar).unlink(missing_ok=True)
        shutil.rmtree(tmp_dir, ignore_errors=True)
    return dest


def npy_bytes(array: np.ndarray) -> bytes:
    buf = io.BytesIO()
    np.save(buf, np.ascontiguousarray(array), allow_pickle=False)
    return buf.getvalue()


def generation_key(source_sha256: str, seed: int) -> str:
    """The folder name of a generated cache: a hash of the clean source's sha256, the seed and
    ``CORRUPTIONS_VERSION``."""
    spec = {"corruptions_version": CORRUPTIONS_VERSION, "seed": int(seed), "source_sha256": source_sha256}
    return hashlib.sha256(json.dumps(spec, sort_keys=True).encode()).hexdigest()[:16]
