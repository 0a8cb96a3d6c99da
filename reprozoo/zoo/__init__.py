"""The model zoo: the weights registry and its cards (``weights/``), and classifiers by name."""

from reprozoo.zoo.classifiers import load_classifier
from reprozoo.zoo.registry import (
    WeightsEntry,
    WeightsError,
    export_checkpoint,
    get_weights,
    list_weights,
    load_model,
    register_weights,
)

__all__ = [
    "WeightsEntry",
    "WeightsError",
    "export_checkpoint",
    "get_weights",
    "list_weights",
    "load_classifier",
    "load_model",
    "register_weights",
]
