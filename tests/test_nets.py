import numpy as np
import pytest
import torch
from torch import nn

from reprozoo.nets import (
    MLP,
    CifarResNet,
    ConvNet,
    create_net,
    list_nets,
    load_legacy_cifar_resnet,
    register_net,
)
from reprozoo.zoo.registry import WeightsError
from tests.conftest import real_data

PRETRAINED = {20: "resnet20-12fca82f.th", 32: "resnet32-d509ac18.th", 44: "resnet44-014dd654.th"}


def n_params(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


# ------------------------------------------------------------------ the registry, every net


@pytest.mark.parametrize("name", list_nets())
def test_every_registered_net_builds_runs_and_backprops(name):
    torch.manual_seed(0)
    net = create_net(name)
    assert isinstance(net.num_classes, int) and isinstance(net.num_features, int)
    x = torch.randn(2, *net.input_shape)
    out = net(x)
    assert out.shape == (2, net.num_classes)
    assert net.forward_features(x).shape == (2, net.num_features)
    out.square().sum().backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in net.parameters())


def test_registry_lists_creates_and_overrides():
    assert {"animalnet", "biganimalnet", "mlp_fmnist", "convnet", "resnet20", "resnet56"} <= set(list_nets())
    assert list_nets("resnet*") == ["resnet20", "resnet32", "resnet44", "resnet56"]
    net = create_net("animalnet", dropout=0.5, num_classes=5)
    assert isinstance(net, MLP) and net.num_classes == 5 and isinstance(net.hidden[0].drop, nn.Dropout)
    with pytest.raises(ValueError, match="no net named 'resnet7'.*resnet20"):
        create_net("resnet7")

    def resnet20(**kwargs):
        return CifarResNet(20, **kwargs)

    with pytest.raises(ValueError, match="'resnet20' is already registered"):
        register_net(resnet20)
    assert create_net("resnet20").depth == 20


def test_tutorial_presets_have_the_tutorial_widths():
    def widths(net):
        return [m.out_features for m in net.modules() if isinstance(m, nn.Linear)]

    animal, big, fmnist = create_net("animalnet"), create_net("biganimalnet"), create_net("mlp_fmnist")
    assert animal.in_features == big.in_features == 3 * 32 * 32
    assert widths(animal) == [128, 32, 3] and isinstance(animal.hidden[0].act, nn.ReLU)
    assert widths(big) == [124, 64, 3] and isinstance(big.hidden[0].act, nn.LeakyReLU)
    assert fmnist.in_features == 784 and widths(fmnist) == [392, 196, 10]


# ------------------------------------------------------------------ MLP


def test_mlp_layer_order_and_norm_options():
    net = MLP(12, 4, hidden=(8, 6), activation="gelu", dropout=0.3, input_dropout=0.1, norm="batch")
    assert [type(m) for m in net.hidden[0]] == [nn.Linear, nn.BatchNorm1d, nn.GELU, nn.Dropout]
    assert list(net.hidden[1]._modules) == ["linear", "norm", "act", "drop"]
    assert net.hidden[1].linear.in_features == 8 and net.head.in_features == 6
    assert isinstance(net.input_dropout, nn.Dropout) and net.input_dropout.p == 0.1
    layer = MLP(12, 4, hidden=(8,), norm="layer", activation="tanh")
    assert [type(m) for m in layer.hidden[0]] == [nn.Linear, nn.LayerNorm, nn.Tanh]  # no dropout module at p=0
    plain = MLP(12, 4, hidden=())
    assert len(plain.hidden) == 0 and plain.head.in_features == 12  # logistic regression
    x = torch.randn(5, 3, 2, 2)  # flattened to (5, 12)
    assert net(x).shape == layer(x).shape == plain(x).shape == (5, 4)
    with pytest.raises(ValueError, match="in_features is 12"):
        plain(torch.randn(5, 13))
    unflat = MLP(12, 4, flatten=False)
    assert unflat(torch.randn(5, 12)).shape == (5, 4)


def test_mlp_forward_matches_a_hand_computation():
    torch.manual_seed(0)
    net = MLP(6, 3, hidden=(5,), activation="elu").eval()
    x = torch.randn(4, 6)
    h = nn.functional.elu(x @ net.hidden[0].linear.weight.T + net.hidden[0].linear.bias)
    assert torch.allclose(net(x), h @ net.head.weight.T + net.head.bias, atol=1e-6)


