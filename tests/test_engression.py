from pathlib import Path

import pytest
import torch
from torch import nn

from reprozoo.methods.engression import EngressionRegressor
from reprozoo.nets.stochastic_mlp import StochasticMLP
from tests.helpers import tiny_data, tiny_engression, tiny_trainer


def test_generator_layers_and_noise_placement():
    base = StochasticMLP(3, 2, hidden_dim=8, num_layer=4, noise_dim=5, noise_every_layer=False)
    every = StochasticMLP(3, 2, hidden_dim=8, num_layer=4, noise_dim=5)  # the default, as the official StoNet
    assert base.input_layer.linear.in_features == 3 + 5
    assert [layer.linear.in_features for layer in base.hidden] == [8, 8]
    assert [layer.linear.in_features for layer in every.hidden] == [13, 13]
    assert base.hidden[0].linear.weight.data_ptr() != base.hidden[1].linear.weight.data_ptr()  # no weight sharing
    res = StochasticMLP(3, 2, hidden_dim=8, num_layer=6, noise_dim=5, resblock=True)
    assert len(res.hidden) == 2 and res(torch.randn(4, 3)).shape == (4, 2)
    with pytest.raises(ValueError, match="num_layer"):
        StochasticMLP(3, 2, num_layer=1)


def test_generator_is_stochastic_and_baseline_is_not():
    x = torch.randn(6, 1)
    model = tiny_engression().eval()
    assert not torch.equal(model(x), model(x))
    baseline = tiny_engression(loss="l1").eval()
    assert baseline.generator.input_layer.noise_dim == 0
    assert torch.equal(baseline(x), baseline(x))


@pytest.mark.parametrize("noise_type", ["normal", "uniform"])
def test_noise_type_and_scale(noise_type):
    from reprozoo.nets.stochastic_mlp import _draw_noise

    eps = _draw_noise(200_000, 1, noise_type, 2.0, torch.empty(0))
    assert eps.std().item() == pytest.approx(2.0, rel=0.02)
    if noise_type == "uniform":
        assert eps.abs().max().item() <= 2.0 * 3**0.5


def test_sample_shapes_and_quantiles_ordered():
    model = tiny_engression(out_dim=2, in_dim=3).eval()
    x = torch.randn(5, 3)
    assert model.sample(x, 7).shape == (5, 7, 2)
    assert model.predict_mean(x).shape == model.predict_median(x).shape == (5, 2)
    q = model.predict_quantiles(x, [0.1, 0.5, 0.9], num_samples=200)
    assert q.shape == (5, 3, 2)
    assert (q[:, 0] <= q[:, 1]).all() and (q[:, 1] <= q[:, 2]).all()


def test_standardisation_measured_on_training_data(tmp_path):
    dm = tiny_data(function="cubic")
    model = tiny_engression()
    tiny_trainer(tmp_path, max_epochs=1).fit(model, datamodule=dm)
    x, y = dm.splits["train"].tensors
    assert bool(model.stats_ready)
    assert torch.allclose(model.x_loc, x.mean(0), atol=1e-5)
    assert torch.allclose(model.x_scale, x.std(0), atol=1e-5)
    assert torch.allclose(model.y_loc, y.mean(0), atol=1e-4)
    assert torch.allclose(model.y_scale, y.std(0), atol=1e-4)
    assert {"x_loc", "x_scale", "y_loc", "y_scale", "stats_ready"} <= set(model.state_dict())


@pytest.mark.slow  # 200 optimizer steps: seconds alone, a minute on a busy 2-core machine
def test_learns_softplus_and_logs_both_terms(tmp_path):
    torch.manual_seed(0)
    dm = tiny_data(n_train=2000, batch_size=250, n_val=500)
    model = tiny_engression(hidden_dim=64, noise_dim=16, eval_samples=100)
    trainer = tiny_trainer(tmp_path, max_epochs=25)
    trainer.fit(model, datamodule=dm)
    metrics = trainer.callback_metrics
    assert {"train/loss_fit", "train/loss_spread", "val/energy_score", "val/crps", "val/coverage80"} <= set(metrics)
    # The true conditional distribution has energy score ~0.42 here; an untrained net is far worse.
    assert metrics["val/energy_score"] < 0.5
    assert 0.65 < metrics["val/coverage80"] < 0.95
    x = torch.linspace(0.2, 1.8, 50)[:, None]
    assert (model.eval().predict_median(x, 400) - dm.true_median(x)).abs().mean() < 0.2


