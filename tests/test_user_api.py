"""What a user of the Python API meets when a call goes wrong: each case names the exception type, the words its
message must hold, and (for the zoo export and the writers) that nothing half-written is left behind.

Covers TRMModule.solve (bad input, wrong answers), EngressionRegressor's seeded sampling and quantile levels, the
zoo export -> load round trip, the atomic writes of PredictionWriter and TentModule, and TRM's quiet checkpointing.
"""

import json
import math
import types
import warnings

import pytest
import torch
from lightning.pytorch.callbacks import ModelCheckpoint
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from reprozoo import _files
from reprozoo.callbacks import predictions as predictions_module
from reprozoo.callbacks.predictions import PredictionWriter
from reprozoo.methods import tent
from reprozoo.methods.engression import EngressionRegressor
from reprozoo.methods.trm import TRMModule, UnsolvedPuzzlesError
from reprozoo.sudoku import answer_problem, encode, generate_puzzles, grid_problem, is_valid_solution
from reprozoo.zoo import export, export_checkpoint, registry
from reprozoo.zoo.registry import WeightsError
from tests.helpers import tiny_data, tiny_engression, tiny_trainer, trm_net

TRM_TINY = {
    "net": trm_net(hidden_size=32, expansion=2.0, puzzle_emb_ndim=32),
    "n": 1,
    "T": 1,
    "n_sup": 1,
    "warmup_steps": 1,
}
ENGRESSION = "reprozoo.methods.engression.EngressionRegressor"


@pytest.fixture(scope="module")
def puzzles() -> list[tuple[str, str]]:
    """Three (question, answer) pairs with unique solutions."""
    return generate_puzzles(3, 40, seed="user-api")


@pytest.fixture(scope="module")
def trm() -> TRMModule:
    torch.manual_seed(0)
    return TRMModule(**TRM_TINY)  # untrained: its answers are wrong


def _with(puzzle: str, cells: dict[int, str]) -> str:
    """``puzzle`` with the given 0-based cells set to the given characters."""
    chars = list(puzzle)
    for cell, value in cells.items():
        chars[cell] = value
    return "".join(chars)


BLANK = "." * 81
BAD_PUZZLE_IDS = [
    "short",
    "long",
    "empty",
    "bad-char",
    "non-ascii",
    "row-clash",
    "column-clash",
    "box-clash",
    "blank",
    "blank-zeros",
    "none",
    "tokens",
]

# ----------------------------------------------------------------------------------------------- TRMModule.solve


@pytest.mark.parametrize(
    "bad, error, words",
    [
        (BLANK[:80], ValueError, ["puzzle 1:", "80 characters", "81"]),
        (BLANK + ".", ValueError, ["puzzle 1:", "82 characters"]),
        ("", ValueError, ["puzzle 1:", "0 characters"]),
        (_with(BLANK, {40: "x"}), ValueError, ["puzzle 1:", "'x'", "position 41"]),
        (_with(BLANK, {3: "é"}), ValueError, ["puzzle 1:", "'é'", "position 4"]),
        (_with(BLANK, {0: "5", 8: "5"}), ValueError, ["puzzle 1:", "contradict", "row 1 has two 5s"]),
        (_with(BLANK, {4: "7", 76: "7"}), ValueError, ["puzzle 1:", "contradict", "column 5 has two 7s"]),
        (_with(BLANK, {60: "3", 80: "3"}), ValueError, ["puzzle 1:", "contradict", "box 9 has two 3s"]),
        (BLANK, ValueError, ["puzzle 1:", "no givens"]),
        ("0" * 81, ValueError, ["puzzle 1:", "no givens"]),
        (None, TypeError, ["puzzle 1 is a NoneType"]),
        (encode(BLANK), TypeError, ["puzzle 1 is a Tensor"]),
    ],
    ids=BAD_PUZZLE_IDS,
)
def test_solve_refuses_bad_puzzles_before_running_the_model(trm, puzzles, monkeypatch, bad, error, words):
    monkeypatch.setattr(trm, "predict_tokens", lambda *a, **k: pytest.fail("the model ran on bad input"))
    with pytest.raises(error) as info:
        trm.solve([puzzles[0][0], bad, puzzles[1][0]])  # the bad one in the middle: all input is checked first
    for word in words:
        assert word in str(info.value)


