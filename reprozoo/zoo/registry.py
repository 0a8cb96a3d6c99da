"""The weights registry: one card per pretrained model, slim verified weight files, offline-first loading.

A *card* (JSON) describes one entry; a *weights file* (``.pt``) holds only what is needed to rebuild the model:

    {"format": "reprozoo-weights/1", "module": "<class path>", "hparams": {...}, "state_dict": {...}}

It is read with ``torch.load(weights_only=True)`` and loaded with ``strict=True``, so a file can neither run code
nor silently drop or invent parameters. Entries that are small enough ship inside the package
(``reprozoo/zoo/weights/``, budget :data:`PACKAGED_BUDGET_BYTES` in all); the others are downloaded from their URL into
the cache (``$REPROZOO_CACHE``, default ``~/.cache/reprozoo``), through a temporary file that is verified against
the card's sha256 before it is renamed into place. ``REPROZOO_OFFLINE=1`` never touches the network.
"""

from __future__ import annotations

import dataclasses
import difflib
import importlib
import json
import os
import tempfile
import urllib.request
from pathlib import Path
from typing import Any

import torch

from reprozoo import _files
from reprozoo._files import sha256_file
from reprozoo.zoo._checks import CheckpointError, check_checkpoint_file

FORMAT = "reprozoo-weights/1"
PACKAGE_DIR = Path(__file__).parent / "weights"
# Everything shipped inside the wheel together must stay under this size; larger entries go behind a URL.
PACKAGED_BUDGET_BYTES = 12 * 1024 * 1024  # MLP teacher + student for MNIST distillation stored as float16


class WeightsError(RuntimeError):
    """A zoo entry or weights file could not be found, fetched, verified or loaded."""


