"""The multilayer perceptron every fully connected classifier here is: ``MLP`` and its registered presets."""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable, Sequence
from typing import Literal

import torch
from torch import nn

from reprozoo._validate import check
from reprozoo.nets._registry import _check_widths, _preset, register_net

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
            projection; :class:`~reprozoo.methods.classifier.ClassifierModule` calls it after every optimizer step, and
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
        check(in_features >= 1, "MLP", "in_features", in_features, ">= 1")
        check(num_classes >= 1, "MLP", "num_classes", num_classes, ">= 1")
        widths = _check_widths("MLP", "hidden", hidden)
        check(activation in _ACTIVATIONS, "MLP", "activation", activation, f"one of {', '.join(_ACTIVATIONS)}")
        check(norm is None or norm in _NORMS, "MLP", "norm", norm, "None, 'batch' or 'layer'")
        check(0 <= dropout < 1, "MLP", "dropout", dropout, "in [0, 1)")
        check(0 <= input_dropout < 1, "MLP", "input_dropout", input_dropout, "in [0, 1)")
        check(max_norm is None or max_norm > 0, "MLP", "max_norm", max_norm, "None or > 0")
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
