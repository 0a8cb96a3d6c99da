"""File and cache primitives shared by the zoo and the datamodules: one way to hash, write and stay offline."""

from __future__ import annotations

import hashlib
import os
import tempfile
from pathlib import Path


def cache_dir() -> Path:
    """``$REPROZOO_CACHE``, default ``~/.cache/reprozoo``: zoo weights and downloaded or generated data."""
    return Path(os.environ.get("REPROZOO_CACHE") or Path.home() / ".cache" / "reprozoo")


def offline() -> bool:
    """``REPROZOO_OFFLINE=1`` (or true/yes/on): nothing may touch the network."""
    return os.environ.get("REPROZOO_OFFLINE", "").strip().lower() in {"1", "true", "yes", "on"}


def sha256_file(path: str | os.PathLike) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def write_atomic(path: str | os.PathLike, data: bytes) -> None:
    """Write through a temporary file in the same folder, then rename: readers never see half a file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(prefix=path.name + ".", suffix=".part", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as out:
            out.write(data)
        os.replace(tmp_name, path)
    finally:
        Path(tmp_name).unlink(missing_ok=True)
