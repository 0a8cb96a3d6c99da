"""The one check that user input goes through where it enters (a config, a file, a call): a ``ValueError`` whose one
line names the class, the field, what it must be and what it got; the CLI prints it as ``error: ...``, exit 2."""

from __future__ import annotations


def check(ok: bool, owner: str, field: str, value, requirement: str) -> None:
    """Raise ``ValueError("<owner>: <field> must be <requirement>, got <value!r>")`` unless ``ok``."""
    if not ok:
        raise ValueError(f"{owner}: {field} must be {requirement}, got {value!r}")
