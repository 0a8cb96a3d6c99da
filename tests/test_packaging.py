"""What ``pip install reprozoo`` needs: every third-party package the source imports is declared in pyproject.toml
(an undeclared one works here only because something else pulled it in), and the typing marker ships."""

from __future__ import annotations

import ast
import re
import sys
from importlib.metadata import packages_distributions

import pytest

from tests.conftest import ROOT

tomllib = pytest.importorskip("tomllib")  # Python >= 3.11

PACKAGE = ROOT / "reprozoo"
PYPROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text())
# The robustbench extra, imported only through reprozoo/zoo/_robustbench.py; the faiss extra, only through
# reprozoo/methods/_knn.py (KNNIndex's faiss backends).
OPTIONAL = {"robustbench", "autoattack", "faiss"}


def _normalise(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def _requirement_names(requirements: list[str]) -> set[str]:
    return {_normalise(re.match(r"[A-Za-z0-9_.-]+", r).group(0)) for r in requirements}


def _imported_top_level_names() -> set[str]:
    """Top-level modules imported anywhere in the package (imports inside functions count too)."""
    names = set()
    for path in PACKAGE.rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                names |= {alias.name.split(".")[0] for alias in node.names}
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                names.add(node.module.split(".")[0])
    return {n for n in names if n not in sys.stdlib_module_names and n != "reprozoo"}


def test_every_imported_package_is_declared():
    declared = _requirement_names(PYPROJECT["project"]["dependencies"])
    distributions = packages_distributions()
    undeclared = {}
    for name in sorted(_imported_top_level_names() - OPTIONAL):
        dists = {_normalise(d) for d in distributions.get(name, [name])}
        if not dists & declared:
            undeclared[name] = sorted(dists)
    assert not undeclared, f"imported but not in [project] dependencies of pyproject.toml: {undeclared}"


def test_optional_imports_have_their_extra():
    extras = PYPROJECT["project"]["optional-dependencies"]
    assert "robustbench" in _requirement_names(extras["robustbench"])
    assert "faiss-cpu" in _requirement_names(extras["faiss"])


def test_the_typing_marker_ships():
    assert (PACKAGE / "py.typed").is_file()
    assert "py.typed" in PYPROJECT["tool"]["setuptools"]["package-data"]["reprozoo"]
    assert "Typing :: Typed" in PYPROJECT["project"]["classifiers"]