def test_head_mode_keeps_backbone_frozen(tmp_path):
    backbone = nn.Sequential(nn.Linear(1, 4), nn.BatchNorm1d(4), nn.Tanh())
    before = {k: v.clone() for k, v in backbone.state_dict().items()}
    model = tiny_engression(in_dim=4, backbone=backbone)
    tiny_trainer(tmp_path, max_epochs=1).fit(model, datamodule=tiny_data())
    for k, v in backbone.state_dict().items():
        assert torch.equal(v, before[k]), k  # weights and BatchNorm running statistics untouched
    assert not backbone.training
    assert all(not p.requires_grad for p in backbone.parameters())
    assert model.sample(torch.randn(3, 1), 5).shape == (3, 5, 1)


def test_head_mode_dimension_mismatch_is_explained():
    model = tiny_engression(in_dim=3, backbone=nn.Linear(1, 4))
    with pytest.raises(ValueError, match="in_dim is 3"):
        model.sample(torch.randn(2, 1), 2)


@pytest.mark.parametrize(
    "kwargs, field",
    [({"beta": 2.5}, "beta"), ({"m": 1}, "m"), ({"quantiles": [0.5, 1.2]}, "quantiles"), ({"lr": 0}, "lr")],
)
def test_bad_hyperparameters_name_the_field(kwargs, field):
    with pytest.raises(ValueError, match=f"EngressionRegressor: {field} must"):
        EngressionRegressor(**kwargs)


def test_test_and_predict_steps(tmp_path):
    dm = tiny_data()
    model = tiny_engression()
    trainer = tiny_trainer(tmp_path, max_epochs=1)
    trainer.fit(model, datamodule=dm)
    (result,) = trainer.test(model, datamodule=dm, verbose=False)
    assert {"test/energy_score", "test/median_mae", "test/pinball_q0.5"} <= set(result)
    batches = trainer.predict(model, datamodule=dm)
    assert torch.cat(batches).shape == (64, 20, 1)


def test_head_mode_on_a_zoo_entry():
    model = tiny_engression(in_dim=1, backbone="engression_stonet.softplus_pre")
    assert isinstance(model.backbone, EngressionRegressor) and not model.backbone.training
    assert all(not p.requires_grad for p in model.backbone.parameters())
    assert model.hparams.backbone == "engression_stonet.softplus_pre"
    assert model.sample(torch.randn(4, 1), 3).shape == (4, 3, 1)


# ------------------------------------------------------------------ the official package's defaults, the baseline


def _official_defaults() -> dict:
    """The defaults the official ``engression()`` resolves for a continuous response, read from the installed
    package: its signature, and for the arguments whose default is None the values its Engressor fills in."""
    import inspect

    import engression as official  # a dev dependency (pyproject's `dev` extra)
    from engression.engression import Engressor
    from engression.models import StoLayer, StoNet

    signature = {name: p.default for name, p in inspect.signature(official.engression).parameters.items()}
    resolved = Engressor(in_dim=1, out_dim=1, check_device=False, verbose=False)
    assert signature["noise_dim"] is None or signature["noise_dim"] == resolved.noise_dim
    return {
        "num_layer": signature["num_layer"],
        "hidden_dim": signature["hidden_dim"],
        "resblock": signature["resblock"],
        "beta": signature["beta"],
        "standardize": signature["standardize"],
        "batch_size": signature["batch_size"],
        "noise_dim": resolved.noise_dim,
        "add_bn": resolved.add_bn,
        "lr": resolved.lr,
        "num_epochs": resolved.num_epochs,
        # engression() builds its StoNet without naming noise_all_layer: the class default decides
        "noise_all_layer": inspect.signature(StoNet).parameters["noise_all_layer"].default,
        "built_noise_all_layer": resolved.model.noise_all_layer,
        "noise_std": inspect.signature(StoLayer).parameters["noise_std"].default,
    }


