"""CIFAR-10 (Krizhevsky, 2009): 32x32 colour images in 10 classes, with the memorization studies' corruptions of
the training split (Zhang et al. 2017, "Understanding deep learning requires rethinking generalization"; Arpit et
al. 2017, "A Closer Look at Memorization in Deep Networks").

Files: the official python version, as torchvision keeps it::

    <data_dir>/cifar-10-batches-py/data_batch_1 .. data_batch_5, test_batch   (batches.meta is not needed)

(``data_dir`` holding those files directly works too.) Each file is a pickle of a dict with ``b"data"``, uint8
(N, 3072) (each row the 1024 red, then green, then blue values of one image, row-major), and ``b"labels"``, N
class numbers. They are read here by :func:`read_batch` (not through ``torchvision.datasets.CIFAR10``, which
md5-checks the files), with an unpickler that builds nothing but plain containers and numpy arrays, and checked
(shape, dtype, labels in 0..9); anything off is a ValueError naming the file. Missing files are downloaded, unless
``REPROZOO_OFFLINE`` is set, as the official archive (torchvision's ``CIFAR10.url``, md5-checked against
``CIFAR10.tgz_md5``) into a temporary folder of ``data_dir`` whose files are then moved into place, so an
interrupted download never looks like data.

Or an ``.npz`` (``images_npz``) with ``x`` uint8 (N, 32, 32, 3) and ``y`` (N,), e.g. a CIFAR-10 test set alone
(``cifar10/test_jpeg_q75.npz``: the 10,000 test images as JPEG q75), split into train, val and test.

Images are kept in memory as uint8 (50,000 x 3,072 bytes = 154 MB for the official training set) and turned into
float tensors per item with torch ops, without PIL.
"""

from __future__ import annotations

import importlib
import os
import pickle
import shutil
import tempfile
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, Dataset
from torchvision.datasets import CIFAR10
from torchvision.datasets.utils import download_and_extract_archive

from reprozoo._files import data_path, offline, publish
from reprozoo.datamodules._base import BatchFetch, WorkerSeededDraws, _SplitsDataModule, collate, seed_of
from reprozoo.datamodules._splits import check_split_args, is_int, official_splits, single_file_splits
from reprozoo.datamodules.cifar10c_files import CLASSES, MEAN, STD, default_clean_root, load_clean_npz

NUM_CLASSES = len(CLASSES)
IMAGE_SIZE = 32
FOLDER = CIFAR10.base_folder  # "cifar-10-batches-py"
TRAIN_FILES = tuple(f"data_batch_{k}" for k in range(1, 6))
TEST_FILE = "test_batch"
CROP_PADDING = 4

# what the official pickles (Python 2, protocol 2) and numpy's own pickles of arrays refer to; nothing else loads
_SAFE_GLOBALS = {
    ("_codecs", "encode"),
    ("numpy", "ndarray"),
    ("numpy", "dtype"),
    ("numpy.core.multiarray", "_reconstruct"),
    ("numpy._core.multiarray", "_reconstruct"),
    ("numpy.core.multiarray", "scalar"),
    ("numpy._core.multiarray", "scalar"),
    ("numpy.core.numeric", "_frombuffer"),
    ("numpy._core.numeric", "_frombuffer"),
}


class _BatchUnpickler(pickle.Unpickler):
    def find_class(self, module: str, name: str):
        if (module, name) not in _SAFE_GLOBALS:
            raise pickle.UnpicklingError(f"refusing to load {module}.{name}: not part of a CIFAR-10 batch file")
        if module.startswith("numpy.core.") and hasattr(np, "_core"):  # numpy 2 moved numpy.core to numpy._core
            module = "numpy._core." + module[len("numpy.core.") :]
        return getattr(importlib.import_module(module), name)


