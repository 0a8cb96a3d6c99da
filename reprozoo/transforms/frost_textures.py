"""The texture photographs of CIFAR-10-C's ``frost``: where they come from, each checked byte for byte.

``make_cifar_c.py`` (``ImageNet-C/create_c/`` of hendrycks/robustness) blends a crop of one of ``frost1.png``,
``frost2.png``, ``frost3.png``, ``frost4.jpg`` and ``frost5.jpg`` into every image (``np.random.randint(5)``: the
``frost6.jpg`` of the same folder is never used). These photographs are files of that repository, which is under
the Apache License 2.0 (its ``LICENSE`` file; the repository says nothing else about them). The
``imagecorruptions`` package (bethgelab, Apache-2.0, on PyPI) ships byte-identical copies of all six as package
data (``imagecorruptions/frost/``, version 1.1.2). reprozoo ships none of them and copies none into itself; it
reads them where they are, in this order (:func:`resolve_frost_dir`):

1. ``frost_dir``, when the caller names a folder (nothing else is tried then);
2. ``<data root>/frost/`` (``$REPROZOO_DATA/frost``, see :func:`reprozoo._files.data_root`) when it holds all five;
3. the ``frost/`` folder of an installed ``imagecorruptions``, located with ``importlib.util.find_spec`` without
   importing it (its module imports OpenCV, scikit-image and ``pkg_resources``);
4. unless ``REPROZOO_OFFLINE``: the missing files downloaded from the repository, pinned at commit
   ``FROST_COMMIT`` (``FROST_URL``), into ``<data root>/frost/``, each written atomically after its sha256 matched.

Every file is checked against ``FROST_SHA256`` (the sha256 of the repository's files) before use, and
:func:`read_frost_texture` returns the very bytes it checked: any other photograph is refused, so that ``frost``
is always CIFAR-10-C's. When the textures cannot be had, the error lists the files and where to put them.
"""

from __future__ import annotations

import hashlib
import importlib.util
import os
import urllib.request
from pathlib import Path

from reprozoo._files import data_root, offline, sha256_file, write_atomic

FROST_FILES = ("frost1.png", "frost2.png", "frost3.png", "frost4.jpg", "frost5.jpg", "frost6.jpg")
FROST_USED = 5  # np.random.randint(5): the script never picks frost6.jpg
# sha256 of ImageNet-C/create_c/frost*.{png,jpg} of hendrycks/robustness (unchanged since commit e0377d4, 2018);
# the imagecorruptions 1.1.2 wheel's imagecorruptions/frost/ files have the same.
FROST_SHA256 = {
    "frost1.png": "ff9f907860bd7a835d459e32f9d588062b7f61ee267343cc7222b56753a14755",
    "frost2.png": "fe211a89b336999c207a852ce05818d4545d0b57c5beadd824b4cc9d9a9b6137",
    "frost3.png": "2d0d50b4a9bb213f38b024ef7768731bb83cc08d2f26b5766bbc167cdfa0e504",
    "frost4.jpg": "3f8b91ca1a9fa7167b09e773da53f5ae60d0a1fd88f02a783f6e328a72887f6e",
    "frost5.jpg": "5fc6a19df4a429ba68abdcc8f8a4278d4c9f81c9ccafd2c92ab0c8cf8992ebd2",
    "frost6.jpg": "1f92b2f48408748085b68dd81d816ef239f42cef3029c25d041fcb6760fb4f25",
}
FROST_REPOSITORY = "hendrycks/robustness"
FROST_COMMIT = "8190fe329f5f072a06e3a2aea02bb5dda69aed9f"
FROST_URL = f"https://raw.githubusercontent.com/{FROST_REPOSITORY}/{FROST_COMMIT}/ImageNet-C/create_c/{{name}}"
FROST_FOLDER = "frost"  # under the data root
PACKAGE = "imagecorruptions"  # PyPI; ships the same files in <package>/frost/


def used_frost_files() -> tuple[str, ...]:
    """The five files the script draws from (``frost1.png`` .. ``frost5.jpg``)."""
    return FROST_FILES[:FROST_USED]


def default_frost_dir() -> Path:
    """``<data root>/frost``: where textures are looked for, and downloaded to."""
    return data_root() / FROST_FOLDER


def package_frost_dir() -> Path | None:
    """The ``frost/`` folder of the installed ``imagecorruptions`` package, or None when it is not installed; found
    from its import spec, without importing it (nothing is checked here)."""
    try:
        spec = importlib.util.find_spec(PACKAGE)
    except (ImportError, ValueError):  # a broken installation counts as none
        return None
    if spec is None:
        return None
    locations = list(spec.submodule_search_locations or [])
    if not locations and spec.origin:
        locations = [str(Path(spec.origin).parent)]
    return Path(locations[0]) / FROST_FOLDER if locations else None


_SHA_CACHE: dict[tuple[str, int, int], str] = {}


def _sha256(path: Path) -> str:
    """sha256 of a file, remembered while its size and modification time stay the same (availability is asked
    several times per datamodule)."""
    st = path.stat()
    key = (str(path.resolve()), st.st_size, st.st_mtime_ns)
    if key not in _SHA_CACHE:
        _SHA_CACHE[key] = sha256_file(path)
    return _SHA_CACHE[key]


def _missing(folder: Path) -> list[str]:
    return [name for name in used_frost_files() if not (folder / name).is_file()]


