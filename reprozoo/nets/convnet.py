"""Conv blocks, then an MLP head: the Technion CS236781 homework ConvNet (plain and residual)."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from reprozoo._validate import check
from reprozoo.nets._registry import _check_widths, _preset, register_net
from reprozoo.nets.mlp import MLP


def _conv_bn_relu(c_in: int, c_out: int, batch_norm: bool, relu: bool = True) -> list[nn.Module]:
    # A conv followed by BatchNorm needs no bias: BN's shift replaces it.
    parts: list[nn.Module] = [nn.Conv2d(c_in, c_out, kernel_size=3, padding=1, bias=not batch_norm)]
    if batch_norm:
        parts.append(nn.BatchNorm2d(c_out))
    if relu:
        parts.append(nn.ReLU())
    return parts


class _ConvResidualBlock(nn.Module):
    """``relu(main(x) + shortcut(x))``; main = ``L`` 3x3 convs (conv -> BN -> ReLU, the last one's ReLU after the
    sum), shortcut = identity, or a 1x1 conv (+ BN) when the channel count changes."""

    def __init__(self, c_in: int, c_out: int, num_convs: int, batch_norm: bool):
        super().__init__()
        parts: list[nn.Module] = []
        for i in range(num_convs):
            parts += _conv_bn_relu(c_in if i == 0 else c_out, c_out, batch_norm, relu=i < num_convs - 1)
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
    """The conv-blocks-then-MLP classifier of the Technion CS236781 deep-learning homework (hw2's ``ConvClassifier``
    and ``ResNetClassifier``, parameterised by the experiments' ``K`` and ``L``)::

        [ [conv3x3 -> (BN) -> ReLU] * L  (K = channels[i] filters) ]  for each block i,
                with a 2x2 max-pool after every `pool_every` convs (counted across blocks)
        -> flatten -> [Linear -> ReLU -> (Dropout)] * len(hidden) -> Linear

    E.g. ``channels=(32, 64), layers_per_block=2, pool_every=2`` is ``conv32 conv32 pool conv64 conv64 pool``, the
    homework's ``K=[32, 64], L=2, P=2``. Convs keep the spatial size (padding 1); each pool halves it (floor), so
    the classifier's input is ``channels[-1] * (image_size // 2**n_pools)**2`` with
    ``n_pools = len(channels) * layers_per_block // pool_every``.

    With ``residual=True`` each block is a residual block of its ``L`` convs (``relu(main(x) + shortcut(x))``, a 1x1
    projection on the shortcut when the channel count changes). A pool cannot sit inside a residual block, so
    the pools that the count places inside a block come right after it; the number of pools, and so the
    output size, is the same as without ``residual``.

    Args:
        in_channels, image_size: the input is (B, in_channels, image_size, image_size); ``image_size`` is only used
            to size the classifier, which then fixes the input size.
        num_classes: width of the logits.
        channels: filters per block (``K``).
        layers_per_block: convs per block (``L``).
        pool_every: convs between 2x2 max-pools (``P``).
        hidden: widths of the classifier's hidden layers.
        residual: residual blocks.
        batch_norm: BatchNorm after every conv.
        dropout: drop probability after each hidden layer of the classifier (the conv layers have none).
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
        batch_norm: bool = True,
        dropout: float = 0.0,
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
        n_pools = len(blocks) * layers_per_block // pool_every
        out_size = image_size // 2**n_pools
        check(
            out_size >= 1,
            "ConvNet",
            "pool_every",
            pool_every,
            f"large enough that {n_pools} 2x2 pools leave something of a {image_size}x{image_size} image",
        )
        self.num_classes = num_classes
        self.input_shape: tuple[int, ...] = (in_channels, image_size, image_size)

        layers: list[nn.Module] = []
        c_in, convs, pools = in_channels, 0, 0
        for k in blocks:
            if residual:
                layers.append(_ConvResidualBlock(c_in, k, layers_per_block, batch_norm))
                convs += layers_per_block
                while pools < convs // pool_every:
                    layers.append(nn.MaxPool2d(2))
                    pools += 1
            else:
                for i in range(layers_per_block):
                    layers += _conv_bn_relu(c_in if i == 0 else k, k, batch_norm)
                    convs += 1
                    if convs % pool_every == 0:
                        layers.append(nn.MaxPool2d(2))
                        pools += 1
            c_in = k
        self.features = nn.Sequential(*layers)
        self.num_features = c_in * out_size**2
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
