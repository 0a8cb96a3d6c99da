"""Writing zoo entries: ``python cli.py zoo export``.

An export is three files in one folder, each written atomically, the card last (a folder never holds a card
without its weights):

* ``<name>.safetensors``: the weights (the module's ``zoo_state_dict`` when it has one, e.g. TRM's EMA weights);
* ``<name>.json``: the card (hyperparameters, sha256, metrics, recipe, licence; see :mod:`reprozoo.zoo.registry`);
* ``<name>.ckpt``: a Lightning checkpoint of the same model, for ``Module.load_from_checkpoint(path)`` with
  Lightning alone (``weights_only`` loading works: it holds tensors and plain values only).

With ``model_card=True`` (``zoo export --hub-folder DIR``) the folder also gets a ``README.md``, a Hugging Face
model card with the measured metrics and how to reproduce them: ``hf upload org/repo DIR .`` publishes it, and
``load_model("hf://org/repo/<name>.json")`` loads it back, checked against the card's sha256.

Everything is built and checked in memory before the first file is written: the weights are read back from their
bytes and loaded into a fresh model as :func:`~reprozoo.zoo.registry.load_model` will load them, and the Lightning
checkpoint holds that fresh model's state, so all three forms give the same model. Any failure is a one-line
:class:`~reprozoo._files.WeightsError` and leaves no file behind.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import re
from pathlib import Path
from typing import Any

import torch

from reprozoo._checks import RECORD_KEY, CheckpointError, check_checkpoint_file, current_class_path, current_hparams
from reprozoo._files import WeightsError, offline, write_atomic
from reprozoo.zoo.registry import (
    FORMAT,
    WEIGHTS_SUFFIX,
    WeightsEntry,
    _import,
    _locate,
    _one_line,
    build_module,
    get_weights,
    load_state,
    read_weights,
    read_weights_bytes,
)

_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_-]*(\.[A-Za-z0-9][A-Za-z0-9_-]*)+")


def _check_name(name: str) -> None:
    if not isinstance(name, str) or not _NAME.fullmatch(name):
        raise WeightsError(
            f"zoo name {name!r} must look like 'method_arch.data' (letters, digits, '_', '-', parts joined by '.')"
        )
    if name.rsplit(".", 1)[1].lower() in {"json", "pt", "pth", "ckpt", "safetensors"}:
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
    model_card: bool = False,
    hub_repo: str | None = None,
) -> tuple[Path, Path]:
    """Turn a Lightning checkpoint into a zoo entry in ``out_dir`` (see the module docstring); returns the paths of
    the weights file and the card. Load the result with ``load_model(<card path>)``.

    The module's class is read from the checkpoint (LightningCLI records it) or given as ``module``. The model is
    rebuilt from the checkpoint's hyperparameters (passed through the class's ``zoo_hparams`` when it has one, e.g.
    to drop a distillation teacher) and loaded strictly. ``dtype`` (e.g. ``torch.float16``) stores the
    floating-point tensors in that precision, halving the file; loading copies them back into the module's own
    dtype, so report metrics measured with the exported file.
    """
    _check_name(name)
    ckpt = _read_checkpoint(ckpt_path)
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
    card = dict(
        name=name,
        module=class_path,
        hparams=hparams,
        url=url,
        metrics=dict(metrics or {}),
        recipe=recipe,
        license=license,
        description=description,
    )
    return _write_entry(
        card, safetensors_bytes(state, class_path), out_dir, f"the export of {ckpt_path}", model_card, hub_repo
    )


def export_entry(
    source: str | os.PathLike,
    out_dir: str | os.PathLike,
    *,
    name: str | None = None,
    model_card: bool = False,
    hub_repo: str | None = None,
    **card_fields: Any,
) -> tuple[Path, Path]:
    """Write the zoo entry ``source`` (a zoo name, a card's path or Hub id) into ``out_dir`` as an export: the same
    weights bytes (a first-format ``.pt`` file is converted to safetensors), its card (renamed ``name``, and with
    ``card_fields`` such as ``url``, ``metrics``, ``recipe``, ``license``, ``description`` replaced when given), and
    its Lightning checkpoint; with ``model_card``, the Hugging Face model card. Returns the weights and card paths."""
    entry = get_weights(source)
    name = name or entry.name
    _check_name(name)
    unknown = set(card_fields) - {"url", "metrics", "recipe", "license", "description"}
    if unknown:
        raise TypeError(f"export_entry() got unexpected card fields {sorted(unknown)}")
    path = _locate(entry, offline=offline())
    state = read_weights(entry, path)  # checks the sha256 before anything is parsed
    data = path.read_bytes()
    if path.suffix != WEIGHTS_SUFFIX:
        data = safetensors_bytes(state, entry.module)
    card = entry.to_card()
    for key in ("sha256", "file", "size_bytes"):
        del card[key]
    card.update({k: v for k, v in card_fields.items() if v is not None}, name=name)
    return _write_entry(card, data, out_dir, f"zoo entry {entry.name!r}", model_card, hub_repo)


def safetensors_bytes(state: dict[str, torch.Tensor], class_path: str) -> bytes:
    """A state dict as the bytes of a weights file (safetensors, with the format and the module class as metadata)."""
    from safetensors.torch import save

    state = {k: v.detach().contiguous() for k, v in state.items()}
    return save(state, metadata={"format": FORMAT, "module": class_path})


def lightning_checkpoint(model: torch.nn.Module, class_path: str, hparams: dict[str, Any]) -> dict[str, Any]:
    """A checkpoint that ``Module.load_from_checkpoint`` reads: the model's state and the hyperparameters, with
    LightningCLI's instantiator so that nested ``class_path`` arguments (a TRM's ``net``) are built as the CLI
    builds them. No optimizer or loop state: it is a starting point, not a run to resume."""
    import lightning

    return {
        "pytorch-lightning_version": lightning.__version__,
        "epoch": 0,
        "global_step": 0,
        "state_dict": {k: v.detach().clone() for k, v in model.state_dict().items()},
        "hyper_parameters": {
            **hparams,
            "_class_path": class_path,
            "_instantiator": "lightning.pytorch.cli.instantiate_module",
        },
        RECORD_KEY: class_path,
    }


def _write_entry(
    card: dict[str, Any],
    weights: bytes,
    out_dir: str | os.PathLike,
    label: str,
    model_card: bool,
    hub_repo: str | None,
) -> tuple[Path, Path]:
    name, class_path = card["name"], card["module"]
    # The export must load as load_model will load it: from the bytes, into a fresh model, by its zoo loading path.
    module, state = read_weights_bytes(weights, label)
    if module != class_path:
        raise WeightsError(f"{label} holds a {module}, not a {class_path}")
    fresh = _rebuild(class_path, card["hparams"], label)
    load_state(fresh, state, label)
    buffer = io.BytesIO()
    torch.save(lightning_checkpoint(fresh, class_path, card["hparams"]), buffer)
    out_dir = Path(out_dir)
    entry = WeightsEntry(
        **card,
        sha256=hashlib.sha256(weights).hexdigest(),
        file=f"{name}{WEIGHTS_SUFFIX}",
        size_bytes=len(weights),
    )
    try:
        card_bytes = (json.dumps(entry.to_card(), indent=2, sort_keys=True) + "\n").encode("utf-8")
    except (TypeError, ValueError) as err:
        raise WeightsError(
            f"the card of {name!r} is not JSON (a hyperparameter or metric is no plain value?): {_one_line(err)}"
        ) from err
    files = {out_dir / entry.file: weights, out_dir / f"{name}.ckpt": buffer.getvalue()}
    if model_card:
        files[out_dir / "README.md"] = hub_readme(entry, repo=hub_repo).encode("utf-8")
    files[out_dir / f"{name}.json"] = card_bytes  # last: a card is never there without its weights

    if out_dir.exists() and not out_dir.is_dir():
        raise WeightsError(f"cannot export into {out_dir}: it is a file, not a folder")
    written: list[Path] = []
    try:
        for path, data in files.items():
            write_atomic(path, data)
            written.append(path)
    except BaseException as err:
        for path in written:
            path.unlink(missing_ok=True)
        if isinstance(err, OSError):
            raise WeightsError(f"cannot write the export to {out_dir}: {_one_line(err)}") from err
        raise
    return out_dir / entry.file, out_dir / f"{name}.json"


def _read_checkpoint(ckpt_path: str | os.PathLike) -> dict[str, Any]:
    """A whole Lightning checkpoint, complete (CRCs checked) and with a ``state_dict``; one-line errors."""
    try:
        check_checkpoint_file(ckpt_path)
    except (CheckpointError, FileNotFoundError) as err:
        raise WeightsError(_one_line(err)) from err
    # It also holds optimizer and loop state of arbitrary types: unpickled in full, as it is the user's own file.
    try:
        ckpt = torch.load(ckpt_path, map_location="cpu", weights_only=False)
    except Exception as err:  # whatever unpickling raises: the file is not a checkpoint we can read
        raise WeightsError(f"cannot read checkpoint {ckpt_path}: {_one_line(err)}") from err
    if not isinstance(ckpt, dict) or "state_dict" not in ckpt:
        raise WeightsError(f"{ckpt_path} is not a Lightning checkpoint (no 'state_dict')")
    return ckpt


def _rebuild(class_path: str, hparams: dict[str, Any], source: str | os.PathLike) -> torch.nn.Module:
    try:
        return build_module(class_path, hparams)
    except WeightsError:
        raise
    except Exception as err:  # the module's own argument checks: ValueError, TypeError, ...
        raise WeightsError(
            f"cannot rebuild {class_path} from the hyperparameters of {source}: {_one_line(err)}"
        ) from err


# ----------------------------------------------------------------------------------------------- the model card


def hub_readme(entry: WeightsEntry, *, repo: str | None = None) -> str:
    """The README.md of a Hugging Face model repository holding ``entry`` (the files ``zoo export`` wrote)."""
    repo = repo or "<org>/<repo>"
    cls = entry.module.rsplit(".", 1)[1]
    method = entry.module.split(".")[-2]
    front = ["---", f"license: {entry.license.lower()}", "library_name: pytorch-lightning", "tags:"]
    front += ["- reprozoo", "- pytorch-lightning", f"- {method}", "---", ""]
    lines = front + [f"# {entry.name}", "", entry.description or f"A {cls} of reprozoo.", ""]
    lines += ["| file | what | sha256 |", "|---|---|---|"]
    lines += [f"| `{entry.file}` | the weights ({entry.size_bytes:,} bytes) | `{entry.sha256}` |"]
    lines += [f"| `{entry.name}.json` | the card: hyperparameters, sha256, metrics, recipe, licence | |"]
    lines += [f"| `{entry.name}.ckpt` | the same model as a Lightning checkpoint | |", ""]
    if entry.metrics:
        lines += ["## Metrics", "", "Measured by reprozoo with these weights (not figures reported by a paper):", ""]
        lines += ["| metric | value |", "|---|---|"]
        lines += [f"| {key} | {value:.4g} |" for key, value in sorted(entry.metrics.items())]
        lines += [""]
    lines += ["## Use", "", "```bash", "pip install reprozoo", "```", "", "```python"]
    lines += ["from reprozoo.zoo import load_model", ""]
    lines += [f'model = load_model("hf://{repo}/{entry.name}.json")  # checked against the card\'s sha256', "```", ""]
    lines += [
        "With Lightning's own loader (the class still comes from reprozoo):",
        "",
        "```python",
        "from huggingface_hub import hf_hub_download",
        "",
    ]
    lines += [f"from {entry.module.rsplit('.', 1)[0]} import {cls}", ""]
    lines += [f'model = {cls}.load_from_checkpoint(hf_hub_download("{repo}", "{entry.name}.ckpt"))', "```", ""]
    if entry.recipe:
        lines += ["## Reproduce", "", "```bash", f"reprozoo fit --config {entry.recipe}"]
        lines += [
            f"reprozoo zoo export lightning_logs/<run>/version_<n>/checkpoints/last.ckpt --name {entry.name} "
            f"--hub-folder {entry.name}",
            "```",
            "",
        ]
    lines += [f"Licence: {entry.license}. Made with reprozoo.", ""]
    return "\n".join(lines)


# ----------------------------------------------------------------------------------------------- old checkpoints


def upgrade_checkpoint(ckpt_path: str | os.PathLike, out: str | os.PathLike | None = None) -> Path:
    """Convert, once, a Lightning checkpoint written before the layout of issue 15 (classes under
    ``reprozoo.zoo``, a TRMModule's or EngressionRegressor's network arguments flat in its hyperparameters) into
    today's: ``load_from_checkpoint``, ``--ckpt_path`` and ``zoo export`` then read it as any other. Weights, optimizer
    and loop states are kept as they are. Written atomically to ``out`` (default: over ``ckpt_path``); returns it.
    A checkpoint that is already current is written unchanged."""
    ckpt = _read_checkpoint(ckpt_path)
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