def _wrong(folder: Path) -> list[str]:
    """'<path> has sha256 X, not the official Y' for each present file whose bytes are not the official ones."""
    out = []
    for name in used_frost_files():
        path = folder / name
        if path.is_file():
            got = _sha256(path)
            if got != FROST_SHA256[name]:
                out.append(f"{path} has sha256 {got}, not the official {FROST_SHA256[name]}")
    return out


def _complete(folder: Path | None) -> bool:
    return folder is not None and not _missing(folder) and not _wrong(folder)


def where_to_put(folder: Path | None = None) -> str:
    """The instructions of every error: which files, where, from where."""
    folder = default_frost_dir() if folder is None else folder
    names = ", ".join(used_frost_files())
    return (
        f"Put the files {names} of {FROST_REPOSITORY} (ImageNet-C/create_c/, Apache-2.0; "
        f"{FROST_URL.format(name='<file>')}) into {folder}/, or `pip install {PACKAGE}` (it ships the same files), "
        "or pass frost_dir, a folder holding them; each must have its official sha256 "
        "(reprozoo.transforms.frost_textures.FROST_SHA256)."
    )


def find_frost_dir(frost_dir: str | os.PathLike | None = None) -> Path | None:
    """The folder whose five textures are all present and official, among ``frost_dir`` (alone, when given), the
    data root's ``frost/`` and the ``imagecorruptions`` package's; None when there is none. Never downloads."""
    if frost_dir is not None:
        folder = Path(frost_dir).expanduser()
        return folder if _complete(folder) else None
    for folder in (default_frost_dir(), package_frost_dir()):
        if _complete(folder):
            return folder
    return None


def frost_unavailable_reason(frost_dir: str | os.PathLike | None = None) -> str | None:
    """Why ``frost`` cannot be generated here, or None when its textures are found, or can be downloaded
    (``frost_dir`` not given, not offline, and nothing wrong in the data root's ``frost/``)."""
    needs = f"frost blends crops of {FROST_USED} texture photographs of {FROST_REPOSITORY}"
    if frost_dir is not None:
        folder = Path(frost_dir).expanduser()
        problems = [f"{folder / n} is missing" for n in _missing(folder)] + _wrong(folder)
        return f"{needs}, given as frost_dir={str(frost_dir)!r}: {'; '.join(problems)}" if problems else None
    if find_frost_dir() is not None:
        return None
    wrong = _wrong(default_frost_dir())
    if wrong:
        return (
            f"{needs}: {'; '.join(wrong)}. Delete or replace those files (missing ones are downloaded). "
            + where_to_put()
        )
    if offline():
        return (
            f"{needs}, which reprozoo does not ship, and found none: not in {default_frost_dir()}/, no {PACKAGE} "
            "package installed, no frost_dir given; offline mode is on (REPROZOO_OFFLINE), so nothing was "
            "downloaded. " + where_to_put()
        )
    return None


def download_frost_textures(folder: str | os.PathLike | None = None) -> Path:
    """Download the used textures that ``folder`` (default ``<data root>/frost``) lacks from ``FROST_URL``; each is
    written atomically once its sha256 matched (OSError otherwise, nothing written). Returns the folder."""
    folder = default_frost_dir() if folder is None else Path(folder)
    for name in _missing(folder):
        url = FROST_URL.format(name=name)
        with urllib.request.urlopen(url, timeout=60) as response:
            data = response.read()
        got = hashlib.sha256(data).hexdigest()
        if got != FROST_SHA256[name]:
            raise OSError(f"the sha256 of what {url} sent is {got}, not {FROST_SHA256[name]}: not the official file")
        write_atomic(folder / name, data)
    return folder


def resolve_frost_dir(frost_dir: str | os.PathLike | None = None) -> Path:
    """The folder to read the textures from (see the module docstring for the order), downloading them into the
    data root when they are nowhere here and ``REPROZOO_OFFLINE`` is not set. FileNotFoundError saying which files
    to put where when they cannot be had (missing, not the official bytes, offline, or the download failed)."""
    found = find_frost_dir(frost_dir)
    if found is not None:
        return found
    why = frost_unavailable_reason(frost_dir)
    if why:
        raise FileNotFoundError(why)
    folder = default_frost_dir()
    try:
        download_frost_textures(folder)
    except Exception as err:  # network, disk and checksum errors come in many types; all mean the same here
        raise FileNotFoundError(
            f"frost needs {FROST_USED} texture photographs of {FROST_REPOSITORY}: not in {folder}/ nor in an "
            f"installed {PACKAGE} package, and their download from {FROST_URL.format(name='<file>')} failed: "
            f"{type(err).__name__}: {err}. " + where_to_put(folder)
        ) from err
    if not _complete(folder):  # e.g. a file replaced meanwhile
        raise FileNotFoundError(f"the frost textures in {folder}/ are incomplete after the download. " + where_to_put())
    return folder


def read_frost_texture(folder: str | os.PathLike, name: str) -> bytes:
    """The bytes of the texture ``name`` in ``folder``, checked against its official sha256 (ValueError naming the
    file otherwise): the bytes returned are the bytes checked."""
    path = Path(folder) / name
    data = path.read_bytes()
    got = hashlib.sha256(data).hexdigest()
    if got != FROST_SHA256[name]:
        raise ValueError(f"the frost texture {path} has sha256 {got}, not the official {FROST_SHA256[name]}")
    return data


def frost_textures_sha256() -> str:
    """One hash of the five official textures (of their sha256s): it names generated ``frost`` files."""
    digest = hashlib.sha256()
    for name in used_frost_files():
        digest.update(FROST_SHA256[name].encode())
    return digest.hexdigest()
