"""The house rules of the package, checked on its source: which folder may import which (no arrow from a lower
floor back up), one kind of thing per folder, and files short enough to read."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "reprozoo"

# What each part of the package may import of reprozoo, floor by floor (CONTRIBUTING.md draws the same picture).
# Floor 0, plumbing and domains that know nothing of Lightning modules: _files, _validate, _xla, _checks,
# _distributed, sudoku, transforms, optim.
# Floor 1: nets (plain nn.Modules), callbacks (any LightningModule), datamodules, zoo (the weights registry).
# Floor 2: methods (the LightningModules). Floor 3: cli.
ALLOWED = {
    "_files": set(),
    "_validate": set(),
    "_xla": set(),
    "_distributed": set(),
    "_checks": {"_xla"},
    "sudoku": {"_validate", "_files"},
    "transforms": {"_validate", "_files"},
    "optim": {"_validate"},
    "nets": {"_validate", "_files"},
    "callbacks": {"_validate", "_files", "sudoku"},
    "datamodules": {"_validate", "_files", "sudoku", "transforms"},
    "zoo": {"_validate", "_files", "_checks", "nets"},
    "methods": {"_validate", "optim", "_files", "_checks", "_xla", "sudoku", "nets", "zoo"},
    "cli": {
        "_validate",
        "_files",
        "_checks",
        "_xla",
        "sudoku",
        "transforms",
        "optim",
        "nets",
        "callbacks",
        "datamodules",
        "zoo",
        "methods",
    },
}


def _part(path: Path) -> str:
    rel = path.relative_to(PACKAGE)
    return rel.parts[0].removesuffix(".py")


def _imports(path: Path) -> set[str]:
    """The parts of reprozoo that ``path`` imports, anywhere in the file (imports inside functions count too)."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        names = []
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names = [node.module] + (
                [f"{node.module}.{a.name}" for a in node.names] if node.module == "reprozoo" else []
            )
        for name in names:
            parts = name.split(".")
            if (
                parts[0] == "reprozoo"
                and len(parts) > 1
                and ((PACKAGE / parts[1]).exists() or (PACKAGE / f"{parts[1]}.py").exists())
            ):
                found.add(parts[1])
    return found


SOURCES = sorted(p for p in PACKAGE.rglob("*.py") if p.name != "__init__.py" or p.parent != PACKAGE)


@pytest.mark.parametrize("path", SOURCES, ids=lambda p: str(p.relative_to(PACKAGE)))
def test_imports_go_down_the_floors(path):
    part = _part(path)
    assert part in ALLOWED, f"{part}: a new part of the package; give it a floor in ALLOWED (and CONTRIBUTING.md)"
    upward = _imports(path) - ALLOWED[part] - {part}
    assert not upward, f"{path.relative_to(PACKAGE)} ({part}) imports {sorted(upward)}: an arrow back up the floors"


def test_every_part_has_a_floor():
    parts = {_part(p) for p in SOURCES}
    assert parts <= set(ALLOWED), sorted(parts - set(ALLOWED))


def test_methods_are_lightning_modules_and_nets_are_not():
    """One kind of thing per folder: LightningModules live in methods/, plain nn.Modules in nets/."""
    import lightning as L
    from torch import nn

    import reprozoo.methods as methods
    import reprozoo.nets as nets

    for name in methods.__all__:
        obj = getattr(methods, name)
        if isinstance(obj, type) and issubclass(obj, nn.Module) and name != "TentAdapter":
            assert issubclass(obj, L.LightningModule), f"reprozoo.methods.{name} is not a LightningModule"
    for name in nets.__all__:
        obj = getattr(nets, name)
        if isinstance(obj, type) and issubclass(obj, nn.Module):
            assert not issubclass(obj, L.LightningModule), f"reprozoo.nets.{name} is a LightningModule: methods/"