def read_batch(path: str | os.PathLike) -> tuple[np.ndarray, np.ndarray]:
    """(images uint8 (N, 32, 32, 3), labels int64 (N,)) of one official CIFAR-10 python batch file; a file that is
    not such a pickle, lacks ``b"data"`` or ``b"labels"``, or holds other shapes, dtypes or labels outside 0..9 is a
    ValueError naming the file."""
    path = Path(path)
    try:
        with open(path, "rb") as fh:
            batch = _BatchUnpickler(fh, encoding="bytes").load()
    except FileNotFoundError:
        raise
    except Exception as err:  # truncated, not a pickle, a foreign object, ...
        raise ValueError(f"cannot read the CIFAR-10 batch file {path}: {type(err).__name__}: {err}") from err
    if not isinstance(batch, dict):
        raise ValueError(f"{path} must hold a dict (a CIFAR-10 python batch), got {type(batch).__name__}")
    batch = {k.decode("latin1") if isinstance(k, bytes) else k: v for k, v in batch.items()}
    missing = [k for k in ("data", "labels") if k not in batch]
    if missing:
        raise ValueError(f"{path} has no {' or '.join(repr(k) for k in missing)} entry (keys: {sorted(batch)})")
    data = batch["data"]
    if not isinstance(data, np.ndarray) or data.dtype != np.uint8 or data.ndim != 2 or data.shape[1] != 3072:
        got = f"{data.dtype} {data.shape}" if isinstance(data, np.ndarray) else type(data).__name__
        raise ValueError(f"{path}: data must be uint8 (N, 3072) (3 x 32 x 32 per row), got {got}")
    try:
        labels = np.asarray(batch["labels"])
    except Exception as err:
        raise ValueError(f"{path}: labels must be a list of integers: {err}") from err
    if labels.ndim != 1 or labels.dtype.kind not in "iu" or len(labels) != len(data):
        raise ValueError(f"{path}: labels must be {len(data)} integers, got {labels.dtype} {labels.shape}")
    if len(labels) == 0:
        raise ValueError(f"{path} holds no images")
    if labels.min() < 0 or labels.max() >= NUM_CLASSES:
        raise ValueError(f"{path} has labels outside 0..{NUM_CLASSES - 1} ({labels.min()}..{labels.max()})")
    images = np.ascontiguousarray(data.reshape(-1, 3, IMAGE_SIZE, IMAGE_SIZE).transpose(0, 2, 3, 1))
    return images, labels.astype(np.int64)


def channel_stats(images: np.ndarray) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """Exact per-channel (mean, std) in [0, 1] of uint8 (N, H, W, 3) images (population std), computed from each
    channel's histogram, so no float copy of the images is made."""
    means, stds = [], []
    values = np.arange(256, dtype=np.float64) / 255.0
    for c in range(images.shape[-1]):
        counts = np.bincount(np.ascontiguousarray(images[..., c]).reshape(-1), minlength=256).astype(np.float64)
        n = counts.sum()
        mean = float((counts * values).sum() / n)
        means.append(mean)
        stds.append(float(np.sqrt((counts * (values - mean) ** 2).sum() / n)))
    return tuple(means), tuple(stds)


# ----------------------------------------------------------------------------------------------- items


