"""The one registry of named networks (timm-style): ``@register_net`` builders, built by name with :func:`create_net`."""

from __future__ import annotations

import fnmatch
from collections.abc import Callable, Sequence

from torch import nn

from reprozoo._validate import check

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


def _check_widths(owner: str, field: str, widths: Sequence[int]) -> list[int]:
    widths = list(widths)
    check(
        all(isinstance(w, int) and not isinstance(w, bool) and w >= 1 for w in widths),
        owner,
        field,
        widths,
        "a sequence of integers >= 1",
    )
    return widths
