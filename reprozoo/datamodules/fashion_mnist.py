"""Fashion-MNIST (Xiao et al., 2017) and MNIST (LeCun et al., 1998): 28x28 grey images in 10 classes.

Files: the official idx files, in torchvision's raw layout (``torchvision.datasets.FashionMNIST`` / ``MNIST``)::

    <data_dir>/FashionMNIST/raw/{train,t10k}-{images-idx3,labels-idx1}-ubyte.gz
    <data_dir>/MNIST/raw/{train,t10k}-{images-idx3,labels-idx1}-ubyte.gz

The uncompressed files that torchvision extracts next to them (same names without ``.gz``) are read when the
``.gz`` ones are absent. A flat folder works too: ``data_dir`` holding the needed files directly (e.g. only the
MNIST test files, with ``train_source="test"``). The default ``data_dir`` is ``mnist/`` or ``fashion_mnist/`` under
the data root (``$REPROZOO_DATA``). Missing files are downloaded, unless ``REPROZOO_OFFLINE`` is set, with torchvision's own
machinery and lists: its ``mirrors`` and its ``resources`` (file name and md5) of the dataset class, each file into a
temporary folder first and then moved into ``raw/`` with one rename, so an interrupted download never looks like
data. Only the files that ``train_source`` needs are fetched.

Every file is read with a small idx reader that checks the magic number (2051 for images, 2049 for labels), the
dimensions (28 x 28 images) and the exact length, and names the file in any error. Images are kept in memory as
uint8 (60,000 x 784 bytes = 47 MB at most) and turned into float tensors per item with torch ops, without PIL.

Normalisation constants, the pixel mean and std (in [0, 1]) of the 60,000 official training images:
MNIST 0.1307 / 0.3081, the values of the PyTorch MNIST example (``pytorch/examples``, ``mnist/main.py``);
Fashion-MNIST 0.2860 / 0.3530, computed the same way over its training images.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Literal, NamedTuple

import numpy as np
import torch
import torchvision.datasets
from torch.utils.data import Dataset

from reprozoo._files import data_path, data_root, offline
from reprozoo.datamodules._base import WorkerSeededDraws, _SplitsDataModule
from reprozoo.datamodules._splits import check_split_args, is_int, official_splits, single_file_splits
from reprozoo.datamodules.idx_files import IMAGE_SIZE, NUM_CLASSES, download_files, find_file, read_images, read_labels

# the official file names (without .gz) of each part, as in torchvision's ``resources``
FILES = {
    "train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
    "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"),
}


class DatasetInfo(NamedTuple):
    title: str
    torchvision_class: type  # its name is the folder, its mirrors/resources/classes are used as they are
    mean: float
    std: float


DATASETS = {
    "fashion_mnist": DatasetInfo("Fashion-MNIST", torchvision.datasets.FashionMNIST, 0.2860, 0.3530),
    "mnist": DatasetInfo("MNIST", torchvision.datasets.MNIST, 0.1307, 0.3081),
}


def default_data_dir(dataset: str = "fashion_mnist") -> Path:
    """``<data root>/mnist`` or ``<data root>/fashion_mnist`` (:func:`reprozoo._files.data_root`): the official idx
    files directly in it, or torchvision's layout below it (``MNIST/raw``, ``FashionMNIST/raw``)."""
    return data_root() / dataset


# ----------------------------------------------------------------------------------------------- items


def shift_image(image: torch.Tensor, dy: int, dx: int) -> torch.Tensor:
    """``image`` (..., H, W) moved down by ``dy`` and right by ``dx`` pixels (negative: up / left); what comes in
    from outside is zero."""
    h, w = image.shape[-2:]
    out = torch.zeros_like(image)
    if abs(dy) < h and abs(dx) < w:
        out[..., max(dy, 0) : h - max(-dy, 0), max(dx, 0) : w - max(-dx, 0)] = image[
            ..., max(-dy, 0) : h - max(dy, 0), max(-dx, 0) : w - max(dx, 0)
        ]
    return out


