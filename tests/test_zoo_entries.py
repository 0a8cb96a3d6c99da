"""Tests generated from the registry: every zoo entry must load offline and reproduce the metrics on its card."""

import json

import pytest
import torch

from reprozoo.cli import CONFIG_DIR, run_lightning
from reprozoo.zoo import registry
from tests.conftest import ROOT, real_data

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
    assert entry.recipe and (CONFIG_DIR.parent / entry.recipe).is_file()
    assert entry.size_bytes == (registry.PACKAGE_DIR / entry.file).stat().st_size if entry.url is None else True
    plain = lambda d: json.loads(json.dumps({k: v for k, v in d.items() if k != "weights"}))  # noqa: E731 tuples -> lists
    assert plain(dict(model.hparams)) == plain(entry.hparams)


@pytest.mark.slow
@pytest.mark.parametrize("name", ENTRIES)
def test_entry_reproduces_its_test_metrics_through_the_cli(name, monkeypatch, tmp_path):
    """`python cli.py test --config <recipe> --model.init_args.weights NAME` gives the card's numbers."""
    entry = registry.get_weights(name)
    test_metrics = {k: v for k, v in entry.metrics.items() if k.startswith("test/")}
    if not test_metrics:
        pytest.fail(f"{name}: card has no test metrics to check")
    import yaml

    data_args = yaml.safe_load((CONFIG_DIR.parent / entry.recipe).read_text()).get("data", {}).get("init_args", {})
    # Each test has an empty data root (conftest): recipes on the real MNIST images read the real copy in place
    # (skipped where there is none).
    real = ["--data.init_args.data_dir", str(real_data("mnist"))] if data_args.get("dataset") == "mnist" else []
    monkeypatch.chdir(ROOT)
    cli = run_lightning(
        [
            "test",
            "--config",
            entry.recipe,
            "--model.init_args.weights",
            name,
            "--trainer.logger",
            "false",
            "--trainer.enable_progress_bar",
            "false",
            "--trainer.default_root_dir",
            str(tmp_path),
            *real,
        ]
    )
    measured = cli.trainer.callback_metrics
    for key, value in test_metrics.items():
        # sampling noise only (100 samples per x, 1,000 points): a few percent at most
        assert measured[key].item() == pytest.approx(value, rel=0.05, abs=0.01), key
    # `--model.init_args.weights NAME` put exactly the zoo weights into the CLI's model
    state = lambda m: m.zoo_state_dict() if hasattr(m, "zoo_state_dict") else m.state_dict()  # noqa: E731
    expected = state(registry.load_model(name))
    assert all(torch.equal(state(cli.model)[k], v) for k, v in expected.items())


@pytest.mark.parametrize("name", [n for n in ENTRIES if n.startswith("trm_")])
def test_trm_entry_solves_fresh_puzzles(name):
    """On puzzles it never saw (a new generator seed, the recipe's number of givens), the zoo TRM solves about
    as many as its card says, and every answer it gets right is a valid grid consistent with the givens."""
    import yaml

    from reprozoo.sudoku import consistent, generate_puzzles, is_valid_solution

    entry = registry.get_weights(name)
    recipe = yaml.safe_load((CONFIG_DIR.parent / entry.recipe).read_text())
    givens = recipe["data"]["init_args"]["num_givens"]
    rows = generate_puzzles(100, givens, seed=f"zoo-test:{name}")
    model = registry.load_model(name, offline=True)
    answers = model.solve([q for q, _ in rows], strict=False)  # the wrong ones too: they are checked below
    right = [a == truth for a, (_, truth) in zip(answers, rows)]
    for (question, _), answer, ok in zip(rows, answers, right):
        assert len(answer) == 81 and consistent(question, answer)  # givens are always kept
        if ok:
            assert is_valid_solution(answer)
    # 100 puzzles: binomial sd <= 0.05; allow three of them
    assert sum(right) / len(right) >= entry.metrics["test/exact_acc"] - 0.15