def test_defaults_equal_the_official_packages():
    import inspect

    official = _official_defaults()
    net = {name: p.default for name, p in inspect.signature(StochasticMLP).parameters.items()}
    module = {name: p.default for name, p in inspect.signature(EngressionRegressor).parameters.items()}
    assert net["num_layer"] == official["num_layer"] == 2
    assert net["hidden_dim"] == official["hidden_dim"]
    assert net["noise_dim"] == official["noise_dim"]
    assert net["resblock"] == official["resblock"]
    assert net["batch_norm"] == official["add_bn"]
    assert net["noise_every_layer"] == official["noise_all_layer"] == official["built_noise_all_layer"]
    assert net["noise_type"] == "normal" and net["noise_scale"] == official["noise_std"]  # torch.randn * noise_std
    assert module["beta"] == official["beta"]
    assert module["lr"] == official["lr"]
    assert module["standardize"] == official["standardize"]
    # the official loss draws two samples per x (energy_loss_two_sample)
    assert module["m"] == 2


def test_configs_train_for_the_official_number_of_epochs():
    import yaml

    from reprozoo.cli._configs import CONFIG_DIR

    epochs = _official_defaults()["num_epochs"]
    for name in ("base", "softplus"):  # softplus.yaml is self-contained (the zoo recipe); the rest inherit base
        config = yaml.safe_load((CONFIG_DIR / "engression" / f"{name}.yaml").read_text())
        assert config["trainer"]["max_epochs"] == epochs, name
        assert "noise_every_layer" not in config["model"]["init_args"]["generator"]["init_args"], name  # the default


def _layers(net: nn.Module) -> list[tuple[str, tuple]]:
    """The network's layers in order, as (kind, shape): what a like-for-like comparison looks at."""
    out = []
    for module in net.modules():
        if isinstance(module, nn.Linear):
            out.append(("linear", (module.in_features, module.out_features)))
        elif isinstance(module, nn.BatchNorm1d):
            out.append(("batch_norm", (module.num_features,)))
    return out


@pytest.mark.parametrize(
    "kwargs",
    [{}, {"num_layer": 4, "batch_norm": False}, {"num_layer": 3, "noise_every_layer": False}, {"resblock": True}],
)
def test_baseline_is_the_generator_minus_its_noise(kwargs):
    generator = StochasticMLP(3, 2, hidden_dim=8, noise_dim=5, **kwargs)
    baseline = generator.without_noise()
    assert baseline.config == generator.config | {"noise_dim": 0}
    noisy, plain = _layers(generator), _layers(baseline)
    # the same layers in the same order; batch norm exactly where the generator has it, none where it has none
    assert [kind for kind, _ in noisy] == [kind for kind, _ in plain]
    assert [shape for kind, shape in noisy if kind == "batch_norm"] == [s for k, s in plain if k == "batch_norm"]
    assert any(kind == "batch_norm" for kind, _ in plain) == generator.config["batch_norm"]
    for (kind, shape), (_, base_shape) in zip(noisy, plain):
        if kind == "linear":
            assert base_shape[1] == shape[1] and shape[0] - base_shape[0] in (0, 5)  # only noise inputs removed
    x = torch.randn(4, 3)
    assert torch.equal(baseline.eval()(x), baseline(x))


@pytest.mark.parametrize("function", ["softplus", "square", "cubic", "log"])
def test_l1_config_is_the_engression_config_minus_the_noise(function):
    """The resolved L1 experiment (its golden, which tests/test_configs.py pins) differs from engression's only
    in the loss, the generator's noise_dim and the logger's name."""
    import yaml

    golden = Path(__file__).parent / "configs_golden"
    eng = yaml.safe_load((golden / f"engression__{function}.yaml").read_text())
    l1 = yaml.safe_load((golden / f"engression__{function}_l1.yaml").read_text())
    assert (eng["model"]["init_args"]["loss"], l1["model"]["init_args"]["loss"]) == ("energy", "l1")
    assert l1["model"]["init_args"]["generator"]["init_args"]["noise_dim"] == 0
    for config in (eng, l1):
        config["model"]["init_args"]["loss"] = None
        config["model"]["init_args"]["generator"]["init_args"]["noise_dim"] = None
        config["trainer"]["logger"]["init_args"]["name"] = None
    assert l1 == eng