class MNISTLikeDataset(WorkerSeededDraws, Dataset):
    """``(image, label)`` items, or ``(image, label, index)`` with ``return_index``, of 28x28 uint8 images.

    The image is float32 (1, 28, 28), or (784,) with ``flatten``: pixels in [0, 1], or ``(p - mean) / std`` with
    ``normalize``. With ``jitter = k > 0`` each access shifts the image by a uniform random integer in [-k, k] in y
    and in x (independently), filling with zeros (black, before normalisation), so every epoch sees new shifts.
    Shifts come from a generator seeded by ``seed`` in the main process, and by ``seed`` and the worker's seed in a
    loader worker (workers never repeat each other's shifts). ``index`` is the item's position in this dataset.

    ``images`` (uint8 (N, 28, 28)), ``labels`` (long (N,)) and ``source_index`` (long (N,): the position of each
    item in the official file it came from) are public.
    """

    def __init__(
        self,
        images: torch.Tensor,
        labels: torch.Tensor,
        mean: float = 0.0,
        std: float = 1.0,
        normalize: bool = True,
        flatten: bool = False,
        jitter: int = 0,
        return_index: bool = False,
        seed: int = 0,
        source_index: torch.Tensor | None = None,
    ):
        if images.dtype != torch.uint8 or images.dim() != 3:
            raise ValueError(
                f"MNISTLikeDataset: images must be uint8 (N, H, W), got {images.dtype} {tuple(images.shape)}"
            )
        if len(labels) != len(images):
            raise ValueError(f"MNISTLikeDataset: {len(images)} images but {len(labels)} labels")
        self.images = images
        self.labels = torch.as_tensor(labels, dtype=torch.long)
        self.source_index = (
            torch.arange(len(images)) if source_index is None else torch.as_tensor(source_index, dtype=torch.long)
        )
        self.mean, self.std, self.normalize, self.flatten = mean, std, normalize, flatten
        self.jitter, self.return_index, self.seed = jitter, return_index, seed
        # p / 255 normalised = p * scale - offset
        self._scale = 1.0 / (255.0 * std) if normalize else 1.0 / 255.0
        self._offset = mean / std if normalize else 0.0
        self._labels = self.labels.tolist()

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, index: int):
        n = len(self.images)
        index = int(index)
        if not -n <= index < n:
            raise IndexError(f"index {index} is out of range for {n} items")
        index %= n
        image = self.images[index]
        if self.jitter:
            dy, dx = torch.randint(-self.jitter, self.jitter + 1, (2,), generator=self._draws(3)).tolist()
            image = shift_image(image, dy, dx)
        x = image.float().mul_(self._scale)
        if self._offset:
            x = x.sub_(self._offset)
        x = x.reshape(-1) if self.flatten else x.unsqueeze(0)
        return (x, self._labels[index], index) if self.return_index else (x, self._labels[index])

    def get_batch(self, indices: list[int]) -> tuple | None:
        """The items of ``indices`` made at once (see :class:`~reprozoo.datamodules._base.BatchFetch`): the same
        values as one by one; None (item by item) with ``jitter``, whose shifts are drawn per item."""
        if self.jitter:
            return None
        index = torch.as_tensor(indices, dtype=torch.long)
        x = self.images[index].float().mul_(self._scale)  # (B, 28, 28)
        if self._offset:
            x = x.sub_(self._offset)
        x = x.reshape(len(index), -1) if self.flatten else x.unsqueeze(1)
        index = index % len(self.images)
        labels = self.labels[index]
        return (x, labels, index) if self.return_index else (x, labels)


# ----------------------------------------------------------------------------------------------- the datamodule


