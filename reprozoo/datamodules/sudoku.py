"""Sudoku-Extreme, the benchmark of the Tiny Recursive Models paper (Jolicoeur-Martineau, 2025), and its recipe.

Each puzzle is a sequence of 81 tokens in row-major order, encoded as the official TRM code does it:
``0`` = pad (never used for sudoku, kept so that vocabularies line up with the other TRM tasks), ``1`` = blank,
``2..10`` = digits 1..9. The vocabulary size is therefore 11.

Three sources of puzzles:

* ``csv``: ``train.csv`` / ``test.csv`` of the Hugging Face dataset ``sapientinc/sudoku-extreme`` in ``data_dir``
  (header ``source,question,answer,rating``, ``.`` = blank), or any CSV of the same columns via
  ``train_file`` / ``test_file``.
* ``hub``: like ``csv``, but missing files are downloaded into ``data_dir`` first (unless ``REPROZOO_OFFLINE=1``).
  The hub publishes no checksum for them, so the sha256 of what was downloaded is recorded next to each file
  (``train.csv.sha256``) and checked on every later load: a file that changed after the download is refused.
* ``generate``: an own seeded generator of puzzles with a unique solution and an exact number of givens, cached in
  ``data_dir`` in the same CSV format. It needs no download, which keeps tests and smoke runs offline.

The training recipe follows the paper: a seeded subsample of ``num_train_puzzles`` (1000) training puzzles, and
on-the-fly augmentation by the validity-preserving symmetries of the official ``build_sudoku_dataset.py`` (digit
relabelling, transpose, band/row and stack/column shuffles). Every grid check in this module is vectorised, so
that validating the ~4M rows of the official files stays affordable.
"""

from __future__ import annotations

import hashlib
import os
import tempfile
import urllib.request
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Literal

import numpy as np
import torch
from torch.utils.data import Dataset, Sampler

from reprozoo._files import data_path, data_root, offline, publish, sha256_file, write_atomic
from reprozoo.datamodules._base import _SplitsDataModule
from reprozoo.sudoku import CSV_HEADER, SEQ_LEN, augment_sudoku, generate_puzzles, read_digits, write_sudoku_csv

HUB_REPO = "sapientinc/sudoku-extreme"
HUB_URL = f"https://huggingface.co/datasets/{HUB_REPO}/resolve/main"
HUB_FILES = ("train.csv", "test.csv")

Source = Literal["csv", "hub", "generate"]

# ----------------------------------------------------------------------------------------------- the hub


def sha256_sidecar(path: str | os.PathLike) -> Path:
    """Where the sha256 recorded at download time of ``path`` lives: ``{path}.sha256``."""
    path = Path(path)
    return path.with_name(path.name + ".sha256")


def verify_recorded_sha256(path: str | os.PathLike) -> None:
    """If a download recorded a sha256 for ``path``, check the file still has it (a file placed by hand has no
    record and is trusted as is: the hub publishes no checksum to compare with)."""
    path = Path(path)
    sidecar = sha256_sidecar(path)
    if not sidecar.is_file():
        return
    expected = sidecar.read_text().split()[0].lower() if sidecar.read_text().split() else ""
    got = sha256_file(path)
    if got != expected:
        raise ValueError(
            f"{path} has sha256 {got}, but {sidecar} recorded {expected or '(nothing)'} when it was downloaded: "
            f"the file changed or is truncated. Delete both files to download it again."
        )


