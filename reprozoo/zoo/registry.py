"""The weights registry: one card per pretrained model, slim verified weight files, offline-first loading.

A *card* (JSON) describes one entry; a *weights file* (``.pt``) holds only what is needed to rebuild the model:

    {"format": "reprozoo-weights/1", "module": "<class path>", "hparams": {...}, "state_dict": {...}}

It is read with ``torch.load(weights_only=True)`` and loaded with ``strict=True``, so a file can neither run code
nor silently drop or invent parameters. Entries that are small enough ship inside the package
(``reprozoo/zoo/weights/``, budget :data:`PACKAGED_BUDGET_BYTES` in all); the others are downloaded from their URL into
the cache (``$REPROZOO_CACHE``, default ``~/.cache/reprozoo``), through a temporary file that is verified against
the card's sha256 before it is renamed into place. ``REPROZOO_OFFLINE=1`` never touches the network.

Your own entries: ``python cli.py zoo export CKPT --name method_arch.data`` (:func:`export_checkpoint`) writes
``method_arch.data.pt`` and its card ``method_arch.data.json`` into one folder. The path of that card then works
wherever a zoo name does: ``load_model("zoo_exports/method_arch.data.json")``, ``weights=`` of every method
(``--model.init_args.weights zoo_exports/method_arch.data.json``), ``get_weights`` (``zoo info``). The weights file
is found next to the card (else, for a card with a ``url``, in the cache or downloaded) and checked against the
card's sha256. :func:`register_weights` with the card's path makes its name known to this process as well.
"""

from __future__ import annotations

import dataclasses
import difflib
import hashlib
import importlib
import io
import json
import os
import re
import tempfile
import urllib.request
from pathlib import Path
from typing import Any

import torch

from reprozoo import _files
from reprozoo._checks import RECORD_KEY, CheckpointError, check_checkpoint_file, current_class_path, current_hparams
from reprozoo._files import WeightsError, sha256_file, write_atomic

FORMAT = "reprozoo-weights/1"
PACKAGE_DIR = Path(__file__).parent / "weights"
# Everything shipped inside the wheel together must stay under this size; larger entries go behind a URL.
PACKAGED_BUDGET_BYTES = 12 * 1024 * 1024  # MLP teacher + student for MNIST distillation stored as float16


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
    # Where the card was read from (not part of the card): its weights file is looked for next to it. None for the
    # packaged cards (their files are in PACKAGE_DIR) and entries built in code.
    card_path: str | None = dataclasses.field(default=None, compare=False, repr=False)

    @classmethod
    def from_card(cls, card: dict[str, Any], source: str = "<card>", card_path: str | None = None) -> WeightsEntry:
        fields = {f.name for f in dataclasses.fields(cls)} - {"card_path"}
        unknown = set(card) - fields
        missing = {"name", "module", "hparams", "sha256", "file"} - set(card)
        if unknown or missing:
            raise WeightsError(f"{source}: bad card (unknown keys {sorted(unknown)}, missing keys {sorted(missing)})")
        file = card["file"]
        if not isinstance(file, str) or not file or Path(file).name != file or file in (".", ".."):
            # A folder part would let a card point at any file on the machine.
            raise WeightsError(f"{source}: bad card ('file' must be a plain file name, got {file!r})")
        card = {
            **card,
            "module": current_class_path(card["module"]),
            "hparams": current_hparams(card["module"], card["hparams"]),
        }
        return cls(**card, card_path=card_path)

    def to_card(self) -> dict[str, Any]:
        card = dataclasses.asdict(self)
        del card["card_path"]
        return card


_REGISTRY: dict[str, WeightsEntry] = {}


def read_card(path: str | os.PathLike, *, packaged: bool = False) -> WeightsEntry:
    """The entry of the card at ``path``; its weights file will be looked for next to it (``packaged``: in
    :data:`PACKAGE_DIR`, wherever that is when the file is needed)."""
    path = Path(path)
    try:
        card = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise WeightsError(f"cannot read card {path}: {_one_line(err)}") from err
    if not isinstance(card, dict):
        raise WeightsError(f"{path}: bad card (a JSON object is expected, got {type(card).__name__})")
    return WeightsEntry.from_card(card, source=str(path), card_path=None if packaged else str(path))


