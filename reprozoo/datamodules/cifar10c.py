"""CIFAR-10-C (Hendrycks & Dietterich, ICLR 2019): the CIFAR-10 test set under 19 corruptions at 5 severities,
served as one test dataloader per (corruption, severity), as test-time adaptation (TENT) and robustness
benchmarks evaluate it.

Two sources (``source``):

* ``"official"``: the published arrays, in the layout robustbench reads (``robustbench/data.py``)::

      <data_dir>/CIFAR-10-C/<corruption>.npy   uint8 (50000, 32, 32, 3): severity s in rows (s-1)*10000 .. s*10000-1
      <data_dir>/CIFAR-10-C/labels.npy         (50000,) integers: the 10,000 test labels once per severity

  Any 5 * n rows are accepted (tiny files in tests). Files are memory-mapped (``np.load(mmap_mode="r")``): a
  domain reads only its own rows, never the whole 150 MB file. When files are missing and ``REPROZOO_OFFLINE`` is
  not set, the official archive ``CIFAR-10-C.tar`` of Zenodo record 2535967 (2.9 GB, md5 ``CIFAR10C_MD5``) is
  downloaded into a temporary file of ``data_dir``, its md5 checked, its members checked (no absolute path, no
  ``..``, no links or devices), extracted into a temporary folder of ``data_dir`` and moved into place; the
  archive is deleted afterwards (about 6 GB of free space are needed meanwhile).
* ``"generate"``: CIFAR-10-C-style data made here by :mod:`reprozoo.transforms.corruptions` (the CIFAR
  parameters of ``make_cifar_c.py``, re-derived with numpy and PIL) from a clean CIFAR-10 test set: an ``.npz``
  with ``x`` uint8 (N, 32, 32, 3) and ``y`` (``clean_npz``, a path, relative ones looked up under
  the data root: ``cifar10/test.npz``; read in place), or torchvision's CIFAR10 test set (``clean="torchvision"``, in ``clean_root``). Only the
  requested severities are generated, and only the first rows a run needs (see ``num_examples``); results are
  cached, one file per severity (the official files stack 5 severities; generating all 5 would cost 5 times
  as much when one is wanted)::

      <data_dir>/CIFAR-10-C-generated/<key>/<corruption>-s<severity>.npy   uint8 (M, 32, 32, 3): clean rows 0..M-1
      <data_dir>/CIFAR-10-C-generated/<key>/labels.npy                     uint8 (N,): the clean labels
      <data_dir>/CIFAR-10-C-generated/<key>/meta.json                      what the key stands for

  ``<key>`` hashes the sha256 of the clean source file, ``seed`` and ``CORRUPTIONS_VERSION``, so a changed
  source, seed or corruption code never reuses a stale cache. Each image's corruption depends only on
  (seed, corruption, severity, image index), so a file holding M rows is extended, never redone, when a run
  needs more; files are written through a temporary file and ``os.replace``. ``frost`` needs the five texture
  photographs of hendrycks/robustness (Apache-2.0), which reprozoo does not ship: they are read from
  ``frost_dir``, ``<data root>/frost/`` or the ``imagecorruptions`` package, else downloaded into
  ``<data root>/frost/`` unless offline, each checked against its sha256 (see
  :mod:`reprozoo.transforms.frost_textures`); its files are named
  ``frost-<textures' sha256 prefix>-s<severity>.npy``.

Domains, in this order: ``"clean"`` (with ``include_clean``: the clean test set, from ``clean_npz`` or
torchvision for either source), then ``"<corruption>-<severity>"`` for each severity, for each corruption (TENT's
loop: ``for severity in severities: for corruption in corruptions``). ``self.domains[dataloader_idx]`` names
the dataloader a test or predict step got.

Items are ``(image, label)``: float32 (3, 32, 32) in [0, 1], or normalised with ``mean`` / ``std`` when
``normalize`` (the default leaves normalisation to the model, as robustbench's models do). They come in file
order, or in one fixed seeded order with ``shuffle`` (needed for class-sorted clean sources such as
``test_jpeg_q75.npz``: a warning says so). The loaders read each batch at once (one gather from the memory map,
``CIFAR10CDataset.get_batch``), giving the tensors the items one by one would collate to.
"""

from __future__ import annotations

import json
import os
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Literal

