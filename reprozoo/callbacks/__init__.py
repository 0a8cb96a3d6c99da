"""Callbacks that work with any LightningModule and any logger."""

from reprozoo.callbacks.frobenius import FrobeniusNormMonitor
from reprozoo.callbacks.landscape import LossLandscape, load_landscape, random_directions
from reprozoo.callbacks.predictions import PredictionWriter
from reprozoo.callbacks.resume import RNGStateCheckpoint
from reprozoo.callbacks.sudoku import PrintSolvedSudoku
from reprozoo.callbacks.summary import MetricsSummary

__all__ = [
    "FrobeniusNormMonitor",
    "LossLandscape",
    "MetricsSummary",
    "PredictionWriter",
    "PrintSolvedSudoku",
    "RNGStateCheckpoint",
    "load_landscape",
    "random_directions",
]