class CIFAR10Dataset(WorkerSeededDraws, Dataset):
    """``(image, label)`` items, or ``(image, label, index)`` with ``return_index``, of uint8 (N, 32, 32, 3) images.

    The image is float32 (3, 32, 32): pixels in [0, 1], or ``(p - mean_c) / std_c`` per channel with ``normalize``.
    With ``augment``, each access pads the image by 4 zero (black) pixels on every side, crops a uniformly random
    32x32 window and flips it left-right with probability 1/2 (the standard CIFAR augmentation); the draws come
    from a generator seeded by ``seed`` in the main process and by ``seed`` and the worker's seed in a loader worker,
    so every epoch sees new crops. ``index`` is the item's position in this dataset.

    ``random_input`` (bool (N,)) marks the items whose image is replaced by Gaussian noise: for item i, a (3, 32, 32)
    draw, per channel of mean ``noise_mean[c]`` and std ``noise_std[c]`` (in [0, 1] units, not clipped), made
    afresh at every access from a generator seeded by ``(noise_seed, i)`` alone, so it is the same noise every time
    (nothing is stored); it is then augmented and normalised as a real image. See :meth:`noise_image`.

    ``images``, ``labels`` (the labels served), ``true_labels``, ``random_input`` and ``source_index`` (each item's
    position in the file(s) it came from) are public.
    """

    def __init__(
        self,
        images: torch.Tensor,
        labels: torch.Tensor,
        *,
        normalize: bool = True,
        augment: bool = False,
        return_index: bool = False,
        seed: int = 0,
        source_index: torch.Tensor | None = None,
        true_labels: torch.Tensor | None = None,
        random_input: torch.Tensor | None = None,
        noise_mean: tuple[float, ...] = MEAN,
        noise_std: tuple[float, ...] = STD,
        noise_seed: int = 0,
    ):
        if images.dtype != torch.uint8 or tuple(images.shape[1:]) != (IMAGE_SIZE, IMAGE_SIZE, 3):
            raise ValueError(
                f"CIFAR10Dataset: images must be uint8 (N, 32, 32, 3), got {images.dtype} {tuple(images.shape)}"
            )
        if len(labels) != len(images):
            raise ValueError(f"CIFAR10Dataset: {len(images)} images but {len(labels)} labels")
        n = len(images)
        self.images = images
        self.labels = torch.as_tensor(labels, dtype=torch.long)
        self.true_labels = self.labels if true_labels is None else torch.as_tensor(true_labels, dtype=torch.long)
        self.source_index = torch.arange(n) if source_index is None else torch.as_tensor(source_index).long()
        self.random_input = (
            torch.zeros(n, dtype=torch.bool) if random_input is None else torch.as_tensor(random_input).bool()
        )
        self.normalize, self.augment, self.return_index, self.seed = normalize, augment, return_index, seed
        self.noise_mean, self.noise_std, self.noise_seed = tuple(noise_mean), tuple(noise_std), noise_seed
        self._mean = torch.tensor(MEAN, dtype=torch.float32).view(3, 1, 1)
        self._std = torch.tensor(STD, dtype=torch.float32).view(3, 1, 1)
        self._noise_mean = torch.tensor(self.noise_mean, dtype=torch.float32).view(3, 1, 1)
        self._noise_std = torch.tensor(self.noise_std, dtype=torch.float32).view(3, 1, 1)
        self._labels = self.labels.tolist()
        self._random = self.random_input.tolist()

    def __len__(self) -> int:
        return len(self.images)

    def with_options(self, **changes) -> CIFAR10Dataset:
        """The same items (tensors shared, nothing copied) with other options, e.g. ``augment=False``."""
        options = dict(
            normalize=self.normalize,
            augment=self.augment,
            return_index=self.return_index,
            seed=self.seed,
            source_index=self.source_index,
            true_labels=self.true_labels,
            random_input=self.random_input,
            noise_mean=self.noise_mean,
            noise_std=self.noise_std,
            noise_seed=self.noise_seed,
        )
        return CIFAR10Dataset(self.images, self.labels, **(options | changes))

    def noise_image(self, index: int) -> torch.Tensor:
        """The Gaussian noise (3, 32, 32), in [0, 1] units before normalisation, that replaces item ``index``'s image
        when ``random_input[index]``: a function of ``(noise_seed, index)`` and the channel statistics alone."""
        generator = torch.Generator().manual_seed(seed_of(self.noise_seed, 12, int(index)))
        z = torch.randn(3, IMAGE_SIZE, IMAGE_SIZE, generator=generator)
        return z.mul_(self._noise_std).add_(self._noise_mean)

    def __getitem__(self, index: int):
        n = len(self.images)
        index = int(index)
        if not -n <= index < n:
            raise IndexError(f"index {index} is out of range for {n} items")
        index %= n
        if self._random[index]:
            x = self.noise_image(index)
        else:
            x = self.images[index].permute(2, 0, 1).float().div_(255.0)
        if self.augment:
            generator = self._draws(5)
            dy, dx = torch.randint(0, 2 * CROP_PADDING + 1, (2,), generator=generator).tolist()
            flip = bool(torch.randint(0, 2, (1,), generator=generator))
            padded = F.pad(x, (CROP_PADDING,) * 4)
            x = padded[:, dy : dy + IMAGE_SIZE, dx : dx + IMAGE_SIZE]
            if flip:
                x = x.flip(-1)
            x = x.contiguous()
        if self.normalize:
            x = (x - self._mean) / self._std
        return (x, self._labels[index], index) if self.return_index else (x, self._labels[index])

    def get_batch(self, indices: list[int]) -> tuple | None:
        """The items of ``indices`` made at once (see :class:`~reprozoo.datamodules._base.BatchFetch`): the same
        values as one by one; None (item by item) with ``augment`` or random inputs in the batch, drawn per item."""
        index = torch.as_tensor(indices, dtype=torch.long) % len(self.images)
        if self.augment or bool(self.random_input[index].any()):
            return None
        x = self.images[index].permute(0, 3, 1, 2).float().div_(255.0)  # (B, 3, 32, 32)
        if self.normalize:
            x = (x - self._mean) / self._std
        labels = self.labels[index]
        return (x, labels, index) if self.return_index else (x, labels)


