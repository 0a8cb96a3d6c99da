"""The weights registry: one card per pretrained model, verified weight files, offline-first loading.

A *card* (JSON) describes one entry: the module's class path and hyperparameters, the sha256 of its weights file,
the metrics we measured, the recipe (config) that made it, its licence and where the file lives. The *weights file*
is a ``.safetensors`` file: tensors only, so reading it can run no code; its metadata names the format and the
module class. Every file is checked against the card's sha256 before it is read (the bytes that were hashed are the
bytes that are parsed), and loaded into the module with ``strict=True``. Files of the first format (``.pt``,
``torch.save`` payloads read with ``weights_only=True``) that ``zoo export`` wrote before are still read.

Where the weights file comes from, by the card's ``url``:

* ``null``: it ships inside the package (``reprozoo/zoo/weights/``, :data:`PACKAGED_BUDGET_BYTES` in all), or lies
  next to the card when the card was read from a path;
* ``https://...`` (or ``http``/``file``): downloaded once into the cache (``$REPROZOO_CACHE``, default
  ``~/.cache/reprozoo``) through a temporary file verified before it is renamed into place;
* ``hf://org/repo[@revision]/path/file``: a file of a Hugging Face Hub model repository, fetched by
  ``huggingface_hub`` into its own cache (``HF_HUB_CACHE``, ``HF_HOME``), at that branch, tag or commit.

``REPROZOO_OFFLINE=1`` (or ``HF_HUB_OFFLINE=1``) never touches the network: a file not in its cache is an error that
says where to put it.

Names: a zoo name (``trm_mlp64.sudoku_gen40``), the path of a card (``zoo_exports/x.y.json``), or a card on the
Hub (``hf://org/repo[@revision]/x.y.json``: its weights file is fetched from the same repository and commit) work
wherever an entry is named: :func:`load_model`, ``weights=`` of every method, ``zoo info``. ``zoo export``
(:mod:`reprozoo.zoo.export`) writes entries; :func:`register_weights` makes a card's name known to this process.
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
import struct
import tempfile
import urllib.request
from pathlib import Path
from typing import Any

import torch

from reprozoo import _files
from reprozoo._checks import current_class_path, current_hparams
from reprozoo._files import WeightsError, sha256_file

FORMAT = "reprozoo-weights/2"  # a .safetensors file; its metadata: {"format": FORMAT, "module": class path}
LEGACY_FORMAT = "reprozoo-weights/1"  # a torch.save payload {"format", "module", "hparams", "state_dict"}, read only
WEIGHTS_SUFFIX = ".safetensors"
PACKAGE_DIR = Path(__file__).parent / "weights"
# Everything shipped inside the wheel together must stay under this size; larger entries go behind a URL.
PACKAGED_BUDGET_BYTES = 12 * 1024 * 1024  # MLP teacher + student for MNIST distillation stored as float16

# hf://org/repo[@revision]/path: Hub repository ids are letters, digits, '-', '_', '.'; a revision is a branch, tag or
# commit without '/'.
_HUB_ID = re.compile(r"hf://(?P<repo>[\w.-]+/[\w.-]+)(?:@(?P<revision>[\w.-]+))?/(?P<file>[^\s@]+)")
_URL = re.compile(r"(https?|file)://\S+")
_SHA256 = re.compile(r"[0-9a-f]{64}")


@dataclasses.dataclass(frozen=True)
class WeightsEntry:
    """One pretrained model: what it is, how it was made, where its file lives and how to check it."""

    name: str  # "method_arch.data", e.g. "engression_mlp.softplus_pre"
    module: str  # class path of the LightningModule
    hparams: dict[str, Any]
    sha256: str  # full hex digest of the weights file
    file: str  # file name: in the package, next to the card, or in the cache
    url: str | None = None  # None: in the package or next to the card; else https://..., hf://org/repo[@rev]/file
    metrics: dict[str, float] = dataclasses.field(default_factory=dict)  # measured by our own recipe
    recipe: str | None = None  # the config that produced it (configs/..., shipped in the package)
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
        if not isinstance(card["sha256"], str) or not _SHA256.fullmatch(card["sha256"]):
            raise WeightsError(f"{source}: bad card ('sha256' must be 64 lower-case hex digits)")
        url = card.get("url")
        if url is not None and not (isinstance(url, str) and (_URL.fullmatch(url) or _HUB_ID.fullmatch(url))):
            raise WeightsError(
                f"{source}: bad card ('url' must be null, an https:// URL or hf://org/repo[@revision]/file, "
                f"got {url!r})"
            )
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
    """Whether ``spec`` names a card file (a path, a string ending in ``.json``, a Hub id) rather than a zoo name."""
    return isinstance(spec, os.PathLike) or str(spec).endswith(".json") or str(spec).startswith("hf://")


def register_weights(entry: WeightsEntry | str | os.PathLike, *, overwrite: bool = False) -> WeightsEntry:
    """Add an entry, given as a :class:`WeightsEntry` or the path of a card (e.g. one ``zoo export`` wrote: its
    weights file is then found next to it); returns the entry."""
    if not isinstance(entry, WeightsEntry):
        entry = get_weights(entry) if str(entry).startswith("hf://") else read_card(entry)
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


def get_weights(name: str | os.PathLike, *, offline: bool | None = None) -> WeightsEntry:
    """The entry called ``name``, or the entry of the card at that path or Hub id (see :func:`is_card_path`); an
    unknown name raises with the closest known names."""
    if str(name).endswith((".pt", ".pth", ".ckpt", WEIGHTS_SUFFIX)):
        raise WeightsError(
            f"{name} is a weights or checkpoint file, not a zoo name: give the card (.json) that `zoo export` wrote "
            "next to the weights file; it holds the sha256 the file is checked against"
        )
    if str(name).startswith("hf://"):
        return _hub_card(str(name), offline=_files.offline() if offline is None else offline)
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


# ----------------------------------------------------------------------------------------------- where files come from


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


def parse_hub_id(spec: str) -> tuple[str, str | None, str]:
    """``hf://org/repo[@revision]/path/file`` as ``(repo_id, revision or None, path/file)``."""
    match = _HUB_ID.fullmatch(spec)
    if match is None:
        raise WeightsError(f"{spec!r} is not a Hub id: write hf://org/repo/file or hf://org/repo@revision/file")
    return match["repo"], match["revision"], match["file"]


