"""Callbacks that work with any LightningModule and any logger."""

from reprozoo.callbacks.frobenius import FrobeniusNormMonitor
from reprozoo.callbacks.history import MetricsHistory
from reprozoo.callbacks.landscape import LossLandscape, load_landscape, random_directions
from reprozoo.callbacks.memorization import FittedExamplesMonitor
from reprozoo.callbacks.predictions import PredictionWriter
from reprozoo.callbacks.resume import RNGStateCheckpoint
from reprozoo.callbacks.sudoku import PrintSolvedSudoku
from reprozoo.callbacks.summary import MetricsSummary

__all__ = [
    "FittedExamplesMonitor",
    "FrobeniusNormMonitor",
    "LossLandscape",
    "MetricsHistory",
    "MetricsSummary",
    "PredictionWriter",
    "PrintSolvedSudoku",
    "RNGStateCheckpoint",
    "load_landscape",
    "random_directions",
]