class FashionMNISTDataModule(_SplitsDataModule):
    """Fashion-MNIST or MNIST (``dataset``) as ``(image, label)`` items, from the official idx files.

    Splits with ``train_source="train"`` (the official training file is there):

    * ``val``: a seeded, stratified ``val_size`` (default 5,000) of the official training file.
    * ``train``: the rest of the training file (55,000 by default), or a seeded class-balanced subset of
      ``num_train`` of it.
    * ``test`` (and predict): the official test file (10,000), or a seeded class-balanced subset of ``num_test``.

    Splits with ``train_source="test"``, for machines that have only the official TEST files (e.g. the MNIST test
    images): the 10,000 test images are split, seeded and stratified (class proportions kept), into disjoint parts:

    * ``test``: ``num_test`` images (default a fifth, 2,000 of 10,000); it depends only on ``seed`` and ``num_test``.
    * the training part: ``num_train`` images of the rest (default all of it, 8,000), from which a stratified
      ``val_size`` (default a tenth of the training part, 800 of 8,000) is held out as ``val``; ``train`` is what
      remains. So ``num_train=8000, num_test=2000`` gives 7,200 train, 800 val and 2,000 test images; pass
      ``val_size`` to choose (``val_size=0``: no val). Note that here ``num_train`` counts train + val, while with
      ``train_source="train"`` it counts train alone. Only the two ``t10k-*`` files are needed (and downloaded).

    ``exclude_classes`` then removes those classes from ``train`` only (e.g. the "mythical" digit 3 of Hinton et
    al.'s distillation paper): val and test keep them, and the remaining training items are exactly those the same
    seed gives without exclusion (``num_train`` is not topped up).

    Items: float32 (1, 28, 28), or (784,) with ``flatten``, normalised with the dataset's mean and std by default;
    ``(image, label, index)`` on the train split with ``return_index``, ``index`` being the item's position in the
    train split (stable: the same for the same files and arguments), for per-example caches. ``jitter = k`` shifts
    training images by up to k pixels in x and y (zero fill; Hinton et al.'s MNIST teacher used k = 2), anew at
    every access; val and test are never augmented. ``deterministic_train_transform`` is True when no augmentation
    is on, i.e. when a cache of per-example outputs on the train split stays valid across epochs.

    Every split is a :class:`MNISTLikeDataset`; ``splits[name].source_index`` gives each item's position in the
    official file it came from (``self.files[split]`` names the files read).

    Args:
        dataset: ``"fashion_mnist"`` or ``"mnist"``.
        data_dir: a folder with the official idx files, directly or in torchvision's layout (``MNIST/raw/``,
            ``FashionMNIST/raw/``); default ``<data root>/<dataset>`` (``$REPROZOO_DATA/mnist``, see docs/data.md).
        train_source: ``"train"`` (official split) or ``"test"`` (split the official test file, see above).
        val_size: held out for val; None = 5,000 with ``train_source="train"``, a tenth of ``num_train`` with
            ``"test"``.
        num_train, num_test: see the splits above; None = all.
        normalize: ``(p - mean) / std`` with p in [0, 1]; MNIST 0.1307 / 0.3081, Fashion-MNIST 0.2860 / 0.3530.
        flatten: items of shape (784,) instead of (1, 28, 28), for MLPs.
        jitter: maximal random shift in pixels (0 = none) of training images, in [0, 27].
        exclude_classes: class numbers (0..9) removed from the train split only.
        return_index: train items are ``(image, label, index)``.
        mirrors: where missing files are downloaded from (``<mirror><file>.gz``, md5 checked); default torchvision's
            ``mirrors`` of the dataset class. Nothing is downloaded with ``REPROZOO_OFFLINE=1``.
        batch_size, num_workers: for all loaders; train is shuffled.
        seed: the splits and subsets each derive their own generator from it, and so do the jitter shifts. As in
            the project's other datamodules, the shuffle order of train (and the jitter drawn inside loader
            workers, which is seeded by each worker's seed) follow torch's global seed, i.e. ``L.seed_everything``.
    """

    def __init__(
        self,
        dataset: Literal["fashion_mnist", "mnist"] = "fashion_mnist",
        data_dir: str | None = None,
        train_source: Literal["train", "test"] = "train",
        val_size: int | None = None,
        num_train: int | None = None,
        num_test: int | None = None,
        normalize: bool = True,
        flatten: bool = False,
        jitter: int = 0,
        exclude_classes: Sequence[int] = (),
        return_index: bool = False,
        mirrors: Sequence[str] | None = None,
        batch_size: int = 128,
        num_workers: int = 0,
        seed: int = 0,
    ):
        super().__init__()
        name = type(self).__name__

        if dataset not in DATASETS:
            raise ValueError(f"{name}: dataset must be one of {sorted(DATASETS)}, got {dataset!r}")
        if train_source not in FILES:
            raise ValueError(f"{name}: train_source must be 'train' or 'test', got {train_source!r}")
        check_split_args(
            name,
            val_size=val_size,
            num_train=num_train,
            num_test=num_test,
            batch_size=batch_size,
            num_workers=num_workers,
            seed=seed,
        )
        if not (is_int(jitter) and 0 <= jitter < IMAGE_SIZE):
            raise ValueError(
                f"{name}: jitter must be an integer number of pixels in [0, {IMAGE_SIZE - 1}], got {jitter!r}"
            )
        if (
            isinstance(exclude_classes, (str, bytes))
            or not isinstance(exclude_classes, Iterable)
            or not all(is_int(c) and 0 <= c < NUM_CLASSES for c in exclude_classes)
        ):
            raise ValueError(f"{name}: exclude_classes must be class numbers in 0..9, got {exclude_classes!r}")
        if len(set(int(c) for c in exclude_classes)) == NUM_CLASSES:
            raise ValueError(f"{name}: exclude_classes removes all 10 classes; the train split would be empty")
        if isinstance(mirrors, (str, bytes)):
            raise ValueError(f"{name}: mirrors must be a list of URLs, got the string {mirrors!r}")
        self.save_hyperparameters()
        self.info = DATASETS[dataset]
        self.data_dir = data_path(data_dir) if data_dir is not None else default_data_dir(dataset)
        self.classes = list(self.info.torchvision_class.classes)
        self.num_classes = NUM_CLASSES
        self.mean, self.std = self.info.mean, self.info.std
        self.mirrors = list(mirrors) if mirrors is not None else list(self.info.torchvision_class.mirrors)
        self.exclude_classes = tuple(sorted({int(c) for c in exclude_classes}))
        self.splits: dict[str, MNISTLikeDataset] = {}
        self.files: dict[str, tuple[Path, Path]] = {}

    @property
    def input_shape(self) -> tuple[int, ...]:
        return (IMAGE_SIZE * IMAGE_SIZE,) if self.hparams.flatten else (1, IMAGE_SIZE, IMAGE_SIZE)

    @property
    def deterministic_train_transform(self) -> bool:
        """True when training items are the same at every access (no augmentation), so that outputs computed once
        per training example (e.g. a teacher's logits, keyed by ``return_index``) stay valid."""
        return self.hparams.jitter == 0

    @property
    def raw_folder(self) -> Path:
        """``data_dir/<torchvision class name>/raw``, as torchvision's ``raw_folder``; or ``data_dir`` itself when
        the needed files lie directly in it (a flat folder of the official files, as they are often kept) and not
        in torchvision's layout."""
        layout = self.data_dir / self.info.torchvision_class.__name__ / "raw"
        flat = all(find_file(self.data_dir, f) is not None for f in self._needed())
        if flat and not any(find_file(layout, f) is not None for f in self._needed()):
            return self.data_dir
        return layout

    # ------------------------------------------------------------------------------------ files

    def _needed(self) -> list[str]:
        parts = ("train", "test") if self.hparams.train_source == "train" else ("test",)
        return [f for part in parts for f in FILES[part]]

    def _where_to_put(self, missing: Sequence[str]) -> str:
        mirror = self.mirrors[0] if self.mirrors else ""
        mirror = mirror if not mirror or mirror.endswith("/") else mirror + "/"
        return (
            f"Put the official {self.info.title} file(s) {', '.join(f'{m}.gz' for m in missing)} into "
            f"{self.raw_folder}/ (torchvision's layout, or all of them directly in data_dir; torchvision's "
            "uncompressed copies without .gz work too), "
            f"e.g. from {mirror}<file>.gz, or run once with network access. With train_source='test' only "
            f"{FILES['test'][0]}.gz and {FILES['test'][1]}.gz are needed."
        )

    def ensure_files(self) -> dict[str, Path]:
        """{official name: path} of the files ``train_source`` needs, after downloading the missing ones (never when
        offline). FileNotFoundError listing the missing files and their folder when they cannot be had."""
        name = type(self).__name__
        raw = self.raw_folder
        missing = [f for f in self._needed() if find_file(raw, f) is None]
        if missing:
            listing = ", ".join(str(raw / f"{f}.gz") for f in missing)
            if offline():
                raise FileNotFoundError(
                    f"{name}: missing {listing}, and offline mode is on (REPROZOO_OFFLINE), so nothing was "
                    f"downloaded. " + self._where_to_put(missing)
                )
            try:
                download_files(raw, missing, self.info.torchvision_class, self.mirrors)
            except Exception as err:
                raise FileNotFoundError(
                    f"{name}: missing {listing}, and the download failed: {err}. " + self._where_to_put(missing)
                ) from err
        return {f: find_file(raw, f) for f in self._needed()}

    def _read_part(self, paths: dict[str, Path], part: str) -> tuple[torch.Tensor, torch.Tensor]:
        name = type(self).__name__
        images_path, labels_path = (paths[f] for f in FILES[part])
        try:
            images, labels = read_images(images_path), read_labels(labels_path)
        except ValueError as err:
            raise ValueError(f"{name}: {err}") from err
        if len(images) != len(labels):
            raise ValueError(
                f"{name}: {images_path} has {len(images)} images but {labels_path} has {len(labels)} labels"
            )
        self.files[part] = (images_path, labels_path)
        return images, labels

    # ------------------------------------------------------------------------------------ Lightning hooks

    def prepare_data(self) -> None:
        self.ensure_files()

    def setup(self, stage: str | None = None) -> None:
        if self.splits:
            return
        hp = self.hparams
        name = type(self).__name__
        paths = self.ensure_files()
        test_images, test_labels = self._read_part(paths, "test")
        test_np = test_labels.numpy()
        seed = hp.seed

        if hp.train_source == "train":
            pool_images, pool_labels = self._read_part(paths, "train")
            pool_np = pool_labels.numpy()
            train_idx, val_idx, test_idx = official_splits(
                pool_np,
                test_np,
                val_size=hp.val_size,
                num_train=hp.num_train,
                num_test=hp.num_test,
                seed=seed,
                owner=name,
                classes=self.classes,
                pool_where=str(self.files["train"][0]),
                test_where="the test file",
            )
        else:
            pool_images, pool_labels, pool_np = test_images, test_labels, test_np
            train_idx, val_idx, test_idx = single_file_splits(
                test_np,
                val_size=hp.val_size,
                num_train=hp.num_train,
                num_test=hp.num_test,
                seed=seed,
                owner=name,
                where=str(self.files["test"][0]),
                why="train_source='test' splits that file",
            )

        if self.exclude_classes:
            train_idx = train_idx[~np.isin(pool_np[train_idx], self.exclude_classes)]

        common = dict(mean=self.mean, std=self.std, normalize=hp.normalize, flatten=hp.flatten, seed=seed)

        def subset(images, labels, idx, **kwargs) -> MNISTLikeDataset:
            idx = torch.from_numpy(np.asarray(idx, dtype=np.int64))
            return MNISTLikeDataset(images[idx], labels[idx], source_index=idx, **common, **kwargs)

        self.splits = {
            "train": subset(pool_images, pool_labels, train_idx, jitter=hp.jitter, return_index=hp.return_index),
            "val": subset(pool_images, pool_labels, val_idx),
            "test": subset(test_images, test_labels, test_idx),
        }


