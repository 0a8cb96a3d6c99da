import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader

from reprozoo.methods._trm_carry import Carry, halted_after_step
from reprozoo.methods.trm import TRMModule, _softmax_cross_entropy, _vote, stablemax_cross_entropy
from tests.helpers import tiny_trainer, trm_net

TINY = dict(net=trm_net(hidden_size=32, expansion=2.0, puzzle_emb_ndim=32), n=2, T=2, n_sup=3, warmup_steps=1, lr=1e-3)


def _batch(b=4, seed=0):
    gen = torch.Generator().manual_seed(seed)
    labels = torch.randint(2, 11, (b, 81), generator=gen)
    inputs = torch.where(torch.rand(b, 81, generator=gen) < 0.5, labels, torch.ones_like(labels))
    return {"inputs": inputs, "labels": labels, "puzzle_identifiers": torch.zeros(b, dtype=torch.long)}


def _loader(n=16, b=4):
    batch = _batch(n)
    items = [{k: v[i] for k, v in batch.items()} for i in range(n)]
    return DataLoader(items, batch_size=b, shuffle=False)


def test_official_sudoku_model_has_5028866_parameters():
    model = TRMModule()
    assert model.num_trainable_parameters() == 5_028_866
    assert model.num_trainable_parameters(include_puzzle_emb=True) == 5_028_866 + 512
    # post-norm without scale: no norm parameters at all; no biases except the halting head's
    assert all(p.dim() > 1 or name == "q_head.bias" for name, p in model.net.named_parameters())


@pytest.mark.slow
def test_full_size_training_step_runs_on_cpu(tmp_path):
    torch.manual_seed(0)
    model = TRMModule(n_sup=1, warmup_steps=1)
    trainer = tiny_trainer(tmp_path, max_steps=1, limit_val_batches=0)
    trainer.fit(model, _loader(n=2, b=2))
    assert trainer.global_step == 1 and torch.isfinite(trainer.callback_metrics["train/loss"])


def test_attention_variant():
    model = TRMModule(
        **(TINY | {"net": trm_net(hidden_size=32, expansion=2.0, puzzle_emb_ndim=32, mixer="attention", num_heads=4)})
    )
    batch = _batch(2)
    x = model.net.embed(batch["inputs"], batch["puzzle_identifiers"])
    y, z = model.net.initial_state(2)
    (y, z), logits, q = model.net(x, y, z, 1, 1)
    assert logits.shape == (2, 81, 11) and q.shape == (2,) and y.shape == (2, 81 + 16, 32)


def test_embeddings_scaled_and_heads_initialised():
    model = TRMModule(**TINY)
    batch = _batch(1)
    x = model.net.embed(batch["inputs"], batch["puzzle_identifiers"])
    token = batch["inputs"][0, 0]
    assert torch.allclose(x[0, 16], model.net.embed_tokens.weight[token] * 32**0.5)
    assert torch.count_nonzero(x[0, :16]) == 0  # zero-initialised puzzle embedding in the prefix
    assert torch.count_nonzero(model.net.q_head.weight) == 0
    assert torch.all(model.net.q_head.bias == -5)


def test_recursion_does_T_minus_1_passes_without_gradient():
    n, T = 3, 4
    model = TRMModule(**(TINY | {"n": n, "T": T}))
    calls = {True: 0, False: 0}
    model.net.blocks[0].register_forward_hook(
        lambda *a: calls.__setitem__(torch.is_grad_enabled(), calls[torch.is_grad_enabled()] + 1)
    )
    batch = _batch(2)
    x = model.net.embed(batch["inputs"], batch["puzzle_identifiers"])
    y, z = model.net.initial_state(2)
    (y2, z2), logits, _ = model.net(x, y, z, n, T)
    assert calls == {False: (T - 1) * (n + 1), True: n + 1}
    assert not y2.requires_grad and not z2.requires_grad and logits.requires_grad


