"""The idx files of MNIST and Fashion-MNIST (LeCun's format, gzipped or not): read with their header checked, found
in the official or torchvision's layout, and downloaded from torchvision's mirrors."""

from __future__ import annotations

import gzip
import os
import shutil
import struct
import tempfile
import zlib
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch

IMAGE_SIZE = 28
NUM_CLASSES = 10
IMAGES_MAGIC = 2051  # 0x00000803: unsigned bytes, 3 dimensions
LABELS_MAGIC = 2049  # 0x00000801: unsigned bytes, 1 dimension


def _read_bytes(path: Path) -> bytes:
    try:
        if path.suffix == ".gz":
            with gzip.open(path, "rb") as fh:
                return fh.read()
        return path.read_bytes()
    except FileNotFoundError:
        raise
    except (OSError, EOFError, zlib.error) as err:  # not gzip, truncated or corrupt stream
        raise ValueError(f"cannot read the idx file {path}: {type(err).__name__}: {err}") from err


def read_idx(path: str | os.PathLike, magic: int) -> torch.Tensor:
    """The uint8 array of an idx file (``.gz`` or not) whose magic number must be ``magic`` (2051: images of shape
    (N, 28, 28), 2049: labels of shape (N,)). A wrong magic number, wrong image size or a length that differs from
    what the header announces (truncated file or trailing bytes) is a ValueError naming the file."""
    path = Path(path)
    if magic not in (IMAGES_MAGIC, LABELS_MAGIC):
        raise ValueError(f"read_idx: magic must be {IMAGES_MAGIC} (images) or {LABELS_MAGIC} (labels), got {magic}")
    kind, ndim = ("images", 3) if magic == IMAGES_MAGIC else ("labels", 1)
    data = _read_bytes(path)
    if len(data) < 4:
        raise ValueError(f"{path} is not an idx {kind} file: {len(data)} bytes, fewer than the 4 of the magic number")
    found = int.from_bytes(data[:4], "big")
    if found != magic:
        raise ValueError(
            f"{path} is not an idx {kind} file: magic number {found} (0x{found:08x}), expected {magic} "
            f"(0x{magic:08x}: unsigned bytes, {ndim} dimension{'s' if ndim > 1 else ''})"
        )
    header = 4 + 4 * ndim
    if len(data) < header:
        raise ValueError(f"{path} is truncated: {len(data)} bytes, shorter than its {header}-byte header")
    dims = struct.unpack(f">{ndim}I", data[4:header])
    if ndim == 3 and dims[1:] != (IMAGE_SIZE, IMAGE_SIZE):
        raise ValueError(f"{path} holds {dims[1]}x{dims[2]} images; expected {IMAGE_SIZE}x{IMAGE_SIZE}")
    expected = int(np.prod(dims))
    have = len(data) - header
    if have != expected:
        what = "truncated" if have < expected else "longer than its header says"
        raise ValueError(
            f"{path} is {what}: its header announces {' x '.join(map(str, dims))} = {expected} bytes of data, "
            f"the file has {have}"
        )
    array = np.frombuffer(data, dtype=np.uint8, count=expected, offset=header).reshape(dims)
    return torch.from_numpy(array.copy())


def read_images(path: str | os.PathLike) -> torch.Tensor:
    """uint8 (N, 28, 28) of an idx images file (magic 2051)."""
    return read_idx(path, IMAGES_MAGIC)


def read_labels(path: str | os.PathLike) -> torch.Tensor:
    """long (N,) of an idx labels file (magic 2049); a label outside 0..9 is a ValueError naming the file."""
    labels = read_idx(path, LABELS_MAGIC)
    if len(labels) and int(labels.max()) >= NUM_CLASSES:
        raise ValueError(f"{path} has the label {int(labels.max())}; labels must be in 0..{NUM_CLASSES - 1}")
    return labels.long()


def find_file(raw_folder: Path, name: str) -> Path | None:
    """``raw_folder/<name>.gz``, else torchvision's extracted ``raw_folder/<name>``, else None."""
    for candidate in (raw_folder / f"{name}.gz", raw_folder / name):
        if candidate.is_file():
            return candidate
    return None


def download_files(raw_folder: Path, names: Sequence[str], torchvision_class: type, mirrors: Sequence[str]) -> None:
    """Download ``<name>.gz`` for each name into ``raw_folder`` with torchvision's ``download_url`` and the md5 of
    ``torchvision_class.resources``, trying ``mirrors`` in order. Each file lands in a temporary folder of
    ``raw_folder`` and is moved into place once its md5 matched. OSError listing every mirror's error when a file
    cannot be had."""
    from torchvision.datasets.utils import download_url

    md5s = dict(torchvision_class.resources)
    raw_folder.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".download-", dir=raw_folder))
    try:
        for name in names:
            filename = f"{name}.gz"
            errors = []
            for mirror in mirrors:
                url = mirror if mirror.endswith("/") else mirror + "/"
                url += filename
                try:
                    download_url(url, str(tmp), filename, md5s[filename])
                except Exception as err:  # network errors come in many types; torchvision raises RuntimeError on md5
                    (tmp / filename).unlink(missing_ok=True)
                    errors.append(f"{url}: {type(err).__name__}: {err}")
                    continue
                os.replace(tmp / filename, raw_folder / filename)
                break
            else:
                raise OSError(f"could not download {filename} ({'; '.join(errors) or 'no mirror given'})")
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
