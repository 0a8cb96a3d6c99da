"""The model zoo: the weights registry and its cards (``weights/``), exports, torch.hub entry points, and
classifiers by name."""

from pathlib import Path

from reprozoo.zoo.classifiers import load_classifier
from reprozoo.zoo.export import export_checkpoint, export_entry, upgrade_checkpoint
from reprozoo.zoo.registry import (
    WeightsEntry,
    WeightsError,
    get_weights,
    list_weights,
    load_model,
    register_weights,
)

# A folder holding a hubconf.py, in a checkout and in an installed package alike:
# torch.hub.load(HUB_DIR, "<entry>", source="local").
HUB_DIR = str(Path(__file__).parent)

__all__ = [
    "HUB_DIR",
    "WeightsEntry",
    "WeightsError",
    "export_checkpoint",
    "export_entry",
    "get_weights",
    "list_weights",
    "load_classifier",
    "load_model",
    "register_weights",
    "upgrade_checkpoint",
]
