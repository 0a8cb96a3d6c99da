"""The experiment configs shipped inside the package (``reprozoo/configs/``), named on the command line as in a
checkout: ``--config configs/trm/sudoku_extreme.yaml`` works from any folder, as do the shorter
``--config trm/sudoku_extreme.yaml`` and ``--config trm/sudoku_extreme``. A file of that path in the working folder
is used instead when there is one (your own configs come first)."""

from __future__ import annotations

import os
from pathlib import Path, PurePosixPath

CONFIG_DIR = Path(__file__).resolve().parents[1] / "configs"


def packaged_config(value: str) -> Path | None:
    """The packaged config that ``value`` names, when ``value`` is not a file of the working folder; else None."""
    if not value or os.path.exists(value) or os.path.isabs(value) or "\n" in value:
        return None
    rel = PurePosixPath(value.replace("\\", "/"))
    if rel.parts[:1] == ("configs",):
        rel = PurePosixPath(*rel.parts[1:]) if len(rel.parts) > 1 else PurePosixPath()
    for candidate in (rel, rel.with_name(rel.name + ".yaml")) if rel.name else ():
        path = (CONFIG_DIR / candidate).resolve()
        if path.is_file() and path.is_relative_to(CONFIG_DIR):
            return path
    return None


def list_configs() -> list[str]:
    """The packaged configs, as the command line names them (``configs/<folder>/<name>.yaml``)."""
    return sorted(f"configs/{p.relative_to(CONFIG_DIR).as_posix()}" for p in CONFIG_DIR.rglob("*.yaml"))


def resolve_config_args(words: list[str]) -> list[str]:
    """``words`` with every ``--config``/``-c`` value that names a packaged config replaced by its path."""
    out = list(words)
    for i, word in enumerate(out):
        if word in ("--config", "-c") and i + 1 < len(out):
            found = packaged_config(out[i + 1])
            if found is not None:
                out[i + 1] = str(found)
        elif word.startswith("--config="):
            found = packaged_config(word.split("=", 1)[1])
            if found is not None:
                out[i] = f"--config={found}"
    return out
