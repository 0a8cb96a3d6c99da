"""Animal Faces-HQ (AFHQ; Choi et al., StarGAN v2, 2020): 512x512 faces of cats, dogs and wild animals.

This datamodule serves AFHQ the way the Neuromatch Academy regularization tutorial uses it: images shrunk to
``image_size`` (32), optionally flattened for MLPs, small class-balanced subsets, and training labels that are
partly or fully randomised for the memorization experiments (Zhang et al., "Understanding deep learning requires
rethinking generalization").

Files, in the official layout of the StarGAN v2 archive (``clovaai/stargan-v2``, ``download.sh``)::

    <data_dir>/afhq/train/{cat,dog,wild}/*.jpg
    <data_dir>/afhq/val/{cat,dog,wild}/*.jpg      (optional, see the splits below)

When ``afhq/train`` is missing and ``REPROZOO_OFFLINE`` is not set, the official archive (``url``) is downloaded
into ``data_dir``, checked (no member may have an absolute path or a ``..`` part), extracted into a temporary
folder of ``data_dir`` and moved into place with one rename, so an interrupted download never looks like the
dataset; the archive is deleted afterwards, as ``download.sh`` does. The archive has no official checksum: the
sha256 of what was downloaded is recorded in ``<data_dir>/afhq.zip.sha256`` (with the URL) for provenance only.

The tutorial's pre-made randomised copies are read when present, instead of randomising labels here:
``<data_dir>/afhq_random/train/<class>/`` (or ``afhq_random_100``) for ``label_noise=1.0`` and
``<data_dir>/afhq_random_<pct>/train/<class>/`` for ``label_noise = pct / 100`` (e.g. ``afhq_random_15``).
"""

from __future__ import annotations

import hashlib
import math
import os
import shutil
import tempfile
import urllib.request
import zipfile
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch.utils.data import Dataset
from torchvision.transforms import InterpolationMode
from torchvision.transforms import functional as TF

from reprozoo._files import data_path, data_root, offline, publish, write_atomic
from reprozoo.datamodules._base import _SplitsDataModule
from reprozoo.datamodules._splits import balanced_pick

CLASSES = ("cat", "dog", "wild")
AFHQ_URL = "https://www.dropbox.com/s/t9l9o3vsx2jai3z/afhq.zip?dl=1"  # download.sh's URL, ?dl=1 = the file itself
ARCHIVE_NAME = "afhq.zip"
IMAGE_EXTENSIONS = frozenset({".jpg", ".jpeg", ".png"})
MEAN = STD = 0.5  # the tutorial's Normalize((0.5, 0.5, 0.5), (0.5, 0.5, 0.5))


def default_data_dir() -> Path:
    """The data root itself (:func:`reprozoo._files.data_root`): AFHQ lives in its ``afhq/`` folder."""
    return data_root()


# ----------------------------------------------------------------------------------------------- files


def list_image_folder(root: str | os.PathLike, classes: Sequence[str] = CLASSES) -> tuple[list[Path], np.ndarray]:
    """(paths, labels) of ``root/<class>/*`` images, sorted by class then file name.

    Images are files ending in .jpg/.jpeg/.png (any case); hidden files and folders (``.DS_Store``,
    ``.ipynb_checkpoints``) and files directly in ``root`` are ignored. A missing class folder is a
    FileNotFoundError; a folder of another name, or a class folder without images, a ValueError.
    """
    root = Path(root)
    if not root.is_dir():
        raise FileNotFoundError(f"{root} is not a folder; expected {', '.join(f'{root}/{c}/' for c in classes)}")
    folders = {p.name for p in root.iterdir() if p.is_dir() and not p.name.startswith(".")}
    unknown = sorted(folders - set(classes))
    if unknown:
        raise ValueError(
            f"{root} has the folder(s) {', '.join(unknown)}, which are not AFHQ classes; "
            f"expected only {', '.join(classes)}"
        )
    missing = [c for c in classes if c not in folders]
    if missing:
        raise FileNotFoundError(f"{root} has no class folder {', '.join(f'{root / c}/' for c in missing)}")
    paths: list[Path] = []
    labels: list[int] = []
    for label, cls in enumerate(classes):
        found = sorted(
            p
            for p in (root / cls).iterdir()
            if p.is_file() and not p.name.startswith(".") and p.suffix.lower() in IMAGE_EXTENSIONS
        )
        if not found:
            raise ValueError(f"the class folder {root / cls}/ has no images (*.jpg, *.jpeg or *.png)")
        paths += found
        labels += [label] * len(found)
    return paths, np.asarray(labels, dtype=np.int64)


