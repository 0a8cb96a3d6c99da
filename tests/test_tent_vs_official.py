"""benchmarks/tent_vs_official.py: stops with exit status 2 and one line without the official checkout, and its
comparison and set-up, run against a stand-in for the official ``tent.py`` written here from the paper's recipe."""

import importlib.util
import os
import subprocess
import sys

import pytest
import torch

from reprozoo.methods.tent_adapter import TentAdapter
from tests.conftest import ROOT

SCRIPT = ROOT / "benchmarks" / "tent_vs_official.py"


def _script():
    spec = importlib.util.spec_from_file_location("tent_vs_official", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    sys.path.insert(0, str(SCRIPT.parent))  # the script imports its sibling _common, as when run as a script
    try:
        spec.loader.exec_module(module)
    finally:
        sys.path.remove(str(SCRIPT.parent))
    return module


@pytest.mark.parametrize("where", ["nothing", "empty folder"])
def test_without_the_official_checkout_it_stops_with_status_2_and_one_line(tmp_path, where):
    env = {k: v for k, v in os.environ.items() if k != "TENT_OFFICIAL"}
    args = [] if where == "nothing" else ["--official", str(tmp_path)]
    done = subprocess.run(
        [sys.executable, str(SCRIPT), *args], capture_output=True, text=True, env=env, cwd=ROOT, timeout=120
    )
    assert done.returncode == 2 and done.stdout == ""
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("tent_vs_official.py: missing data:")
    assert "--official DIR" in lines[0] and "TENT_OFFICIAL" in lines[0]


STAND_IN = """
import copy
import torch
from torch import nn

def configure_model(model):
    model.train()
    model.requires_grad_(False)
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.requires_grad_(True)
            m.track_running_stats, m.running_mean, m.running_var = False, None, None
    return model

def collect_params(model):
    params, names = [], []
    for nm, m in model.named_modules():
        if isinstance(m, nn.BatchNorm2d):
            params += [m.weight, m.bias]
            names += [nm + ".weight", nm + ".bias"]
    return params, names

def check_model(model):
    assert model.training

class Tent(nn.Module):
    def __init__(self, model, optimizer, steps=1, episodic=False):
        super().__init__()
        self.model, self.optimizer = model, optimizer
        self.states = copy.deepcopy(model.state_dict()), copy.deepcopy(optimizer.state_dict())

    def forward(self, x):
        with torch.enable_grad():
            out = self.model(x)
            loss = -(out.softmax(1) * out.log_softmax(1)).sum(1).mean(0)
            loss.backward()
        self.optimizer.step()
        self.optimizer.zero_grad()
        return out

    def reset(self):
        self.model.load_state_dict(self.states[0])
        self.optimizer.load_state_dict(self.states[1])
"""


def _net(seed=0):
    torch.manual_seed(seed)
    return torch.nn.Sequential(
        torch.nn.Conv2d(3, 4, 3, padding=1),
        torch.nn.BatchNorm2d(4),
        torch.nn.ReLU(),
        torch.nn.AdaptiveAvgPool2d(1),
        torch.nn.Flatten(),
        torch.nn.Linear(4, 3),
    )


def test_the_comparison_finds_ours_equal_to_the_recipe_and_a_changed_recipe_different(tmp_path):
    (tmp_path / "tent.py").write_text(STAND_IN)
    script = _script()
    official = script._import_official(tmp_path)
    g = torch.Generator().manual_seed(3)
    batches = [(torch.randn(8, 3, 6, 6, generator=g) * 2 + 1, torch.randint(0, 3, (8,), generator=g)) for _ in range(4)]
    theirs, ours, again = [], [], []
    wrong = script.adapt_pass(script.official_tent(official, _net()), batches, theirs)
    assert script.adapt_pass(TentAdapter(_net()), batches, ours) == wrong
    assert script.compare("x", ours, theirs) == "x: identical; argmax differs on 0 of 32 images"
    script.adapt_pass(TentAdapter(_net(), lr=0.5), batches, again)  # another learning rate: other logits
    assert "max |logit diff|" in script.compare("x", again, theirs)
    assert not torch.equal(torch.cat(again[1:]), torch.cat(theirs[1:])) and torch.equal(again[0], theirs[0])
    # The limit computes the gradients of every adapted parameter and changes nothing.
    model = official.configure_model(_net())
    params, _ = official.collect_params(model)
    before = [p.detach().clone() for p in params]
    script.limit_pass(model, params, batches)
    assert all(torch.equal(a, b) and p.grad is None for a, b, p in zip(before, params, params))
