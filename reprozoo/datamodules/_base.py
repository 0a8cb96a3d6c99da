"""What every datamodule of the project shares: named splits built in ``setup``, one way to load them, and a
training loader that resumes exactly where a checkpoint left it."""

from __future__ import annotations

from collections.abc import Iterator, Sized
from typing import Any

import lightning as L
import torch
from lightning.fabric.utilities.distributed import DistributedSamplerWrapper
from torch.utils.data import BatchSampler, DataLoader, Dataset, Sampler


class SeededRandomSampler(Sampler[int]):
    """A shuffle whose order is a function of ``(seed, epoch)`` alone.

    ``RandomSampler`` draws each epoch's order from the global RNG, so a run resumed from a checkpoint sees other
    examples than the run it continues. Under DDP Lightning wraps this sampler in a ``DistributedSamplerWrapper``
    (each process takes its share of this order, ``set_epoch`` is passed on), so the order still follows the seed
    kept in the checkpoint rather than whatever seed the resumed process was started with."""

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


class ResumableBatchSampler(BatchSampler):
    """A ``BatchSampler`` that can start an epoch part-way: ``skip`` index batches are dropped (no data is read for
    them) on the next pass only. Its epoch is the wrapped sampler's (ours, or Lightning's DDP wrapper of ours)."""

    def __init__(self, sampler: Sampler[int], batch_size: int, drop_last: bool) -> None:
        super().__init__(sampler, batch_size, drop_last)
        if isinstance(sampler, DistributedSamplerWrapper):
            # Lightning wraps our sampler for DDP with shuffle=True, which re-permutes our order with the global seed
            # of the (possibly resumed) process; our sampler already shuffles, by the seed kept in the checkpoint.
            sampler.shuffle = False
        self._epoch = 0
        self.skip = 0

    @property
    def epoch(self) -> int:
        # Lightning calls set_epoch on the sampler (not on the batch sampler): the sampler's epoch is the truth
        return int(getattr(self.sampler, "epoch", self._epoch))

    def set_epoch(self, epoch: int) -> None:
        self._epoch = epoch
        if callable(getattr(self.sampler, "set_epoch", None)):
            self.sampler.set_epoch(epoch)

    def __iter__(self) -> Iterator[list[int]]:
        skip, self.skip = self.skip, 0
        for i, batch in enumerate(super().__iter__()):
            if i >= skip:
                yield batch


class ResumableDataLoader(DataLoader):
    """The training loader: Lightning stores its ``state_dict`` (epoch, batches taken) in every checkpoint and
    loads it when a run resumes mid-epoch, so the resumed run reads exactly the batches the killed one had not.

    Needs a ``ResumableBatchSampler``. ``__iter__`` is a generator: Lightning calls ``iter()`` before it sets the
    epoch of a resumed run, and nothing (sampler order, worker seeds) is drawn until the first batch is asked for.
    The worker seeds come from a generator seeded per epoch, not from the global RNG, so iterating does not
    shift the random draws of the training step. Lightning's training loop does not prefetch from loaders with a
    length, so the batches handed out are the batches trained on."""

    def __init__(self, *args: Any, seed: int = 0, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        if not isinstance(self.batch_sampler, ResumableBatchSampler):
            raise TypeError(
                f"ResumableDataLoader needs a ResumableBatchSampler, got {type(self.batch_sampler).__name__}"
            )
        # With a batch_sampler, DataLoader sets `sampler` to a SequentialSampler that is never used. Lightning reads
        # `sampler` to build the DDP sampler and to set the epoch: it must see ours, to wrap it
        # (DistributedSamplerWrapper) rather than replace it. (DataLoader forbids setting it after __init__.)
        object.__setattr__(self, "sampler", self.batch_sampler.sampler)
        self.seed = seed
        self._taken = 0

    def __iter__(self) -> Iterator[Any]:
        batch_sampler = self.batch_sampler
        self._taken = batch_sampler.skip
        self.generator = torch.Generator().manual_seed(self.seed + batch_sampler.epoch)
        for batch in super().__iter__():
            self._taken += 1
            yield batch

    def set_epoch(self, epoch: int) -> None:
        """For hand-written loops (Lightning sets the sampler's epoch itself)."""
        self.batch_sampler.set_epoch(epoch)

    def __getstate__(self) -> dict[str, Any]:
        # torch.Generator does not survive the pickling of ddp_spawn / spawn workers; __iter__ makes a new one
        return {**self.__dict__, "generator": None}

    def state_dict(self) -> dict[str, int]:
        return {"epoch": self.batch_sampler.epoch, "batches": self._taken}

    def load_state_dict(self, state: dict[str, int]) -> None:
        epoch, batches = int(state["epoch"]), int(state["batches"])
        if batches >= len(self):  # saved at the end of an epoch: the next one starts from its beginning
            epoch, batches = epoch + 1, 0
        self.batch_sampler.set_epoch(epoch)
        self.batch_sampler.skip = batches
        self._taken = batches


class _SplitsDataModule(L.LightningDataModule):
    """Subclasses fill ``self.splits`` ({"train", "val", "test"}) in ``setup`` and have ``batch_size`` and
    ``num_workers`` hyperparameters; train is shuffled (resumably, see ``ResumableDataLoader``), predict reads the
    test split. The shuffle seed is rank zero's ``torch.initial_seed()`` when training starts (so ``seed_everything``
    fixes it) and is part of the checkpoint, so a resumed run keeps the order even if started with another seed."""

    splits: dict[str, Dataset]
    _shuffle_seed: int | None = None

    def _loader(self, split: str, **kwargs) -> DataLoader:
        return DataLoader(
            self.splits[split],
            batch_size=self.hparams.batch_size,
            num_workers=self.hparams.num_workers,
            persistent_workers=self.hparams.num_workers > 0,
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
        sampler = self._train_sampler(self._shuffle_seed)
        return ResumableDataLoader(
            self.splits["train"],
            batch_sampler=ResumableBatchSampler(sampler, self.hparams.batch_size, drop_last=False),
            num_workers=self.hparams.num_workers,
            persistent_workers=self.hparams.num_workers > 0,
            seed=self._shuffle_seed,
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