def is_card_path(spec: str | os.PathLike) -> bool:
    """Whether ``spec`` names a card file (a path, or a string ending in ``.json``) rather than a zoo name."""
    return isinstance(spec, os.PathLike) or str(spec).endswith(".json")


def register_weights(entry: WeightsEntry | str | os.PathLike, *, overwrite: bool = False) -> WeightsEntry:
    """Add an entry, given as a :class:`WeightsEntry` or the path of a card (e.g. one ``zoo export`` wrote: its
    weights file is then found next to it); returns the entry."""
    if not isinstance(entry, WeightsEntry):
        entry = read_card(entry)
    if entry.name in _REGISTRY and not overwrite and _REGISTRY[entry.name] != entry:
        raise WeightsError(f"zoo entry {entry.name!r} is already registered with a different card")
    _REGISTRY[entry.name] = entry
    return entry


def _load_packaged_cards() -> None:
    for card in sorted(PACKAGE_DIR.glob("*.json")):
        register_weights(read_card(card, packaged=True), overwrite=True)


def list_weights(pattern: str | None = None) -> list[str]:
    """Names of all registered entries (optionally those containing ``pattern``), sorted."""
    return sorted(n for n in _REGISTRY if pattern is None or pattern in n)


def get_weights(name: str | os.PathLike) -> WeightsEntry:
    """The entry called ``name``, or the entry of the card at that path (``zoo_exports/method_arch.data.json``,
    see :func:`is_card_path`); an unknown name raises with the closest known names."""
    if str(name).endswith((".pt", ".pth", ".ckpt")):
        raise WeightsError(
            f"{name} is a weights or checkpoint file, not a zoo name: give the card (.json) that `zoo export` wrote "
            "next to the weights file; it holds the sha256 the file is checked against"
        )
    if is_card_path(name):
        return read_card(name)
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
        _files.publish(tmp, dest)
    finally:
        tmp.unlink(missing_ok=True)


def weights_path(
    name: str | os.PathLike, *, offline: bool | None = None, cache_dir: str | os.PathLike | None = None
) -> Path:
    """Local path of the verified weights file of ``name`` (a zoo name or a card's path), downloading it first if
    needed and allowed."""
    entry = get_weights(name)
    offline = _files.offline() if offline is None else offline
    if entry.card_path is not None:
        beside = Path(entry.card_path).parent / entry.file
        if beside.is_file():
            _verify(beside, entry.sha256)
            return beside
        if entry.url is None:
            raise WeightsError(
                f"card {entry.card_path} names the weights file {entry.file}, which is not next to it ({beside}): "
                "keep the .pt and .json that `zoo export` wrote in one folder"
            )
    elif entry.url is None:
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
    module_name, _, attr = current_class_path(class_path).rpartition(".")
    try:
        return getattr(importlib.import_module(module_name), attr)
    except (ImportError, AttributeError, ValueError) as err:
        raise WeightsError(f"cannot import {class_path!r}: {err}") from err


def read_weights_file(path: str | os.PathLike | io.BytesIO, label: str | None = None) -> dict[str, Any]:
    """Read a weights file (or its bytes, called ``label`` in errors) with ``weights_only=True``; check its layout."""
    label = label or str(path)
    try:
        payload = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:
        raise WeightsError(
            f"{label} is not a readable reprozoo weights file (truncated or tampered?): {_one_line(err)}"
        ) from err
    if not isinstance(payload, dict) or payload.get("format") != FORMAT:
        raise WeightsError(f"{label} is not a reprozoo weights file (expected format {FORMAT!r})")
    for key in ("module", "hparams", "state_dict"):
        if key not in payload:
            raise WeightsError(f"{label}: weights file lacks {key!r}")
    payload["module"] = current_class_path(payload["module"])
    payload["hparams"] = current_hparams(payload["module"], payload["hparams"])
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
            f"(use the entry's recipe config for a matching architecture): {_one_line(err)}"
        ) from err


def load_model(name: str | os.PathLike, *, offline: bool | None = None, cache_dir: str | os.PathLike | None = None):
    """The pretrained model ``name`` (a zoo name, or the path of a card ``zoo export`` wrote) as its
    LightningModule, weights loaded strictly, in eval mode."""
    entry = get_weights(name)
    path = weights_path(name, offline=offline, cache_dir=cache_dir)
    payload = read_weights_file(path)
    if payload["module"] != entry.module:
        raise WeightsError(f"{path} holds a {payload['module']}, but zoo entry {name!r} is a {entry.module}")
    model = build_module(payload["module"], payload["hparams"])
    load_state(model, payload["state_dict"], f"zoo entry {name!r} ({path})")
    return model.eval()


