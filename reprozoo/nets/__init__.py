"""The networks: plain ``nn.Module``s, each defined once, timm-style (one skeleton per model, one registry).

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
* :class:`WideResNet`: WRN-28-10 in RobustBench's layout (:func:`load_wide_resnet_checkpoint`).

Two networks outside the classifier interface, each the one definition its method uses:
:class:`StochasticMLP` (engression's generator g(x, eps), the official StoNet) and :class:`TinyRecursiveNetwork`
(TRM's f).

The residual blocks differ on purpose: the CIFAR ResNet's (option-A zero-pad shortcut) and the WRN's (pre-activation)
have the parameter layout of the published weights they load; the ConvNet's (L convs, 1x1 projection shortcut) is the
homework's; StochasticMLP's adds noise to each of its two linear layers (the official StoResBlock).
"""

from reprozoo.nets._registry import create_net, list_nets, net_from, net_record, register_net
from reprozoo.nets.convnet import ConvNet
from reprozoo.nets.mlp import MLP
from reprozoo.nets.resnet import CifarResNet, load_legacy_cifar_resnet
from reprozoo.nets.stochastic_mlp import StochasticMLP
from reprozoo.nets.trm import TinyRecursiveNetwork, TRMConfig
from reprozoo.nets.wide_resnet import WideResNet, load_wide_resnet_checkpoint

__all__ = [
    "MLP",
    "CifarResNet",
    "ConvNet",
    "StochasticMLP",
    "TRMConfig",
    "TinyRecursiveNetwork",
    "WideResNet",
    "create_net",
    "list_nets",
    "net_from",
    "net_record",
    "load_legacy_cifar_resnet",
    "load_wide_resnet_checkpoint",
    "register_net",
]
