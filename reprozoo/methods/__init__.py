"""The methods: one LightningModule a file, each reading top-down like its paper."""

from reprozoo.methods.classifier import ClassifierModule
from reprozoo.methods.distillation import DistillationModule
from reprozoo.methods.engression import EngressionRegressor
from reprozoo.methods.nca import NCAModule
from reprozoo.methods.tent import TentAdapter, TentModule
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