@pytest.mark.parametrize("training_loop", ["carry", "whole_batch"])
def test_latents_carry_detached_across_supervision_steps(tmp_path, training_loop):
    model = TRMModule(**(TINY | {"n_sup": 3, "halt_exploration_prob": 0.0, "training_loop": training_loop}))
    seen = []
    forward = model.net.forward

    def recording(x, y, z, n, T):
        seen.append((y.clone(), y.grad_fn, z.grad_fn))
        out = forward(x, y, z, n, T)
        seen.append(("out", out[0][0].clone()))
        return out

    model.net.forward = recording
    tiny_trainer(tmp_path, max_steps=3, max_epochs=-1, limit_val_batches=0).fit(model, _loader(n=4, b=4))
    inputs = [s for s in seen if s[0] != "out"]
    outputs = [s[1] for s in seen if s[0] == "out"]
    assert len(inputs) == 3  # three supervision steps of one puzzle batch (halting head starts at -5: no early halt)
    assert all(grad_y is None and grad_z is None for _, grad_y, grad_z in inputs)
    assert torch.equal(inputs[1][0], outputs[0]) and torch.equal(inputs[2][0], outputs[1])


@pytest.mark.slow
def test_whole_batch_takes_one_optimizer_step_per_supervision_step_and_halts(tmp_path):
    TINY_WB = TINY | {"training_loop": "whole_batch"}
    model = TRMModule(**(TINY_WB | {"n_sup": 4, "halt_exploration_prob": 0.0}))
    trainer = tiny_trainer(tmp_path, max_epochs=1, limit_val_batches=0)
    trainer.fit(model, _loader(n=8, b=4))
    assert trainer.global_step == 2 * 4  # two batches, no sample halted before N_sup
    assert trainer.callback_metrics["train/sup_steps"] == 4

    eager = TRMModule(**(TINY_WB | {"n_sup": 4, "halt_exploration_prob": 0.0}))
    eager.net.q_head.bias.data.fill_(20.0)  # halting logit > 0 from the start: every sample halts after step 1
    trainer = tiny_trainer(tmp_path, max_epochs=1, limit_val_batches=0)
    trainer.fit(eager, _loader(n=8, b=4))
    assert trainer.callback_metrics["train/sup_steps"] == 1 and trainer.global_step == 2

    explore = TRMModule(**(TINY_WB | {"n_sup": 4, "halt_exploration_prob": 1.0}))
    explore.net.q_head.bias.data.fill_(20.0)  # would halt at once, but every sample must first run 2..N_sup steps
    trainer = tiny_trainer(tmp_path, max_epochs=1, limit_val_batches=0)
    trainer.fit(explore, _loader(n=8, b=4))
    assert trainer.callback_metrics["train/sup_steps"] >= 2


@pytest.mark.parametrize("training_loop", ["carry", "whole_batch"])
def test_exploration_is_drawn_at_every_supervision_step(tmp_path, training_loop):
    """The official rule draws, at every supervision step, whether each sample explores and its minimum number of
    steps (not once per batch): 4 puzzles that run all 4 steps take exactly 4 such pairs of draws from the module's
    generator, the same ones a replay makes."""
    model = TRMModule(**(TINY | {"n_sup": 4, "halt_exploration_prob": 0.5, "training_loop": training_loop}))
    model.net.q_head.bias.data.fill_(-20.0)  # never halts early: all 4 steps run
    start = model._rng.get_state()
    trainer = tiny_trainer(tmp_path, max_steps=4, max_epochs=-1, limit_val_batches=0)
    trainer.fit(model, _loader(n=4, b=4))
    assert trainer.global_step == 4 and trainer.callback_metrics["train/sup_steps"] == 4
    replay = torch.Generator()
    replay.set_state(start)
    for _ in range(4):
        torch.rand(4, generator=replay), torch.randint(2, 5, (4,), generator=replay)
    assert torch.equal(model._rng.get_state(), replay.get_state())


def test_evaluation_uses_ema_weights_and_full_depth(tmp_path):
    model = TRMModule(**(TINY | {"n_sup": 2, "n_sup_eval": 5}))
    tiny_trainer(tmp_path, max_steps=4, limit_val_batches=0).fit(model, _loader(n=8, b=4))
    ema = model.ema.module
    assert not all(torch.equal(a, b) for a, b in zip(ema.parameters(), model.net.parameters()))
    calls = []
    ema.register_forward_hook(lambda *a: calls.append(1))
    batch = _batch(3)
    pred, conf = model.predict_tokens(batch["inputs"], batch["puzzle_identifiers"])
    assert len(calls) == 5 and pred.shape == (3, 81) and conf.shape == (3,)
    with torch.no_grad():  # the live weights do not matter for inference
        for p in model.net.parameters():
            p.add_(torch.randn_like(p))
    assert torch.equal(model.predict_tokens(batch["inputs"], batch["puzzle_identifiers"])[0], pred)
    from reprozoo.sudoku import generate_puzzles

    # Real puzzles (random tokens would have contradicting givens, which solve refuses); the model is untrained, so
    # strict=False: its wrong answers come back instead of raising.
    puzzles = [question for question, _ in generate_puzzles(3, 40, seed="trm-ema-test")]
    solved = model.solve(puzzles, strict=False)
    with torch.no_grad():  # changing the EMA weights does change what solve returns
        for p in ema.parameters():
            p.mul_(-1.0)
    assert model.solve(puzzles, strict=False) != solved
    assert all(len(s) == 81 and all(a == b for a, b in zip(q, s) if a != ".") for q, s in zip(puzzles, solved))


