"""File and cache primitives shared by the zoo and the datamodules: one way to hash, write and stay offline."""

from __future__ import annotations

import hashlib
import io
import os
import tempfile
from pathlib import Path


class WeightsError(RuntimeError):
    """A zoo entry or weights file could not be found, fetched, verified or loaded."""


def cache_dir() -> Path:
    """``$REPROZOO_CACHE``, default ``~/.cache/reprozoo``: zoo weights and downloaded or generated data."""
    return Path(os.environ.get("REPROZOO_CACHE") or Path.home() / ".cache" / "reprozoo")


def save_figure(fig, path: str | os.PathLike, *, dpi: int = 100) -> None:
    """A matplotlib figure as a PNG, written atomically (see :func:`write_atomic`)."""
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=dpi)
    write_atomic(path, buffer.getvalue())


def data_root() -> Path:
    """The one folder under which every DataModule looks for its data by default: ``$REPROZOO_DATA`` when set,
    else ``$REPROZOO_CACHE/data`` (``~/.cache/reprozoo/data``). Each dataset has its own folder in it (``mnist/``,
    ``fashion_mnist/``, ``sudoku-extreme/``, ``afhq/``, ``CIFAR-10-C/``, ``cifar10/``), where downloads go too."""
    return Path(os.environ.get("REPROZOO_DATA") or cache_dir() / "data")


def data_path(path: str | os.PathLike) -> Path:
    """A data file or folder named in a config: an absolute path as it is; a relative one from the working directory
    when it exists there, else under :func:`data_root` (so configs name datasets, ``cifar10/test.npz``, not
    folders of one machine)."""
    path = Path(path).expanduser()
    if path.is_absolute() or path.exists():
        return path
    return data_root() / path


def offline() -> bool:
    """``REPROZOO_OFFLINE=1`` (or true/yes/on): nothing may touch the network."""
    return os.environ.get("REPROZOO_OFFLINE", "").strip().lower() in {"1", "true", "yes", "on"}


def sha256_file(path: str | os.PathLike) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _umask() -> int:
    mask = os.umask(0)  # reading the umask means setting it: put it straight back
    os.umask(mask)
    return mask


def publish(tmp: str | os.PathLike, dest: str | os.PathLike) -> None:
    """Rename a finished temporary file or folder onto ``dest`` in one step, with the permissions a new file or
    folder gets (``mkstemp``/``mkdtemp`` make them private: 0600 / 0700)."""
    os.chmod(tmp, (0o777 if os.path.isdir(tmp) else 0o666) & ~_umask())
    os.replace(tmp, dest)


def write_atomic(path: str | os.PathLike, data: bytes) -> None:
    """Write through a temporary file in the same folder, then rename: readers never see half a file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(prefix=path.name + ".", suffix=".part", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as out:
            out.write(data)
        publish(tmp_name, path)
    finally:
        Path(tmp_name).unlink(missing_ok=True)
