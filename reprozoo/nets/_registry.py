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


def net_record(net: nn.Module) -> dict:
    """How a method records a network that has a ``config`` (its keyword arguments) in its hyperparameters: the
    ``class_path`` form that LightningCLI records for a network it built from a config, so a checkpoint rebuilds the
    network whether it was given in a config or as a Python object."""
    cls = type(net)
    module = "reprozoo.nets" if cls.__module__.startswith("reprozoo.nets.") else cls.__module__  # as configs name it
    return {"class_path": f"{module}.{cls.__qualname__}", "init_args": dict(net.config)}


def net_from(spec, cls: type[nn.Module], owner: str, field: str) -> nn.Module:
    """The network ``spec`` of a method: a ``cls`` as it is, ``None`` for ``cls()``, or the record of
    :func:`net_record` (read back from a checkpoint written outside LightningCLI)."""
    if spec is None:
        return cls()
    if isinstance(spec, dict):
        known = (f"{cls.__module__}.{cls.__qualname__}", f"reprozoo.nets.{cls.__qualname__}")
        check(spec.get("class_path") in known, owner, field, spec, f"a {cls.__name__} or its class_path config")
        return cls(**spec.get("init_args", {}))
    check(isinstance(spec, cls), owner, field, spec, f"a {cls.__name__}")
    return spec