def load_image(path: str | os.PathLike, image_size: int) -> torch.Tensor:
    """uint8 tensor (3, image_size, image_size): RGB, resized (bilinear, antialiased) as the tutorial's
    ``transforms.Resize((s, s))`` does on a PIL image. Any failure is a ValueError naming the file."""
    try:
        with Image.open(path) as image:
            image = image.convert("RGB")
        image = TF.resize(image, [image_size, image_size], interpolation=InterpolationMode.BILINEAR, antialias=True)
    except Exception as err:  # PIL raises many types for a bad file (OSError, SyntaxError, ValueError, ...)
        raise ValueError(f"cannot read the image {path}: {type(err).__name__}: {err}") from err
    return TF.pil_to_tensor(image)


class AnimalFacesDataset(Dataset):
    """``(image, label)`` items of image files: float32 (3, s, s) in [0, 1], or [-1, 1] with ``normalize``,
    or (3*s*s,) with ``flatten``; the label is an int.

    Each image is decoded and resized once, on first access, and its uint8 tensor is kept in memory (3 KB per
    image at s=32). With loader workers each worker keeps its own cache (the base class makes them persistent).
    """

    def __init__(
        self,
        paths: Sequence[str | os.PathLike],
        labels: Sequence[int] | torch.Tensor,
        image_size: int = 32,
        normalize: bool = True,
        flatten: bool = False,
    ):
        self.paths = [Path(p) for p in paths]
        self.labels = torch.as_tensor(labels, dtype=torch.long).reshape(-1)
        if len(self.paths) != len(self.labels):
            raise ValueError(f"AnimalFacesDataset: {len(self.paths)} paths but {len(self.labels)} labels")
        self.image_size, self.normalize, self.flatten = image_size, normalize, flatten
        self._cache: list[torch.Tensor | None] = [None] * len(self.paths)

    def __len__(self) -> int:
        return len(self.paths)

    def image_uint8(self, index: int) -> torch.Tensor:
        cached = self._cache[index]
        if cached is None:
            cached = self._cache[index] = load_image(self.paths[index], self.image_size)
        return cached

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        x = self.image_uint8(index).float().div_(255)
        if self.normalize:
            x = x.sub_(MEAN).div_(STD)
        if self.flatten:
            x = x.reshape(-1)
        return x, int(self.labels[index])


# ----------------------------------------------------------------------------------------------- download


def check_zip_members(archive: zipfile.ZipFile) -> None:
    """ValueError unless every member stays inside the folder it is extracted to: no absolute path, no drive
    letter, no ``..`` part (``/`` and ``\\`` both count as separators)."""
    for name in archive.namelist():
        parts = name.replace("\\", "/").split("/")
        if name.startswith(("/", "\\")) or (len(parts[0]) >= 2 and parts[0][1] == ":") or ".." in parts:
            raise ValueError(
                f"the archive has the unsafe member {name!r} (absolute path or '..'); nothing was extracted"
            )


def download_afhq(data_dir: str | os.PathLike, url: str = AFHQ_URL) -> Path:
    """Download the AFHQ archive from ``url`` and extract it to ``data_dir/afhq``; returns that folder.

    The archive goes to a temporary file in ``data_dir``, is checked member by member, extracted into a temporary
    folder in ``data_dir`` and moved into place with ``os.replace``; its sha256 is recorded in
    ``data_dir/afhq.zip.sha256`` (no official checksum exists) and the archive is deleted. The archive may hold
    ``afhq/train/...`` (the official one) or ``train/...`` at its top. Raises ValueError for an archive that is
    not a zip, has an unsafe member or no ``train`` folder, OSError for network and disk errors.
    """
    data_dir = Path(data_dir)
    data_dir.mkdir(parents=True, exist_ok=True)
    dest = data_dir / "afhq"
    fd, tmp_zip = tempfile.mkstemp(prefix=ARCHIVE_NAME + ".", suffix=".part", dir=data_dir)
    tmp_dir = tempfile.mkdtemp(prefix=".afhq-extract-", dir=data_dir)
    digest = hashlib.sha256()
    try:
        with os.fdopen(fd, "wb") as out, urllib.request.urlopen(url, timeout=60) as response:
            for block in iter(lambda: response.read(1 << 20), b""):
                out.write(block)
                digest.update(block)
        if not zipfile.is_zipfile(tmp_zip):
            raise ValueError(f"what {url} sent is not a zip archive")
        with zipfile.ZipFile(tmp_zip) as archive:
            check_zip_members(archive)
            archive.extractall(tmp_dir)
        tmp = Path(tmp_dir)
        root = tmp / "afhq" if (tmp / "afhq" / "train").is_dir() else tmp
        if not (root / "train").is_dir():
            raise ValueError(f"the archive from {url} has no afhq/train/ (or train/) folder")
        write_atomic(data_dir / f"{ARCHIVE_NAME}.sha256", f"{digest.hexdigest()}  {ARCHIVE_NAME}  {url}\n".encode())
        publish(root, dest)  # one rename: afhq/ appears complete or not at all
    finally:
        Path(tmp_zip).unlink(missing_ok=True)
        shutil.rmtree(tmp_dir, ignore_errors=True)
    return dest