def test_solve_wants_a_list_and_sane_arguments(trm, puzzles):
    with pytest.raises(TypeError, match=r"single string: use solve\(\[puzzle\]\)"):
        trm.solve(puzzles[0][0])
    for kwargs, field in (({"k": 0}, "k"), ({"batch_size": 0}, "batch_size"), ({"n_sup": 0}, "n_sup")):
        with pytest.raises(ValueError, match=f"{field} must be an integer >= 1"):
            trm.solve([puzzles[0][0]], **kwargs)
    assert trm.solve([]) == []
    questions = [q for q, _ in puzzles]
    from_generator = trm.solve((q for q in questions), strict=False)  # read once, as a list would be
    assert from_generator == trm.solve(tuple(questions), strict=False) and len(from_generator) == 3


def test_wrong_answers_raise_with_every_answer_attached_or_come_back_with_strict_false(trm, puzzles):
    questions = [q for q, _ in puzzles]
    with pytest.raises(UnsolvedPuzzlesError) as info:
        trm.solve(questions)
    err = info.value
    assert isinstance(err, ValueError)
    message = str(err)
    assert message.startswith("puzzle 0: the model's answer is not a valid sudoku (")
    assert "3 of 3 puzzles not solved" in message and "strict=False" in message
    assert sorted(err.problems) == [0, 1, 2] and all("not a valid sudoku" in p for p in err.problems.values())
    lenient = trm.solve(questions, strict=False)
    assert lenient == err.answers and len(lenient) == 3
    for question, answer in zip(questions, lenient):
        assert len(answer) == 81 and answer_problem(question, answer) is not None  # wrong, givens kept
        assert answer_problem(question, answer).startswith("is not a valid sudoku")


def test_right_answers_come_back_as_strings(trm, puzzles, monkeypatch):
    """With a model that answers correctly (its tokens replaced by the true solutions), nothing is raised."""
    truth = torch.stack([encode(a) for _, a in puzzles])  # (3, 81)
    monkeypatch.setattr(trm, "predict_tokens", lambda inputs, *a, **k: (truth[: len(inputs)], torch.ones(len(inputs))))
    answers = trm.solve([q for q, _ in puzzles])
    assert answers == [a for _, a in puzzles] and all(is_valid_solution(a) for a in answers)


def test_a_puzzle_without_solution_is_told_from_a_model_error(trm):
    # No two equal givens in a unit, but cell 9 (row 1, column 9) can hold no digit: 1..8 in its row, 9 below it.
    stuck = _with(BLANK, {**{c: str(c + 1) for c in range(8)}, 17: "9"})
    assert grid_problem(stuck) is None
    with pytest.raises(UnsolvedPuzzlesError, match="puzzle 0: the puzzle has no solution"):
        trm.solve([stuck])


# ----------------------------------------------------------------------------------------------- engression


@pytest.fixture(scope="module")
def engression() -> EngressionRegressor:
    torch.manual_seed(0)
    return tiny_engression().eval()


X = torch.linspace(0, 2, 7)[:, None]  # (7, 1)


@pytest.mark.parametrize("method", ["sample", "predict_mean", "predict_median", "predict_quantiles"])
def test_seed_reproduces_draws_and_leaves_the_global_rng_alone(engression, method):
    call = getattr(engression, method)
    args = (X, [0.1, 0.5, 0.9]) if method == "predict_quantiles" else (X,)
    before = torch.random.get_rng_state()
    first, again, other = call(*args, seed=1), call(*args, seed=1), call(*args, seed=2)
    assert torch.equal(torch.random.get_rng_state(), before)  # seeded calls draw nothing from the global stream
    assert torch.equal(first, again) and not torch.equal(first, other)
    torch.manual_seed(5)
    unseeded = call(*args)
    torch.manual_seed(5)
    assert torch.equal(call(*args), unseeded)  # seed=None: the global stream, as before


