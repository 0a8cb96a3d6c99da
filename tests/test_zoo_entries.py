"""Tests generated from the registry: every zoo entry must load offline and reproduce the metrics on its card."""

import pytest
import torch

from reprozoo.cli import run_lightning
from reprozoo.zoo import registry
from tests.conftest import ROOT

ENTRIES = registry.list_weights()


def test_the_zoo_is_not_empty():
    assert any(name.startswith("engression_") for name in ENTRIES)


def test_packaged_files_stay_within_budget():
    total = sum(p.stat().st_size for p in registry.PACKAGE_DIR.iterdir())
    assert total <= registry.PACKAGED_BUDGET_BYTES


@pytest.mark.parametrize("name", ENTRIES)
def test_entry_loads_offline_and_matches_its_card(name, monkeypatch):
    import urllib.request

    monkeypatch.setattr(urllib.request, "urlopen", lambda *a, **k: pytest.fail("network touched"))
    entry = registry.get_weights(name)
    model = registry.load_model(name, offline=True)
    assert f"{type(model).__module__}.{type(model).__qualname__}" == entry.module
    assert not model.training
    assert entry.metrics, "cards record the metrics our recipe measured"
    assert entry.recipe and (ROOT / entry.recipe).is_file()
    assert entry.size_bytes == (registry.PACKAGE_DIR / entry.file).stat().st_size if entry.url is None else True
    assert {k: v for k, v in model.hparams.items() if k != "weights"} == {
        k: (list(v) if isinstance(v, tuple) else v) for k, v in entry.hparams.items() if k != "weights"
    }


@pytest.mark.parametrize("name", ENTRIES)
def test_entry_reproduces_its_test_metrics_through_the_cli(name, monkeypatch, tmp_path):
    """`python cli.py test --config <recipe> --model.init_args.weights NAME` gives the card's numbers."""
    entry = registry.get_weights(name)
    test_metrics = {k: v for k, v in entry.metrics.items() if k.startswith("test/")}
    if not test_metrics:
        pytest.fail(f"{name}: card has no test metrics to check")
    monkeypatch.chdir(ROOT)
    cli = run_lightning(
        [
            "test",
            "--config", entry.recipe,
            "--model.init_args.weights", name,
            "--trainer.logger", "false",
            "--trainer.enable_progress_bar", "false",
            "--trainer.default_root_dir", str(tmp_path),
        ]
    )  # fmt: skip
    measured = cli.trainer.callback_metrics
    for key, value in test_metrics.items():
        # sampling noise only (100 samples per x, 1,000 points): a few percent at most
        assert measured[key].item() == pytest.approx(value, rel=0.05, abs=0.01), key
    assert torch.equal(cli.model.x_loc, registry.load_model(name).x_loc)
