"""Classification networks that the experiments share, timm-style: one skeleton per model, one registry.

Every network here is an ``nn.Module`` with keyword hyperparameters (so a config can build it by ``class_path``)
and the same small interface:

* ``num_classes``: width of the logits; ``input_shape``: the shape of one input item, e.g. ``(3, 32, 32)``;
  ``num_features``: width of what ``forward_features`` returns.
* ``forward(x) -> (B, num_classes)`` logits and ``forward_features(x) -> (B, num_features)``, the representation
  just before the classifier (what a head, e.g. engression's ``backbone=``, sits on).

Named presets are registered with :func:`register_net` and built with :func:`create_net` (``create_net("resnet20")``,
``create_net("animalnet", dropout=0.5)``: keyword arguments override the preset). :func:`list_nets` lists them.

Models:

* :class:`MLP`, with presets ``animalnet`` and ``biganimalnet`` (the Neuromatch Academy regularization tutorial,
  W2D1) and ``mlp_fmnist`` (784-392-196-10).
* :class:`ConvNet`: the conv-blocks-then-MLP pattern of the Technion CS236781 deep-learning homework
  (``convnet``, ``convnet_residual``).
* :class:`CifarResNet`: He et al. 2016's CIFAR ResNets (``resnet20/32/44/56``), laid out as
  akamaster/pytorch_resnet_cifar10 so its published weights load: see :func:`load_legacy_cifar_resnet`.
"""

from __future__ import annotations

import fnmatch
import os
from collections import OrderedDict
from collections.abc import Callable, Sequence
from typing import Literal

import torch
from torch import nn

from reprozoo.zoo.registry import WeightsError

__all__ = [
    "CifarResNet",
    "ConvNet",
    "MLP",
    "create_net",
    "list_nets",
    "load_legacy_cifar_resnet",
    "register_net",
]

Activation = Literal["relu", "gelu", "tanh", "leaky_relu", "elu"]
Norm = Literal["batch", "layer"]

_ACTIVATIONS: dict[str, Callable[[], nn.Module]] = {
    "relu": nn.ReLU,
    "gelu": nn.GELU,
    "tanh": nn.Tanh,
    "leaky_relu": nn.LeakyReLU,  # slope 0.01, F.leaky_relu's default, which the tutorial's BigAnimalNet uses
    "elu": nn.ELU,
}
_NORMS: dict[str, Callable[[int], nn.Module]] = {"batch": nn.BatchNorm1d, "layer": nn.LayerNorm}

# The ImageNet statistics that the akamaster CIFAR ResNet weights were trained with (not CIFAR's own).
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


# ------------------------------------------------------------------------------------------------------- registry

_NETS: dict[str, Callable[..., nn.Module]] = {}


def register_net(fn: Callable[..., nn.Module]) -> Callable[..., nn.Module]:
    """Decorator: register a builder under its function name. It must build with no arguments (the registry's
    generated tests do exactly that) and accept keyword overrides."""
    name = fn.__name__
    if name in _NETS:
        raise ValueError(f"register_net: a net named {name!r} is already registered")
    _NETS[name] = fn
    return fn


def list_nets(pattern: str | None = None) -> list[str]:
    """Sorted names of the registered nets, optionally only those matching a shell-style ``pattern`` (``resnet*``)."""
    names = sorted(_NETS)
    return [n for n in names if fnmatch.fnmatchcase(n, pattern)] if pattern else names


def create_net(name: str, **kwargs) -> nn.Module:
    """Build the registered net ``name``; ``kwargs`` override its preset hyperparameters."""
    try:
        builder = _NETS[name]
    except KeyError:
        raise ValueError(f"create_net: no net named {name!r}; registered: {', '.join(list_nets())}") from None
    return builder(**kwargs)


def _preset(defaults: dict, overrides: dict) -> dict:
    return {**defaults, **overrides}


def _check(ok: bool, owner: str, field: str, value, requirement: str) -> None:
    if not ok:
        raise ValueError(f"{owner}: {field} must be {requirement}, got {value!r}")


def _check_widths(owner: str, field: str, widths: Sequence[int]) -> list[int]:
    widths = list(widths)
    _check(
        all(isinstance(w, int) and not isinstance(w, bool) and w >= 1 for w in widths),
        owner,
        field,
        widths,
        "a sequence of integers >= 1",
    )
    return widths


# ------------------------------------------------------------------------------------------------------- MLP


