"""Wide residual networks (Zagoruyko & Komodakis 2016) laid out as RobustBench's CIFAR ``WideResNet``.

RobustBench's default CIFAR-10 model, ``Standard`` (the model of the TENT paper's CIFAR-10-C example), is a
WRN-28-10 trained on clean CIFAR-10 with inputs in [0, 1] and no input normalisation. Its checkpoints are state dicts
whose keys this module reproduces exactly, so they load strictly here without RobustBench installed
(:func:`load_wide_resnet_checkpoint`). The key names were checked against RobustBench 1.1.1,
``robustbench/model_zoo/architectures/wide_resnet.py`` (itself after yaodongyu/TRADES)::

    conv1.weight
    block{1,2,3}.layer.{i}.bn1.*, .conv1.weight, .bn2.*, .conv2.weight, (.convShortcut.weight: first unit of a
        stage whose width changes)
    bn1.*            (the final BatchNorm, before global average pooling)
    fc.weight, fc.bias

The block is pre-activation (BN -> ReLU -> conv, twice). RobustBench's block has one quirk kept here because the
weights were trained with it: in a unit whose width changes, the 1x1 projection shortcut takes the *activated*
input ``relu(bn1(x))``, not ``x``; in the other units the shortcut is the identity on ``x``. WRN-28-10 has
36,479,194 parameters.
"""

from __future__ import annotations

import os

import torch
import torch.nn.functional as F
from torch import nn

from reprozoo._files import WeightsError
from reprozoo._validate import check

__all__ = ["WideResNet", "load_wide_resnet_checkpoint", "wide_resnet28_10"]