def test_max_norm_clips_only_long_rows_of_hidden_layers():
    torch.manual_seed(0)
    net = MLP(10, 3, hidden=(7, 5), max_norm=1.0)
    assert all((layer.linear.weight.norm(dim=1) <= 1.0 + 1e-6).all() for layer in net.hidden)  # from the start
    with torch.no_grad():
        for layer in net.hidden:
            layer.linear.weight.mul_(torch.linspace(0.5, 4.0, layer.linear.out_features)[:, None])
        net.head.weight.mul_(10)
    before = [layer.linear.weight.detach().clone() for layer in net.hidden]
    head_before = net.head.weight.detach().clone()
    net.apply_max_norm()
    for w0, layer in zip(before, net.hidden):
        w = layer.linear.weight
        for j in range(w.shape[0]):  # row by row, in float64
            r0 = w0[j].double()
            norm = float(np.sqrt(sum(v * v for v in r0.tolist())))
            expected = r0 / norm if norm > 1.0 else r0
            assert torch.allclose(w[j].double(), expected, atol=1e-6), j
    assert (before[0].norm(dim=1) > 1).any() and (before[0].norm(dim=1) < 1).any()  # both cases exercised
    assert torch.equal(net.head.weight, head_before)  # the output layer is not constrained
    assert net.hidden[0].linear.weight.is_leaf and net.hidden[0].linear.weight.requires_grad
    MLP(10, 3).apply_max_norm()  # no-op without max_norm


@pytest.mark.parametrize(
    "kwargs, field",
    [
        ({"in_features": 0}, "in_features"),
        ({"hidden": (4, 0)}, "hidden"),
        ({"activation": "swish"}, "activation"),
        ({"norm": "group"}, "norm"),
        ({"dropout": 1.0}, "dropout"),
        ({"input_dropout": -0.1}, "input_dropout"),
        ({"max_norm": 0.0}, "max_norm"),
    ],
)
def test_mlp_bad_fields_are_named(kwargs, field):
    with pytest.raises(ValueError, match=f"MLP: {field} must"):
        MLP(**{"in_features": 4, "num_classes": 2, **kwargs})


# ------------------------------------------------------------------ ConvNet


@pytest.mark.parametrize(
    "channels, L, P, residual, n_pools",
    [
        ((32, 64), 2, 2, False, 2),
        ((16,), 3, 1, False, 3),
        ((8, 16, 32), 1, 2, False, 1),
        ((8, 16), 2, 3, True, 1),
        ((8, 16), 2, 1, True, 4),
        ((8, 8, 16), 2, 2, True, 3),
    ],
)
def test_convnet_shapes(channels, L, P, residual, n_pools):
    net = ConvNet(
        in_channels=3,
        num_classes=7,
        channels=channels,
        layers_per_block=L,
        pool_every=P,
        residual=residual,
        hidden=(20,),
        image_size=32,
    )
    convs3 = [m for m in net.features.modules() if isinstance(m, nn.Conv2d) and m.kernel_size == (3, 3)]
    assert [c.out_channels for c in convs3] == [k for k in channels for _ in range(L)]
    assert sum(isinstance(m, nn.MaxPool2d) for m in net.features) == n_pools
    side = 32 // 2**n_pools
    x = torch.randn(3, 3, 32, 32)
    assert net.features(x).shape == (3, channels[-1], side, side)
    assert net.num_features == channels[-1] * side * side == net.classifier.in_features
    assert net(x).shape == (3, 7)


def test_convnet_plain_layout_and_residual_projection():
    net = ConvNet(channels=(4, 8), layers_per_block=2, pool_every=2, batch_norm=True)
    types = [type(m).__name__ for m in net.features]
    assert types == ["Conv2d", "BatchNorm2d", "ReLU"] * 2 + ["MaxPool2d"] + ["Conv2d", "BatchNorm2d", "ReLU"] * 2 + [
        "MaxPool2d"
    ]
    assert all(m.bias is None for m in net.features if isinstance(m, nn.Conv2d))  # BN replaces the bias
    no_bn = ConvNet(channels=(4,), batch_norm=False)
    assert not any(isinstance(m, nn.BatchNorm2d) for m in no_bn.modules())
    res = ConvNet(channels=(4, 4, 8), layers_per_block=1, pool_every=1, residual=True, image_size=16)
    blocks = [m for m in res.features if not isinstance(m, nn.MaxPool2d)]
    assert isinstance(blocks[0].shortcut, nn.Sequential)  # 3 -> 4 channels: 1x1 projection
    assert isinstance(blocks[1].shortcut, nn.Identity)  # 4 -> 4
    assert blocks[2].shortcut[0].kernel_size == (1, 1) and blocks[2].shortcut[0].out_channels == 8
    # a residual block with an all-zero main path passes its input through (then ReLU)
    with torch.no_grad():
        for p in blocks[1].main.parameters():
            p.zero_()
    x = torch.rand(2, 4, 8, 8)
    assert torch.equal(blocks[1].eval()(x), x)