# ----------------------------------------------------------------------------------------------- subsets


def _holdout(labels: np.ndarray, fraction: float, num_classes: int, rng: np.random.Generator) -> np.ndarray:
    """bool mask of a stratified held-out part: round(fraction * n_c) of each class, at least 1 and at most
    n_c - 1 (a class of one image stays in train)."""
    mask = np.zeros(len(labels), dtype=bool)
    for c in range(num_classes):
        pool = np.flatnonzero(labels == c)
        k = min(max(1, round(fraction * len(pool))), len(pool) - 1)
        mask[rng.choice(pool, size=k, replace=False)] = True
    return mask


def premade_folder_names(label_noise: float) -> list[str]:
    """The folder names of the tutorial's pre-made randomised copies that stand for ``label_noise``:
    ``afhq_random`` and ``afhq_random_100`` for 1.0, ``afhq_random_<pct>`` for an integer percentage, none
    for 0 or a non-integer percentage."""
    pct = round(label_noise * 100)
    if pct == 0 or not math.isclose(label_noise * 100, pct, abs_tol=1e-9):
        return []
    return ["afhq_random", "afhq_random_100"] if pct == 100 else [f"afhq_random_{pct}"]


# ----------------------------------------------------------------------------------------------- the datamodule


class AnimalFacesDataModule(_SplitsDataModule):
    """AFHQ cats / dogs / wild animals (labels 0 / 1 / 2) as ``(image, label)`` items, with label randomisation.

    Splits:

    * ``train``: ``afhq/train`` (or a pre-made randomised copy, see below), minus what is held out for val, then
      a seeded class-balanced subset of ``num_train`` images (None = all).
    * ``val``: ``afhq/val`` when that folder exists (``val_fraction`` is then unused). Without it (e.g. the
      41-image sample), a seeded, stratified ``val_fraction`` of ``afhq/train`` is held out (about that fraction
      of each class, at least one image of each); with ``val_fraction=0`` and no ``afhq/val``, val is empty.
      Then a seeded class-balanced subset of ``num_val`` images (None = all). Val labels are never randomised.
    * ``test`` (and predict): the val split itself. AFHQ has no test split; its val folder is what the StarGAN v2
      paper and the tutorial evaluate on.

    Label randomisation: ``round(label_noise * N)`` of the N training items (after the subset) are drawn with a
    seeded generator and get a uniformly random class, once, in ``setup``: the same labels in every epoch. A
    random class may equal the true one (as with the tutorial's shuffling), so about 2/3 of the drawn labels
    actually change, and ``label_noise=1`` makes labels independent of the images (1/3 agree by chance).
    ``self.true_labels`` (long) and ``self.noisy_mask`` (bool: drawn for randomisation) are aligned with
    ``splits["train"]``; its labels, as served, are ``splits["train"].labels``.

    Pre-made randomised folders: when ``use_premade`` and ``<data_dir>/afhq_random[_<pct>]/train/<class>/``
    exists for the requested ``label_noise`` (``afhq_random`` or ``afhq_random_100`` for 1.0,
    ``afhq_random_<pct>`` for pct/100, e.g. ``afhq_random_15``), its folders give the training labels as they
    are, instead of randomising here. ``afhq/train`` is still needed (it is what the held-out val comes from, and
    the file names there give ``true_labels``). ``noisy_mask`` then marks the labels that differ from the true
    ones; a pre-made image whose file name is not in ``afhq/train`` gets true label -1 and is not marked.
    ``self.train_source`` names the folder used, ``self.val_source`` where val came from.

    Args:
        data_dir: the folder that holds ``afhq/`` (and any ``afhq_random*/``); default
            the data root (``$REPROZOO_DATA``, see docs/data.md), i.e. the images in ``$REPROZOO_DATA/afhq/train/``.
        url: where the official archive is downloaded from when ``afhq/train`` is missing (a ``file://`` URL
            works); nothing is downloaded with ``REPROZOO_OFFLINE=1``.
        image_size: images are resized to ``image_size`` x ``image_size`` (tutorial: 32).
        normalize: map [0, 1] to [-1, 1] (mean 0.5, std 0.5 per channel, as the tutorial).
        flatten: items of shape (3 * image_size**2,) instead of (3, image_size, image_size), for MLPs.
        num_train, num_val: sizes of seeded class-balanced subsets (tutorial: e.g. 100 and 100); None = all.
        val_fraction: held out of ``afhq/train`` for val when there is no ``afhq/val`` (in [0, 1)).
        label_noise: fraction of training labels replaced by a uniformly random class, in [0, 1].
        use_premade: read the tutorial's pre-made randomised folders when present.
        batch_size, num_workers: for all loaders; train is shuffled.
        seed: held-out split, subsets and label randomisation each derive their own generator from it.
    """

    def __init__(
        self,
        data_dir: str | None = None,
        url: str = AFHQ_URL,
        image_size: int = 32,
        normalize: bool = True,
        flatten: bool = False,
        num_train: int | None = None,
        num_val: int | None = None,
        val_fraction: float = 0.2,
        label_noise: float = 0.0,
        use_premade: bool = True,
        batch_size: int = 32,
        num_workers: int = 0,
        seed: int = 0,
    ):
        super().__init__()
        name = type(self).__name__
        if isinstance(image_size, bool) or not isinstance(image_size, int) or image_size < 1:
            raise ValueError(f"{name}: image_size must be an integer >= 1, got {image_size!r}")
        if not (isinstance(label_noise, (int, float)) and 0.0 <= label_noise <= 1.0):
            raise ValueError(f"{name}: label_noise must be a fraction in [0, 1], got {label_noise!r}")
        if not (isinstance(val_fraction, (int, float)) and 0.0 <= val_fraction < 1.0):
            raise ValueError(f"{name}: val_fraction must be in [0, 1), got {val_fraction!r}")
        for field, value in {"num_train": num_train, "num_val": num_val}.items():
            if value is not None and value < 1:
                raise ValueError(f"{name}: {field} must be >= 1 or None, got {value}")
        if batch_size < 1:
            raise ValueError(f"{name}: batch_size must be >= 1, got {batch_size}")
        for field, value in {"num_workers": num_workers, "seed": seed}.items():
            if value < 0:
                raise ValueError(f"{name}: {field} must be >= 0, got {value}")
        self.save_hyperparameters()
        self.data_dir = data_path(data_dir) if data_dir is not None else default_data_dir()
        self.classes = list(CLASSES)
        self.num_classes = len(CLASSES)
        self.splits: dict[str, AnimalFacesDataset] = {}
        self.true_labels: torch.Tensor | None = None
        self.noisy_mask: torch.Tensor | None = None
        self.train_source: str | None = None
        self.val_source: str | None = None

    @property
    def input_shape(self) -> tuple[int, ...]:
        s = self.hparams.image_size
        return (3 * s * s,) if self.hparams.flatten else (3, s, s)

    # ------------------------------------------------------------------------------------ files

    def _where_to_put(self) -> str:
        d = self.data_dir
        return (
            f"Put the AFHQ images at {d / 'afhq' / 'train' / 'cat'}/*.jpg, {d / 'afhq' / 'train' / 'dog'}/*.jpg and "
            f"{d / 'afhq' / 'train' / 'wild'}/*.jpg, and optionally the validation images at "
            f"{d / 'afhq' / 'val'}/{{cat,dog,wild}}/*.jpg (without them, val_fraction of train is held out). "
            f"They are the official Animal Faces-HQ archive of StarGAN v2 (clovaai/stargan-v2), {self.hparams.url}: "
            f"unzip it into {d}."
        )

    def ensure_data(self) -> Path:
        """``data_dir/afhq``, after downloading it if ``afhq/train`` is missing (never when offline)."""
        name, url = type(self).__name__, self.hparams.url
        root = self.data_dir / "afhq"
        if (root / "train").is_dir():
            return root
        if root.exists():
            raise FileNotFoundError(
                f"{name}: {root} exists but has no train/ folder; nothing was downloaded over it. "
                f"Complete it or delete it to download again. " + self._where_to_put()
            )
        if offline():
            raise FileNotFoundError(
                f"{name}: missing {root / 'train'}/ and offline mode is on (REPROZOO_OFFLINE), so nothing was "
                f"downloaded. " + self._where_to_put()
            )
        try:
            return download_afhq(self.data_dir, url)
        except ValueError as err:
            raise ValueError(f"{name}: refused the archive from {url}: {err}. " + self._where_to_put()) from err
        except Exception as err:  # network errors come in many types; all mean the same to the user
            raise FileNotFoundError(f"{name}: could not download {url}: {err}. " + self._where_to_put()) from err

    def premade_folder(self) -> Path | None:
        """The pre-made randomised folder used for ``label_noise`` (the one holding ``train/``), or None."""
        if not self.hparams.use_premade:
            return None
        for folder in premade_folder_names(self.hparams.label_noise):
            if (self.data_dir / folder / "train").is_dir():
                return self.data_dir / folder
        return None

    # ------------------------------------------------------------------------------------ Lightning hooks

    def prepare_data(self) -> None:
        self.ensure_data()

    def setup(self, stage: str | None = None) -> None:
        if self.splits:
            return
        hp = self.hparams
        name = type(self).__name__
        root = self.ensure_data()

        def listing(folder: Path) -> tuple[list[Path], np.ndarray]:
            try:
                return list_image_folder(folder, CLASSES)
            except (FileNotFoundError, ValueError) as err:
                raise type(err)(f"{name}: {err}") from err

        clean_paths, clean_labels = listing(root / "train")
        if (root / "val").is_dir():
            val_paths, val_labels = listing(root / "val")
            held_out = np.zeros(len(clean_paths), dtype=bool)
            self.val_source = "afhq/val"
        elif hp.val_fraction > 0:
            held_out = _holdout(clean_labels, hp.val_fraction, len(CLASSES), np.random.default_rng((hp.seed, 0)))
            val_paths = [p for p, h in zip(clean_paths, held_out) if h]
            val_labels = clean_labels[held_out]
            self.val_source = "afhq/train (held out)"
        else:
            held_out = np.zeros(len(clean_paths), dtype=bool)
            val_paths, val_labels = [], np.zeros(0, dtype=np.int64)
            self.val_source = None

        premade = self.premade_folder()
        if premade is None:
            keep = ~held_out
            train_paths = [p for p, k in zip(clean_paths, keep) if k]
            train_labels = clean_labels[keep]
            true_labels = train_labels.copy()
            self.train_source = "afhq/train"
        else:
            truth = {p.name: int(label) for p, label in zip(clean_paths, clean_labels)}
            val_names = {p.name for p in val_paths}
            all_paths, all_labels = listing(premade / "train")
            keep = np.array([p.name not in val_names for p in all_paths], dtype=bool)
            train_paths = [p for p, k in zip(all_paths, keep) if k]
            train_labels = all_labels[keep]
            true_labels = np.array([truth.get(p.name, -1) for p in train_paths], dtype=np.int64)
            self.train_source = premade.name

        if hp.num_train is not None:
            pick = balanced_pick(
                train_labels, hp.num_train, np.random.default_rng((hp.seed, 1)), f"{name}: num_train", CLASSES
            )
            train_paths = [train_paths[i] for i in pick]
            train_labels, true_labels = train_labels[pick], true_labels[pick]
        if hp.num_val is not None:
            pick = balanced_pick(
                val_labels, hp.num_val, np.random.default_rng((hp.seed, 2)), f"{name}: num_val", CLASSES
            )
            val_paths = [val_paths[i] for i in pick]
            val_labels = val_labels[pick]

        if premade is None:
            noisy = np.zeros(len(train_labels), dtype=bool)
            rng = np.random.default_rng((hp.seed, 3))
            drawn = rng.choice(len(train_labels), size=round(hp.label_noise * len(train_labels)), replace=False)
            train_labels = train_labels.copy()
            train_labels[drawn] = rng.integers(0, len(CLASSES), size=len(drawn))
            noisy[drawn] = True
        else:
            noisy = (true_labels >= 0) & (true_labels != train_labels)

        self.true_labels = torch.from_numpy(true_labels)
        self.noisy_mask = torch.from_numpy(noisy)
        options = dict(image_size=hp.image_size, normalize=hp.normalize, flatten=hp.flatten)
        self.splits["train"] = AnimalFacesDataset(train_paths, torch.from_numpy(train_labels), **options)
        self.splits["val"] = AnimalFacesDataset(val_paths, torch.from_numpy(val_labels), **options)
        self.splits["test"] = self.splits["val"]
