"""How the datamodules of labelled images split their files, seeded and class-aware: the official layout (a training
pool and a separate test file) and the one-file layout (only a set of test images, split three ways). The same
seed gives the same splits in every datamodule that uses them (each part draws from ``(seed, k)``: val 0, train 1,
test 2)."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np


def stratified_pick(labels: np.ndarray, n: int, rng: np.random.Generator) -> np.ndarray:
    """Sorted positions of ``n`` of ``labels`` keeping the class proportions: each class gets the floor of its share
    and the remaining items go to the largest remainders (ties broken at random)."""
    classes, counts = np.unique(labels, return_counts=True)
    total = len(labels)
    quotas, remainders = np.divmod(n * counts, total) if total else (counts * 0, counts * 0)
    rest = n - int(quotas.sum())
    order = np.lexsort((rng.random(len(classes)), -remainders))
    quotas[order[:rest]] += 1
    picks = [rng.choice(np.flatnonzero(labels == c), size=int(q), replace=False) for c, q in zip(classes, quotas)]
    return np.sort(np.concatenate(picks)) if picks else np.zeros(0, dtype=np.int64)


def balanced_pick(
    labels: np.ndarray, n: int, rng: np.random.Generator, what: str, classes: Sequence[str]
) -> np.ndarray:
    """Sorted positions of ``n`` of ``labels`` (0 .. len(classes) - 1), ``n // len(classes)`` per class and one more
    for ``n % len(classes)`` classes drawn at random; ValueError starting with ``what`` when a class has too few
    items."""
    k = len(classes)
    quotas = np.full(k, n // k)
    quotas[rng.permutation(k)[: n % k]] += 1
    picks = []
    for c in range(k):
        pool = np.flatnonzero(labels == c)
        if len(pool) < quotas[c]:
            counts = np.bincount(labels, minlength=k)
            raise ValueError(
                f"{what}: a class-balanced subset of {n} needs {quotas[c]} items of class {c} ({classes[c]}), "
                f"but there are only {len(pool)} (per class: {counts.tolist()}, {len(labels)} in all)"
            )
        picks.append(rng.choice(pool, size=int(quotas[c]), replace=False))
    return np.sort(np.concatenate(picks))


def rest_of(n: int, taken: np.ndarray) -> np.ndarray:
    keep = np.ones(n, dtype=bool)
    keep[taken] = False
    return np.flatnonzero(keep)


def _rng(seed: int, k: int) -> np.random.Generator:
    return np.random.default_rng((seed, k))


def official_splits(
    pool_labels: np.ndarray,
    test_labels: np.ndarray,
    *,
    val_size: int | None,
    num_train: int | None,
    num_test: int | None,
    seed: int,
    owner: str,
    classes: Sequence[str],
    pool_where: str,
    test_where: str,
    unit: str = "item",
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(train, val, test) positions: ``val`` a stratified ``val_size`` (default 5,000) of the pool, ``train`` the
    rest or a class-balanced ``num_train`` of it, ``test`` the test file or a class-balanced ``num_test`` of it.
    ValueErrors start with ``owner`` and name the field and the file (``pool_where``, ``test_where``)."""
    val_size = 5000 if val_size is None else val_size
    if val_size >= len(pool_labels):
        raise ValueError(
            f"{owner}: val_size={val_size} leaves no training {unit} of the {len(pool_labels)} in {pool_where}"
        )
    val_idx = stratified_pick(pool_labels, val_size, _rng(seed, 0))
    train_idx = rest_of(len(pool_labels), val_idx)
    if num_train is not None:
        if num_train > len(train_idx):
            raise ValueError(
                f"{owner}: num_train={num_train}, but only {len(train_idx)} training {unit}s remain after holding "
                f"out val_size={val_size} of {len(pool_labels)}"
            )
        train_idx = train_idx[
            balanced_pick(pool_labels[train_idx], num_train, _rng(seed, 1), f"{owner}: num_train", classes)
        ]
    test_idx = np.arange(len(test_labels))
    if num_test is not None:
        if num_test > len(test_labels):
            raise ValueError(f"{owner}: num_test={num_test}, but {test_where} has only {len(test_labels)}")
        test_idx = balanced_pick(test_labels, num_test, _rng(seed, 2), f"{owner}: num_test", classes)
    return train_idx, val_idx, test_idx


def single_file_splits(
    labels: np.ndarray,
    *,
    val_size: int | None,
    num_train: int | None,
    num_test: int | None,
    seed: int,
    owner: str,
    where: str,
    why: str,
    unit: str = "item",
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(train, val, test) positions of one file split three ways, seeded and stratified: ``test`` ``num_test``
    (default a fifth), then ``num_train`` of the rest (default all of it) as the training part, of which
    ``val_size`` (default a tenth) is held out as ``val``. ``why`` says in the errors why the file is split."""
    total = len(labels)
    num_test = total // 5 if num_test is None else num_test
    num_train = total - num_test if num_train is None else num_train
    if num_test + num_train > total:
        raise ValueError(
            f"{owner}: num_train={num_train} + num_test={num_test} is more than the {total} images of {where} ({why})"
        )
    if num_train < 1 or num_test < 1:
        raise ValueError(
            f"{owner}: the {total} images of {where} leave num_train={num_train}, num_test={num_test}; both must "
            "be >= 1"
        )
    test_idx = stratified_pick(labels, num_test, _rng(seed, 2))
    rest = rest_of(total, test_idx)
    part = rest[stratified_pick(labels[rest], num_train, _rng(seed, 1))]
    val_size = num_train // 10 if val_size is None else val_size
    if val_size >= num_train:
        raise ValueError(
            f"{owner}: val_size={val_size} leaves no training {unit} of the num_train={num_train} ({why}: val is "
            "held out of the training part)"
        )
    val_idx = part[stratified_pick(labels[part], val_size, _rng(seed, 0))]
    return np.setdiff1d(part, val_idx), val_idx, test_idx


def is_int(value) -> bool:
    """An integer (Python or numpy), not a bool."""
    return isinstance(value, (int, np.integer)) and not isinstance(value, bool)


def check_split_args(owner: str, *, val_size, num_train, num_test, batch_size, num_workers, seed) -> None:
    """The arguments every datamodule of these splits shares: one-line ValueErrors naming ``owner`` and the field."""
    if val_size is not None and not (is_int(val_size) and val_size >= 0):
        raise ValueError(f"{owner}: val_size must be an integer >= 0 or None, got {val_size!r}")
    for field, value in {"num_train": num_train, "num_test": num_test}.items():
        if value is not None and not (is_int(value) and value >= 1):
            raise ValueError(f"{owner}: {field} must be an integer >= 1 or None, got {value!r}")
    if not (is_int(batch_size) and batch_size >= 1):
        raise ValueError(f"{owner}: batch_size must be an integer >= 1, got {batch_size!r}")
    for field, value in {"num_workers": num_workers, "seed": seed}.items():
        if not (is_int(value) and value >= 0):
            raise ValueError(f"{owner}: {field} must be an integer >= 0, got {value!r}")
