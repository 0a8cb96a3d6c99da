"""torch.hub entry points: one per zoo entry, named as the entry.

From GitHub, through the repository's own ``hubconf.py`` (which re-exports these)::

    torch.hub.load("<owner>/reprozoo", "trm_mlp64.sudoku_gen40")

From an installed package, or any checkout, without network (``reprozoo.zoo.HUB_DIR`` is this folder)::

    torch.hub.load(reprozoo.zoo.HUB_DIR, "trm_mlp64.sudoku_gen40", source="local")

Each returns what :func:`reprozoo.zoo.load_model` returns (the LightningModule, weights checked against the card's
sha256, in eval mode); ``pretrained=False`` gives the same architecture freshly initialised.
"""

from reprozoo.zoo.registry import build_module as _build_module
from reprozoo.zoo.registry import get_weights as _get_weights
from reprozoo.zoo.registry import list_weights as _list_weights
from reprozoo.zoo.registry import load_model as _load_model

dependencies = ["torch", "lightning", "safetensors", "huggingface_hub"]


def _entrypoint(name: str):
    entry = _get_weights(name)

    def load(pretrained: bool = True, *, offline: bool | None = None, cache_dir: str | None = None):
        if not pretrained:
            return _build_module(entry.module, entry.hparams)
        return _load_model(name, offline=offline, cache_dir=cache_dir)

    metrics = ", ".join(f"{k} {v:.4g}" for k, v in sorted(entry.metrics.items()))
    load.__name__ = load.__qualname__ = name
    load.__doc__ = f"{entry.description}\n\nMeasured: {metrics or '(no metrics)'}. Recipe: {entry.recipe}."
    return load


# Zoo names hold a '.', so they are set as attributes, which is all torch.hub looks for.
globals().update({_name: _entrypoint(_name) for _name in _list_weights()})
