"""The official TRM optimizers against their formulas, computed here independently in float64."""

import math

import pytest
import torch

from reprozoo.methods.trm import TRMModule
from reprozoo.optim import AdamATan2, AdamATan2SignSGD, SignSGD
from tests.helpers import trm_net


def _reference_adam_atan2(p0, grads, lr, betas, weight_decay):
    """The official kernel's arithmetic (adam-atan2 0.0.3, csrc/adam_atan2.cu), one scalar loop per step."""
    b1, b2 = betas
    p, m, v = p0.double().clone(), torch.zeros_like(p0, dtype=torch.float64), torch.zeros_like(p0, dtype=torch.float64)
    for t, g in enumerate(grads, start=1):
        g = g.double()
        p = p * (1 - lr * weight_decay)
        m = m + (1 - b1) * (g - m)
        v = v + (1 - b2) * (g * g - v)
        denom = v.sqrt() / math.sqrt(1 - b2**t)
        p = p - lr / (1 - b1**t) * torch.atan2(m, denom)
    return p


@pytest.mark.parametrize("weight_decay", [0.0, 1.0])
def test_adam_atan2_equals_the_official_formula(weight_decay):
    torch.manual_seed(0)
    p0 = torch.randn(5, 3, dtype=torch.float64)
    grads = [torch.randn(5, 3, dtype=torch.float64) * 10 ** (k % 3 - 1) for k in range(7)]
    param = torch.nn.Parameter(p0.clone())
    opt = AdamATan2([param], lr=1e-2, betas=(0.9, 0.95), weight_decay=weight_decay)
    for g in grads:
        param.grad = g.clone()
        opt.step()
    torch.testing.assert_close(param.detach(), _reference_adam_atan2(p0, grads, 1e-2, (0.9, 0.95), weight_decay))


def test_adam_atan2_needs_no_epsilon_and_bounds_every_step():
    """The update is atan2(m, sqrt(v)): the first step does not depend on the gradient's scale (where Adam's epsilon
    would make tiny gradients move less), and no coordinate moves by more than lr / (1 - beta1) * pi / 2."""
    moves = []
    for scale in (1e-12, 1.0, 1e6):
        param = torch.nn.Parameter(torch.zeros(4, dtype=torch.float64))
        opt = AdamATan2([param], lr=1e-3, betas=(0.9, 0.95), weight_decay=0.0)
        param.grad = torch.tensor([1.0, -2.0, 0.5, 0.0], dtype=torch.float64) * scale
        opt.step()
        moves.append(param.detach().clone())
    torch.testing.assert_close(moves[0], moves[1])
    torch.testing.assert_close(moves[2], moves[1])
    assert moves[1].abs().max() <= 1e-3 / (1 - 0.9) * math.pi / 2
    assert moves[1][3] == 0  # a zero gradient does not move


def test_sign_sgd_moves_the_rows_used_by_lr_and_decays_them_only():
    weights = torch.nn.Parameter(torch.tensor([[1.0, -2.0], [3.0, 4.0], [0.5, 0.5]]))
    grad = torch.tensor([[0.3, -1e-9], [0.0, 0.0], [-2.0, 0.0]])  # row 1 not used by the batch
    weights.grad = grad
    SignSGD([weights], lr=0.1, weight_decay=0.5).step()
    want = torch.tensor([[1.0 * 0.95 - 0.1, -2.0 * 0.95 + 0.1], [3.0, 4.0], [0.5 * 0.95 + 0.1, 0.5 * 0.95]])
    torch.testing.assert_close(weights.detach(), want)


def test_trm_takes_the_official_pair_of_optimizers_as_one():
    model = TRMModule(
        net=trm_net(hidden_size=16, expansion=1.0, puzzle_emb_ndim=16),
        optimizer="adam_atan2",
        lr=1e-3,
        puzzle_emb_lr=1e-2,
        weight_decay=0.5,
        puzzle_emb_weight_decay=0.25,
    )
    optimizers, schedulers = model.configure_optimizers()
    assert [type(o) for o in optimizers] == [AdamATan2SignSGD] and len(schedulers) == 1
    weights, emb = optimizers[0].param_groups
    assert (weights["initial_lr"], weights["weight_decay"], weights["sign_sgd"]) == (1e-3, 0.5, False)
    assert (emb["initial_lr"], emb["weight_decay"], emb["sign_sgd"]) == (1e-2, 0.25, True)  # lr: the warmup's
    assert [id(p) for p in emb["params"]] == [id(model.net.puzzle_emb.weight)]
    assert id(model.net.puzzle_emb.weight) not in {id(p) for p in weights["params"]}


def test_the_pair_steps_as_adam_atan2_and_sign_sgd_apart():
    torch.manual_seed(0)
    w0, e0 = torch.randn(4, 3), torch.randn(2, 3)
    grads = [(torch.randn(4, 3), torch.randn(2, 3) * torch.tensor([[1.0], [0.0]])) for _ in range(3)]
    w, e = torch.nn.Parameter(w0.clone()), torch.nn.Parameter(e0.clone())
    pair = AdamATan2SignSGD(
        [{"params": [w]}, {"params": [e], "sign_sgd": True, "lr": 0.1, "weight_decay": 0.5}],
        lr=1e-2,
        betas=(0.9, 0.95),
        weight_decay=1.0,
    )
    w2, e2 = torch.nn.Parameter(w0.clone()), torch.nn.Parameter(e0.clone())
    apart = [AdamATan2([w2], lr=1e-2, betas=(0.9, 0.95), weight_decay=1.0), SignSGD([e2], lr=0.1, weight_decay=0.5)]
    for gw, ge in grads:
        w.grad, e.grad, w2.grad, e2.grad = gw.clone(), ge.clone(), gw.clone(), ge.clone()
        pair.step()
        for opt in apart:
            opt.step()
    assert torch.equal(w, w2) and torch.equal(e, e2) and not torch.equal(e[0], e0[0])
    assert torch.equal(e[1], e0[1])  # the row no batch used: untouched


def test_lightning_counts_one_optimizer_step_per_trm_step(tmp_path):
    """With two optimizers Lightning would count two (max_steps would stop at half the steps)."""
    from torch.utils.data import DataLoader

    from tests.helpers import tiny_trainer

    model = TRMModule(net=trm_net(hidden_size=16, expansion=1.0, puzzle_emb_ndim=16), optimizer="adam_atan2", n_sup=2)
    calls = []
    model.net.register_forward_hook(lambda *a: calls.append(1))
    items = [{"inputs": torch.randint(1, 11, (81,)), "labels": torch.randint(2, 11, (81,))} for _ in range(8)]
    trainer = tiny_trainer(tmp_path, max_steps=3, max_epochs=-1, limit_val_batches=0)
    trainer.fit(model, DataLoader(items, batch_size=4))
    assert trainer.global_step == 3 and len(calls) == 3
