import os
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
# The real data the run was started with, read once: every test then gets its own empty data root (below), so a
# test can never write into the real one, and tests that read real files ask for them through real_data().
REAL_DATA = Path(os.environ["REPROZOO_DATA"]).resolve() if os.environ.get("REPROZOO_DATA") else None
REQUIRE_DATA = os.environ.get("REPROZOO_REQUIRE_DATA", "").strip().lower() in {"1", "true", "yes", "on"}


@pytest.fixture(autouse=True)
def _isolated_roots(tmp_path, monkeypatch):
    """Every test gets its own zoo cache and data root and starts offline: nothing reaches the network, the
    user's cache or the real data."""
    monkeypatch.setenv("REPROZOO_CACHE", str(tmp_path / "zoo-cache"))
    monkeypatch.setenv("REPROZOO_DATA", str(tmp_path / "data-root"))
    monkeypatch.setenv("REPROZOO_OFFLINE", "1")


def real_data(*parts: str) -> Path:
    """``$REPROZOO_DATA/<parts>`` of the real data (see docs/data.md), read in place. Where the variable is unset
    or the file is missing the test is skipped with a one-line reason, unless ``REPROZOO_REQUIRE_DATA=1`` (CI),
    where that is a failure: CI cannot go green by skipping."""
    name = "/".join(parts) or "."
    if REAL_DATA is None:
        reason = f"needs real data: set REPROZOO_DATA to a folder holding {name}"
    elif not REAL_DATA.joinpath(*parts).exists():
        reason = f"needs real data: {name} is missing under REPROZOO_DATA={REAL_DATA}"
    else:
        return REAL_DATA.joinpath(*parts)
    if REQUIRE_DATA:
        pytest.fail(f"{reason} (REPROZOO_REQUIRE_DATA is set)", pytrace=False)
    pytest.skip(reason)