class MLP(nn.Module):
    """Fully connected classifier: flatten, then per hidden layer ``Linear -> norm -> activation -> dropout``, then a
    linear head.

    Args:
        in_features: size of one flattened input item (``3 * 32 * 32`` for a 32x32 RGB image).
        num_classes: width of the logits.
        hidden: widths of the hidden layers; ``()`` is multinomial logistic regression.
        activation: nonlinearity after each hidden layer's norm.
        dropout: drop probability after each hidden activation (not before the head: only hidden units drop).
        input_dropout: drop probability on the input itself (the dropout paper drops inputs at a lower rate, ~0.2).
        norm: ``"batch"`` (BatchNorm1d) or ``"layer"`` (LayerNorm) between each hidden Linear and its activation.
        max_norm: Hinton et al. (2012) / Srivastava et al. (2014) max-norm constraint: the incoming weight vector of
            every hidden unit (a row of a hidden Linear's weight) is kept at L2 norm <= ``max_norm`` by rescaling it
            after each optimizer step. Only hidden units are constrained, not the head. ``apply_max_norm()`` does the
            projection; :class:`~reprozoo.zoo.classifier.ClassifierModule` calls it after every optimizer step, and
            it is applied once at construction so the constraint holds from the start.
        flatten: flatten inputs (B, ...) to (B, in_features); with False inputs must already be (B, in_features).
    """

    def __init__(
        self,
        in_features: int,
        num_classes: int,
        hidden: Sequence[int] = (128,),
        activation: Activation = "relu",
        dropout: float = 0.0,
        input_dropout: float = 0.0,
        norm: Norm | None = None,
        max_norm: float | None = None,
        flatten: bool = True,
    ):
        super().__init__()
        _check(in_features >= 1, "MLP", "in_features", in_features, ">= 1")
        _check(num_classes >= 1, "MLP", "num_classes", num_classes, ">= 1")
        widths = _check_widths("MLP", "hidden", hidden)
        _check(activation in _ACTIVATIONS, "MLP", "activation", activation, f"one of {', '.join(_ACTIVATIONS)}")
        _check(norm is None or norm in _NORMS, "MLP", "norm", norm, "None, 'batch' or 'layer'")
        _check(0 <= dropout < 1, "MLP", "dropout", dropout, "in [0, 1)")
        _check(0 <= input_dropout < 1, "MLP", "input_dropout", input_dropout, "in [0, 1)")
        _check(max_norm is None or max_norm > 0, "MLP", "max_norm", max_norm, "None or > 0")
        self.in_features, self.num_classes, self.max_norm, self.flatten = in_features, num_classes, max_norm, flatten
        self.input_shape: tuple[int, ...] = (in_features,)

        self.input_dropout = nn.Dropout(input_dropout) if input_dropout else nn.Identity()
        layers = []
        width_in = in_features
        for width in widths:
            parts: OrderedDict[str, nn.Module] = OrderedDict(linear=nn.Linear(width_in, width))
            if norm is not None:
                parts["norm"] = _NORMS[norm](width)
            parts["act"] = _ACTIVATIONS[activation]()
            if dropout:
                parts["drop"] = nn.Dropout(dropout)
            layers.append(nn.Sequential(parts))
            width_in = width
        self.hidden = nn.ModuleList(layers)
        self.num_features = width_in
        self.head = nn.Linear(width_in, num_classes)
        if max_norm is not None:
            self.apply_max_norm()

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        if self.flatten:
            x = x.flatten(1)  # (B, ...) -> (B, in_features)
        if x.shape[-1] != self.in_features:
            raise ValueError(
                f"MLP: got inputs of {x.shape[-1]} features (shape {tuple(x.shape)}), in_features is {self.in_features}"
            )
        x = self.input_dropout(x)
        for layer in self.hidden:
            x = layer(x)  # (B, width)
        return x  # (B, num_features)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.forward_features(x))  # (B, num_classes)

    @torch.no_grad()
    def apply_max_norm(self) -> None:
        """Rescale, in place, every hidden unit's incoming weight row whose L2 norm exceeds ``max_norm`` to norm
        ``max_norm`` (rows within the bound are untouched). No-op without ``max_norm``."""
        if self.max_norm is None:
            return
        for layer in self.hidden:
            weight = layer.linear.weight  # (out, in): row j feeds hidden unit j
            norms = weight.norm(dim=1, keepdim=True)  # (out, 1)
            weight.mul_((self.max_norm / norms.clamp_min(1e-12)).clamp(max=1.0))


@register_net
def animalnet(**kwargs) -> MLP:
    """The regularization tutorial's ``AnimalNet`` (Neuromatch Academy DL, W2D1): 3*32*32 -> 128 -> 32 -> 3, ReLU.
    (The tutorial returns log-softmax and trains with NLL; these are logits for cross-entropy, the same loss.)"""
    return MLP(**_preset(dict(in_features=3 * 32 * 32, num_classes=3, hidden=(128, 32), activation="relu"), kwargs))


