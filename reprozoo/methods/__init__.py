"""The methods: one LightningModule a file, each reading top-down like its paper."""

from reprozoo.methods.classifier import ClassifierModule
from reprozoo.methods.distillation import DistillationModule
from reprozoo.methods.engression import EngressionRegressor
from reprozoo.methods.nca import NCAModule
from reprozoo.methods.tent import TentModule
from reprozoo.methods.tent_adapter import TentAdapter
from reprozoo.methods.trm import TRMModule

__all__ = [
    "ClassifierModule",
    "DistillationModule",
    "EngressionRegressor",
    "NCAModule",
    "TRMModule",
    "TentAdapter",
    "TentModule",
]