@dataclasses.dataclass(frozen=True)
class WeightsEntry:
    """One pretrained model: what it is, how it was made, where its file lives and how to check it."""

    name: str  # "method_arch.data", e.g. "engression_mlp.softplus_pre"
    module: str  # class path of the LightningModule
    hparams: dict[str, Any]
    sha256: str  # full hex digest of the weights file
    file: str  # file name, in the package (url None) or in the cache
    url: str | None = None  # None: the file ships inside the package
    metrics: dict[str, float] = dataclasses.field(default_factory=dict)  # measured by our own recipe
    recipe: str | None = None  # the config that produced it, relative to the repo root
    license: str = "MIT"
    description: str = ""
    size_bytes: int | None = None

    @classmethod
    def from_card(cls, card: dict[str, Any], source: str = "<card>") -> WeightsEntry:
        fields = {f.name for f in dataclasses.fields(cls)}
        unknown = set(card) - fields
        missing = {"name", "module", "hparams", "sha256", "file"} - set(card)
        if unknown or missing:
            raise WeightsError(f"{source}: bad card (unknown keys {sorted(unknown)}, missing keys {sorted(missing)})")
        return cls(**card)

    def to_card(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


_REGISTRY: dict[str, WeightsEntry] = {}


def register_weights(entry: WeightsEntry | str | os.PathLike, *, overwrite: bool = False) -> WeightsEntry:
    """Add an entry, given as a :class:`WeightsEntry` or the path of a card; returns the entry."""
    if not isinstance(entry, WeightsEntry):
        path = Path(entry)
        try:
            card = json.loads(path.read_text())
        except (OSError, json.JSONDecodeError) as err:
            raise WeightsError(f"cannot read card {path}: {err}") from err
        entry = WeightsEntry.from_card(card, source=str(path))
    if entry.name in _REGISTRY and not overwrite and _REGISTRY[entry.name] != entry:
        raise WeightsError(f"zoo entry {entry.name!r} is already registered with a different card")
    _REGISTRY[entry.name] = entry
    return entry


def _load_packaged_cards() -> None:
    for card in sorted(PACKAGE_DIR.glob("*.json")):
        register_weights(card, overwrite=True)


def list_weights(pattern: str | None = None) -> list[str]:
    """Names of all registered entries (optionally those containing ``pattern``), sorted."""
    return sorted(n for n in _REGISTRY if pattern is None or pattern in n)


def get_weights(name: str) -> WeightsEntry:
    """The entry called ``name``; an unknown name raises with the closest known names."""
    try:
        return _REGISTRY[name]
    except KeyError:
        close = difflib.get_close_matches(name, list(_REGISTRY), n=3, cutoff=0.4)
        hint = f" Did you mean {', '.join(map(repr, close))}?" if close else ""
        raise WeightsError(
            f"no zoo entry named {name!r}.{hint} Known entries: {', '.join(list_weights()) or '(none)'}"
        ) from None


# ----------------------------------------------------------------------------------------------- files and hashes


def _verify(path: Path, expected: str) -> None:
    got = sha256_file(path)
    if got != expected:
        raise WeightsError(
            f"sha256 mismatch for {path}: expected {expected}, got {got}. "
            "The file is corrupt or not the published one; it was not loaded."
        )


def _download(url: str, dest: Path, expected_sha256: str) -> None:
    """Fetch ``url`` to ``dest`` atomically: a partial or wrong download never appears under ``dest``."""
    dest.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(prefix=dest.name + ".", suffix=".part", dir=dest.parent)
    tmp = Path(tmp_name)
    try:
        with os.fdopen(fd, "wb") as out, urllib.request.urlopen(url, timeout=60) as response:
            for block in iter(lambda: response.read(1 << 20), b""):
                out.write(block)
        _verify(tmp, expected_sha256)
        os.replace(tmp, dest)
    finally:
        tmp.unlink(missing_ok=True)


def weights_path(name: str, *, offline: bool | None = None, cache_dir: str | os.PathLike | None = None) -> Path:
    """Local path of the verified weights file of ``name``, downloading it first if needed and allowed."""
    entry = get_weights(name)
    offline = _files.offline() if offline is None else offline
    if entry.url is None:
        path = PACKAGE_DIR / entry.file
        if not path.is_file():
            raise WeightsError(f"zoo entry {name!r} ships inside the package but {path} is missing: reinstall reprozoo")
        _verify(path, entry.sha256)
        return path
    path = Path(cache_dir or _files.cache_dir()) / entry.file
    if path.is_file():
        _verify(path, entry.sha256)
        return path
    if offline:
        raise WeightsError(
            f"zoo entry {name!r} is not in the cache and offline mode is on (REPROZOO_OFFLINE / offline=True). "
            f"Download {entry.url} and place it at {path} (sha256 {entry.sha256})."
        )
    try:
        _download(entry.url, path, entry.sha256)
    except WeightsError:
        raise
    except Exception as err:  # network errors come in many types; all mean the same to the user
        raise WeightsError(
            f"could not download zoo entry {name!r} from {entry.url}: {err}. "
            f"Place the file at {path} (sha256 {entry.sha256}) to use it offline."
        ) from err
    return path


# ----------------------------------------------------------------------------------------------- reading and writing


def _import(class_path: str) -> type:
    module_name, _, attr = class_path.rpartition(".")
    try:
        return getattr(importlib.import_module(module_name), attr)
    except (ImportError, AttributeError, ValueError) as err:
        raise WeightsError(f"cannot import {class_path!r}: {err}") from err


def read_weights_file(path: str | os.PathLike) -> dict[str, Any]:
    """Read a weights file safely (``weights_only=True``) and check its layout."""
    try:
        payload = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:
        raise WeightsError(f"{path} is not a readable reprozoo weights file (truncated or tampered?): {err}") from err
    if not isinstance(payload, dict) or payload.get("format") != FORMAT:
        raise WeightsError(f"{path} is not a reprozoo weights file (expected format {FORMAT!r})")
    for key in ("module", "hparams", "state_dict"):
        if key not in payload:
            raise WeightsError(f"{path}: weights file lacks {key!r}")
    return payload


def build_module(class_path: str, hparams: dict[str, Any]) -> torch.nn.Module:
    """Instantiate ``class_path`` from saved hyperparameters (nested ``class_path`` dicts included)."""
    cls = _import(class_path)
    hparams = {k: v for k, v in hparams.items() if not k.startswith("_")}
    hparams["weights"] = None  # the weights come from the file, not from the zoo again
    from lightning.pytorch.cli import instantiate_module

    module = instantiate_module(cls, hparams)
    # A nested module given by class_path reaches __init__ as an object, which the module records as None (it cannot
    # be a hyperparameter): put its config back, so that the model's hparams say how to rebuild it, as after a CLI run.
    recorded = getattr(module, "hparams", None)
    if recorded is not None:
        for key, value in hparams.items():
            if recorded.get(key, "") is None and isinstance(value, dict) and "class_path" in value:
                recorded[key] = value
    return module


def load_state(module: torch.nn.Module, state_dict: dict[str, torch.Tensor], source: str, *, zoo: bool = True) -> None:
    """Strict load. Zoo files go through the module's ``load_zoo_state_dict`` when it defines one (the
    counterpart of ``zoo_state_dict``, e.g. TRM ships only its EMA weights); Lightning checkpoints never do."""
    try:
        if zoo and hasattr(module, "load_zoo_state_dict"):
            module.load_zoo_state_dict(state_dict)
        else:
            module.load_state_dict(state_dict, strict=True)
    except RuntimeError as err:
        raise WeightsError(
            f"{source} does not fit {type(module).__name__} with these hyperparameters "
            f"(use the entry's recipe config for a matching architecture): {err}"
        ) from err


def load_model(name: str, *, offline: bool | None = None, cache_dir: str | os.PathLike | None = None):
    """The pretrained model ``name`` as its LightningModule, weights loaded strictly, in eval mode."""
    entry = get_weights(name)
    path = weights_path(name, offline=offline, cache_dir=cache_dir)
    payload = read_weights_file(path)
    if payload["module"] != entry.module:
        raise WeightsError(f"{path} holds a {payload['module']}, but zoo entry {name!r} is a {entry.module}")
    model = build_module(payload["module"], payload["hparams"])
    load_state(model, payload["state_dict"], f"zoo entry {name!r} ({path})")
    return model.eval()


def load_pretrained_into(module: torch.nn.Module, name: str) -> None:
    """Initialise ``module`` from zoo entry ``name`` (``weights=NAME`` in every method's constructor)."""
    entry = get_weights(name)
    class_path = f"{type(module).__module__}.{type(module).__qualname__}"
    if entry.module != class_path:
        raise WeightsError(f"zoo entry {name!r} holds a {entry.module}, not a {class_path}")
    payload = read_weights_file(weights_path(name))
    load_state(module, payload["state_dict"], f"zoo entry {name!r}")


def export_checkpoint(
    ckpt_path: str | os.PathLike,
    name: str,
    out_dir: str | os.PathLike,
    *,
    module: str | None = None,
    url: str | None = None,
    metrics: dict[str, float] | None = None,
    recipe: str | None = None,
    license: str = "MIT",
    description: str = "",
    dtype: torch.dtype | None = None,
) -> tuple[Path, Path]:
    """Turn a Lightning checkpoint into a slim weights file plus its card; returns both paths.

    The module's class is read from the checkpoint (LightningCLI records it) or given as ``module``. The model is
    rebuilt from the checkpoint's hyperparameters (passed through the class's ``zoo_hparams`` when it has one, e.g.
    to drop a distillation teacher) and loaded strictly, so an export that would not load fails here. ``dtype``
    (e.g. ``torch.float16``) stores the floating-point tensors in that precision, halving the file; loading copies
    them back into the module's own dtype, so report metrics measured with the exported file.
    """
    if "." not in name or not name.replace("_", "").replace(".", "").replace("-", "").isalnum():
        raise WeightsError(f"zoo name {name!r} must look like 'method_arch.data' (letters, digits, '_', '-', '.')")
    try:
        check_checkpoint_file(ckpt_path)
    except (CheckpointError, FileNotFoundError) as err:
        raise WeightsError(str(err)) from err
    # A Lightning checkpoint also holds optimizer and loop state of arbitrary types; it is the user's own file.
    ckpt = torch.load(ckpt_path, map_location="cpu", weights_only=False)
    if not isinstance(ckpt, dict) or "state_dict" not in ckpt:
        raise WeightsError(f"{ckpt_path} is not a Lightning checkpoint (no 'state_dict')")
    hparams = dict(ckpt.get("hyper_parameters") or {})
    class_path = module or hparams.get("_class_path")
    if not class_path:
        raise WeightsError(f"{ckpt_path} does not record its module class: pass module='package.Class'")
    hparams = {k: v for k, v in hparams.items() if not k.startswith("_")}
    hparams["weights"] = None
    adjust = getattr(_import(class_path), "zoo_hparams", None)
    if callable(adjust):
        hparams = adjust(hparams)
    model = build_module(class_path, hparams)
    load_state(model, ckpt["state_dict"], str(ckpt_path), zoo=False)
    # What a zoo file holds: the module's choice (zoo_state_dict, e.g. EMA weights only) or its whole state.
    state = model.zoo_state_dict() if hasattr(model, "zoo_state_dict") else model.state_dict()
    state = {k: v.detach().clone().contiguous() for k, v in state.items()}
    if dtype is not None:
        state = {k: v.to(dtype) if v.is_floating_point() else v for k, v in state.items()}

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    weights_file = out_dir / f"{name}.pt"
    torch.save({"format": FORMAT, "module": class_path, "hparams": hparams, "state_dict": state}, weights_file)
    read_weights_file(weights_file)  # refuse to publish anything that would not load with weights_only=True
    entry = WeightsEntry(
        name=name,
        module=class_path,
        hparams=hparams,
        sha256=sha256_file(weights_file),
        file=weights_file.name,
        url=url,
        metrics=dict(metrics or {}),
        recipe=recipe,
        license=license,
        description=description,
        size_bytes=weights_file.stat().st_size,
    )
    card_file = out_dir / f"{name}.json"
    card_file.write_text(json.dumps(entry.to_card(), indent=2, sort_keys=True) + "\n")
    return weights_file, card_file


_load_packaged_cards()
