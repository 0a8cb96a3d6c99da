"""What every datamodule of the project shares: named splits built in ``setup``, one way to load them, and a
training loader that resumes exactly where a checkpoint left it."""

from __future__ import annotations

import math
from collections.abc import Iterator, Sized
from typing import Any

import lightning as L
import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, DistributedSampler, Sampler, TensorDataset, get_worker_info
from torch.utils.data.dataloader import default_collate


class Batch(tuple):
    """A batch fetched at once, which :func:`collate` passes on as it is instead of collating items."""


def collate(items: Any) -> Any:
    """The loaders' ``collate_fn``: a :class:`Batch` becomes the list of its tensors, as ``default_collate`` makes it
    from the items one by one; anything else (a list of items) goes to ``default_collate``."""
    return list(items) if isinstance(items, Batch) else default_collate(items)


class BatchFetch(Dataset):
    """What the project's loaders read: ``dataset`` with its batches fetched at once where it can (a
    ``TensorDataset``: one gather per tensor; a dataset with ``get_batch(indices)``: that), not item by item. For a
    batch of 1,000 rows that is one indexing instead of 1,000 item reads and a stack. DataLoader calls
    ``__getitems__`` with a batch's indices; :func:`collate` must be its ``collate_fn``. Items (``[i]``), length and
    any other attribute are the dataset's. The batches equal those that the items one by one collate to."""

    def __init__(self, dataset: Dataset):
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, index: int) -> Any:
        return self.dataset[index]

    def __getattr__(self, name: str) -> Any:
        if name == "dataset":  # not set yet (unpickling): no recursion
            raise AttributeError(name)
        return getattr(self.dataset, name)

    def __getitems__(self, indices: list[int]) -> Batch | list:
        if isinstance(self.dataset, TensorDataset):
            index = torch.as_tensor(indices, dtype=torch.long)
            return Batch(t[index] for t in self.dataset.tensors)
        batch = self.dataset.get_batch(indices) if hasattr(self.dataset, "get_batch") else None
        return Batch(batch) if batch is not None else [self.dataset[i] for i in indices]


def seed_of(*entropy: int) -> int:
    """A 63-bit seed mixed from integers (numpy's SeedSequence): nearby inputs give unrelated generators."""
    return int(np.random.SeedSequence([int(e) for e in entropy]).generate_state(1, dtype=np.uint64)[0] >> 1)


class WorkerSeededDraws:
    """For datasets that draw anew at each access (augmentation): :meth:`_draws` is a generator seeded by
    ``self.seed`` and ``tag`` in the main process, and by those and the worker's seed in a loader worker, so workers
    never repeat each other's draws and a run is reproducible for a given seed and worker count. The generator is
    made by each process for itself and never pickled."""

    seed: int
    _generator: torch.Generator | None = None
    _generator_key: int | None = None

    def _draws(self, tag: int) -> torch.Generator:
        info = get_worker_info()
        key = -1 if info is None else int(info.seed)
        if self._generator is None or self._generator_key != key:
            entropy = (self.seed, tag) if info is None else (self.seed, tag, int(info.seed))
            self._generator = torch.Generator().manual_seed(seed_of(*entropy))
            self._generator_key = key
        return self._generator

    def __getstate__(self) -> dict:
        state = dict(self.__dict__)
        state["_generator"] = state["_generator_key"] = None  # each process makes its own
        return state


class SeededRandomSampler(Sampler[int]):
    """A shuffle whose order is a function of ``(seed, epoch)`` alone.

    ``RandomSampler`` draws each epoch's order from the global RNG, so a run resumed from a checkpoint sees other
    examples than the run it continues. Under DDP :class:`ResumableSampler` deals this order to the processes, so
    the order still follows the seed kept in the checkpoint rather than whatever seed the resumed process was
    started with."""

    def __init__(self, data_source: Sized, seed: int = 0) -> None:
        self.data_source = data_source
        self.seed = seed
        self.epoch = 0

    def __len__(self) -> int:
        return len(self.data_source)

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __iter__(self) -> Iterator[int]:
        generator = torch.Generator().manual_seed(self.seed + self.epoch)
        yield from torch.randperm(len(self.data_source), generator=generator).tolist()


class ResumableSampler(DistributedSampler):
    """The training sampler: the order of ``order`` (a sampler with ``set_epoch``, e.g. :class:`SeededRandomSampler`)
    dealt to the processes of a distributed run as ``DistributedSampler`` deals (padded to a multiple of
    ``num_replicas``, then every ``num_replicas``-th index from ``rank``), and able to start an epoch part-way:
    ``skip`` indices are dropped, on the next pass only, without reading their data.

    Being a ``DistributedSampler``, Lightning neither replaces nor wraps it under DDP; the datamodule gives it the
    trainer's ``world_size`` and ``global_rank``. One process: ``num_replicas=1, rank=0``."""

    def __init__(self, order: Sampler[int], *, num_replicas: int = 1, rank: int = 0) -> None:
        super().__init__(range(len(order)), num_replicas=num_replicas, rank=rank, shuffle=False, drop_last=False)
        self.order = order
        self.skip = 0

    def __iter__(self) -> Iterator[int]:
        if callable(getattr(self.order, "set_epoch", None)):
            self.order.set_epoch(self.epoch)
        indices = list(self.order)
        padding = self.total_size - len(indices)
        if padding > 0:  # as DistributedSampler pads: repeat the start of the order
            indices += (indices * math.ceil(padding / len(indices)))[:padding]
        mine = indices[self.rank : self.total_size : self.num_replicas]
        skip, self.skip = self.skip, 0
        yield from mine[skip:]