class TransferSetMNISTDataModule(FashionMNISTDataModule):
    """:class:`FashionMNISTDataModule` for a student's transfer set (Hinton, Vinyals & Dean 2015, section 3): a class
    left out of the transfer set is left out of everything the student's run sees, the validation split used to
    select its checkpoint included, and a separate held-out ``tune`` split keeps every class for choosing the
    excluded classes' logit bias.

    The splits are those of :class:`FashionMNISTDataModule` with the same arguments, then:

    * ``train`` keeps only the classes of the transfer set: ``transfer_classes`` (None = all ten) minus
      ``exclude_classes`` (the paper's "mythical" 3: ``exclude_classes=[3]``; its 7-and-8 experiment:
      ``transfer_classes=[7, 8]``);
    * ``val`` keeps the same classes when ``exclude_from_val`` (the default), so the model selection never sees a
      class the student is not meant to know; ``exclude_from_val=False`` keeps the parent's behaviour (all classes);
    * ``tune`` is the whole held-out ``val`` part before that filtering, every class in it: the data to tune the
      logit bias on (the paper tuned it on the test set). It never overlaps ``test``.

    Args: those of :class:`FashionMNISTDataModule`, and
        transfer_classes: the classes (0..9) the transfer set may contain; None = all.
        exclude_from_val: also filter ``val`` as ``train``.
    """

    def __init__(
        self,
        dataset: Literal["fashion_mnist", "mnist"] = "mnist",
        data_dir: str | None = None,
        train_source: Literal["train", "test"] = "train",
        val_size: int | None = None,
        num_train: int | None = None,
        num_test: int | None = None,
        normalize: bool = True,
        flatten: bool = False,
        jitter: int = 0,
        exclude_classes: Sequence[int] = (),
        transfer_classes: Sequence[int] | None = None,
        exclude_from_val: bool = True,
        return_index: bool = False,
        mirrors: Sequence[str] | None = None,
        batch_size: int = 128,
        num_workers: int = 0,
        seed: int = 0,
    ):
        super().__init__(
            dataset=dataset,
            data_dir=data_dir,
            train_source=train_source,
            val_size=val_size,
            num_train=num_train,
            num_test=num_test,
            normalize=normalize,
            flatten=flatten,
            jitter=jitter,
            exclude_classes=exclude_classes,
            return_index=return_index,
            mirrors=mirrors,
            batch_size=batch_size,
            num_workers=num_workers,
            seed=seed,
        )
        name = type(self).__name__
        if transfer_classes is not None and (
            isinstance(transfer_classes, (str, bytes))
            or not isinstance(transfer_classes, Iterable)
            or not all(
                isinstance(c, (int, np.integer)) and not isinstance(c, bool) and 0 <= c < NUM_CLASSES
                for c in transfer_classes
            )
        ):
            raise ValueError(
                f"{name}: transfer_classes must be a list of class numbers in 0..9 (or null for all), "
                f"got {transfer_classes!r}"
            )
        if not isinstance(exclude_from_val, bool):
            raise ValueError(f"{name}: exclude_from_val must be true or false, got {exclude_from_val!r}")
        kept = set(range(NUM_CLASSES)) if transfer_classes is None else {int(c) for c in transfer_classes}
        kept -= set(self.exclude_classes)
        if not kept:
            raise ValueError(
                f"{name}: transfer_classes={transfer_classes!r} minus exclude_classes={list(self.exclude_classes)} "
                "leaves no class in the transfer set; keep at least one"
            )
        self.transfer_classes = tuple(sorted(kept))
        self.exclude_from_val = exclude_from_val

    def setup(self, stage: str | None = None) -> None:
        if self.splits:
            return
        super().setup(stage)
        held_out = self.splits["val"]
        self.splits["train"] = self._only(self.splits["train"], self.transfer_classes)
        self.splits["val"] = self._only(held_out, self.transfer_classes) if self.exclude_from_val else held_out
        self.splits["tune"] = held_out

    @staticmethod
    def _only(split: MNISTLikeDataset, classes: Sequence[int]) -> MNISTLikeDataset:
        keep = torch.isin(split.labels, torch.tensor(classes, dtype=torch.long))
        if bool(keep.all()):
            return split
        # A new dataset rather than a view, so that an item's index (return_index) is its place in this split.
        return MNISTLikeDataset(
            split.images[keep],
            split.labels[keep],
            mean=split.mean,
            std=split.std,
            normalize=split.normalize,
            flatten=split.flatten,
            jitter=split.jitter,
            return_index=split.return_index,
            seed=split.seed,
            source_index=split.source_index[keep],
        )

    def tune_dataloader(self):
        """The held-out ``tune`` split, every class in it, in order: for tuning the logit bias, never the test."""
        if not self.splits:
            self.setup("fit")
        return self._loader("tune")