def _hub_offline() -> bool:
    # huggingface_hub reads HF_HUB_OFFLINE once, at import; read it again here so that setting it later counts.
    return os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in {"1", "true", "yes", "on"}


def hub_file(spec: str, *, offline: bool = False) -> Path:
    """The local path of a file on the Hugging Face Hub (``hf://org/repo[@revision]/file``), in huggingface_hub's
    cache (``HF_HUB_CACHE``), fetched first unless it is there or ``offline``. Not verified: callers check it."""
    repo, revision, filename = parse_hub_id(spec)
    from huggingface_hub import hf_hub_download
    from huggingface_hub.errors import LocalEntryNotFoundError

    offline = offline or _hub_offline()
    try:
        path = hf_hub_download(
            repo, filename, revision=revision, cache_dir=os.environ.get("HF_HUB_CACHE"), local_files_only=offline
        )
    except LocalEntryNotFoundError as err:
        fetch = f"hf download {repo} {filename}" + (f" --revision {revision}" if revision else "")
        why = "offline mode is on (REPROZOO_OFFLINE / HF_HUB_OFFLINE)" if offline else _one_line(err, 200)
        raise WeightsError(
            f"{spec} is not in the Hugging Face cache and {why}: run `{fetch}` on a machine with network and copy "
            "its cache (HF_HUB_CACHE, default ~/.cache/huggingface/hub) here"
        ) from err
    except Exception as err:  # network, missing repository, revision or file: all one message to the user
        raise WeightsError(f"could not fetch {spec} from the Hugging Face Hub: {_one_line(err)}") from err
    return Path(path)


def _hub_card(spec: str, *, offline: bool) -> WeightsEntry:
    """The entry of a card on the Hub; its weights file comes from the same repository, at the same commit."""
    if not spec.endswith(".json"):
        raise WeightsError(
            f"{spec} names a file that is not a card: name the card (.json) that `zoo export --hub-folder` wrote "
            "beside the weights; it holds the sha256 they are checked against"
        )
    path = hub_file(spec, offline=offline)
    entry = read_card(path)
    repo, revision, filename = parse_hub_id(spec)
    # The snapshot folder is named by the commit the card was read at: pin the weights to it.
    parts = path.parts
    if "snapshots" in parts[:-1]:
        revision = parts[parts.index("snapshots") + 1]
    folder = filename.rpartition("/")[0]
    weights = f"{folder}/{entry.file}" if folder else entry.file
    hub_url = f"hf://{repo}" + (f"@{revision}" if revision else "") + f"/{weights}"
    return dataclasses.replace(entry, url=hub_url)


def weights_path(
    name: str | os.PathLike, *, offline: bool | None = None, cache_dir: str | os.PathLike | None = None
) -> Path:
    """Local path of the verified weights file of ``name`` (a zoo name, a card's path or Hub id), downloading it
    first if needed and allowed."""
    offline = _files.offline() if offline is None else offline
    entry = get_weights(name, offline=offline)
    path = _locate(entry, offline=offline, cache_dir=cache_dir)
    _verify(path, entry.sha256)
    return path