class ResumableDataLoader(DataLoader):
    """The training loader: Lightning stores its ``state_dict`` (epoch, batches taken) in every checkpoint and
    loads it when a run resumes mid-epoch, so the resumed run reads exactly the batches the killed one had not.

    Needs a :class:`ResumableSampler` as ``sampler``. ``__iter__`` is a generator: Lightning calls ``iter()`` before
    it sets the epoch of a resumed run, and nothing (sampler order, worker seeds) is drawn until the first batch is
    asked for. The worker seeds come from a generator seeded per epoch, not from the global RNG, so iterating does
    not shift the random draws of the training step. Lightning's training loop does not prefetch from loaders with a
    length, so the batches handed out are the batches trained on."""

    def __init__(self, *args: Any, seed: int = 0, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        if not isinstance(self.sampler, ResumableSampler) or self.batch_size is None:
            raise TypeError(
                f"ResumableDataLoader needs sampler=ResumableSampler(...) and a batch_size, got "
                f"{type(self.sampler).__name__} and batch_size={self.batch_size}"
            )
        self.seed = seed
        self._taken = 0

    def __iter__(self) -> Iterator[Any]:
        self._taken = self.sampler.skip // self.batch_size
        self.generator = torch.Generator().manual_seed(self.seed + self.sampler.epoch)
        for batch in super().__iter__():
            self._taken += 1
            yield batch

    def set_epoch(self, epoch: int) -> None:
        """For hand-written loops (Lightning sets the sampler's epoch itself)."""
        self.sampler.set_epoch(epoch)

    def __getstate__(self) -> dict[str, Any]:
        # torch.Generator does not survive the pickling of ddp_spawn / spawn workers; __iter__ makes a new one
        return {**self.__dict__, "generator": None}

    def state_dict(self) -> dict[str, int]:
        return {"epoch": self.sampler.epoch, "batches": self._taken}

    def load_state_dict(self, state: dict[str, int]) -> None:
        epoch, batches = int(state["epoch"]), int(state["batches"])
        if batches >= len(self):  # saved at the end of an epoch: the next one starts from its beginning
            epoch, batches = epoch + 1, 0
        self.sampler.set_epoch(epoch)
        self.sampler.skip = batches * self.batch_size
        self._taken = batches


class _SplitsDataModule(L.LightningDataModule):
    """Subclasses fill ``self.splits`` ({"train", "val", "test"}) in ``setup`` and have ``batch_size`` and
    ``num_workers`` hyperparameters; train is shuffled (resumably, see ``ResumableDataLoader``), predict reads the
    test split. The shuffle seed is rank zero's ``torch.initial_seed()`` when training starts (so ``seed_everything``
    fixes it) and is part of the checkpoint, so a resumed run keeps the order even if started with another seed."""

    splits: dict[str, Dataset]
    _shuffle_seed: int | None = None
    drop_last_train: bool = False  # drop the short last training batch of each epoch (every batch the same size)

    def _loader(self, split: str, **kwargs) -> DataLoader:
        return DataLoader(
            BatchFetch(self.splits[split]),
            batch_size=self.hparams.batch_size,
            num_workers=self.hparams.num_workers,
            persistent_workers=self.hparams.num_workers > 0,
            collate_fn=collate,
            **kwargs,
        )

    def _train_sampler(self, seed: int) -> Sampler[int]:
        return SeededRandomSampler(self.splits["train"], seed=seed)

    def train_dataloader(self) -> DataLoader:
        if self._shuffle_seed is None:
            self._shuffle_seed = torch.initial_seed() % 2**62
            trainer = self.trainer
            if trainer is not None and trainer.world_size > 1:  # unseeded runs: every rank must shuffle alike
                self._shuffle_seed = trainer.strategy.broadcast(self._shuffle_seed, src=0)
        trainer = self.trainer
        replicas, rank = (trainer.world_size, trainer.global_rank) if trainer is not None else (1, 0)
        sampler = ResumableSampler(self._train_sampler(self._shuffle_seed), num_replicas=replicas, rank=rank)
        return ResumableDataLoader(
            BatchFetch(self.splits["train"]),
            sampler=sampler,
            batch_size=self.hparams.batch_size,
            num_workers=self.hparams.num_workers,
            persistent_workers=self.hparams.num_workers > 0,
            drop_last=self.drop_last_train,
            seed=self._shuffle_seed,
            collate_fn=collate,
        )

    def val_dataloader(self) -> DataLoader:
        return self._loader("val")

    def test_dataloader(self) -> DataLoader:
        return self._loader("test")

    def predict_dataloader(self) -> DataLoader:
        return self._loader("test")

    def state_dict(self) -> dict[str, Any]:
        return {} if self._shuffle_seed is None else {"shuffle_seed": self._shuffle_seed}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        if "shuffle_seed" in state_dict:
            self._shuffle_seed = int(state_dict["shuffle_seed"])