def test_ema_follows_the_official_update():
    model = TRMModule(**(TINY | {"ema_decay": 0.9}))
    before = [p.detach().clone() for p in model.ema.module.parameters()]
    model.ema.update_parameters(model.net)  # first update copies
    with torch.no_grad():
        for p in model.net.parameters():
            p.add_(1.0)
    model.ema.update_parameters(model.net)
    for e, p, _b in zip(model.ema.module.parameters(), model.net.parameters(), before):
        assert torch.allclose(e, 0.9 * (p - 1.0) + 0.1 * p, atol=1e-6)


@pytest.mark.slow
def test_validation_metrics_and_alignment_score(tmp_path):
    model = TRMModule(**(TINY | {"n_sup": 2, "log_alignment": True}))
    trainer = tiny_trainer(tmp_path, max_epochs=1)
    trainer.fit(model, _loader(n=4, b=4), _loader(n=8, b=4))
    m = trainer.callback_metrics
    assert {"val/exact_acc", "val/cell_acc", "val/halt_acc", "val/aas_latent_cos", "val/aas_pred_agree"} <= set(m)
    assert 0 <= m["val/cell_acc"] <= 1 and -1 <= m["val/aas_latent_cos"] <= 1


@pytest.mark.slow
def test_best_of_k_and_vote():
    model = TRMModule(**(TINY | {"eval_k": 3}))
    batch = _batch(2)
    pred, conf = model.predict_tokens(batch["inputs"], batch["puzzle_identifiers"])
    assert pred.shape == (2, 81)
    cands = torch.tensor([[1, 2], [3, 4], [1, 2], [3, 4], [5, 6]])
    assert _vote(cands, torch.tensor([0.1, 0.9, 0.2, 0.3, 0.99])) == 1  # 2-2 tie, the more confident wins
    assert _vote(cands[:3], torch.tensor([0.1, 0.9, 0.2])) in (0, 2)  # majority beats confidence


def test_randomized_depth_and_curriculum(tmp_path):
    model = TRMModule(**(TINY | {"n": 6, "T": 3, "n_sup": 16, "randomize_depth": True}))
    draws = {model._depth() for _ in range(200)}
    ns, ts, sups = zip(*draws)
    assert min(ns) == 4 and max(ns) == 8 and min(ts) == 2 and max(ts) == 4 and min(sups) == 12 and max(sups) == 20
    cur = TRMModule(**(TINY | {"curriculum": [[2, 1], [4, 2], [6, 3]]}))
    cur.trainer = type("T", (), {"max_epochs": 9, "current_epoch": 0, "max_steps": -1, "global_step": 0})()
    seen = []
    for epoch in (0, 3, 8):
        cur.trainer.current_epoch = epoch
        seen.append(cur._depth()[:2])
    assert seen == [(2, 1), (4, 2), (6, 3)]


def test_stablemax_cross_entropy_matches_independent_computation():
    gen = torch.Generator().manual_seed(0)
    logits = torch.randn(3, 5, 11, generator=gen) * 4
    labels = torch.randint(0, 11, (3, 5), generator=gen)
    x = logits.double().numpy()
    s = np.where(x >= 0, x + 1, 1 / (1 - x))
    p = s / s.sum(-1, keepdims=True)
    expected = -np.log(np.take_along_axis(p, labels.numpy()[..., None], -1))[..., 0]
    assert np.allclose(stablemax_cross_entropy(logits, labels).numpy(), expected)
    assert torch.allclose(
        _softmax_cross_entropy(logits, labels), F.cross_entropy(logits.transpose(1, 2), labels, reduction="none")
    )


