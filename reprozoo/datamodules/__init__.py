"""LightningDataModules: real data loaders and the papers' synthetic problems."""

from reprozoo.datamodules._base import ResumableDataLoader, ResumableSampler, SeededRandomSampler
from reprozoo.datamodules.animal_faces import AnimalFacesDataModule
from reprozoo.datamodules.cifar10 import CIFAR10DataModule
from reprozoo.datamodules.cifar10c import CIFAR10CDataModule
from reprozoo.datamodules.fashion_mnist import FashionMNISTDataModule, TransferSetMNISTDataModule
from reprozoo.datamodules.rings import ConcentricRingsDataModule
from reprozoo.datamodules.sudoku import SudokuExtremeDataModule
from reprozoo.datamodules.synthetic import SyntheticRegressionDataModule

__all__ = [
    "AnimalFacesDataModule",
    "CIFAR10DataModule",
    "CIFAR10CDataModule",
    "ConcentricRingsDataModule",
    "FashionMNISTDataModule",
    "TransferSetMNISTDataModule",
    "ResumableDataLoader",
    "ResumableSampler",
    "SeededRandomSampler",
    "SudokuExtremeDataModule",
    "SyntheticRegressionDataModule",
]
