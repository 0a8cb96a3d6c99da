"""What every datamodule of the project shares: named splits built in ``setup`` and one way to load them."""

from __future__ import annotations

import lightning as L
from torch.utils.data import DataLoader, Dataset


class _SplitsDataModule(L.LightningDataModule):
    """Subclasses fill ``self.splits`` ({"train", "val", "test"}) in ``setup`` and have ``batch_size`` and
    ``num_workers`` hyperparameters; train is shuffled, predict reads the test split."""

    splits: dict[str, Dataset]

    def _loader(self, split: str, **kwargs) -> DataLoader:
        return DataLoader(
            self.splits[split],
            batch_size=self.hparams.batch_size,
            num_workers=self.hparams.num_workers,
            persistent_workers=self.hparams.num_workers > 0,
            **kwargs,
        )

    def train_dataloader(self) -> DataLoader:
        return self._loader("train", shuffle=True)

    def val_dataloader(self) -> DataLoader:
        return self._loader("val")

    def test_dataloader(self) -> DataLoader:
        return self._loader("test")

    def predict_dataloader(self) -> DataLoader:
        return self._loader("test")