import lightning as L
import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

from reprozoo._files import data_path, offline, sha256_file, write_atomic
from reprozoo.datamodules._base import BatchFetch, collate
from reprozoo.datamodules._splits import is_int
from reprozoo.datamodules.cifar10c_files import (
    ARCHIVE_NAME,
    CIFAR10C_BYTES,
    CIFAR10C_MD5,
    CIFAR10C_URL,
    CLASSES,
    FOLDER,
    GENERATED_FOLDER,
    MEAN,
    NUM_SEVERITIES,
    STD,
    ZENODO_RECORD,
    default_clean_root,
    default_data_dir,
    download_cifar10c,
    generation_key,
    load_clean_npz,
    load_torchvision_test_set,
    npy_bytes,
    open_images_file,
    read_labels_file,
)
from reprozoo.transforms.corruptions import (
    BENCHMARK_CORRUPTIONS,
    CORRUPTIONS,
    CORRUPTIONS_VERSION,
    available_corruptions,
    check_corruption,
    corrupt,
)
from reprozoo.transforms.frost_textures import frost_textures_sha256

# ----------------------------------------------------------------------------------------------- items


class CIFAR10CDataset(Dataset):
    """``(image, label)`` items of rows of a uint8 (N, 32, 32, 3) image array: an ``.npy`` file, memory-mapped on
    first access in each process (never pickled into loader workers), or an in-memory array.

    The image is float32 (3, 32, 32) in [0, 1], or ``(p - mean) / std`` per channel when ``mean`` and ``std`` are
    given; the label an int. ``rows`` are the rows read, ``labels`` (long) and ``source_index`` (long: each item's
    index in the clean test set) are aligned with them.
    """

    def __init__(
        self,
        images: str | os.PathLike | np.ndarray,
        rows: Sequence[int] | np.ndarray,
        labels: Sequence[int] | np.ndarray,
        mean: Sequence[float] | None = None,
        std: Sequence[float] | None = None,
        source_index: Sequence[int] | np.ndarray | None = None,
    ):
        self.path = None if isinstance(images, np.ndarray) else Path(images)
        self._images = images if isinstance(images, np.ndarray) else None
        self.rows = np.asarray(rows, dtype=np.int64).reshape(-1)
        self.labels = torch.as_tensor(np.asarray(labels), dtype=torch.long).reshape(-1)
        if len(self.labels) != len(self.rows):
            raise ValueError(f"CIFAR10CDataset: {len(self.rows)} rows but {len(self.labels)} labels")
        self.source_index = torch.as_tensor(
            np.asarray(self.rows if source_index is None else source_index, dtype=np.int64)
        )
        if (mean is None) != (std is None):
            raise ValueError("CIFAR10CDataset: give both mean and std, or neither")
        self.mean = None if mean is None else torch.tensor(mean, dtype=torch.float32).reshape(3, 1, 1)
        self.std = None if std is None else torch.tensor(std, dtype=torch.float32).reshape(3, 1, 1)
        self._labels = self.labels.tolist()

    def __getstate__(self) -> dict:
        state = dict(self.__dict__)
        if self.path is not None:
            state["_images"] = None  # each process maps the file itself
        return state

    @property
    def images(self) -> np.ndarray:
        """The whole image array (memory-mapped for a file)."""
        if self._images is None:
            self._images = np.load(self.path, mmap_mode="r", allow_pickle=False)
        return self._images

    def __len__(self) -> int:
        return len(self.rows)

    def image_uint8(self, index: int) -> np.ndarray:
        return np.asarray(self.images[self.rows[index]])

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        n = len(self.rows)
        index = int(index)
        if not -n <= index < n:
            raise IndexError(f"index {index} is out of range for {n} items")
        x = torch.from_numpy(np.array(self.images[self.rows[index]])).permute(2, 0, 1).float().div_(255)
        if self.mean is not None:
            x = x.sub_(self.mean).div_(self.std)
        return x, self._labels[index]

    def get_batch(self, indices: Sequence[int]) -> list[torch.Tensor]:
        """``[images (B, 3, 32, 32) float32, labels (B,) long]`` of ``indices`` in one read: what the items one by one
        collate to (same values, contiguous), without B item reads and a stack. :class:`BatchFetch` calls it."""
        n = len(self.rows)
        index = np.asarray(indices, dtype=np.int64).reshape(-1)
        if len(index) and not (-n <= index.min() and index.max() < n):
            bad = index[(index < -n) | (index >= n)][0]
            raise IndexError(f"index {bad} is out of range for {n} items")
        pixels = np.asarray(self.images[self.rows[index]])  # (B, 32, 32, 3) uint8; one gather from the memory map
        # Layout, type and scale in one numpy pass (single-threaded: no thread start-up for a batch this small); the
        # float32 division by 255 is correctly rounded, so the values are those of the items' torch ``div_(255)``.
        x = np.empty((len(index), 3, *pixels.shape[1:3]), dtype=np.float32)
        np.divide(pixels.transpose(0, 3, 1, 2), np.float32(255), out=x, dtype=np.float32)
        x = torch.from_numpy(x)
        if self.mean is not None:
            x = x.sub_(self.mean).div_(self.std)
        return [x, self.labels[torch.from_numpy(index)]]


