import math

import pytest
import torch

from reprozoo.datamodules import SyntheticRegressionDataModule
from reprozoo.datamodules.synthetic import TRUE_FUNCTIONS


def test_true_functions():
    x = torch.tensor([-1.0, 0.0, 1.0, 2.0, 3.0])
    assert torch.allclose(TRUE_FUNCTIONS["square"](x), torch.tensor([0.0, 0.0, 0.5, 2.0, 4.5]))
    assert torch.allclose(TRUE_FUNCTIONS["cubic"](x), x**3 / 3)
    assert torch.allclose(TRUE_FUNCTIONS["softplus"](x), torch.log1p(torch.exp(x)))
    log = TRUE_FUNCTIONS["log"]
    assert log(torch.tensor([2.0])).item() == pytest.approx(math.log(3))  # continuous at 2
    assert log(torch.tensor([1.0])).item() == pytest.approx(1 / 3 + math.log(3) - 2 / 3)  # linear part
    assert log(torch.tensor([5.0])).item() == pytest.approx(math.log(6))


def test_seeded_and_split_shapes():
    a, b = SyntheticRegressionDataModule(n_train=300, seed=3), SyntheticRegressionDataModule(n_train=300, seed=3)
    a.setup(), b.setup()
    for split in ("train", "val", "test"):
        for ta, tb in zip(a.splits[split].tensors, b.splits[split].tensors):
            assert torch.equal(ta, tb)
    x, y = a.splits["train"].tensors
    assert x.shape == y.shape == (300, 1) and x.min() >= 0 and x.max() <= 2
    grid = a.splits["test"].tensors[0]
    assert grid[0].item() == 0 and grid[-1].item() == 4
    c = SyntheticRegressionDataModule(n_train=300, seed=4)
    c.setup()
    assert not torch.equal(c.splits["train"].tensors[0], x)


@pytest.mark.parametrize("noise", ["pre", "post"])
@pytest.mark.parametrize("noise_dist", ["gaussian", "uniform"])
@pytest.mark.parametrize("function", sorted(TRUE_FUNCTIONS))
def test_true_quantiles_match_draws(function, noise, noise_dist):
    dm = SyntheticRegressionDataModule(function=function, noise=noise, noise_dist=noise_dist)
    x = torch.full((40_000, 1), 1.3)
    y = dm.draw_y(x, torch.Generator().manual_seed(0))
    for q in (0.1, 0.5, 0.9):
        # scale-free definition of a quantile, P(Y < t) <= q <= P(Y <= t), up to binomial noise (sd ~0.0015);
        # the two differ where g is flat (square below 0)
        t = dm.true_quantile(x[:1], q)
        assert (y < t).float().mean().item() <= q + 0.01
        assert (y <= t).float().mean().item() >= q - 0.01


@pytest.mark.parametrize(
    "kwargs, field",
    [
        ({"function": "sine"}, "function"),
        ({"train_support": (2.0, 0.0)}, "train_support"),
        ({"n_train": 0}, "n_train"),
        ({"noise_std": -1.0}, "noise_std"),
    ],
)
def test_bad_arguments_name_the_field(kwargs, field):
    with pytest.raises(ValueError, match=field):
        SyntheticRegressionDataModule(**kwargs)
