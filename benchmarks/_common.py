"""What the benchmark scripts share: where the project's real data lies, and a quiet Lightning."""

from __future__ import annotations

import logging
import os
import warnings
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SHARED_DATA = ROOT.parent / "shared" / "data"  # read in place, never copied (see its README)


def quiet_lightning(offline: bool = True) -> None:
    """Silence Lightning's per-run banners and the warnings that small CPU runs always trigger; by default never
    download (the benchmarks read local data)."""
    for pattern in (".*does not have many workers.*", ".*LightningCLI's args parameter.*", ".*smaller than the logging.*"):
        warnings.filterwarnings("ignore", pattern)
    for name in ("lightning.pytorch", "lightning.fabric"):
        logging.getLogger(name).setLevel(logging.WARNING)
    if offline:
        os.environ.setdefault("REPROZOO_OFFLINE", "1")
