"""The exit of a CPU (gloo) distributed run: ``import reprozoo`` registers the handler that destroys a live process
group at exit (reprozoo/_distributed.py), without which two-process runs aborted now and then after finishing."""

from __future__ import annotations

import subprocess
import sys

import pytest

from tests.conftest import ROOT

_EXIT_SCRIPT = """
import sys
import torch.distributed as dist
import reprozoo  # registers the exit handler
destroy = dist.destroy_process_group
def recorded(*args, **kwargs):
    print("destroyed", dist.is_initialized(), flush=True)
    destroy(*args, **kwargs)
dist.destroy_process_group = recorded
if sys.argv[1] == "group":
    dist.init_process_group("gloo", init_method="file://" + sys.argv[2], rank=0, world_size=1)
print("exiting", flush=True)
"""


@pytest.mark.parametrize("group", [True, False], ids=["with_group", "without_group"])
def test_importing_reprozoo_destroys_a_live_process_group_at_exit(group, tmp_path):
    """gloo groups left alive at exit abort the process now and then (reprozoo/_distributed.py): the handler that
    ``import reprozoo`` registers destroys the group at exit, and does nothing where there is none."""
    args = [sys.executable, "-c", _EXIT_SCRIPT, "group" if group else "none", str(tmp_path / "store")]
    done = subprocess.run(args, cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    expected = ["exiting", "destroyed True"] if group else ["exiting"]
    assert done.stdout.split("\n")[:-1] == expected
