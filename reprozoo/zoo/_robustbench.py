"""RobustBench (robustbench 1.1.1 from PyPI) behind a small import shim, and offline loading of its models.

``import robustbench`` (1.1.1) fails in a fresh environment for two reasons, both outside our control:

* ``robustbench/eval.py`` does ``from autoattack import AutoAttack`` and ``from autoattack.state import ...``, but
  the AutoAttack that PyPI ships (``pyautoattack``, which robustbench 1.1.1 itself requires) installs as the module
  ``pyautoattack``; ``autoattack`` is the name of the GitHub-only package (fra31/auto-attack);
* ``robustbench/loaders.py`` does ``import pkg_resources``, which setuptools removed in version 81.

:func:`import_robustbench` imports it with, *only for the duration of that import and only where the real module is
missing*, ``autoattack`` (and its submodules) aliased to ``pyautoattack`` and a minimal ``pkg_resources`` holding the
one function robustbench calls (``resource_filename``, used for ImageNet file lists). Nothing is left in
``sys.modules`` afterwards except robustbench's own modules. ``pip install "setuptools<81"`` is not needed.

Install: ``pip install "robustbench==1.1.1"`` (brings ``pyautoattack``, ``timm==1.0.9``, ``gdown`` and others).
"""

from __future__ import annotations

import importlib
import importlib.util
import os
import sys
import types
import warnings
from pathlib import Path
from typing import Literal

from torch import nn

from reprozoo import _files
from reprozoo.zoo.registry import WeightsError

__all__ = ["PIP_INSTALL", "import_robustbench", "load_robustbench_model", "robustbench_checkpoint_path"]

PIP_INSTALL = 'pip install "robustbench==1.1.1"'


def _pkg_resources_stub() -> types.ModuleType:
    stub = types.ModuleType("pkg_resources")
    stub.__doc__ = "reprozoo's stand-in for the one pkg_resources function robustbench 1.1.1 calls."

    def resource_filename(package_or_requirement: str, resource_name: str) -> str:
        # pkg_resources resolves a resource next to the module (or inside the package) named by its first argument.
        module = importlib.import_module(package_or_requirement)
        return str(Path(module.__file__).parent / resource_name)

    stub.resource_filename = resource_filename
    return stub


def import_robustbench() -> types.ModuleType:
    """``robustbench`` imported through the shim above; an ImportError naming the pip command if it is not installed."""
    if "robustbench" in sys.modules and hasattr(sys.modules["robustbench"], "load_model"):
        return sys.modules["robustbench"]
    if importlib.util.find_spec("robustbench") is None:
        raise ImportError(f"robustbench is not installed: {PIP_INSTALL}")
    added: list[str] = []
    try:
        if importlib.util.find_spec("autoattack") is None:
            if importlib.util.find_spec("pyautoattack") is None:
                raise ImportError(f"robustbench needs AutoAttack, which PyPI ships as pyautoattack: {PIP_INSTALL}")
            importlib.import_module("pyautoattack")
            importlib.import_module("pyautoattack.state")
            for name, module in list(sys.modules.items()):
                if name == "pyautoattack" or name.startswith("pyautoattack."):
                    alias = "autoattack" + name.removeprefix("pyautoattack")
                    if alias not in sys.modules:
                        sys.modules[alias] = module
                        added.append(alias)
        if importlib.util.find_spec("pkg_resources") is None:
            sys.modules["pkg_resources"] = _pkg_resources_stub()
            added.append("pkg_resources")
        with warnings.catch_warnings():
            # pkg_resources' deprecation notice and torch's torch.jit.interface FutureWarning, raised by its imports.
            warnings.simplefilter("ignore", DeprecationWarning)
            warnings.simplefilter("ignore", FutureWarning)
            warnings.filterwarnings("ignore", message=".*pkg_resources is deprecated.*")
            robustbench = importlib.import_module("robustbench")
            importlib.import_module("robustbench.utils")
    except ImportError as err:
        raise ImportError(f"robustbench could not be imported ({err}); install it with: {PIP_INSTALL}") from err
    finally:
        for alias in added:  # robustbench's modules keep their references; the global names go
            sys.modules.pop(alias, None)
    return robustbench


def robustbench_checkpoint_path(
    name: str, dataset: str = "cifar10", threat_model: str = "corruptions", model_dir: str | os.PathLike | None = None
) -> Path:
    """Where ``robustbench.utils.load_model`` looks for (and downloads) a checkpoint:
    ``<model_dir>/<dataset>/<threat_model>/<name>.pt``; ``model_dir`` defaults to ``$REPROZOO_CACHE/robustbench``."""
    root = Path(model_dir) if model_dir is not None else _files.cache_dir() / "robustbench"
    return root / dataset / threat_model / f"{name}.pt"


def load_robustbench_model(
    name: str,
    dataset: Literal["cifar10", "cifar100", "imagenet"] = "cifar10",
    threat_model: Literal["corruptions", "Linf", "L2"] = "corruptions",
    model_dir: str | os.PathLike | None = None,
    *,
    offline: bool | None = None,
) -> nn.Module:
    """RobustBench model ``name`` (e.g. ``"Standard"``, the WRN-28-10 of the TENT example) through
    ``robustbench.utils.load_model``, in eval mode.

    The checkpoint is read from :func:`robustbench_checkpoint_path` when it is there (no network). When it is
    missing, RobustBench downloads it (Google Drive), unless offline (``offline=True`` or ``REPROZOO_OFFLINE=1``),
    where a :class:`~reprozoo.zoo.registry.WeightsError` says where to put the file. Models that RobustBench serves
    through timm are not supported offline here. A ``Standard``-layout file also loads without RobustBench:
    :func:`reprozoo.nets.wide_resnet.load_wide_resnet_checkpoint`.
    """
    path = robustbench_checkpoint_path(name, dataset, threat_model, model_dir)
    offline = _files.offline() if offline is None else offline
    if offline and not path.is_file():
        raise WeightsError(
            f"robustbench model {name!r} ({dataset}, {threat_model}) is not in the cache and offline mode is on "
            f"(REPROZOO_OFFLINE / offline=True): place its checkpoint at {path}"
        )
    robustbench = import_robustbench()
    try:
        model = robustbench.utils.load_model(
            name, model_dir=str(path.parents[2]), dataset=dataset, threat_model=threat_model
        )
    except KeyError:
        raise WeightsError(f"robustbench knows no model {name!r} for {dataset} / {threat_model}") from None
    except ValueError as err:  # an unknown dataset or threat model name
        raise WeightsError(f"robustbench model {name!r}: {err}") from err
    return model.eval()