@pytest.mark.parametrize("level", [0.0, 1.0, -0.1, 1.5, 90, math.nan, math.inf, -math.inf])
def test_quantile_levels_outside_zero_one_are_refused_by_value(engression, level):
    before = torch.random.get_rng_state()
    with pytest.raises(ValueError, match="not in \\(0, 1\\)") as info:
        engression.predict_quantiles(X, [0.5, level])
    assert repr(level) in str(info.value)
    assert torch.equal(torch.random.get_rng_state(), before)  # refused before any sampling


@pytest.mark.parametrize(
    "call, error, words",
    [
        (lambda m: m.predict_quantiles(X, []), ValueError, "q is empty"),
        (lambda m: m.predict_quantiles(X, 0.5), TypeError, "sequence of levels"),
        (lambda m: m.predict_quantiles(X, ["a"]), TypeError, "'a' is not a number"),
        (lambda m: m.predict_quantiles(X, [0.5], seed="x"), TypeError, "seed must be an integer"),
        (lambda m: m.sample(X, 0), ValueError, "num_samples must be an integer >= 1"),
    ],
    ids=["empty", "scalar", "not-a-number", "bad-seed", "no-samples"],
)
def test_other_bad_sampling_arguments(engression, call, error, words):
    with pytest.raises(error, match=words):
        call(engression)


def test_quantile_levels_as_tensor_and_shape(engression):
    q = engression.predict_quantiles(X, torch.tensor([0.1, 0.9]), num_samples=50, seed=0)
    assert q.shape == (7, 2, 1) and bool((q[:, 0] <= q[:, 1]).all())


