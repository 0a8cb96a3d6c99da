"""LightningDataModules: real data loaders and the papers' synthetic problems."""

from reprozoo.datamodules.synthetic import SyntheticRegressionDataModule

__all__ = ["SyntheticRegressionDataModule"]
