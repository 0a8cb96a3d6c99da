"""Callbacks that work with any LightningModule and any logger."""

from reprozoo.callbacks.summary import MetricsSummary

__all__ = ["MetricsSummary"]
