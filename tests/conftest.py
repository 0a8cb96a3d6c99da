import os
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SHARED_DATA = ROOT.parent / "shared" / "data"


@pytest.fixture(autouse=True)
def _isolated_zoo_cache(tmp_path, monkeypatch):
    """Every test gets its own zoo cache and starts offline: nothing reaches the network or the user's cache."""
    monkeypatch.setenv("REPROZOO_CACHE", str(tmp_path / "zoo-cache"))
    monkeypatch.setenv("REPROZOO_OFFLINE", "1")


def shared_data(*parts: str) -> Path:
    """A file of ../shared/data, read in place; skipped with a reason only where ../shared is absent (a user's
    clone), never in CI, where a missing file is an error."""
    path = SHARED_DATA.joinpath(*parts)
    if not SHARED_DATA.is_dir():
        if os.environ.get("CI"):
            raise FileNotFoundError(f"{SHARED_DATA} is missing in CI")
        pytest.skip(f"{SHARED_DATA} is absent (a user's clone): real-data test skipped")
    return path