def download_from_hub(name: str, data_dir: str | os.PathLike, hub_url: str = HUB_URL) -> Path:
    """Download ``{hub_url}/{name}`` to ``data_dir/name`` atomically and record its sha256 in ``{name}.sha256``.

    The data goes to a temporary file in ``data_dir`` first and is renamed into place only once complete and
    starting with the expected CSV header, so an interrupted or wrong download never looks like the dataset.
    """
    data_dir = Path(data_dir)
    data_dir.mkdir(parents=True, exist_ok=True)
    dest = data_dir / name
    url = f"{hub_url.rstrip('/')}/{name}"
    fd, tmp_name = tempfile.mkstemp(prefix=name + ".", suffix=".part", dir=data_dir)
    digest = hashlib.sha256()
    try:
        with os.fdopen(fd, "wb") as out, urllib.request.urlopen(url, timeout=60) as response:
            for block in iter(lambda: response.read(1 << 20), b""):
                out.write(block)
                digest.update(block)
        with open(tmp_name, "rb") as fh:
            first = fh.readline().decode("utf-8-sig", "replace").strip()
        if tuple(first.split(",")) != CSV_HEADER:
            raise ValueError(f"{url} does not start with the header {','.join(CSV_HEADER)!r} (got {first[:80]!r})")
        # the record first: a crash between the two renames leaves a record without a file, which the next
        # download overwrites, never a file without its record
        write_atomic(sha256_sidecar(dest), f"{digest.hexdigest()}  {name}\n".encode())
        publish(tmp_name, dest)
    finally:
        Path(tmp_name).unlink(missing_ok=True)
    return dest


def _where_to_put(paths: Sequence[Path], data_dir: Path) -> str:
    places = "; ".join(f"{p.name} at {p}" for p in paths)
    return (
        f"Put {places}. They are the files of the Hugging Face dataset {HUB_REPO} "
        f"({', '.join(f'{HUB_URL}/{p.name}' for p in paths)}), e.g. "
        f"`huggingface-cli download {HUB_REPO} --repo-type dataset --local-dir {data_dir}`."
    )


class SudokuDataset(Dataset):
    """Token grids (stored as uint8) served as ``{"inputs", "labels", "puzzle_identifiers"}``.

    With ``augment`` each item is a random symmetry of its puzzle, drawn from a generator seeded by
    ``(seed, round, index)`` where an item key is ``round * len(self) + index``. A plain loader asks for keys
    0..N-1 (round 0); :class:`EpochSampler` asks for later rounds in later epochs. The augmentation of an item is
    therefore a function of its key only: the same in every worker, process and run.
    """

    def __init__(self, questions: torch.Tensor, answers: torch.Tensor, augment: bool = False, seed: int = 0):
        if questions.shape != answers.shape or questions.ndim != 2 or questions.shape[1] != SEQ_LEN:
            raise ValueError(
                "SudokuDataset: questions and answers must both be (N, 81), "
                f"got {tuple(questions.shape)} and {tuple(answers.shape)}"
            )
        self.questions, self.answers = questions, answers
        self.augment, self.seed = augment, seed

    def __len__(self) -> int:
        return len(self.questions)

    def __getitem__(self, key: int) -> dict[str, torch.Tensor]:
        n = len(self.questions)
        key = int(key)
        if key < 0 or n == 0:
            raise IndexError(f"SudokuDataset: key {key} out of range")
        round_, index = divmod(key, n)
        question, answer = self.questions[index].long(), self.answers[index].long()
        if self.augment:
            question, answer = augment_sudoku(question, answer, np.random.default_rng((self.seed, round_, index)))
        return {"inputs": question, "labels": answer, "puzzle_identifiers": torch.zeros((), dtype=torch.long)}


class EpochSampler(Sampler[int]):
    """Shuffled keys for :class:`SudokuDataset`: epoch ``e`` visits each puzzle ``repeats`` times, as keys of rounds
    ``e * repeats .. e * repeats + repeats - 1``, so each visit gets a fresh augmentation.

    The order is seeded by (seed, epoch). Lightning calls ``set_epoch`` on a loader's sampler at the start of every
    training epoch; in a hand-written loop call it yourself, or every epoch repeats epoch 0. The sampler runs in
    the main process, which is why the epoch reaches workers (persistent or not) without any shared state.
    """

    def __init__(self, num_puzzles: int, repeats: int = 1, shuffle: bool = True, seed: int = 0):
        self.num_puzzles, self.repeats, self.shuffle, self.seed = num_puzzles, repeats, shuffle, seed
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)

    def __len__(self) -> int:
        return self.num_puzzles * self.repeats

    def __iter__(self) -> Iterator[int]:
        total = len(self)
        order = np.random.default_rng((self.seed, self.epoch)).permutation(total) if self.shuffle else np.arange(total)
        base = self.epoch * total
        return iter((base + order).tolist())


