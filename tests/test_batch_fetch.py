"""The project's loaders fetch a batch at once (BatchFetch) where a dataset allows it: the batches must equal the
items read one by one and collated by torch's default_collate, for every datamodule and option."""

from __future__ import annotations

import pickle

import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader, TensorDataset
from torch.utils.data.dataloader import default_collate

from reprozoo.datamodules import (
    CIFAR10DataModule,
    ConcentricRingsDataModule,
    FashionMNISTDataModule,
    SyntheticRegressionDataModule,
)
from reprozoo.datamodules._base import Batch, BatchFetch, collate
from tests.test_fashion_mnist import make_raw


def _same(a, b) -> None:
    assert type(a) is type(b) and len(a) == len(b)
    for x, y in zip(a, b):
        assert x.dtype == y.dtype and x.shape == y.shape and torch.equal(x, y)


def _check_loaders(dm) -> None:
    dm.setup("fit")
    for loader in (dm.train_dataloader(), dm.val_dataloader(), dm.test_dataloader()):
        assert isinstance(loader.dataset, BatchFetch) and loader.collate_fn is collate
        order = list(loader.sampler) if loader.sampler is not None else range(len(loader.dataset))
        size = loader.batch_size
        batches = list(loader)
        for k, batch in enumerate(batches[:3]):
            items = [loader.dataset.dataset[i] for i in order[k * size : (k + 1) * size]]
            _same(batch, default_collate(items))


def test_tensor_datasets_of_engression_and_rings():
    _check_loaders(SyntheticRegressionDataModule(n_train=2500, n_val=300, n_test=300, batch_size=1000))
    _check_loaders(ConcentricRingsDataModule(batch_size=64))


@pytest.mark.parametrize("flatten, return_index", [(False, False), (True, True)])
def test_mnist_batches_equal_the_items(tmp_path, flatten, return_index):
    make_raw(tmp_path, n_train=120, n_test=40)
    dm = FashionMNISTDataModule(
        data_dir=str(tmp_path), val_size=20, batch_size=16, flatten=flatten, return_index=return_index
    )
    _check_loaders(dm)
    assert dm.splits["train"].get_batch([0, 3]) is not None


def test_mnist_with_jitter_goes_item_by_item(tmp_path):
    make_raw(tmp_path, n_train=120, n_test=40)
    dm = FashionMNISTDataModule(data_dir=str(tmp_path), val_size=20, batch_size=16, jitter=2)
    dm.setup("fit")
    assert dm.splits["train"].get_batch([0, 1]) is None and dm.splits["val"].get_batch([0, 1]) is not None
    assert isinstance(BatchFetch(dm.splits["train"]).__getitems__([0, 1]), list)


@pytest.mark.parametrize("options", [{}, {"return_index": True, "label_noise": 0.3}, {"random_inputs": 0.5}])
def test_cifar10_batches_equal_the_items(tmp_path, options):
    rng = np.random.default_rng(0)
    path = tmp_path / "tiny.npz"
    np.savez(path, x=rng.integers(0, 256, (200, 32, 32, 3), dtype=np.uint8), y=np.arange(200) % 10)
    dm = CIFAR10DataModule(images_npz=str(path), num_train=150, val_size=30, num_test=50, batch_size=16, **options)
    _check_loaders(dm)
    loader = dm.train_eval_dataloader()
    _same(next(iter(loader)), default_collate([dm.splits["train"][i] for i in range(16)]))


def test_batch_fetch_passes_items_attributes_and_pickles():
    ds = TensorDataset(torch.arange(10.0).view(10, 1), torch.arange(10))
    ds.note = "kept"
    fetch = BatchFetch(ds)
    assert len(fetch) == 10 and fetch[3] == ds[3] and fetch.note == "kept" and fetch.tensors is ds.tensors
    batch = fetch.__getitems__([4, 1])
    assert isinstance(batch, Batch) and torch.equal(batch[1], torch.tensor([4, 1]))
    again = pickle.loads(pickle.dumps(fetch))  # as loader workers of the spawn method receive it
    assert torch.equal(again.dataset.tensors[0], ds.tensors[0])
    workers = DataLoader(fetch, batch_size=4, num_workers=1, collate_fn=collate)
    _same(next(iter(workers)), [torch.arange(4.0).view(4, 1), torch.arange(4)])