# ----------------------------------------------------------------------------------------------- zoo export


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A tiny engression model after one epoch, and its Lightning checkpoint."""
    root = tmp_path_factory.mktemp("trained")
    torch.manual_seed(0)
    model = tiny_engression()
    trainer = tiny_trainer(root, max_epochs=1, enable_checkpointing=False)
    trainer.fit(model, datamodule=tiny_data(n_train=128, n_val=32, n_test=32))
    ckpt = root / "model.ckpt"
    trainer.save_checkpoint(ckpt)
    return model.eval(), ckpt


@pytest.fixture
def private_registry(monkeypatch):
    monkeypatch.setattr(registry, "_REGISTRY", dict(registry._REGISTRY))


def test_export_from_the_cli_loads_back_from_its_card(trained, tmp_path, capsys, private_registry):
    """The documented path: `zoo export` -> `load_model(<card>)`, `weights=<card>`, `register_weights(<card>)`."""
    from reprozoo.cli import main  # here, not at the top: the rest of this file does not depend on the CLI

    model, ckpt = trained
    out = tmp_path / "zoo_exports"
    args = ["zoo", "export", str(ckpt), "--name", "engression_user.tiny", "--out", str(out), "--module", ENGRESSION]
    assert main(args) == 0, capsys.readouterr().err
    card = out / "engression_user.tiny.json"
    assert sorted(p.name for p in out.iterdir()) == [
        "engression_user.tiny.ckpt",
        "engression_user.tiny.json",
        "engression_user.tiny.safetensors",
    ]

    for spec in (card, str(card)):  # a Path or a string ending in .json
        loaded = registry.load_model(spec)
        assert isinstance(loaded, EngressionRegressor) and not loaded.training
        assert loaded.state_dict().keys() == model.state_dict().keys()
        assert all(torch.equal(v, model.state_dict()[k]) for k, v in loaded.state_dict().items())
        assert torch.equal(loaded.sample(X, 5, seed=3), model.sample(X, 5, seed=3))
    assert registry.get_weights(str(card)).sha256 == registry.sha256_file(out / "engression_user.tiny.safetensors")

    tuned = tiny_engression(weights=str(card))  # `--model.init_args.weights <card>` in a config
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in tuned.state_dict().items())

    registry.register_weights(card)  # and by name, for the rest of the process
    assert "engression_user.tiny" in registry.list_weights()
    assert torch.equal(registry.load_model("engression_user.tiny").sample(X, 5, seed=3), model.sample(X, 5, seed=3))


@pytest.mark.parametrize("name", ["bad name", "nodots", "a..b", ".a.b", "method_arch.json", "../up.x", ""])
def test_export_refuses_bad_names_and_writes_nothing(trained, tmp_path, name):
    _, ckpt = trained
    with pytest.raises(WeightsError, match="method_arch.data") as info:
        export_checkpoint(ckpt, name, tmp_path / "out", module=ENGRESSION)
    assert "\n" not in str(info.value) and not (tmp_path / "out").exists()


def _damaged(ckpt, tmp_path):
    bad = tmp_path / "bad.ckpt"
    bad.write_bytes(ckpt.read_bytes()[:-200])
    return bad


def _text(ckpt, tmp_path):
    path = tmp_path / "notes.ckpt"
    path.write_text("not a checkpoint\n")
    return path


@pytest.mark.parametrize(
    "make_ckpt, kwargs, words",
    [
        (lambda ckpt, tmp: tmp / "missing.ckpt", {}, "does not exist"),
        (_damaged, {}, "truncated or corrupt"),
        (_text, {}, "not a PyTorch checkpoint"),
        (
            lambda ckpt, tmp: ckpt,
            {"module": "reprozoo.methods.nca.NCAModule"},
            "cannot rebuild reprozoo.methods.nca.NCAModule",
        ),
        (lambda ckpt, tmp: ckpt, {"module": "reprozoo.zoo.nope.Model"}, "cannot import"),
        (lambda ckpt, tmp: ckpt, {}, "does not record its module class"),
    ],
    ids=["missing", "truncated", "text-file", "other-module", "unknown-module", "no-class"],
)
def test_export_of_a_bad_checkpoint_is_one_line_and_writes_nothing(trained, tmp_path, make_ckpt, kwargs, words):
    _, ckpt = trained
    with pytest.raises(WeightsError, match=words) as info:
        export_checkpoint(make_ckpt(ckpt, tmp_path), "engression_user.bad", tmp_path / "out", **kwargs)
    assert "\n" not in str(info.value) and not (tmp_path / "out").exists()


def test_export_that_cannot_write_its_card_leaves_no_weights_file(trained, tmp_path, monkeypatch):
    _, ckpt = trained
    real = export.write_atomic

    def card_fails(path, data):
        if str(path).endswith(".json"):
            raise OSError(28, "No space left on device")
        real(path, data)

    monkeypatch.setattr(export, "write_atomic", card_fails)
    with pytest.raises(WeightsError, match="cannot write the export .*No space left") as info:
        export_checkpoint(ckpt, "engression_user.full", tmp_path / "out", module=ENGRESSION)
    assert "\n" not in str(info.value) and list((tmp_path / "out").iterdir()) == []
    (tmp_path / "file").write_text("")
    with pytest.raises(WeightsError, match="it is a file, not a folder"):
        export_checkpoint(ckpt, "engression_user.full", tmp_path / "file", module=ENGRESSION)


def test_loading_a_damaged_or_incomplete_export_is_refused(trained, tmp_path):
    _, ckpt = trained
    weights, card = export_checkpoint(ckpt, "engression_user.dmg", tmp_path / "out", module=ENGRESSION)
    for spec in (weights, str(weights), ckpt):
        with pytest.raises(WeightsError, match="give the card \\(.json\\)"):
            registry.load_model(spec)
    weights.write_bytes(weights.read_bytes()[:-10])
    with pytest.raises(WeightsError, match="sha256 mismatch"):
        registry.load_model(card)
    weights.unlink()
    with pytest.raises(WeightsError, match="not next to it"):
        registry.load_model(card)
    sneaky = json.loads(card.read_text()) | {"file": "../model.ckpt"}
    card.write_text(json.dumps(sneaky))
    with pytest.raises(WeightsError, match="plain file name"):
        registry.load_model(card)
    with pytest.raises(WeightsError, match="cannot read card"):
        registry.load_model(tmp_path / "out" / "nothing.json")


# ----------------------------------------------------------------------------------------------- atomic writes


@pytest.fixture
def recorded_writes(monkeypatch):
    """Every write_atomic call of the writers under test: (path name, bytes)."""
    calls = []

    def record(module):
        real = module.write_atomic

        def write(path, data):
            calls.append((path.name, data))
            real(path, data)

        monkeypatch.setattr(module, "write_atomic", write)

    record(predictions_module)
    record(tent)
    record(_files)  # figures: save_figure writes through it
    return calls


@pytest.mark.parametrize("fmt", ["pt", "csv"])
def test_prediction_files_are_written_atomically(tmp_path, recorded_writes, fmt):
    writer = PredictionWriter(output_dir=tmp_path, format=fmt)
    trainer = types.SimpleNamespace(world_size=1, global_rank=0, log_dir=None, default_root_dir=tmp_path)
    outputs = [{"pred": torch.tensor([1, 2])}, {"pred": torch.tensor([3])}]
    writer.write_on_epoch_end(trainer, None, outputs, [[0, 1], [2]])
    ((name, data),) = recorded_writes
    assert sorted(p.name for p in tmp_path.iterdir()) == [name] == [f"predictions.{fmt}"]
    assert (tmp_path / name).read_bytes() == data  # one complete file, no temporary left
    if fmt == "csv":
        assert data.decode().splitlines() == ["index,dataloader,pred", "0,0,1", "1,0,2", "2,0,3"]
    else:
        assert torch.load(tmp_path / name, weights_only=True)["batch_indices"] == [[[0, 1], [2]]]


def test_prediction_files_per_batch_are_written_atomically(tmp_path, recorded_writes):
    writer = PredictionWriter(output_dir=tmp_path, write_interval="batch")
    trainer = types.SimpleNamespace(world_size=2, global_rank=1, log_dir=None, default_root_dir=tmp_path)
    writer.write_on_batch_end(trainer, None, torch.ones(2, 3), [4, 5], None, batch_idx=7, dataloader_idx=0)
    ((name, _),) = recorded_writes
    assert name == "predictions_dl0_batch7_rank1.pt" and [p.name for p in tmp_path.iterdir()] == [name]
    assert torch.load(tmp_path / name, weights_only=True)["batch_indices"] == [4, 5]


class _TinyBNNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv, self.bn, self.fc = nn.Conv2d(3, 4, 3, padding=1), nn.BatchNorm2d(4), nn.Linear(4, 3)

    def forward(self, x):  # (B, 3, H, W) -> (B, 3)
        return self.fc(torch.relu(self.bn(self.conv(x))).mean(dim=(2, 3)))


def test_tent_summary_table_and_figure_are_written_atomically(tmp_path, recorded_writes):
    torch.manual_seed(0)
    data = TensorDataset(torch.randn(8, 3, 6, 6), torch.randint(0, 3, (8,)))
    module = tent.TentModule(_TinyBNNet(), domains=["clean"])
    tiny_trainer(tmp_path).test(module, dataloaders=DataLoader(data, batch_size=4))
    out = tmp_path / "tent"
    written = {name: data for name, data in recorded_writes}
    assert (
        sorted(written)
        == sorted(p.name for p in out.iterdir())
        == ["error_per_domain.png", "summary.csv", "summary.md"]
    )
    assert all((out / name).read_bytes() == data for name, data in written.items())
    assert written["error_per_domain.png"].startswith(b"\x89PNG")


# ----------------------------------------------------------------------------------------------- quiet TRM training


def test_trm_checkpointing_every_n_steps_does_not_print_lightnings_manual_optimisation_advice(tmp_path):
    inputs = torch.stack([encode(q) for q, _ in generate_puzzles(4, 40, seed="quiet")])  # (4, 81)
    items = [{"inputs": x, "labels": x, "puzzle_identifiers": torch.tensor(0)} for x in inputs]
    model = TRMModule(**TRM_TINY)
    trainer = tiny_trainer(
        tmp_path,
        max_steps=2,
        limit_val_batches=0,
        callbacks=[ModelCheckpoint(dirpath=tmp_path / "ckpt", every_n_train_steps=1)],
    )
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")  # all warnings recorded, except those TRM filters on purpose
        trainer.fit(model, DataLoader(items, batch_size=2))
    assert (tmp_path / "ckpt").is_dir() and any((tmp_path / "ckpt").iterdir())
    shown = [str(w.message) for w in caught]
    assert not any("manual optimization and every_n_train_steps" in m for m in shown), shown
