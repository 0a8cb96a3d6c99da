"""Methods (one module each), their networks, and the weights registry."""

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
    "load_model",
    "register_weights",
]
