"""Convs with a pool every few, then an MLP head: the Technion CS236781 homework ConvNet (plain and residual)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Literal

import torch
from torch import nn

from reprozoo._validate import check
from reprozoo.nets._registry import _check_widths, _preset, register_net
from reprozoo.nets.mlp import MLP

_POOLS = {"max": nn.MaxPool2d, "avg": nn.AvgPool2d}


def _conv_bn_relu(
    c_in: int, c_out: int, *, kernel_size: int, padding: int, batch_norm: bool, relu: bool = True
) -> list[nn.Module]:
    # A conv followed by BatchNorm needs no bias: BN's shift replaces it.
    parts: list[nn.Module] = [nn.Conv2d(c_in, c_out, kernel_size=kernel_size, padding=padding, bias=not batch_norm)]
    if batch_norm:
        parts.append(nn.BatchNorm2d(c_out))
    if relu:
        parts.append(nn.ReLU())
    return parts


class _ConvResidualBlock(nn.Module):
    """``relu(main(x) + shortcut(x))``. ``main``: the convs of ``widths`` (conv -> BN -> ReLU, the last one's ReLU
    after the sum), all ``kernel_size`` with "same" padding; with ``bottleneck`` (three or more convs, input width =
    output width) He et al. 2016's bottleneck instead: 1x1 down to a quarter of the width, the middle convs there,
    1x1 back up. ``shortcut``: identity, or a 1x1 conv (+ BN) when the width changes."""

    def __init__(self, c_in: int, widths: list[int], *, kernel_size: int, batch_norm: bool, bottleneck: bool):
        super().__init__()
        c_out, n = widths[-1], len(widths)
        if bottleneck and n >= 3 and c_in == c_out:
            inner = max(1, c_out // 4)
            kernels = [1] + [kernel_size] * (n - 2) + [1]
            widths = [inner] * (n - 1) + [c_out]
        else:
            kernels = [kernel_size] * n
        parts: list[nn.Module] = []
        c = c_in
        for i, (w, k) in enumerate(zip(widths, kernels)):
            parts += _conv_bn_relu(c, w, kernel_size=k, padding=k // 2, batch_norm=batch_norm, relu=i < n - 1)
            c = w
        self.main = nn.Sequential(*parts)
        if c_in == c_out:
            self.shortcut: nn.Module = nn.Identity()
        else:
            proj: list[nn.Module] = [nn.Conv2d(c_in, c_out, kernel_size=1, bias=not batch_norm)]
            if batch_norm:
                proj.append(nn.BatchNorm2d(c_out))
            self.shortcut = nn.Sequential(*proj)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (B, c_in, H, W) -> (B, c_out, H, W)
        return torch.relu(self.main(x) + self.shortcut(x))


class ConvNet(nn.Module):
    """The convolutional classifier of the Technion CS236781 deep-learning homework (hw2's ``ConvClassifier`` and
    ``ResNetClassifier``, parameterised by its experiments' ``K``, ``L`` and ``P``)::

        convs:  K = channels, each width repeated L = layers_per_block times: N = len(channels) * L convs
        plain:     [ (conv -> (BN) -> ReLU) * P -> pool ] * (N // P)  -> the N % P convs left, without a pool
        residual:  [ residual block of P convs     -> pool ] * (N // P)  -> a block of the N % P convs left
        -> flatten -> [Linear -> ReLU -> (Dropout)] * len(hidden) -> Linear

    E.g. ``channels=(32, 64), layers_per_block=2, pool_every=2`` is ``conv32 conv32 pool conv64 conv64 pool``, the
    homework's ``K=[32, 64], L=2, P=2``. Each conv has ``kernel_size`` and ``padding`` (stride 1), so a conv maps a
    side ``s`` to ``s + 2 * padding - kernel_size + 1``; each 2x2 pool (``"max"`` or ``"avg"``) halves it (floor).
    The classifier's input size follows from ``image_size``.

    Residual blocks (``residual=True``) group the convs ``P`` at a time, as the homework does: ``relu(main(x) +
    shortcut(x))`` with a 1x1 projection on the shortcut when the width changes. Their convs keep the size ("same"
    padding), so they need an odd ``kernel_size`` and ``padding`` left at None. ``bottleneck=True`` makes every block
    of three or more convs whose input and output widths match a bottleneck block (He et al. 2016): 1x1 down to a
    quarter of the width, the inner convs at that width, 1x1 back up.

    Args:
        in_channels, image_size: the input is (B, in_channels, image_size, image_size); ``image_size`` is only used
            to size the classifier, which then fixes the input size.
        num_classes: width of the logits.
        channels: filters per block (``K``).
        layers_per_block: convs per width (``L``).
        pool_every: convs between 2x2 pools (``P``).
        hidden: widths of the classifier's hidden layers.
        residual: residual blocks; bottleneck: bottleneck residual blocks where they fit (see above).
        batch_norm: BatchNorm after every conv.
        dropout: drop probability after each hidden layer of the classifier (the conv layers have none).
        kernel_size, padding: of every conv (stride 1); ``padding=None`` is ``kernel_size // 2`` ("same" for odd
            kernels). The study's plain CNNs use kernel 2 with padding 1, which grows the side by one per conv.
        pool: ``"max"`` or ``"avg"`` 2x2 pooling.
    """

    def __init__(
        self,
        in_channels: int = 3,
        num_classes: int = 10,
        channels: Sequence[int] = (32, 64),
        layers_per_block: int = 2,
        pool_every: int = 2,
        hidden: Sequence[int] = (100,),
        residual: bool = False,
        bottleneck: bool = False,
        batch_norm: bool = True,
        dropout: float = 0.0,
        kernel_size: int = 3,
        padding: int | None = None,
        pool: Literal["max", "avg"] = "max",
        image_size: int = 32,
    ):
        super().__init__()
        check(in_channels >= 1, "ConvNet", "in_channels", in_channels, ">= 1")
        check(num_classes >= 1, "ConvNet", "num_classes", num_classes, ">= 1")
        blocks = _check_widths("ConvNet", "channels", channels)
        check(len(blocks) >= 1, "ConvNet", "channels", list(channels), "non-empty")
        check(layers_per_block >= 1, "ConvNet", "layers_per_block", layers_per_block, ">= 1")
        check(pool_every >= 1, "ConvNet", "pool_every", pool_every, ">= 1")
        check(image_size >= 1, "ConvNet", "image_size", image_size, ">= 1")
        check(kernel_size >= 1, "ConvNet", "kernel_size", kernel_size, ">= 1")
        check(padding is None or padding >= 0, "ConvNet", "padding", padding, "None or >= 0")
        check(pool in _POOLS, "ConvNet", "pool", pool, "'max' or 'avg'")
        check(not bottleneck or residual, "ConvNet", "bottleneck", bottleneck, "False unless residual=True")
        check(
            not residual or (kernel_size % 2 == 1 and padding in (None, kernel_size // 2)),
            "ConvNet",
            "kernel_size",
            kernel_size,
            "odd, with padding None, for residual blocks (their convs must keep the size)",
        )
        pad = kernel_size // 2 if padding is None else padding
        self.num_classes = num_classes
        self.input_shape: tuple[int, ...] = (in_channels, image_size, image_size)

        widths = [k for k in blocks for _ in range(layers_per_block)]  # (N,) the homework's `channels`
        groups = [widths[i : i + pool_every] for i in range(0, len(widths), pool_every)]
        layers: list[nn.Module] = []
        c_in, side = in_channels, image_size
        for group in groups:
            if residual:
                layers.append(
                    _ConvResidualBlock(
                        c_in, group, kernel_size=kernel_size, batch_norm=batch_norm, bottleneck=bottleneck
                    )
                )
            else:
                for i, w in enumerate(group):
                    layers += _conv_bn_relu(
                        c_in if i == 0 else group[i - 1], w, kernel_size=kernel_size, padding=pad, batch_norm=batch_norm
                    )
            side += len(group) * (2 * pad - kernel_size + 1)
            check(side >= 1, "ConvNet", "kernel_size", kernel_size, f"small enough for padding {pad} to leave a side")
            if len(group) == pool_every:
                layers.append(_POOLS[pool](2))
                side //= 2
                check(
                    side >= 1,
                    "ConvNet",
                    "pool_every",
                    pool_every,
                    f"large enough that its 2x2 pools leave something of a {image_size}x{image_size} image",
                )
            c_in = group[-1]
        self.features = nn.Sequential(*layers)
        self.num_features = c_in * side**2
        self.classifier = MLP(self.num_features, num_classes, hidden, activation="relu", dropout=dropout)

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        return self.features(x).flatten(1)  # (B, C, H, W) -> (B, K_last * h * w)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.forward_features(x))  # (B, num_classes)


@register_net
def convnet(**kwargs) -> ConvNet:
    """ConvNet with its defaults: conv32 conv32 pool conv64 conv64 pool, FC 100, 10 classes, 32x32 RGB."""
    return ConvNet(**kwargs)


@register_net
def convnet_residual(**kwargs) -> ConvNet:
    """ConvNet's defaults with residual blocks."""
    return ConvNet(**_preset(dict(residual=True), kwargs))