# ----------------------------------------------------------------------------------------------- the datamodule


def default_data_dir() -> Path:
    """``<data root>/sudoku-extreme`` (:func:`reprozoo._files.data_root`)."""
    return data_root() / "sudoku-extreme"


class SudokuExtremeDataModule(_SplitsDataModule):
    """Sudoku-Extreme puzzles with the TRM training recipe.

    Splits: ``train`` is a seeded subsample of ``num_train_puzzles`` training puzzles. ``val`` (``num_val``
    puzzles) is a seeded draw from the training puzzles *not* in that subsample, so that model selection never
    looks at the test split; only where those are too few (e.g. ``num_train_puzzles=None``, all of them) is it
    drawn from the test split instead, and ``self.val_source`` says which. ``test`` is the test file as is (first
    ``limit_test`` rows if given); ``predict`` is the test split too.

    Args:
        source: ``csv`` (files in ``data_dir`` or ``train_file``/``test_file``), ``hub`` (download missing files
            from the Hugging Face dataset ``sapientinc/sudoku-extreme``) or ``generate`` (own unique-solution
            puzzles with ``num_givens`` givens, cached in ``data_dir``).
        data_dir: where ``train.csv``/``test.csv`` are, or go, or where generated puzzles are cached; default
            ``<data root>/sudoku-extreme`` (``$REPROZOO_DATA/sudoku-extreme``, see docs/data.md).
        train_file, test_file: for ``csv``, any CSV of the official columns instead of ``data_dir/{train,test}.csv``.
        hub_url: base URL of the hub files (a ``file://`` URL works, which is how the download is tested).
        num_givens: givens per generated puzzle (17..80; the generator is fast from ~24 up).
        n_train_generated, n_test_generated: generated puzzles per split (train and test use different seeds and
            are deduplicated: a training puzzle that also is a test question is dropped).
        num_train_puzzles: training puzzles used (paper: 1000); None = all.
        num_val: validation puzzles (0 = no validation split).
        limit_test: cap on the test split's size (its first rows).
        min_rating: keep only puzzles rated at least this, in both splits (needs ratings: not for ``generate``).
        augment: random sudoku symmetries on the training split, fresh in each epoch and each repeat.
        train_repeats: visits of each training puzzle per epoch (each a different augmentation); TRM pre-computes
            1000 augmentations per puzzle, which ``train_repeats=1000`` mimics without the disk cost.
        batch_size, num_workers: for all loaders (per process under DDP); train is shuffled (seeded by seed and
            epoch) and drops the short last batch of each epoch, as the official loader: every training batch has
            ``batch_size`` puzzles, which TRM's carry needs to run on across epochs.
        seed: subsample, validation draw, generation, shuffling and augmentation all derive from it.
    """

    drop_last_train = True

    def __init__(
        self,
        source: Source = "generate",
        data_dir: str | None = None,
        train_file: str | None = None,
        test_file: str | None = None,
        hub_url: str = HUB_URL,
        num_givens: int = 30,
        n_train_generated: int = 2000,
        n_test_generated: int = 500,
        num_train_puzzles: int | None = 1000,
        num_val: int = 500,
        limit_test: int | None = None,
        min_rating: int | None = None,
        augment: bool = True,
        train_repeats: int = 1,
        batch_size: int = 256,
        num_workers: int = 0,
        seed: int = 0,
    ):
        super().__init__()
        name = type(self).__name__
        if source not in ("csv", "hub", "generate"):
            raise ValueError(f"{name}: source must be 'csv', 'hub' or 'generate', got {source!r}")
        if not 17 <= num_givens <= 80:
            raise ValueError(
                f"{name}: num_givens must be in 17..80 (a unique sudoku needs at least 17), got {num_givens}"
            )
        for field, value in {
            "n_train_generated": n_train_generated,
            "n_test_generated": n_test_generated,
            "train_repeats": train_repeats,
            "batch_size": batch_size,
        }.items():
            if value < 1:
                raise ValueError(f"{name}: {field} must be >= 1, got {value}")
        for field, value in {"num_train_puzzles": num_train_puzzles, "limit_test": limit_test}.items():
            if value is not None and value < 1:
                raise ValueError(f"{name}: {field} must be >= 1 or None, got {value}")
        for field, value in {"num_val": num_val, "num_workers": num_workers, "seed": seed}.items():
            if value < 0:
                raise ValueError(f"{name}: {field} must be >= 0, got {value}")
        if min_rating is not None and source == "generate":
            raise ValueError(
                f"{name}: min_rating needs rated puzzles; generated ones have no rating (source='generate')"
            )
        if (train_file is not None or test_file is not None) and source != "csv":
            field = "train_file" if train_file is not None else "test_file"
            raise ValueError(f"{name}: {field} is only used with source='csv', got source={source!r}")
        self.save_hyperparameters()
        self.data_dir = data_path(data_dir) if data_dir is not None else default_data_dir()
        self.splits: dict[str, SudokuDataset] = {}
        self.val_source: str | None = None
        self._verified: set[Path] = set()

    # ------------------------------------------------------------------------------------ files

    def generated_path(self, split: str) -> Path:
        hp = self.hparams
        n = hp.n_train_generated if split == "train" else hp.n_test_generated
        return self.data_dir / f"generated_g{hp.num_givens}_n{n}_s{hp.seed}_{split}.csv"

    def _csv_files(self) -> tuple[Path, Path]:
        hp = self.hparams
        train = Path(hp.train_file) if hp.train_file is not None else self.data_dir / "train.csv"
        test = Path(hp.test_file) if hp.test_file is not None else self.data_dir / "test.csv"
        return train, test

    def files(self) -> tuple[Path, Path]:
        """Paths of the (train, test) CSV files, after generating or downloading whatever is missing."""
        hp = self.hparams
        if hp.source == "generate":
            paths = self.generated_path("train"), self.generated_path("test")
            for split, path in zip(("train", "test"), paths):
                if not path.is_file():
                    n = hp.n_train_generated if split == "train" else hp.n_test_generated
                    rows = generate_puzzles(n, hp.num_givens, seed=f"reprozoo.sudoku:{hp.seed}:{split}")
                    write_sudoku_csv(path, rows, source=f"generated_g{hp.num_givens}_s{hp.seed}")
            return paths
        paths = self._csv_files()
        missing = [p for p in paths if not p.is_file()]
        if missing and hp.source == "csv":
            raise FileNotFoundError(
                f"{type(self).__name__}: missing {', '.join(map(str, missing))}. "
                + _where_to_put(missing, self.data_dir)
                + " Or use source='hub' to download them, or source='generate' for puzzles made locally."
            )
        if missing:
            if offline():
                raise FileNotFoundError(
                    f"{type(self).__name__}: missing {', '.join(map(str, missing))} and offline mode is on "
                    f"(REPROZOO_OFFLINE), so nothing was downloaded. " + _where_to_put(missing, self.data_dir)
                )
            for path in missing:
                try:
                    download_from_hub(path.name, self.data_dir, hub_url=hp.hub_url)
                except Exception as err:  # network errors come in many types; all mean the same to the user
                    raise FileNotFoundError(
                        f"{type(self).__name__}: could not download {hp.hub_url.rstrip('/')}/{path.name}: {err}. "
                        + _where_to_put(missing, self.data_dir)
                    ) from err
        for path in paths:
            if path not in self._verified:  # prepare_data and setup both ask: hash a large file once
                verify_recorded_sha256(path)
                self._verified.add(path)
        return paths

    # ------------------------------------------------------------------------------------ Lightning hooks

    def prepare_data(self) -> None:
        self.files()

    def setup(self, stage: str | None = None) -> None:
        if self.splits:
            return
        hp = self.hparams
        name = type(self).__name__
        train_path, test_path = self.files()
        train_q, train_a, _ = read_digits(train_path, min_rating=hp.min_rating)
        test_q, test_a, _ = read_digits(test_path, min_rating=hp.min_rating, limit=hp.limit_test)
        if hp.source == "generate":
            for path, digits in ((train_path, train_q), (test_path, test_q)):
                counts = (digits > 0).sum(axis=1)
                if (counts != hp.num_givens).any():  # the name promises the givens: a cache that breaks it is stale
                    raise ValueError(
                        f"{name}: {path} has a puzzle with {int(counts[counts != hp.num_givens][0])} givens, "
                        f"expected num_givens={hp.num_givens}; delete the file to generate it again"
                    )
            # the two seeds make overlaps astronomically rare; rule them out anyway
            test_keys = {row.tobytes() for row in test_q}
            keep = np.fromiter((row.tobytes() not in test_keys for row in train_q), dtype=bool, count=len(train_q))
            train_q, train_a = train_q[keep], train_a[keep]
        n_train = len(train_q)
        k = n_train if hp.num_train_puzzles is None else hp.num_train_puzzles
        if k > n_train or n_train == 0:
            raise ValueError(
                f"{name}: num_train_puzzles={hp.num_train_puzzles} but {train_path} has {n_train} usable puzzles"
            )
        if len(test_q) == 0:
            raise ValueError(f"{name}: the test split {test_path} has no usable puzzles")
        order = np.random.default_rng((hp.seed, 1)).permutation(n_train)
        train_idx, rest = order[:k], order[k:]
        if len(rest) >= hp.num_val:
            val_q, val_a, self.val_source = train_q[rest[: hp.num_val]], train_a[rest[: hp.num_val]], "train"
        elif hp.num_val <= len(test_q):
            pick = np.random.default_rng((hp.seed, 2)).permutation(len(test_q))[: hp.num_val]
            val_q, val_a, self.val_source = test_q[pick], test_a[pick], "test"
        else:
            raise ValueError(
                f"{name}: num_val={hp.num_val} is more than the {len(rest)} training puzzles left over and the "
                f"{len(test_q)} test puzzles"
            )

        def tokens(digits: np.ndarray) -> torch.Tensor:
            return torch.from_numpy(digits + 1)  # uint8: blank 1, digits 2..10

        self.splits["train"] = SudokuDataset(
            tokens(train_q[train_idx]), tokens(train_a[train_idx]), hp.augment, hp.seed
        )
        self.splits["val"] = SudokuDataset(tokens(val_q), tokens(val_a))
        self.splits["test"] = SudokuDataset(tokens(test_q), tokens(test_a))

    def train_dataloader(self):
        hp, trainer = self.hparams, self.trainer
        per_process = len(self.splits["train"]) * hp.train_repeats // (trainer.world_size if trainer else 1)
        if per_process < hp.batch_size:
            raise ValueError(
                f"{type(self).__name__}: batch_size={hp.batch_size} is more than the {per_process} training puzzles "
                "an epoch gives each process (num_train_puzzles x train_repeats / processes); the short last batch "
                "is dropped, so an epoch would have no batch: lower batch_size or raise train_repeats"
            )
        return super().train_dataloader()

    def _train_sampler(self, seed: int) -> Sampler[int]:
        hp = self.hparams  # the order has its own seed: it also picks each visit's augmentation
        return EpochSampler(len(self.splits["train"]), hp.train_repeats, True, hp.seed)