@register_net
def biganimalnet(**kwargs) -> MLP:
    """The tutorial's ``BigAnimalNet`` (W2D1 tutorial 2): 3*32*32 -> 124 -> 64 -> 3 with leaky ReLU (slope 0.01)."""
    defaults = dict(in_features=3 * 32 * 32, num_classes=3, hidden=(124, 64), activation="leaky_relu")
    return MLP(**_preset(defaults, kwargs))


@register_net
def mlp_fmnist(**kwargs) -> MLP:
    """784-392-196-10 ReLU MLP for (Fashion-)MNIST 28x28 images."""
    return MLP(**_preset(dict(in_features=28 * 28, num_classes=10, hidden=(392, 196)), kwargs))


# ------------------------------------------------------------------------------------------------------- ConvNet


def _conv_bn_relu(c_in: int, c_out: int, batch_norm: bool, relu: bool = True) -> list[nn.Module]:
    # A conv followed by BatchNorm needs no bias: BN's shift replaces it.
    parts: list[nn.Module] = [nn.Conv2d(c_in, c_out, kernel_size=3, padding=1, bias=not batch_norm)]
    if batch_norm:
        parts.append(nn.BatchNorm2d(c_out))
    if relu:
        parts.append(nn.ReLU())
    return parts


class _ResidualBlock(nn.Module):
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
        _check(in_channels >= 1, "ConvNet", "in_channels", in_channels, ">= 1")
        _check(num_classes >= 1, "ConvNet", "num_classes", num_classes, ">= 1")
        blocks = _check_widths("ConvNet", "channels", channels)
        _check(len(blocks) >= 1, "ConvNet", "channels", list(channels), "non-empty")
        _check(layers_per_block >= 1, "ConvNet", "layers_per_block", layers_per_block, ">= 1")
        _check(pool_every >= 1, "ConvNet", "pool_every", pool_every, ">= 1")
        _check(image_size >= 1, "ConvNet", "image_size", image_size, ">= 1")
        n_pools = len(blocks) * layers_per_block // pool_every
        out_size = image_size // 2**n_pools
        _check(
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
                layers.append(_ResidualBlock(c_in, k, layers_per_block, batch_norm))
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


# ------------------------------------------------------------------------------------------------------- CIFAR ResNet


class _ZeroPadShortcut(nn.Module):
    """He et al.'s option A: subsample by ``stride`` and zero-pad the new channels, half before and half after the
    old ones (the order the published weights were trained with). No parameters."""

    def __init__(self, c_in: int, c_out: int, stride: int):
        super().__init__()
        self.stride, self.pad_before, self.pad_after = stride, (c_out - c_in) // 2, c_out - c_in - (c_out - c_in) // 2

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x[:, :, :: self.stride, :: self.stride]  # (B, c_in, H/s, W/s)
        return nn.functional.pad(x, (0, 0, 0, 0, self.pad_before, self.pad_after))  # (B, c_out, H/s, W/s)


class _BasicBlock(nn.Module):
    """``relu(bn2(conv2(relu(bn1(conv1(x))))) + shortcut(x))``, two 3x3 convs; the first may have stride 2."""

    def __init__(self, c_in: int, c_out: int, stride: int):
        super().__init__()
        self.conv1 = nn.Conv2d(c_in, c_out, kernel_size=3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(c_out)
        self.conv2 = nn.Conv2d(c_out, c_out, kernel_size=3, stride=1, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(c_out)
        self.shortcut = _ZeroPadShortcut(c_in, c_out, stride) if stride != 1 or c_in != c_out else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = torch.relu(self.bn1(self.conv1(x)))
        return torch.relu(self.bn2(self.conv2(out)) + self.shortcut(x))


class CifarResNet(nn.Module):
    """He et al. 2016 (sec. 4.2) ResNet for 32x32 images: a 3x3 conv with 16 filters, three stages of ``n`` basic
    blocks with 16, 32 and 64 filters (the 2nd and 3rd start with stride 2), global average pooling and a linear
    head; ``depth = 6 n + 2`` (20, 32, 44, 56, 110, ...). Shortcuts are option A (stride-2 subsampling and zero
    channels, no parameters), so the parameter count is that of the paper: 0.27M for ResNet-20.

    Module names follow akamaster/pytorch_resnet_cifar10 (``conv1``, ``bn1``, ``layer1.0.conv1``, ..., ``linear``),
    whose published weights :func:`load_legacy_cifar_resnet` loads.

    Args:
        depth: ``6 n + 2``.
        num_classes: width of the logits.
        normalize: standardise inputs in [0, 1] with the ImageNet mean and std in ``forward``, as the published
            weights expect. The statistics are non-persistent buffers: not in the state dict, so checkpoints are the
            same with and without.
    """

    def __init__(self, depth: int = 20, num_classes: int = 10, normalize: bool = False):
        super().__init__()
        _check(
            depth >= 8 and (depth - 2) % 6 == 0,
            "CifarResNet",
            "depth",
            depth,
            "6 n + 2 with n >= 1 (20, 32, 44, 56, ...)",
        )
        _check(num_classes >= 1, "CifarResNet", "num_classes", num_classes, ">= 1")
        n = (depth - 2) // 6
        self.depth, self.num_classes, self.normalize = depth, num_classes, normalize
        self.input_shape: tuple[int, ...] = (3, 32, 32)
        self.num_features = 64
        if normalize:
            self.register_buffer("mean", torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1), persistent=False)
            self.register_buffer("std", torch.tensor(IMAGENET_STD).view(1, 3, 1, 1), persistent=False)
        self.conv1 = nn.Conv2d(3, 16, kernel_size=3, stride=1, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(16)
        self.layer1 = self._stage(16, 16, n, stride=1)
        self.layer2 = self._stage(16, 32, n, stride=2)
        self.layer3 = self._stage(32, 64, n, stride=2)
        self.linear = nn.Linear(64, num_classes)
        for module in self.modules():
            if isinstance(module, (nn.Conv2d, nn.Linear)):
                nn.init.kaiming_normal_(module.weight)  # He init, the paper's

    @staticmethod
    def _stage(c_in: int, c_out: int, n: int, stride: int) -> nn.Sequential:
        return nn.Sequential(
            *(_BasicBlock(c_in if i == 0 else c_out, c_out, stride if i == 0 else 1) for i in range(n))
        )

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        if self.normalize:
            x = (x - self.mean) / self.std
        x = torch.relu(self.bn1(self.conv1(x)))  # (B, 16, 32, 32)
        x = self.layer3(self.layer2(self.layer1(x)))  # (B, 64, 8, 8)
        return x.mean(dim=(2, 3))  # (B, 64)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.linear(self.forward_features(x))  # (B, num_classes)

    @classmethod
    def from_legacy_checkpoint(
        cls, path: str | os.PathLike, depth: int | None = None, *, normalize: bool = True
    ) -> CifarResNet:
        """See :func:`load_legacy_cifar_resnet`."""
        return load_legacy_cifar_resnet(path, depth, normalize=normalize)


@register_net
def resnet20(**kwargs) -> CifarResNet:
    """CIFAR ResNet-20 (n = 3), 0.27M parameters."""
    return CifarResNet(**_preset(dict(depth=20), kwargs))


@register_net
def resnet32(**kwargs) -> CifarResNet:
    """CIFAR ResNet-32 (n = 5), 0.46M parameters."""
    return CifarResNet(**_preset(dict(depth=32), kwargs))


@register_net
def resnet44(**kwargs) -> CifarResNet:
    """CIFAR ResNet-44 (n = 7), 0.66M parameters."""
    return CifarResNet(**_preset(dict(depth=44), kwargs))


@register_net
def resnet56(**kwargs) -> CifarResNet:
    """CIFAR ResNet-56 (n = 9), 0.85M parameters."""
    return CifarResNet(**_preset(dict(depth=56), kwargs))


def load_legacy_cifar_resnet(
    path: str | os.PathLike, depth: int | None = None, *, normalize: bool = True
) -> CifarResNet:
    """A :class:`CifarResNet` with the weights of an akamaster/pytorch_resnet_cifar10 file (``resnet20-12fca82f.th``:
    ``{'best_prec1', 'state_dict'}`` with keys prefixed ``module.``, as ``nn.DataParallel`` saved them), in eval mode.

    The file is read with ``weights_only=True``, the prefix stripped and the weights loaded strictly (the files
    predate BatchNorm's ``num_batches_tracked``, which starts at 0). ``depth`` defaults to what the file holds;
    ``num_classes`` is read from the head. ``normalize`` defaults to True because these weights expect
    ImageNet-standardised inputs. Any problem is a :class:`~reprozoo.zoo.registry.WeightsError` naming the file.
    """
    try:
        payload = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:
        raise WeightsError(f"{path} is not a readable CIFAR ResNet weights file: {err}") from err
    state = payload.get("state_dict", payload) if isinstance(payload, dict) else None
    if not isinstance(state, dict) or ("module.linear.weight" not in state and "linear.weight" not in state):
        raise WeightsError(f"{path} does not hold a CIFAR ResNet state dict (no 'state_dict' with 'linear.weight')")
    state = {k.removeprefix("module."): v for k, v in state.items()}
    blocks = {k.split(".")[1] for k in state if k.startswith("layer1.")}
    depth = 6 * len(blocks) + 2 if depth is None else depth
    model = CifarResNet(depth, num_classes=state["linear.weight"].shape[0], normalize=normalize)
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as err:
        raise WeightsError(f"{path} does not fit CifarResNet(depth={depth}): {err}") from err
    return model.eval()