def load_pretrained_into(module: torch.nn.Module, name: str | os.PathLike) -> None:
    """Initialise ``module`` from zoo entry ``name`` or a card's path (``weights=NAME`` in every method's
    constructor)."""
    entry = get_weights(name)
    class_path = f"{type(module).__module__}.{type(module).__qualname__}"
    if entry.module != class_path:
        raise WeightsError(f"zoo entry {name!r} holds a {entry.module}, not a {class_path}")
    payload = read_weights_file(weights_path(name))
    load_state(module, payload["state_dict"], f"zoo entry {name!r}")


_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_-]*(\.[A-Za-z0-9][A-Za-z0-9_-]*)+")


def _check_name(name: str) -> None:
    if not isinstance(name, str) or not _NAME.fullmatch(name):
        raise WeightsError(
            f"zoo name {name!r} must look like 'method_arch.data' (letters, digits, '_', '-', parts joined by '.')"
        )
    if name.rsplit(".", 1)[1].lower() in {"json", "pt", "pth", "ckpt"}:
        raise WeightsError(f"zoo name {name!r} ends like a file name; use 'method_arch.data'")


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
    """Turn a Lightning checkpoint into a slim weights file plus its card; returns both paths
    (``out_dir/<name>.pt``, ``out_dir/<name>.json``). Load the result with ``load_model(<card path>)``.

    The module's class is read from the checkpoint (LightningCLI records it) or given as ``module``. The model is
    rebuilt from the checkpoint's hyperparameters (passed through the class's ``zoo_hparams`` when it has one, e.g.
    to drop a distillation teacher) and loaded strictly; the file's bytes are then read back with
    ``weights_only=True`` and loaded into a fresh model as :func:`load_model` will, all before anything is written.
    Both files are written atomically (temporary file + rename); any failure is a one-line :class:`WeightsError`
    and leaves no file behind. ``dtype`` (e.g. ``torch.float16``) stores the floating-point tensors in that
    precision, halving the file; loading copies them back into the module's own dtype, so report metrics measured
    with the exported file.
    """
    _check_name(name)
    try:
        check_checkpoint_file(ckpt_path)
    except (CheckpointError, FileNotFoundError) as err:
        raise WeightsError(_one_line(err)) from err
    # A Lightning checkpoint also holds optimizer and loop state of arbitrary types; it is the user's own file.
    try:
        ckpt = torch.load(ckpt_path, map_location="cpu", weights_only=False)
    except Exception as err:  # whatever unpickling raises: the file is not a checkpoint we can read
        raise WeightsError(f"cannot read checkpoint {ckpt_path}: {_one_line(err)}") from err
    if not isinstance(ckpt, dict) or "state_dict" not in ckpt:
        raise WeightsError(f"{ckpt_path} is not a Lightning checkpoint (no 'state_dict')")
    hparams = dict(ckpt.get("hyper_parameters") or {})
    class_path = module or hparams.get("_class_path")
    if not class_path:
        raise WeightsError(f"{ckpt_path} does not record its module class: pass module='package.Class'")
    class_path = current_class_path(class_path)
    hparams = {k: v for k, v in current_hparams(class_path, hparams).items() if not k.startswith("_")}
    hparams["weights"] = None
    adjust = getattr(_import(class_path), "zoo_hparams", None)
    if callable(adjust):
        hparams = adjust(hparams)
    model = _rebuild(class_path, hparams, ckpt_path)
    load_state(model, ckpt["state_dict"], str(ckpt_path), zoo=False)
    # What a zoo file holds: the module's choice (zoo_state_dict, e.g. EMA weights only) or its whole state.
    state = model.zoo_state_dict() if hasattr(model, "zoo_state_dict") else model.state_dict()
    state = {k: v.detach().clone().contiguous() for k, v in state.items()}
    if dtype is not None:
        state = {k: v.to(dtype) if v.is_floating_point() else v for k, v in state.items()}

    # Everything is serialised and checked in memory first: a failure below writes nothing.
    buffer = io.BytesIO()
    torch.save({"format": FORMAT, "module": class_path, "hparams": hparams, "state_dict": state}, buffer)
    weights_bytes = buffer.getvalue()
    out_dir = Path(out_dir)
    weights_file, card_file = out_dir / f"{name}.pt", out_dir / f"{name}.json"
    # The export must load as load_model will load it: weights_only=True, a fresh model, its zoo loading path.
    payload = read_weights_file(io.BytesIO(weights_bytes), label=f"the export of {ckpt_path}")
    load_state(_rebuild(class_path, payload["hparams"], ckpt_path), payload["state_dict"], f"the export of {ckpt_path}")
    entry = WeightsEntry(
        name=name,
        module=class_path,
        hparams=hparams,
        sha256=hashlib.sha256(weights_bytes).hexdigest(),
        file=weights_file.name,
        url=url,
        metrics=dict(metrics or {}),
        recipe=recipe,
        license=license,
        description=description,
        size_bytes=len(weights_bytes),
    )
    try:
        card_bytes = (json.dumps(entry.to_card(), indent=2, sort_keys=True) + "\n").encode("utf-8")
    except (TypeError, ValueError) as err:
        raise WeightsError(
            f"the card of {name!r} is not JSON (a hyperparameter or metric is no plain value?): {_one_line(err)}"
        ) from err

    if out_dir.exists() and not out_dir.is_dir():
        raise WeightsError(f"cannot export into {out_dir}: it is a file, not a folder")
    try:
        write_atomic(weights_file, weights_bytes)
        try:
            write_atomic(card_file, card_bytes)
        except BaseException:
            weights_file.unlink(missing_ok=True)  # no weights file without its card
            raise
    except OSError as err:
        raise WeightsError(f"cannot write the export to {out_dir}: {_one_line(err)}") from err
    return weights_file, card_file


