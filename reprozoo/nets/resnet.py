"""He et al. (2016) CIFAR ResNets, laid out as akamaster/pytorch_resnet_cifar10 so its published weights load."""

from __future__ import annotations

import os

import torch
from torch import nn

from reprozoo._files import WeightsError
from reprozoo._validate import check
from reprozoo.nets._registry import _preset, register_net

# The ImageNet statistics that the akamaster CIFAR ResNet weights were trained with (not CIFAR's own).
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


class _ZeroPadShortcut(nn.Module):
    """He et al.'s option A: subsample by ``stride`` and zero-pad the new channels, half before and half after the
    old ones (the order the published weights were trained with). No parameters."""

    def __init__(self, c_in: int, c_out: int, stride: int):
        super().__init__()
        self.stride, self.pad_before, self.pad_after = stride, (c_out - c_in) // 2, c_out - c_in - (c_out - c_in) // 2

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x[:, :, :: self.stride, :: self.stride]  # (B, c_in, H/s, W/s)
        return nn.functional.pad(x, (0, 0, 0, 0, self.pad_before, self.pad_after))  # (B, c_out, H/s, W/s)


class _BasicBlock(nn.Module):
    """``relu(bn2(conv2(relu(bn1(conv1(x))))) + shortcut(x))``, two 3x3 convs; the first may have stride 2."""

    def __init__(self, c_in: int, c_out: int, stride: int):
        super().__init__()
        self.conv1 = nn.Conv2d(c_in, c_out, kernel_size=3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(c_out)
        self.conv2 = nn.Conv2d(c_out, c_out, kernel_size=3, stride=1, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(c_out)
        self.shortcut = _ZeroPadShortcut(c_in, c_out, stride) if stride != 1 or c_in != c_out else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = torch.relu(self.bn1(self.conv1(x)))
        return torch.relu(self.bn2(self.conv2(out)) + self.shortcut(x))


class CifarResNet(nn.Module):
    """He et al. 2016 (sec. 4.2) ResNet for 32x32 images: a 3x3 conv with 16 filters, three stages of ``n`` basic
    blocks with 16, 32 and 64 filters (the 2nd and 3rd start with stride 2), global average pooling and a linear
    head; ``depth = 6 n + 2`` (20, 32, 44, 56, 110, ...). Shortcuts are option A (stride-2 subsampling and zero
    channels, no parameters), so the parameter count is that of the paper: 0.27M for ResNet-20.

    Module names follow akamaster/pytorch_resnet_cifar10 (``conv1``, ``bn1``, ``layer1.0.conv1``, ..., ``linear``),
    whose published weights :func:`load_legacy_cifar_resnet` loads.

    Args:
        depth: ``6 n + 2``.
        num_classes: width of the logits.
        normalize: standardise inputs in [0, 1] with the ImageNet mean and std in ``forward``, as the published
            weights expect. The statistics are non-persistent buffers: not in the state dict, so checkpoints are the
            same with and without.
    """

    def __init__(self, depth: int = 20, num_classes: int = 10, normalize: bool = False):
        super().__init__()
        check(
            depth >= 8 and (depth - 2) % 6 == 0,
            "CifarResNet",
            "depth",
            depth,
            "6 n + 2 with n >= 1 (20, 32, 44, 56, ...)",
        )
        check(num_classes >= 1, "CifarResNet", "num_classes", num_classes, ">= 1")
        n = (depth - 2) // 6
        self.depth, self.num_classes, self.normalize = depth, num_classes, normalize
        self.input_shape: tuple[int, ...] = (3, 32, 32)
        self.num_features = 64
        if normalize:
            self.register_buffer("mean", torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1), persistent=False)
            self.register_buffer("std", torch.tensor(IMAGENET_STD).view(1, 3, 1, 1), persistent=False)
        self.conv1 = nn.Conv2d(3, 16, kernel_size=3, stride=1, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(16)
        self.layer1 = self._stage(16, 16, n, stride=1)
        self.layer2 = self._stage(16, 32, n, stride=2)
        self.layer3 = self._stage(32, 64, n, stride=2)
        self.linear = nn.Linear(64, num_classes)
        for module in self.modules():
            if isinstance(module, (nn.Conv2d, nn.Linear)):
                nn.init.kaiming_normal_(module.weight)  # He init, the paper's

    @staticmethod
    def _stage(c_in: int, c_out: int, n: int, stride: int) -> nn.Sequential:
        return nn.Sequential(
            *(_BasicBlock(c_in if i == 0 else c_out, c_out, stride if i == 0 else 1) for i in range(n))
        )

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        if self.normalize:
            x = (x - self.mean) / self.std
        x = torch.relu(self.bn1(self.conv1(x)))  # (B, 16, 32, 32)
        x = self.layer3(self.layer2(self.layer1(x)))  # (B, 64, 8, 8)
        return x.mean(dim=(2, 3))  # (B, 64)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.linear(self.forward_features(x))  # (B, num_classes)

    @classmethod
    def from_legacy_checkpoint(
        cls, path: str | os.PathLike, depth: int | None = None, *, normalize: bool = True
    ) -> CifarResNet:
        """See :func:`load_legacy_cifar_resnet`."""
        return load_legacy_cifar_resnet(path, depth, normalize=normalize)


@register_net
def resnet20(**kwargs) -> CifarResNet:
    """CIFAR ResNet-20 (n = 3), 0.27M parameters."""
    return CifarResNet(**_preset(dict(depth=20), kwargs))


@register_net
def resnet32(**kwargs) -> CifarResNet:
    """CIFAR ResNet-32 (n = 5), 0.46M parameters."""
    return CifarResNet(**_preset(dict(depth=32), kwargs))


@register_net
def resnet44(**kwargs) -> CifarResNet:
    """CIFAR ResNet-44 (n = 7), 0.66M parameters."""
    return CifarResNet(**_preset(dict(depth=44), kwargs))


@register_net
def resnet56(**kwargs) -> CifarResNet:
    """CIFAR ResNet-56 (n = 9), 0.85M parameters."""
    return CifarResNet(**_preset(dict(depth=56), kwargs))


def load_legacy_cifar_resnet(
    path: str | os.PathLike, depth: int | None = None, *, normalize: bool = True
) -> CifarResNet:
    """A :class:`CifarResNet` with the weights of an akamaster/pytorch_resnet_cifar10 file (``resnet20-12fca82f.th``:
    ``{'best_prec1', 'state_dict'}`` with keys prefixed ``module.``, as ``nn.DataParallel`` saved them), in eval mode.

    The file is read with ``weights_only=True``, the prefix stripped and the weights loaded strictly (the files
    predate BatchNorm's ``num_batches_tracked``, which starts at 0). ``depth`` defaults to what the file holds;
    ``num_classes`` is read from the head. ``normalize`` defaults to True because these weights expect
    ImageNet-standardised inputs. Any problem is a :class:`~reprozoo.zoo.registry.WeightsError` naming the file.
    """
    try:
        payload = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:
        raise WeightsError(f"{path} is not a readable CIFAR ResNet weights file: {err}") from err
    state = payload.get("state_dict", payload) if isinstance(payload, dict) else None
    if not isinstance(state, dict) or ("module.linear.weight" not in state and "linear.weight" not in state):
        raise WeightsError(f"{path} does not hold a CIFAR ResNet state dict (no 'state_dict' with 'linear.weight')")
    state = {k.removeprefix("module."): v for k, v in state.items()}
    blocks = {k.split(".")[1] for k in state if k.startswith("layer1.")}
    depth = 6 * len(blocks) + 2 if depth is None else depth
    model = CifarResNet(depth, num_classes=state["linear.weight"].shape[0], normalize=normalize)
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as err:
        raise WeightsError(f"{path} does not fit CifarResNet(depth={depth}): {err}") from err
    return model.eval()