# ----------------------------------------------------------------------------------------------- the datamodule


class CIFAR10CDataModule(L.LightningDataModule):
    """CIFAR-10-C test domains, one test (and predict) dataloader per (corruption, severity), plus ``"clean"``.

    Args:
        data_dir: holds ``CIFAR-10-C/`` (official) and ``CIFAR-10-C-generated/`` (generated); default
            the data root (``$REPROZOO_DATA``, see docs/data.md).
        source: ``"official"`` (the published arrays, downloaded when missing and online) or ``"generate"``
            (made here from a clean CIFAR-10 test set and cached; see the module docstring).
        corruptions: names among the 15 benchmark corruptions and the 4 extra ones (``speckle_noise``,
            ``gaussian_blur``, ``spatter``, ``saturate``); a single name works. Default: the 15 benchmark ones in
            ``make_cifar_c.py``'s order; for ``source="generate"`` all 15 when ``frost``'s texture photographs are
            found or can be downloaded (see ``frost_dir``), else the other 14 (asking for ``frost`` by name then
            is an error saying which files to put where).
        severities: in 1..5 (default ``(5,)``, the severity TENT's tables report); a single integer works.
        num_examples: items per domain: the first ``num_examples`` (``subset="first"``, as robustbench's
            ``n_examples``) or a seeded random sample (``subset="random"``, served in the order drawn, so classes
            mix; the same sample and order for every domain); None = all. With ``source="generate"``, "first" also limits generation to those rows, while "random"
            generates every row up to the largest index drawn.
        shuffle: serve each domain's items in one seeded random order (the same for every domain, the same in
            every epoch) instead of file order. Use it with class-sorted sources such as
            an ``.npz`` of the test set grouped by class, so that batches mix classes as in
            the official test order: batch-statistics methods such as TENT need that (``subset="random"`` mixes
            classes too).
        include_clean: add the ``"clean"`` domain first: the clean test set (``clean_npz`` or torchvision's),
            which must have the same images and labels, in the same order, as the corrupted ones.
        clean: where clean images come from, ``"npz"`` (``clean_npz``) or ``"torchvision"`` (``clean_root``);
            default: ``"npz"`` when ``clean_npz`` is given, else ``"torchvision"``.
        clean_npz: an ``.npz`` with ``x`` uint8 (N, 32, 32, 3) and ``y`` (N,), read in place; a relative path that
            is not in the working directory is looked up under the data root.
        clean_root: torchvision's CIFAR10 root (default ``<data root>/cifar10``); downloaded there by
            torchvision when missing, unless offline.
        frost_dir: a folder with ``make_cifar_c.py``'s frost textures (``frost1.png`` .. ``frost5.jpg``); default:
            ``<data root>/frost/``, else the installed ``imagecorruptions`` package's copies, else downloaded
            from hendrycks/robustness into ``<data root>/frost/`` when generating (not when offline). Every file
            must have its official sha256.
        normalize: normalise items with ``mean`` / ``std`` (default: no, items in [0, 1]).
        mean, std: per-channel, default the CIFAR-10 training statistics ``MEAN`` / ``STD``.
        url, md5: where the official archive is downloaded from and its md5 (a ``file://`` URL works); nothing is
            downloaded with ``REPROZOO_OFFLINE=1``.
        batch_size: 200 by default, the batch size of TENT's CIFAR-10-C runs; num_workers: for every loader.
        seed: the generated corruptions (each image's generator derives from it) and ``subset="random"``.

    After ``setup``: ``domains`` (names, in dataloader order), ``datasets`` ({domain: CIFAR10CDataset}),
    ``files`` ({domain: the file its images come from}) and, for ``source="generate"``, ``generated_dir``.
    """

    def __init__(
        self,
        data_dir: str | None = None,
        source: Literal["official", "generate"] = "official",
        corruptions: Sequence[str] | None = None,
        severities: Sequence[int] = (5,),
        num_examples: int | None = None,
        subset: Literal["first", "random"] = "first",
        shuffle: bool = False,
        include_clean: bool = False,
        clean: Literal["npz", "torchvision"] | None = None,
        clean_npz: str | None = None,
        clean_root: str | None = None,
        frost_dir: str | None = None,
        normalize: bool = False,
        mean: Sequence[float] = MEAN,
        std: Sequence[float] = STD,
        url: str = CIFAR10C_URL,
        md5: str = CIFAR10C_MD5,
        batch_size: int = 200,
        num_workers: int = 0,
        seed: int = 0,
    ):
        super().__init__()
        name = type(self).__name__
        if source not in ("official", "generate"):
            raise ValueError(f"{name}: source must be 'official' or 'generate', got {source!r}")
        if corruptions is None:  # the benchmark's 15; those that can be generated here for "generate"
            available = available_corruptions(frost_dir) if source == "generate" else CORRUPTIONS
            corruptions = [c for c in BENCHMARK_CORRUPTIONS if c in available]
        if isinstance(corruptions, str):
            corruptions = [corruptions]
        if not isinstance(corruptions, Sequence) or not all(isinstance(c, str) for c in corruptions):
            raise ValueError(f"{name}: corruptions must be a list of names, got {corruptions!r}")
        unknown = [c for c in corruptions if c not in CORRUPTIONS]
        if unknown:
            raise ValueError(
                f"{name}: corruptions has the unknown name(s) {', '.join(map(repr, unknown))}; the CIFAR-10-C "
                f"corruptions are {', '.join(CORRUPTIONS)}"
            )
        if len(set(corruptions)) != len(corruptions):
            raise ValueError(f"{name}: corruptions lists a name twice: {list(corruptions)}")
        if source == "generate":
            for c in corruptions:
                try:
                    check_corruption(c, frost_dir)
                except ValueError as err:
                    raise ValueError(f"{name}: corruptions: {err}") from err
        if is_int(severities):
            severities = [severities]
        if not isinstance(severities, Sequence) or not all(is_int(s) and 1 <= s <= 5 for s in severities):
            raise ValueError(f"{name}: severities must be integers in 1..5, got {severities!r}")
        if len(set(severities)) != len(severities):
            raise ValueError(f"{name}: severities lists a severity twice: {list(severities)}")
        if not include_clean and not (corruptions and severities):
            raise ValueError(
                f"{name}: no domain to serve: corruptions and severities are empty and include_clean is off"
            )
        if num_examples is not None and not (is_int(num_examples) and num_examples >= 1):
            raise ValueError(f"{name}: num_examples must be an integer >= 1 or None, got {num_examples!r}")
        if subset not in ("first", "random"):
            raise ValueError(f"{name}: subset must be 'first' or 'random', got {subset!r}")
        if not isinstance(shuffle, bool):
            raise ValueError(f"{name}: shuffle must be True or False, got {shuffle!r}")
        if clean not in (None, "npz", "torchvision"):
            raise ValueError(f"{name}: clean must be 'npz', 'torchvision' or None, got {clean!r}")
        if clean == "npz" and clean_npz is None:
            raise ValueError(f"{name}: clean='npz' needs clean_npz, the path of an .npz with x and y")
        if clean == "torchvision" and clean_npz is not None:
            raise ValueError(f"{name}: clean='torchvision' and clean_npz={clean_npz!r} contradict each other")
        for field, value in {"mean": mean, "std": std}.items():
            if (
                isinstance(value, str)
                or not isinstance(value, Sequence)
                or len(value) != 3
                or not all(isinstance(v, (int, float)) for v in value)
            ):
                raise ValueError(f"{name}: {field} must be 3 per-channel numbers, got {value!r}")
        if not all(s > 0 for s in std):
            raise ValueError(f"{name}: std must be positive, got {std!r}")
        if not isinstance(md5, str) or len(md5) != 32 or any(ch not in "0123456789abcdefABCDEF" for ch in md5):
            raise ValueError(f"{name}: md5 must be 32 hexadecimal digits, got {md5!r}")
        if not (is_int(batch_size) and batch_size >= 1):
            raise ValueError(f"{name}: batch_size must be an integer >= 1, got {batch_size!r}")
        for field, value in {"num_workers": num_workers, "seed": seed}.items():
            if not (is_int(value) and value >= 0):
                raise ValueError(f"{name}: {field} must be an integer >= 0, got {value!r}")
        self.save_hyperparameters()
        self.data_dir = data_path(data_dir) if data_dir is not None else default_data_dir()
        self.corruptions = tuple(corruptions)
        self.severities = tuple(int(s) for s in severities)
        self.clean_kind = clean or ("npz" if clean_npz is not None else "torchvision")
        self.clean_root = data_path(clean_root) if clean_root is not None else default_clean_root()
        self.classes = list(CLASSES)
        self.num_classes = len(CLASSES)
        self.domains = (["clean"] if include_clean else []) + [
            f"{c}-{s}" for s in self.severities for c in self.corruptions
        ]
        self.datasets: dict[str, CIFAR10CDataset] = {}
        self.files: dict[str, Path] = {}
        self.generated_dir: Path | None = None
        self._clean: tuple[np.ndarray, np.ndarray, Path, str] | None = None

    @property
    def input_shape(self) -> tuple[int, ...]:
        return (3, 32, 32)

    @property
    def folder(self) -> Path:
        """``data_dir/CIFAR-10-C``, where the official files are read."""
        return self.data_dir / FOLDER

    # ------------------------------------------------------------------------------------ official files

    def _official_names(self) -> list[str]:
        return ["labels.npy"] + [f"{c}.npy" for c in self.corruptions]

    def _where_to_put(self, missing: Sequence[str]) -> str:
        hp = self.hparams
        return (
            f"Put the official CIFAR-10-C file(s) {', '.join(missing)} into {self.folder}/ (the layout robustbench "
            "reads: <corruption>.npy uint8 (50000, 32, 32, 3) with severity s in rows (s-1)*10000 .. s*10000-1, "
            f"and labels.npy (50000,)): they are in {ARCHIVE_NAME} of Zenodo record {ZENODO_RECORD} ({hp.url}, "
            f"md5 {hp.md5}, {CIFAR10C_BYTES / 1e9:.1f} GB); extract it into {self.data_dir}/, or run once with "
            "network access. Or make CIFAR-10-C-style data here with source='generate' (from clean_npz, an .npz "
            "with x uint8 (N, 32, 32, 3) and y, or torchvision's CIFAR-10 test set)."
        )

    def ensure_files(self) -> dict[str, Path]:
        """{"labels" or corruption: path} of the official files the chosen corruptions need, after downloading the
        archive when one is missing (never when offline). FileNotFoundError listing the missing files and their
        folder when they cannot be had; ValueError when the downloaded archive is refused."""
        name, hp = type(self).__name__, self.hparams
        missing = [f for f in self._official_names() if not (self.folder / f).is_file()]
        if missing:
            listing = ", ".join(str(self.folder / f) for f in missing)
            if offline():
                raise FileNotFoundError(
                    f"{name}: missing {listing}, and offline mode is on (REPROZOO_OFFLINE), so nothing was "
                    "downloaded. " + self._where_to_put(missing)
                )
            try:
                download_cifar10c(self.data_dir, hp.url, hp.md5)
            except ValueError as err:
                raise ValueError(
                    f"{name}: refused the archive from {hp.url}: {err}. " + self._where_to_put(missing)
                ) from err
            except Exception as err:  # network and disk errors come in many types; all mean the same here
                raise FileNotFoundError(
                    f"{name}: missing {listing}, and the download failed: {type(err).__name__}: {err}. "
                    + self._where_to_put(missing)
                ) from err
            still = [f for f in self._official_names() if not (self.folder / f).is_file()]
            if still:
                raise FileNotFoundError(
                    f"{name}: the archive from {hp.url} has no {', '.join(still)}. " + self._where_to_put(still)
                )
        paths = {"labels": self.folder / "labels.npy"}
        paths.update({c: self.folder / f"{c}.npy" for c in self.corruptions})
        return paths

    # ------------------------------------------------------------------------------------ clean source

    def clean_data(self) -> tuple[np.ndarray, np.ndarray, Path, str]:
        """(x uint8 (N, 32, 32, 3), y int64 (N,), the file they come from, its sha256) of the clean source."""
        if self._clean is None:
            name, hp = type(self).__name__, self.hparams
            try:
                if self.clean_kind == "npz":
                    path = data_path(hp.clean_npz)
                    if not path.is_file():
                        raise FileNotFoundError(
                            f"clean_npz {path} does not exist; it must be an .npz with x uint8 (N, 32, 32, 3) and y"
                        )
                    x, y = load_clean_npz(path)
                else:
                    x, y, path = load_torchvision_test_set(self.clean_root)
            except (FileNotFoundError, ValueError) as err:
                raise type(err)(f"{name}: {err}") from err
            grouped = len(y) > 1 and (np.diff(y) >= 0).all() and len(np.unique(y)) < len(y) / 2  # class runs
            if grouped and not hp.shuffle and not (hp.subset == "random" and hp.num_examples is not None):
                warnings.warn(
                    f"{name}: the clean source {path} is sorted by class, so every batch holds one class; pass "
                    "shuffle=True (or subset='random' with num_examples) to serve the domains in a seeded random "
                    "order: TENT and other batch-statistics methods need mixed batches",
                    stacklevel=2,
                )
            self._clean = (x, y, path, sha256_file(path))
        return self._clean

    # ------------------------------------------------------------------------------------ generation

    def _indices(self, n: int, where: str) -> np.ndarray:
        hp = self.hparams
        if hp.num_examples is None:
            return np.arange(n)
        if hp.num_examples > n:
            raise ValueError(
                f"{type(self).__name__}: num_examples={hp.num_examples}, but {where} has only {n} images per domain"
            )
        if hp.subset == "first":
            return np.arange(hp.num_examples)
        return np.random.default_rng((hp.seed, 5)).choice(n, size=hp.num_examples, replace=False)

    def _served(self, idx: np.ndarray) -> np.ndarray:
        """``idx`` in serving order: as is, or one seeded permutation of it with ``shuffle``."""
        if not self.hparams.shuffle:
            return idx
        return idx[np.random.default_rng((self.hparams.seed, 6)).permutation(len(idx))]

    def generated_file_name(self, corruption: str, severity: int) -> str:
        """``<corruption>-s<severity>.npy`` (``frost-<textures' sha256 prefix>-s<severity>.npy`` for frost)."""
        if corruption == "frost":
            return f"frost-{frost_textures_sha256()[:12]}-s{severity}.npy"  # only the official textures are used
        return f"{corruption}-s{severity}.npy"

    def ensure_generated(self) -> dict[str, Path]:
        """{domain: file} of the generated domains, generating (and caching) what is missing: the rows this run
        needs, for each chosen (corruption, severity). Cached files are reused; a shorter one is extended and an
        unreadable one redone."""
        hp = self.hparams
        x, y, source_path, source_sha = self.clean_data()
        folder = self.data_dir / GENERATED_FOLDER / generation_key(source_sha, hp.seed)
        folder.mkdir(parents=True, exist_ok=True)
        self.generated_dir = folder
        if not (folder / "meta.json").is_file():
            meta = {
                "what": "CIFAR-10-C-style corruptions made by reprozoo.transforms.corruptions; one file per "
                "severity, rows = the clean images in order (a prefix of them)",
                "corruptions_version": CORRUPTIONS_VERSION,
                "seed": int(hp.seed),
                "source_sha256": source_sha,
                "source_file": source_path.name,
                "num_images": len(x),
            }
            write_atomic(folder / "meta.json", (json.dumps(meta, indent=2) + "\n").encode())
        if not (folder / "labels.npy").is_file():
            write_atomic(folder / "labels.npy", npy_bytes(y.astype(np.uint8)))
        needed = int(self._indices(len(x), f"the clean source {source_path}").max()) + 1
        files = {}
        for s in self.severities:
            for c in self.corruptions:
                path = folder / self.generated_file_name(c, s)
                have = 0
                existing = None
                if path.is_file():
                    try:
                        existing = open_images_file(path)
                        have = len(existing) if len(existing) <= len(x) else 0
                    except ValueError:
                        existing, have = None, 0  # unreadable cache: redo it
                if have < needed:
                    new = corrupt(
                        x[have:needed],
                        c,
                        s,
                        seed=hp.seed,
                        indices=np.arange(have, needed),
                        frost_dir=hp.frost_dir,
                        progress=needed - have >= 1000,
                    )
                    data = np.concatenate([np.asarray(existing[:have]), new]) if have else new
                    del existing
                    write_atomic(path, npy_bytes(data))
                files[f"{c}-{s}"] = path
        return files

    # ------------------------------------------------------------------------------------ Lightning hooks

    def prepare_data(self) -> None:
        if self.hparams.source == "official":
            if self.corruptions and self.severities:
                self.ensure_files()
        elif self.corruptions and self.severities:
            self.ensure_generated()
        if self.hparams.include_clean:
            self.clean_data()

    def setup(self, stage: str | None = None) -> None:
        if self.datasets:
            return
        hp = self.hparams
        name = type(self).__name__
        norm = dict(mean=hp.mean, std=hp.std) if hp.normalize else {}
        datasets: dict[str, CIFAR10CDataset] = {}
        files: dict[str, Path] = {}
        n = None
        if self.corruptions and self.severities:
            if hp.source == "official":
                paths = self.ensure_files()
                try:
                    labels = read_labels_file(paths["labels"])
                    for c in self.corruptions:
                        try:
                            open_images_file(paths[c], rows=len(labels))
                        except ValueError as err:
                            raise ValueError(f"{err} (the rows of {paths['labels']}: 5 severities x n images)") from err
                except ValueError as err:
                    raise ValueError(f"{name}: {err}") from err
                n = len(labels) // NUM_SEVERITIES
                idx = self._served(self._indices(n, str(self.folder)))
                for s in self.severities:
                    rows = (s - 1) * n + idx
                    for c in self.corruptions:
                        d = f"{c}-{s}"
                        datasets[d] = CIFAR10CDataset(paths[c], rows, labels[rows], source_index=idx, **norm)
                        files[d] = paths[c]
            else:
                generated = self.ensure_generated()
                x, y, source_path, _ = self.clean_data()
                n = len(x)
                idx = self._served(self._indices(n, f"the clean source {source_path}"))
                for d, path in generated.items():
                    datasets[d] = CIFAR10CDataset(path, idx, y[idx], **norm)
                    files[d] = path
        if hp.include_clean:
            x, y, source_path, _ = self.clean_data()
            if n is not None and hp.source == "official":
                first = labels[:n]
                if len(y) != n or not np.array_equal(y, first):
                    raise ValueError(
                        f"{name}: the clean test set {source_path} ({len(y)} images) does not match "
                        f"{paths['labels']} ({n} images per severity): include_clean needs the same images, "
                        "in the same order"
                    )
            idx = self._served(self._indices(len(x), f"the clean source {source_path}"))
            datasets["clean"] = CIFAR10CDataset(x, idx, y[idx], **norm)
            files["clean"] = source_path
        self.datasets = {d: datasets[d] for d in self.domains}
        self.files = {d: files[d] for d in self.domains}
        if not hp.include_clean and hp.source == "generate":
            self._clean = None  # the clean images are not served: free them

    def _loader(self, dataset: Dataset) -> DataLoader:
        hp = self.hparams
        # Batch-indexed: one read of the memory map per batch (CIFAR10CDataset.get_batch), not one per image.
        return DataLoader(
            BatchFetch(dataset),
            batch_size=hp.batch_size,
            num_workers=hp.num_workers,
            persistent_workers=hp.num_workers > 0,
            collate_fn=collate,
        )

    def test_dataloader(self) -> list[DataLoader]:
        """One loader per domain, in ``self.domains`` order; items in file order, or the fixed seeded order of
        ``shuffle`` (never reshuffled between epochs)."""
        return [self._loader(self.datasets[d]) for d in self.domains]

    def predict_dataloader(self) -> list[DataLoader]:
        return self.test_dataloader()