def _locate(entry: WeightsEntry, *, offline: bool, cache_dir: str | os.PathLike | None = None) -> Path:
    """Where the weights file of ``entry`` is on this machine (fetched if needed and allowed); not yet verified."""
    name = entry.name
    if entry.card_path is not None:
        beside = Path(entry.card_path).parent / entry.file
        if beside.is_file():
            return beside
        if entry.url is None:
            raise WeightsError(
                f"card {entry.card_path} names the weights file {entry.file}, which is not next to it ({beside}): "
                "keep the weights file and the .json that `zoo export` wrote in one folder"
            )
    elif entry.url is None:
        path = PACKAGE_DIR / entry.file
        if not path.is_file():
            raise WeightsError(f"zoo entry {name!r} ships inside the package but {path} is missing: reinstall reprozoo")
        return path
    if entry.url.startswith("hf://"):
        return hub_file(entry.url, offline=offline)
    path = Path(cache_dir or _files.cache_dir()) / entry.file
    if path.is_file():
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


# ----------------------------------------------------------------------------------------------- reading


def _import(class_path: str) -> type:
    module_name, _, attr = current_class_path(class_path).rpartition(".")
    try:
        return getattr(importlib.import_module(module_name), attr)
    except (ImportError, AttributeError, ValueError) as err:
        raise WeightsError(f"cannot import {class_path!r}: {err}") from err


def _safetensors_metadata(data: bytes) -> dict[str, str]:
    # The file starts with the length of its JSON header (8 bytes, little-endian), then the header itself.
    (length,) = struct.unpack("<Q", data[:8])
    return json.loads(data[8 : 8 + length]).get("__metadata__") or {}


def read_weights_bytes(data: bytes, label: str, *, legacy: bool = False) -> tuple[str, dict[str, torch.Tensor]]:
    """``(module class path, state dict)`` of a weights file's bytes (called ``label`` in errors): a
    ``.safetensors`` file, or with ``legacy`` a ``.pt`` file of the first format (read with ``weights_only=True``)."""
    if legacy:
        try:
            payload = torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
        except Exception as err:
            raise WeightsError(
                f"{label} is not a readable weights file (truncated or tampered?): {_one_line(err)}"
            ) from err
        if not isinstance(payload, dict) or payload.get("format") != LEGACY_FORMAT or "state_dict" not in payload:
            raise WeightsError(f"{label} is not a reprozoo weights file (expected format {LEGACY_FORMAT!r})")
        return current_class_path(str(payload.get("module"))), payload["state_dict"]
    from safetensors import SafetensorError
    from safetensors.torch import load

    try:
        meta = _safetensors_metadata(data)
        state = load(data)
    except (SafetensorError, ValueError, struct.error, UnicodeDecodeError) as err:
        raise WeightsError(
            f"{label} is not a readable safetensors file (truncated or tampered?): {_one_line(err)}"
        ) from err
    if meta.get("format") != FORMAT or "module" not in meta:
        raise WeightsError(f"{label} is not a reprozoo weights file (its metadata lacks format {FORMAT!r})")
    return current_class_path(meta["module"]), state


def read_weights(entry: WeightsEntry, path: Path) -> dict[str, torch.Tensor]:
    """The state dict in ``path``, the weights file of ``entry``: its bytes are checked against the card's sha256,
    then parsed (the same bytes), and the module class they name must be the card's."""
    data = path.read_bytes()
    got = hashlib.sha256(data).hexdigest()
    if got != entry.sha256:
        raise WeightsError(
            f"sha256 mismatch for {path}: expected {entry.sha256}, got {got}. "
            "The file is corrupt or not the published one; it was not loaded."
        )
    module, state = read_weights_bytes(data, str(path), legacy=path.suffix != WEIGHTS_SUFFIX)
    if module != entry.module:
        raise WeightsError(f"{path} holds a {module}, but zoo entry {entry.name!r} is a {entry.module}")
    return state


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
    """The pretrained model ``name`` (a zoo name, the path of a card ``zoo export`` wrote, or a card on the Hub,
    ``hf://org/repo[@revision]/x.y.json``) as its LightningModule, weights verified and loaded strictly, in eval
    mode."""
    offline = _files.offline() if offline is None else offline
    entry = get_weights(name, offline=offline)
    path = _locate(entry, offline=offline, cache_dir=cache_dir)
    state = read_weights(entry, path)
    model = build_module(entry.module, entry.hparams)
    load_state(model, state, f"zoo entry {entry.name!r} ({path})")
    return model.eval()


def load_pretrained_into(module: torch.nn.Module, name: str | os.PathLike) -> None:
    """Initialise ``module`` from zoo entry ``name``, a card's path or Hub id (``weights=NAME`` in every method's
    constructor)."""
    entry = get_weights(name)
    class_path = f"{type(module).__module__}.{type(module).__qualname__}"
    if entry.module != class_path:
        raise WeightsError(f"zoo entry {name!r} holds a {entry.module}, not a {class_path}")
    path = _locate(entry, offline=_files.offline())
    load_state(module, read_weights(entry, path), f"zoo entry {name!r}")


def _one_line(err: BaseException | str, limit: int = 500) -> str:
    """An error message on one line (strict loading lists keys over many lines), cut at ``limit`` characters."""
    text = " ".join(str(err).split())
    return text if len(text) <= limit else text[: limit - 3] + "..."


_load_packaged_cards()
