"""Callbacks that work with any LightningModule and any logger."""

from reprozoo.callbacks.frobenius import FrobeniusNormMonitor
from reprozoo.callbacks.predictions import PredictionWriter
from reprozoo.callbacks.sudoku import PrintSolvedSudoku
from reprozoo.callbacks.summary import MetricsSummary

__all__ = ["FrobeniusNormMonitor", "MetricsSummary", "PredictionWriter", "PrintSolvedSudoku"]