@pytest.mark.slow
@pytest.mark.parametrize(
    "optimizer, training_loop", [("adamw", "carry"), ("adam_atan2", "carry"), ("adamw", "whole_batch")]
)
def test_resume_continues_identically_with_ema(tmp_path, optimizer, training_loop):
    """Two epochs straight == one epoch, checkpoint, a new process-like start, one more epoch (EMA, optimizers,
    schedulers, the module's own random draws and the carry included)."""

    def run(epochs, ckpt=None, save=None):
        torch.manual_seed(0)
        model = TRMModule(
            **(
                TINY
                | {"n_sup": 3, "halt_exploration_prob": 0.5, "optimizer": optimizer, "training_loop": training_loop}
            )
        )
        trainer = tiny_trainer(tmp_path, max_epochs=epochs, limit_val_batches=0, enable_checkpointing=False)
        trainer.fit(model, _loader(n=16, b=4), ckpt_path=ckpt)
        if save:
            trainer.save_checkpoint(save)
        return model

    straight = run(2)
    run(1, save=tmp_path / "half.ckpt")
    resumed = run(2, ckpt=tmp_path / "half.ckpt")
    for (name, a), b in zip(straight.state_dict().items(), resumed.state_dict().values()):
        assert torch.equal(a, b), name
    assert any(k.startswith("ema.") for k in straight.state_dict())
    if training_loop == "carry":
        saved = torch.load(tmp_path / "half.ckpt", weights_only=True)["trm_carry"]
        assert saved["world_size"] == 1 and not saved["slots"]["halted"].all(), "the checkpoint should fall mid-carry"
        for key, value in straight._carry.state().items():
            assert torch.equal(value, resumed._carry.state()[key]), key


@pytest.mark.parametrize(
    "kwargs, field", [({"n": 0}, "n"), ({"ema_decay": 1.0}, "ema_decay"), ({"curriculum": [[2]]}, "curriculum")]
)
def test_bad_arguments_name_the_field(kwargs, field):
    with pytest.raises(ValueError, match=f"TRMModule: {field} must"):
        TRMModule(**kwargs)


# ------------------------------------------------------------------------------------------ the streaming carry


def test_carry_refill_takes_new_puzzles_only_into_halted_slots():
    b, s, d = 4, 3, 2
    old = {"inputs": torch.arange(b * 5).view(b, 5), "labels": torch.arange(b * 5).view(b, 5) + 100}
    new = {"inputs": -torch.ones(b, 5, dtype=torch.long), "labels": -2 * torch.ones(b, 5, dtype=torch.long)}
    carry = Carry(
        y=torch.randn(b, s, d),
        z=torch.randn(b, s, d),
        steps=torch.tensor([3, 1, 16, 2]),
        halted=torch.tensor([False, True, True, False]),
        data=old,
    )
    y0, z0 = torch.zeros(b, s, d), torch.full((b, s, d), 7.0)
    nxt = carry.refill(new, y0, z0)
    for i, refilled in enumerate(carry.halted.tolist()):
        src = new if refilled else old
        assert torch.equal(nxt.data["inputs"][i], src["inputs"][i]) and torch.equal(
            nxt.data["labels"][i], src["labels"][i]
        )
        assert torch.equal(nxt.y[i], y0[i] if refilled else carry.y[i])
        assert torch.equal(nxt.z[i], z0[i] if refilled else carry.z[i])
        assert nxt.steps[i] == (0 if refilled else carry.steps[i])
    again = Carry.from_state(nxt.state(), torch.device("cpu"))  # a checkpoint round trip keeps every field
    assert all(torch.equal(v, again.state()[k]) for k, v in nxt.state().items())
    # the official halting rule: N_sup reached, or a positive halting logit, never before the exploration minimum
    steps, q = torch.tensor([1, 2, 3, 4, 4]), torch.tensor([5.0, -5.0, 5.0, -5.0, -5.0])
    assert halted_after_step(steps, q, 4, torch.tensor([0, 0, 4, 0, 0])).tolist() == [True, False, False, True, True]
    assert halted_after_step(torch.tensor([1]), torch.tensor([-9.0]), 1, torch.tensor([0])).tolist() == [True]