# ----------------------------------------------------------------------------------------------- the datamodule


class CIFAR10DataModule(_SplitsDataModule):
    """CIFAR-10 as ``(image, label)`` items, from the official python batches or an ``.npz``, with the label and
    input randomisations of the memorization studies.

    Splits from the official files (the default):

    * ``val``: a seeded, stratified ``val_size`` (default 5,000) of the 50,000 training images.
    * ``train``: the rest (45,000 by default), or a seeded class-balanced subset of ``num_train`` of it.
    * ``test`` (and predict): the official test batch (10,000), or a seeded class-balanced subset of ``num_test``.

    Splits from ``images_npz`` (for machines that have only a set of test images, e.g. ``cifar10/test_jpeg_q75.npz``,
    the 10,000 CIFAR-10 test images as JPEG q75): that file is the only source and is split, seeded and stratified,
    into disjoint parts, as :class:`~reprozoo.datamodules.FashionMNISTDataModule` splits with ``train_source="test"``:

    * ``test``: ``num_test`` images (default a fifth, 2,000 of 10,000);
    * the training part: ``num_train`` of the rest (default all of it, 8,000), from which ``val_size`` (default a
      tenth of the training part, 800) is held out as ``val``; ``train`` is what remains (7,200). Here
      ``num_train`` counts train + val.

    Items: float32 (3, 32, 32), normalised per channel with the CIFAR-10 training mean and std
    (``cifar10c_files.MEAN`` / ``STD``) by default. ``augment`` (training only) pads by 4 black pixels, crops 32x32
    at a random place and flips left-right half of the time, anew at every access, from a generator seeded by
    ``seed`` (and each loader worker's seed); val and test are never augmented. ``return_index`` makes train items
    ``(image, label, index)``, ``index`` being the item's position in the train split.

    Memorization options, on the train split only (val and test never change). Each is exact and a pure function of
    the files and the arguments, drawn from generators seeded by ``noise_seed`` (default ``seed``), so a run resumed
    from a checkpoint (same hyperparameters) sees the same data; nothing random is stored elsewhere:

    * ``label_noise = p``: exactly ``round(p * N_train)`` training examples, chosen without replacement, get a label
      drawn uniformly from the 9 *other* classes, so exactly that fraction of the training labels is wrong. (Zhang
      et al.'s "partially corrupted labels" draw the new label from all 10 classes, so about 1/10 of the chosen
      examples keep their true label there.)
    * ``random_labels``: every training label is replaced by a uniform draw from all 10 classes (Zhang et al.'s
      "random labels", Arpit et al.'s "randY"); about 1/10 agree with the truth by chance. Not with
      ``label_noise > 0``.
    * ``random_inputs = q``: exactly ``round(q * N_train)`` training images, chosen without replacement, are replaced
      by Gaussian noise with the per-channel mean and std of the training split's images (in [0, 1], computed
      exactly from the files; Arpit et al.'s "randX" is ``q = 1``), not clipped; labels are kept. The noise of each
      example is regenerated at every access from a per-example seed (``noise_seed`` and its train position), so it
      never changes and costs no memory; it is then augmented and normalised like a real image.

    :meth:`train_groups` marks the train examples by kind (``clean``, ``noisy_label``, ``random_input``),
    ``true_train_labels`` holds their true labels, and :meth:`train_eval_dataloader` reads the train split in order,
    unshuffled and unaugmented, with the labels trained on, for per-example "was this example fitted" evaluation.

    Every split is a :class:`CIFAR10Dataset`; ``splits[name].source_index`` gives each item's position in its
    source (the five training batches concatenated in order, the test batch, or the ``.npz``), and ``self.files``
    names the files read.

    Args:
        data_dir: a folder holding ``cifar-10-batches-py/`` (torchvision's root), or those files directly; default
            ``<data root>/cifar10`` (``$REPROZOO_DATA/cifar10``, see docs/data.md).
        images_npz: an ``.npz`` with ``x`` uint8 (N, 32, 32, 3) and ``y`` (N,), the only source when given (see
            above); a relative path is looked up in the working directory, then under the data root.
        val_size: held out for val; None = 5,000 from the official files, a tenth of ``num_train`` from an ``.npz``.
        num_train, num_test: see the splits above; None = all.
        normalize: ``(p - mean_c) / std_c`` with p in [0, 1].
        augment: random crop (padding 4) and horizontal flip of training images.
        return_index: train items are ``(image, label, index)``.
        label_noise: fraction in [0, 1] of training labels made wrong (see above).
        random_labels: replace every training label by a uniformly random class.
        random_inputs: fraction in [0, 1] of training images replaced by Gaussian noise.
        noise_seed: seeds the three options above; None = ``seed``.
        batch_size, num_workers: for all loaders; train is shuffled.
        seed: the splits and subsets each derive their own generator from it, and so does the augmentation. As in
            the project's other datamodules, the shuffle order of train follows torch's global seed
            (``L.seed_everything``) and is kept in checkpoints.
    """

    num_classes = NUM_CLASSES
    input_shape = (3, IMAGE_SIZE, IMAGE_SIZE)

    def __init__(
        self,
        data_dir: str | None = None,
        images_npz: str | None = None,
        val_size: int | None = None,
        num_train: int | None = None,
        num_test: int | None = None,
        normalize: bool = True,
        augment: bool = False,
        return_index: bool = False,
        label_noise: float = 0.0,
        random_labels: bool = False,
        random_inputs: float = 0.0,
        noise_seed: int | None = None,
        batch_size: int = 128,
        num_workers: int = 0,
        seed: int = 0,
    ):
        super().__init__()
        name = type(self).__name__

        def is_fraction(value) -> bool:
            return (
                isinstance(value, (int, float, np.integer, np.floating))
                and not isinstance(value, bool)
                and 0.0 <= value <= 1.0
            )

        for field, value in {"data_dir": data_dir, "images_npz": images_npz}.items():
            if value is not None and not (isinstance(value, (str, os.PathLike)) and str(value)):
                raise ValueError(f"{name}: {field} must be a path (a non-empty string) or None, got {value!r}")
        check_split_args(
            name,
            val_size=val_size,
            num_train=num_train,
            num_test=num_test,
            batch_size=batch_size,
            num_workers=num_workers,
            seed=seed,
        )
        for field, value in {
            "normalize": normalize,
            "augment": augment,
            "return_index": return_index,
            "random_labels": random_labels,
        }.items():
            if not isinstance(value, bool):
                raise ValueError(f"{name}: {field} must be true or false, got {value!r}")
        for field, value in {"label_noise": label_noise, "random_inputs": random_inputs}.items():
            if not is_fraction(value):
                raise ValueError(f"{name}: {field} must be a fraction in [0, 1], got {value!r}")
        if random_labels and label_noise > 0:
            raise ValueError(
                f"{name}: random_labels must be false when label_noise > 0 (random_labels already replaces every "
                f"label), got random_labels=True with label_noise={label_noise!r}"
            )
        if noise_seed is not None and not (is_int(noise_seed) and noise_seed >= 0):
            raise ValueError(f"{name}: noise_seed must be an integer >= 0 or None (= seed), got {noise_seed!r}")
        self.save_hyperparameters()
        self.data_dir = data_path(data_dir) if data_dir is not None else default_clean_root()
        self.images_npz = data_path(images_npz) if images_npz is not None else None
        self.noise_seed = int(seed if noise_seed is None else noise_seed)
        self.classes = list(CLASSES)
        self.splits: dict[str, CIFAR10Dataset] = {}
        self.files: dict[str, list[Path]] = {}

    @property
    def deterministic_train_transform(self) -> bool:
        """True when training items are the same at every access (no augmentation; the noise of ``random_inputs``
        never changes), so that outputs computed once per training example stay valid."""
        return not self.hparams.augment

    @property
    def batches_folder(self) -> Path:
        """``data_dir/cifar-10-batches-py``, torchvision's layout; or ``data_dir`` itself when the official files
        lie directly in it and not in that layout."""
        layout = self.data_dir / FOLDER
        needed = (*TRAIN_FILES, TEST_FILE)
        if not layout.exists() and all((self.data_dir / f).is_file() for f in needed):
            return self.data_dir
        return layout

    # ------------------------------------------------------------------------------------ files

    def _where_to_put(self) -> str:
        return (
            f"Put the official CIFAR-10 python batches {', '.join(TRAIN_FILES)} and {TEST_FILE} into "
            f"{self.data_dir / FOLDER}/ (extract {CIFAR10.filename} from {CIFAR10.url} into {self.data_dir}/), "
            "or run once with network access, or give images_npz, an .npz with x uint8 (N, 32, 32, 3) and y (N,)."
        )

    def _download(self) -> None:
        """The official archive into a temporary folder of ``data_dir`` (md5-checked by torchvision), extracted
        there, then its batch files moved into place: the whole folder with one rename, or each missing file."""
        self.data_dir.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=".cifar10-download-", dir=self.data_dir))
        try:
            download_and_extract_archive(CIFAR10.url, tmp, extract_root=tmp / "x", md5=CIFAR10.tgz_md5)
            extracted = tmp / "x" / FOLDER
            if not all((extracted / f).is_file() for f in (*TRAIN_FILES, TEST_FILE)):
                raise ValueError(f"the archive from {CIFAR10.url} has no {FOLDER}/ with the batch files")
            dest = self.data_dir / FOLDER
            if not dest.exists():
                publish(extracted, dest)
            else:
                for f in extracted.iterdir():
                    if f.is_file() and not (dest / f.name).exists():
                        os.replace(f, dest / f.name)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)

    def ensure_files(self) -> list[Path]:
        """The paths of the five training batches and the test batch, after downloading them when missing (never
        when offline); FileNotFoundError listing the missing files and their folder when they cannot be had. With
        ``images_npz``, ``[images_npz]`` (FileNotFoundError when it is missing)."""
        name = type(self).__name__
        if self.images_npz is not None:
            if not self.images_npz.is_file():
                raise FileNotFoundError(
                    f"{name}: images_npz {self.images_npz} does not exist (a relative path is looked up in the "
                    "working directory, then under the data root); expected an .npz with x uint8 (N, 32, 32, 3) "
                    "and y (N,)"
                )
            return [self.images_npz]
        folder = self.batches_folder
        needed = (*TRAIN_FILES, TEST_FILE)
        missing = [f for f in needed if not (folder / f).is_file()]
        if missing:
            listing = f"{', '.join(missing)} in {folder}/"
            if offline():
                raise FileNotFoundError(
                    f"{name}: missing {listing}, and offline mode is on (REPROZOO_OFFLINE), so nothing was "
                    "downloaded. " + self._where_to_put()
                )
            try:
                self._download()
            except Exception as err:
                raise FileNotFoundError(
                    f"{name}: missing {listing}, and the download of {CIFAR10.url} failed: "
                    f"{type(err).__name__}: {err}. " + self._where_to_put()
                ) from err
            folder = self.batches_folder
        return [folder / f for f in needed]

    def _read(self, path: Path) -> tuple[np.ndarray, np.ndarray]:
        try:
            if self.images_npz is not None:
                return load_clean_npz(path)
            return read_batch(path)
        except ValueError as err:
            raise ValueError(f"{type(self).__name__}: {err}") from err

    # ------------------------------------------------------------------------------------ Lightning hooks

    def prepare_data(self) -> None:
        self.ensure_files()

    def setup(self, stage: str | None = None) -> None:
        if self.splits:
            return
        hp = self.hparams
        name = type(self).__name__
        paths = self.ensure_files()
        seed = hp.seed

        if self.images_npz is None:
            parts = [self._read(p) for p in paths[:-1]]
            pool_x = np.concatenate([x for x, _ in parts])
            pool_y = np.concatenate([y for _, y in parts])
            test_x, test_y = self._read(paths[-1])
            self.files = {"train": list(paths[:-1]), "val": list(paths[:-1]), "test": [paths[-1]]}
            train_idx, val_idx, test_idx = official_splits(
                pool_y,
                test_y,
                val_size=hp.val_size,
                num_train=hp.num_train,
                num_test=hp.num_test,
                seed=seed,
                owner=name,
                classes=self.classes,
                pool_where=f"{paths[0].parent}/data_batch_1..5",
                test_where=str(paths[-1]),
                unit="image",
            )
        else:
            pool_x, pool_y = self._read(paths[0])
            test_x, test_y = pool_x, pool_y
            self.files = {split: [paths[0]] for split in ("train", "val", "test")}
            train_idx, val_idx, test_idx = single_file_splits(
                pool_y,
                val_size=hp.val_size,
                num_train=hp.num_train,
                num_test=hp.num_test,
                seed=seed,
                owner=name,
                where=str(paths[0]),
                why="images_npz is split into train, val and test",
                unit="image",
            )

        def subset(x: np.ndarray, y: np.ndarray, idx: np.ndarray, **kwargs) -> CIFAR10Dataset:
            idx = np.asarray(idx, dtype=np.int64)
            return CIFAR10Dataset(
                torch.from_numpy(np.ascontiguousarray(x[idx])),
                torch.from_numpy(y[idx]),
                normalize=hp.normalize,
                seed=seed,
                source_index=torch.from_numpy(idx),
                **kwargs,
            )

        train_x = np.ascontiguousarray(pool_x[train_idx])
        true_y = pool_y[train_idx]
        train_y, random_input = self._corrupt(true_y)
        noise_mean, noise_std = channel_stats(train_x) if random_input.any() else (MEAN, STD)
        train = CIFAR10Dataset(
            torch.from_numpy(train_x),
            torch.from_numpy(train_y),
            normalize=hp.normalize,
            augment=hp.augment,
            return_index=hp.return_index,
            seed=seed,
            source_index=torch.from_numpy(np.asarray(train_idx, dtype=np.int64)),
            true_labels=torch.from_numpy(true_y),
            random_input=torch.from_numpy(random_input),
            noise_mean=noise_mean,
            noise_std=noise_std,
            noise_seed=self.noise_seed,
        )
        self.splits = {
            "train": train,
            "val": subset(pool_x, pool_y, val_idx),
            "test": subset(test_x, test_y, test_idx),
        }

    def _corrupt(self, true_y: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(the labels trained on, bool mask of the examples whose image is noise): a function of ``true_y``,
        ``noise_seed`` and the options alone."""
        hp = self.hparams
        n = len(true_y)
        labels = true_y.copy()
        if hp.label_noise > 0:
            rng = np.random.default_rng((self.noise_seed, 10))
            chosen = rng.choice(n, size=round(hp.label_noise * n), replace=False)
            labels[chosen] = (true_y[chosen] + rng.integers(1, NUM_CLASSES, size=len(chosen))) % NUM_CLASSES
        if hp.random_labels:
            labels = np.random.default_rng((self.noise_seed, 11)).integers(0, NUM_CLASSES, size=n)
        random_input = np.zeros(n, dtype=bool)
        if hp.random_inputs > 0:
            rng = np.random.default_rng((self.noise_seed, 12))
            random_input[rng.choice(n, size=round(hp.random_inputs * n), replace=False)] = True
        return labels.astype(np.int64), random_input

    # ------------------------------------------------------------------------------------ memorization study

    def _train(self) -> CIFAR10Dataset:
        if not self.splits:
            self.setup("fit")
        return self.splits["train"]

    @property
    def true_train_labels(self) -> torch.Tensor:
        """The true labels (long (N_train,)) of the train split, in its order, whatever the labels trained on."""
        return self._train().true_labels

    def train_groups(self) -> dict[str, torch.Tensor]:
        """Bool masks over the train split's positions: ``clean`` (true label and real image), ``noisy_label``
        (the label trained on differs from the true one; present with ``label_noise > 0`` or ``random_labels``)
        and ``random_input`` (the image is noise; present with ``random_inputs > 0``). An example can be in both
        of the last two."""
        train = self._train()
        hp = self.hparams
        noisy = train.labels != train.true_labels
        groups = {"clean": ~noisy & ~train.random_input}
        if hp.label_noise > 0 or hp.random_labels:
            groups["noisy_label"] = noisy
        if hp.random_inputs > 0:
            groups["random_input"] = train.random_input.clone()
        return groups

    def train_eval_dataloader(self) -> DataLoader:
        """The train split in order, unshuffled and unaugmented, with the labels trained on (and the index with
        ``return_index``), in batches of ``batch_size``: for telling which training examples are fitted."""
        return DataLoader(
            BatchFetch(self._train().with_options(augment=False)),
            batch_size=self.hparams.batch_size,
            num_workers=self.hparams.num_workers,
            persistent_workers=self.hparams.num_workers > 0,
            shuffle=False,
            collate_fn=collate,
        )