def _rebuild(class_path: str, hparams: dict[str, Any], ckpt_path: str | os.PathLike) -> torch.nn.Module:
    try:
        return build_module(class_path, hparams)
    except WeightsError:
        raise
    except Exception as err:  # the module's own argument checks: ValueError, TypeError, ...
        raise WeightsError(
            f"cannot rebuild {class_path} from the hyperparameters of {ckpt_path}: {_one_line(err)}"
        ) from err


def _one_line(err: BaseException | str, limit: int = 500) -> str:
    """An error message on one line (strict loading lists keys over many lines), cut at ``limit`` characters."""
    text = " ".join(str(err).split())
    return text if len(text) <= limit else text[: limit - 3] + "..."


_load_packaged_cards()


def upgrade_checkpoint(ckpt_path: str | os.PathLike, out: str | os.PathLike | None = None) -> Path:
    """Convert, once, a Lightning checkpoint written before the layout of issue 15 (classes under
    ``reprozoo.zoo``, a TRMModule's or EngressionRegressor's network arguments flat in its hyperparameters) into
    today's: ``load_from_checkpoint``, ``--ckpt_path`` and ``zoo export`` then read it as any other. Weights, optimizer
    and loop states are kept as they are. Written atomically to ``out`` (default: over ``ckpt_path``); returns it.
    A checkpoint that is already current is written unchanged."""
    try:
        check_checkpoint_file(ckpt_path)
    except (CheckpointError, FileNotFoundError) as err:
        raise WeightsError(_one_line(err)) from err
    try:  # the user's own file, as for export: it holds optimizer and loop state of arbitrary types
        ckpt = torch.load(ckpt_path, map_location="cpu", weights_only=False)
    except Exception as err:  # whatever unpickling raises: the file is not a checkpoint we can read
        raise WeightsError(f"cannot read checkpoint {ckpt_path}: {_one_line(err)}") from err
    if not isinstance(ckpt, dict) or "state_dict" not in ckpt:
        raise WeightsError(f"{ckpt_path} is not a Lightning checkpoint (no 'state_dict')")
    hparams = dict(ckpt.get("hyper_parameters") or {})
    writer = ckpt.get(RECORD_KEY) or hparams.get("_class_path")
    if not isinstance(writer, str):
        raise WeightsError(f"{ckpt_path} does not record its module class, so there is nothing to convert")
    ckpt["hyper_parameters"] = current_hparams(writer, hparams)
    if RECORD_KEY in ckpt:
        ckpt[RECORD_KEY] = current_class_path(writer)
    buffer = io.BytesIO()
    torch.save(ckpt, buffer)
    out = Path(out if out is not None else ckpt_path)
    write_atomic(out, buffer.getvalue())
    return out