def test_carry_streams_new_puzzles_into_halted_slots_and_keeps_the_others(tmp_path):
    """Slot 0 halts after every step (its halting logit is forced positive), the other slots run all N_sup = 3
    steps: slot 0 takes the puzzle at its row of every batch, the others take a new puzzle every third batch, and a
    running slot's latents are those its previous step returned."""
    model = TRMModule(**(TINY | {"n_sup": 3, "halt_exploration_prob": 0.0}))
    model.net.q_head.bias.data.fill_(-20.0)
    forward, embed, seen, tokens = model.net.forward, model.net.embed, [], []

    def recording(x, y, z, n, T):
        (y2, z2), logits, q = forward(x, y, z, n, T)
        seen.append({"y_in": y.clone(), "y_out": y2.clone()})
        return (y2, z2), logits, torch.where(torch.arange(len(q)) == 0, 30.0, q)

    model.net.forward = recording
    model.net.embed = lambda inputs, ids=None: (tokens.append(inputs.clone()), embed(inputs, ids))[1]
    batches = [_batch(4, seed=i) for i in range(7)]
    loader = DataLoader([{k: v.clone() for k, v in batch.items()} for batch in batches], batch_size=None)
    trainer = tiny_trainer(tmp_path, max_steps=7, limit_val_batches=0)
    trainer.fit(model, loader)
    assert trainer.global_step == 7 and len(seen) == 7
    y_init = model.net.initial_state(4)[0]
    for step, record in enumerate(seen):
        for slot in range(4):
            source = step if slot == 0 else step - step % 3  # the batch the slot's puzzle came from
            assert torch.equal(tokens[step][slot], batches[source]["inputs"][slot]), (step, slot)
            fresh = slot == 0 or step % 3 == 0
            expected_y = y_init[slot] if fresh else seen[step - 1]["y_out"][slot]
            assert torch.equal(record["y_in"][slot], expected_y), (step, slot)
    assert trainer.callback_metrics["train/new_puzzles"] == 1.0  # at step 7 every slot took a new puzzle
    assert model._carry.steps.tolist() == [1, 1, 1, 1]


def test_carry_restarts_on_a_batch_of_another_size(tmp_path):
    model = TRMModule(**(TINY | {"n_sup": 3}))
    trainer = tiny_trainer(tmp_path, max_epochs=1, limit_val_batches=0)
    trainer.fit(model, _loader(n=10, b=4))  # batches of 4, 4, 2: the last one starts a fresh carry of 2 slots
    assert trainer.global_step == 3 and model._carry.size == 2 and model._carry.steps.tolist() == [1, 1]


def test_a_carry_of_another_world_size_is_not_resumed(tmp_path, caplog):
    model = TRMModule(**(TINY | {"n_sup": 3}))
    trainer = tiny_trainer(tmp_path, max_steps=2, limit_val_batches=0)
    trainer.fit(model, _loader(n=8, b=4))
    trainer.save_checkpoint(tmp_path / "a.ckpt")
    state = torch.load(tmp_path / "a.ckpt", weights_only=True)
    assert state["trm_carry"]["slots"]["y"].shape[:2] == (1, 4)
    state["trm_carry"] = {
        "world_size": 2,
        "slots": {k: v.expand(2, *v.shape[1:]) for k, v in state["trm_carry"]["slots"].items()},
    }
    torch.save(state, tmp_path / "b.ckpt")
    resumed = TRMModule(**(TINY | {"n_sup": 3}))
    with caplog.at_level("INFO"):
        tiny_trainer(tmp_path, max_steps=3, limit_val_batches=0).fit(
            resumed, _loader(n=8, b=4), ckpt_path=tmp_path / "b.ckpt"
        )
    assert "carry is of 2 process(es), this run has 1" in caplog.text
    assert resumed._carry.steps.tolist() == [1, 1, 1, 1]  # fresh: every slot took a new puzzle at step 3


@pytest.mark.slow
def test_compiled_network_trains_and_computes_as_the_eager_one(tmp_path):
    """compile=True compiles the network in place (nn.Module.compile: the state dict keeps its names) when training
    starts, trains, and its supervision step gives the eager step's outputs to float tolerance."""
    torch.manual_seed(0)
    model = TRMModule(**(TINY | {"n_sup": 2, "compile": True}))
    names = list(model.state_dict())
    trainer = tiny_trainer(tmp_path, max_steps=2, max_epochs=-1, limit_val_batches=0)
    trainer.fit(model, _loader(n=8, b=4))
    assert trainer.global_step == 2 and model.net._compiled_call_impl is not None
    assert list(model.state_dict()) == names
    batch = _batch(4)
    x = model.net.embed(batch["inputs"], batch["puzzle_identifiers"])
    y, z = model.net.initial_state(4)
    (y1, _), logits1, q1 = model.net(x, y, z, 2, 2)  # compiled (__call__)
    (y2, _), logits2, q2 = model.net.forward(x, y, z, 2, 2)  # eager
    torch.testing.assert_close(logits1, logits2, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(q1, q2, atol=1e-4, rtol=1e-4)
