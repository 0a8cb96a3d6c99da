"""LightningDataModules: real data loaders and the papers' synthetic problems."""

from reprozoo.datamodules.sudoku import SudokuExtremeDataModule
from reprozoo.datamodules.synthetic import SyntheticRegressionDataModule

__all__ = ["SudokuExtremeDataModule", "SyntheticRegressionDataModule"]