class _WideUnit(nn.Module):
    """One pre-activation residual unit: ``bn1 -> relu -> conv1 (stride) -> bn2 -> relu -> (dropout) -> conv2``
    plus the shortcut (identity, or ``convShortcut`` 1x1 on the activated input when the width changes)."""

    def __init__(self, c_in: int, c_out: int, stride: int, dropout: float):
        super().__init__()
        self.bn1 = nn.BatchNorm2d(c_in)
        self.conv1 = nn.Conv2d(c_in, c_out, kernel_size=3, stride=stride, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(c_out)
        self.conv2 = nn.Conv2d(c_out, c_out, kernel_size=3, stride=1, padding=1, bias=False)
        self.dropout = dropout
        # RobustBench projects only when the width changes (a stride-2 unit of equal width would have no shortcut
        # projection there either; WRNs never have one).
        self.convShortcut = None if c_in == c_out else nn.Conv2d(c_in, c_out, kernel_size=1, stride=stride, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        act = F.relu(self.bn1(x))
        out = F.relu(self.bn2(self.conv1(act)))
        if self.dropout > 0:
            out = F.dropout(out, p=self.dropout, training=self.training)
        out = self.conv2(out)
        shortcut = x if self.convShortcut is None else self.convShortcut(act)
        return shortcut + out


class _WideStage(nn.Module):
    """``n`` units in ``self.layer`` (the attribute name is part of the checkpoint keys)."""

    def __init__(self, n: int, c_in: int, c_out: int, stride: int, dropout: float):
        super().__init__()
        self.layer = nn.Sequential(
            *(_WideUnit(c_in if i == 0 else c_out, c_out, stride if i == 0 else 1, dropout) for i in range(n))
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.layer(x)


class WideResNet(nn.Module):
    """WRN-``depth``-``widen_factor`` for 32x32 images: a 3x3 conv with 16 filters, three stages of
    ``n = (depth - 4) / 6`` pre-activation units with ``16 k``, ``32 k`` and ``64 k`` filters (the 2nd and 3rd start
    with stride 2), BN, ReLU, global average pooling and a linear head.

    Interface of :mod:`reprozoo.nets`: ``num_classes``, ``input_shape`` (3, 32, 32), ``num_features``
    (``64 k``), ``forward_features`` and ``forward``. Inputs are used as given (RobustBench's models take [0, 1]
    images, no normalisation).

    Args:
        depth: ``6 n + 4`` (16, 22, 28, 34, 40, ...).
        widen_factor: ``k``.
        num_classes: width of the logits.
        dropout: drop probability between the two convs of each unit (0 in RobustBench's ``Standard``).
        bias_last: the head has a bias (RobustBench's default).
    """

    def __init__(
        self,
        depth: int = 28,
        widen_factor: int = 10,
        num_classes: int = 10,
        dropout: float = 0.0,
        bias_last: bool = True,
    ):
        super().__init__()
        check(
            depth >= 10 and (depth - 4) % 6 == 0,
            "WideResNet",
            "depth",
            depth,
            "6 n + 4 with n >= 1 (16, 22, 28, 34, 40, ...)",
        )
        check(
            isinstance(widen_factor, int) and widen_factor >= 1,
            "WideResNet",
            "widen_factor",
            widen_factor,
            "an integer >= 1",
        )
        check(num_classes >= 1, "WideResNet", "num_classes", num_classes, ">= 1")
        check(0 <= dropout < 1, "WideResNet", "dropout", dropout, "in [0, 1)")
        n = (depth - 4) // 6
        widths = [16, 16 * widen_factor, 32 * widen_factor, 64 * widen_factor]
        self.depth, self.widen_factor, self.num_classes = depth, widen_factor, num_classes
        self.input_shape: tuple[int, ...] = (3, 32, 32)
        self.num_features = widths[3]
        self.conv1 = nn.Conv2d(3, widths[0], kernel_size=3, stride=1, padding=1, bias=False)
        self.block1 = _WideStage(n, widths[0], widths[1], 1, dropout)
        self.block2 = _WideStage(n, widths[1], widths[2], 2, dropout)
        self.block3 = _WideStage(n, widths[2], widths[3], 2, dropout)
        self.bn1 = nn.BatchNorm2d(widths[3])
        self.fc = nn.Linear(widths[3], num_classes, bias=bias_last)
        for module in self.modules():
            if isinstance(module, nn.Conv2d):
                nn.init.kaiming_normal_(module.weight, mode="fan_out", nonlinearity="relu")  # N(0, 2 / (k*k*c_out))
            elif isinstance(module, nn.Linear) and module.bias is not None:
                nn.init.zeros_(module.bias)

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        x = self.block3(self.block2(self.block1(self.conv1(x))))  # (B, 64k, 8, 8) for 32x32 inputs
        x = F.relu(self.bn1(x))
        return x.mean(dim=(2, 3))  # (B, 64k): global average pooling

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.forward_features(x))  # (B, num_classes)


def wide_resnet28_10(**kwargs) -> WideResNet:
    """WRN-28-10 (36.5M parameters), the architecture of RobustBench's CIFAR-10 ``Standard`` model."""
    return WideResNet(**{"depth": 28, "widen_factor": 10, **kwargs})


def load_wide_resnet_checkpoint(path: str | os.PathLike) -> WideResNet:
    """A :class:`WideResNet` with the weights of a RobustBench-layout checkpoint (e.g. ``<model_dir>/cifar10/
    corruptions/Standard.pt``: a state dict, or ``{"state_dict": ...}``, keys possibly prefixed ``module.`` or
    ``model.``), in eval mode. Depth, width, classes and head bias are read from the weights; loading is strict and
    the file is read with ``weights_only=True``. Problems raise :class:`~reprozoo.zoo.registry.WeightsError`."""
    try:
        payload = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:
        raise WeightsError(f"{path} is not a readable WideResNet weights file: {err}") from err
    state = payload.get("state_dict", payload) if isinstance(payload, dict) else None
    if not isinstance(state, dict):
        raise WeightsError(f"{path} does not hold a state dict")
    state = {_strip(k): v for k, v in state.items()}
    if "block1.layer.0.conv1.weight" not in state or "fc.weight" not in state:
        raise WeightsError(
            f"{path} does not hold a RobustBench WideResNet state dict (no 'block1.layer.0.conv1.weight')"
        )
    n = len({k.split(".")[2] for k in state if k.startswith("block1.layer.")})
    widen_factor = state["block1.layer.0.conv1.weight"].shape[0] // 16
    model = WideResNet(6 * n + 4, widen_factor, num_classes=state["fc.weight"].shape[0], bias_last="fc.bias" in state)
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as err:
        arch = f"WideResNet(depth={6 * n + 4}, widen_factor={widen_factor})"
        raise WeightsError(f"{path} does not fit {arch}: {err}") from err
    return model.eval()


def _strip(key: str) -> str:
    for prefix in ("module.", "model."):
        key = key.removeprefix(prefix)
    return key