def test_convnet_residual_blocks_group_pool_every_convs_as_the_homework():
    # K=[8], L=5, P=2: the convs 8 8 8 8 8 make blocks of 2, 2 and 1 convs, a pool after each full block
    net = ConvNet(channels=(8,), layers_per_block=5, pool_every=2, residual=True, batch_norm=False)
    kinds = [type(m).__name__ for m in net.features]
    assert kinds == ["_ConvResidualBlock", "MaxPool2d", "_ConvResidualBlock", "MaxPool2d", "_ConvResidualBlock"]
    sizes = [sum(isinstance(m, nn.Conv2d) for m in b.main) for b in net.features if hasattr(b, "main")]
    assert sizes == [2, 2, 1]
    assert net.features(torch.randn(1, 3, 32, 32)).shape == (1, 8, 8, 8)


def test_convnet_bottleneck_blocks():
    net = ConvNet(channels=(16,), layers_per_block=4, pool_every=4, residual=True, bottleneck=True, image_size=8)
    first = net.features[0]  # 3 -> 16: no bottleneck (input and output widths differ)
    assert [c.kernel_size for c in first.main if isinstance(c, nn.Conv2d)] == [(3, 3)] * 4
    net = ConvNet(channels=(16, 16), layers_per_block=4, pool_every=4, residual=True, bottleneck=True, image_size=8)
    second = net.features[2]  # 16 -> 16 with 4 convs: 1x1 down to 4, two 3x3 at 4, 1x1 up to 16
    convs = [c for c in second.main if isinstance(c, nn.Conv2d)]
    assert [(c.kernel_size[0], c.in_channels, c.out_channels) for c in convs] == [
        (1, 16, 4),
        (3, 4, 4),
        (3, 4, 4),
        (1, 4, 16),
    ]
    assert isinstance(second.shortcut, nn.Identity)
    assert net(torch.randn(2, 3, 8, 8)).shape == (2, 10)


def _side_after(image: int, convs: int, pool_every: int, kernel: int, pad: int) -> int:
    side = image
    for i in range(1, convs + 1):
        side = side + 2 * pad - kernel + 1
        if i % pool_every == 0:
            side //= 2
    return side


@pytest.mark.parametrize("L, K", [(2, 32), (4, 64), (8, 128), (16, 32), (16, 64), (3, 64)])
def test_convnet_kernel2_padding1_avgpool_size_and_parameters(L, K):
    """The course's plain CNNs: kernel 2, padding 1 (the side grows by one per conv), avg pool every 3 convs."""
    net = ConvNet(
        channels=(K,),
        layers_per_block=L,
        pool_every=3,
        kernel_size=2,
        padding=1,
        pool="avg",
        batch_norm=False,
        dropout=0.4,
    )
    side = _side_after(32, L, 3, 2, 1)
    assert net.num_features == K * side * side
    assert net.features(torch.randn(1, 3, 32, 32)).shape == (1, K, side, side)
    assert sum(isinstance(m, nn.AvgPool2d) for m in net.features) == L // 3
    convs = 4 * 3 * K + K + (L - 1) * (4 * K * K + K)  # 2x2 kernels with bias (no batch norm)
    head = net.num_features * 100 + 100 + 100 * 10 + 10
    assert n_params(net) == convs + head
    assert any(isinstance(m, nn.Dropout) and m.p == 0.4 for m in net.classifier.modules())


def test_convnet_other_input_sizes_and_bad_fields():
    net = ConvNet(in_channels=1, num_classes=10, channels=(8,), image_size=28)
    assert net.input_shape == (1, 28, 28) and net(torch.randn(2, 1, 28, 28)).shape == (2, 10)
    with pytest.raises(ValueError, match="ConvNet: pool_every must"):
        ConvNet(channels=(8, 8, 8), layers_per_block=2, pool_every=1, image_size=32)  # 6 pools of a 32x32 image
    with pytest.raises(ValueError, match="ConvNet: channels must"):
        ConvNet(channels=())
    with pytest.raises(ValueError, match="ConvNet: layers_per_block must"):
        ConvNet(layers_per_block=0)
    with pytest.raises(ValueError, match="ConvNet: kernel_size must be odd"):
        ConvNet(residual=True, kernel_size=2, padding=1)  # a residual sum needs convs that keep the size
    with pytest.raises(ValueError, match="ConvNet: bottleneck must"):
        ConvNet(bottleneck=True)
    with pytest.raises(ValueError, match="ConvNet: pool must"):
        ConvNet(pool="min")


