"""Classifiers by name for the methods that adapt or distil one: a module, a zoo entry, a weights file of another
project (akamaster CIFAR ResNets, RobustBench-layout WideResNets) or a RobustBench model."""

from __future__ import annotations

import warnings

import torch
from torch import nn

from reprozoo._files import WeightsError, data_path
from reprozoo.nets import create_net, list_nets, load_legacy_cifar_resnet, load_wide_resnet_checkpoint
from reprozoo.zoo.registry import is_card_path, list_weights, load_model

__all__ = ["load_classifier"]


def load_classifier(
    spec: nn.Module | str,
    *,
    robustbench_dataset: str = "cifar10",
    robustbench_threat_model: str = "corruptions",
    robustbench_dir: str | None = None,
) -> nn.Module:
    """The classifier named by ``spec``:

    * an ``nn.Module``: itself;
    * ``"robustbench:<name>"``: RobustBench model ``<name>`` (``robustbench:Standard``, the WRN-28-10 of the TENT
      example) from ``robustbench_dir`` (default ``$REPROZOO_CACHE/robustbench``), see
      :func:`reprozoo.zoo._robustbench.load_robustbench_model`;
    * a reprozoo zoo entry (``reprozoo zoo list``): its network;
    * the path of a weights file (a relative one not in the working directory is looked up under the data root,
      ``$REPROZOO_DATA``): an akamaster CIFAR ResNet (``resnet20-12fca82f.th``,
      :func:`~reprozoo.nets.load_legacy_cifar_resnet`, ImageNet input normalisation built in) or a
      RobustBench-layout WideResNet state dict (:func:`~reprozoo.nets.wide_resnet.load_wide_resnet_checkpoint`,
      no RobustBench needed);
    * a registered net name (:func:`~reprozoo.nets.list_nets`): randomly initialised, with a warning (for smoke
      tests only).
    """
    if isinstance(spec, nn.Module):
        return spec

    text = str(spec)
    if text.startswith("robustbench:"):
        from reprozoo.zoo._robustbench import load_robustbench_model

        return load_robustbench_model(
            text.removeprefix("robustbench:"), robustbench_dataset, robustbench_threat_model, robustbench_dir
        )
    if text in list_weights() or is_card_path(text):  # a zoo name, or the card of a `zoo export`
        module = load_model(text)
        return getattr(module, "net", module)
    path = data_path(text)  # a relative file name is looked up under the data root too (configs name data, not folders)
    if path.is_file():
        try:
            payload = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as err:
            raise WeightsError(f"{path} is not a readable weights file: {err}") from err
        state = payload.get("state_dict", payload) if isinstance(payload, dict) else {}
        keys = {k.removeprefix("module.").removeprefix("model.") for k in state} if isinstance(state, dict) else set()
        del payload, state
        if "linear.weight" in keys and any(k.startswith("layer1.") for k in keys):
            return load_legacy_cifar_resnet(path)
        if "block1.layer.0.conv1.weight" in keys:
            return load_wide_resnet_checkpoint(path)
        raise WeightsError(f"{path} holds neither an akamaster CIFAR ResNet nor a RobustBench WideResNet state dict")
    if text in list_nets():
        warnings.warn(
            f"load_classifier: {text!r} is a registered net name: it is randomly initialised, not trained", stacklevel=2
        )
        return create_net(text)
    if path.suffix in {".th", ".pt", ".pth"} or "/" in text:
        raise FileNotFoundError(
            f"TentModule: model weights file {path} does not exist; put the file there (a relative name is looked up "
            "in the working directory, then under the data root, $REPROZOO_DATA), or give its absolute path"
        )
    raise ValueError(
        f"TentModule: model must be an nn.Module, 'robustbench:<name>', a zoo entry, a weights file or a registered "
        f"net name, got {text!r}"
    )