# ------------------------------------------------------------------ CIFAR ResNets


@pytest.mark.parametrize("depth, published", [(20, 0.27e6), (32, 0.46e6), (44, 0.66e6), (56, 0.85e6)])
def test_resnet_parameter_counts(depth, published):
    n = (depth - 2) // 6
    stem = 3 * 16 * 9 + 2 * 16
    block = lambda c_in, c: 9 * c_in * c + 9 * c * c + 4 * c  # noqa: E731  two convs, two BNs
    stages = block(16, 16) * n + block(16, 32) + block(32, 32) * (n - 1) + block(32, 64) + block(64, 64) * (n - 1)
    expected = stem + stages + 64 * 10 + 10
    net = create_net(f"resnet{depth}")
    assert n_params(net) == expected
    assert abs(expected - published) / published < 0.01
    assert sum(isinstance(m, (nn.Conv2d, nn.Linear)) for m in net.modules()) == depth  # 6n + 1 convs, 1 linear


def test_resnet_option_a_shortcut_and_normalization():
    net = CifarResNet(20, normalize=True)
    first = net.layer2[0]
    x = torch.arange(2 * 16 * 4 * 4, dtype=torch.float32).view(2, 16, 4, 4)
    out = first.shortcut(x)
    assert out.shape == (2, 32, 2, 2)
    assert torch.equal(out[:, 8:24], x[:, :, ::2, ::2]) and not out[:, :8].any() and not out[:, 24:].any()
    assert not list(first.shortcut.parameters())
    assert set(net.state_dict()) == set(CifarResNet(20).state_dict())  # mean/std are not in the state dict
    net.eval()
    img = torch.rand(2, 3, 32, 32)
    mean = torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1)
    std = torch.tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1)
    plain = CifarResNet(20).eval()
    plain.load_state_dict(net.state_dict())
    assert torch.allclose(net(img), plain((img - mean) / std), atol=1e-5)
    with pytest.raises(ValueError, match="CifarResNet: depth must"):
        CifarResNet(21)


@pytest.mark.parametrize("depth", sorted(PRETRAINED))
def test_pretrained_cifar_resnets_load_strictly_and_classify(depth):
    path = real_data("cifar10", "pretrained", PRETRAINED[depth])
    raw = torch.load(path, map_location="cpu", weights_only=True)["state_dict"]
    model = load_legacy_cifar_resnet(path)
    assert model.depth == depth and not model.training and model.normalize
    assert {"module." + k for k in model.state_dict() if not k.endswith("num_batches_tracked")} == set(raw)
    assert torch.equal(model.layer3[0].conv2.weight, raw["module.layer3.0.conv2.weight"])
    data = np.load(real_data("cifar10", "test_jpeg_q75.npz"))
    pick = np.random.default_rng(0).choice(len(data["y"]), 500, replace=False)  # the file is sorted by class
    x = torch.from_numpy(data["x"][pick]).permute(0, 3, 1, 2).float().div(255)  # (500, 3, 32, 32) in [0, 1]
    y = torch.from_numpy(data["y"][pick])
    assert len(y.unique()) == 10
    with torch.no_grad():
        acc = (model(x).argmax(1) == y).float().mean().item()
    # 81-83 % on all 10,000 JPEG images; chance is 0.1, a mis-wired net far below 0.7.
    assert acc > 0.72
    same = CifarResNet.from_legacy_checkpoint(path, depth)
    assert torch.equal(same.linear.weight, model.linear.weight)


def test_legacy_loader_names_the_file_on_mismatch(tmp_path):
    path = real_data("cifar10", "pretrained", PRETRAINED[20])
    with pytest.raises(WeightsError, match=f"{PRETRAINED[20]}.*depth=32"):
        load_legacy_cifar_resnet(path, depth=32)
    bad = tmp_path / "bad.th"
    torch.save({"state_dict": {"module.conv1.weight": torch.zeros(1)}}, bad)
    with pytest.raises(WeightsError, match="bad.th"):
        load_legacy_cifar_resnet(bad)
    bad.write_bytes(b"not a pickle")
    with pytest.raises(WeightsError, match="bad.th"):
        load_legacy_cifar_resnet(bad)
