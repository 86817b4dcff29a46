"""Pre-activation ResNets for 32x32 inputs: PreAct ResNet-18 (``preact-resnet18``) and WideResNet (``wrn-28-10``).

**PreAct ResNet-18** -- He, Zhang, Ren, Sun, *Identity Mappings in Deep Residual Networks*, 2016,
https://arxiv.org/abs/1603.05027. The common CIFAR variant (Kuang Liu's ``pytorch-cifar``, used by
much adversarial-training work): 3x3 stem conv with 64 channels, four stages of two pre-activation
basic blocks (BN-ReLU-conv3x3-BN-ReLU-conv3x3) with widths 64/128/256/512 and strides 1/2/2/2,
1x1-conv shortcuts on the pre-activation where the shape changes, then -- as in He et al. and in
Rice et al.'s robust-overfitting code, but unlike ``pytorch-cifar`` -- a final BN-ReLU, global average
pool and a linear layer. 11,172,170 parameters at 10 classes.

**WideResNet-28-10** -- Zagoruyko, Komodakis, *Wide Residual Networks*, 2016,
https://arxiv.org/abs/1605.07146. 3x3 stem conv with 16 channels, three groups of ``(depth - 4) / 6``
pre-activation basic blocks with widths 16k/32k/64k (k = ``widen_factor``) and strides 1/2/2, dropout
between the two convs of a block (0 by default, as in Madry et al.'s and TRADES' CIFAR models), final
BN-ReLU, global average pool, linear layer. ``WideResNet(depth=28, widen_factor=10)`` has 36,479,194
parameters at 10 classes, the figure of the authors' code; ``WideResNet(depth=10, widen_factor=1)``
is a small one for tests.

**Input.** (N, C, H, W) in [0, 1], native 32x32 (CIFAR, SVHN); 28x28 one-channel inputs work too.
No normalisation by default (``normalize=None``); ``normalize="cifar10"`` adds CIFAR-10 mean/std as a
buffer layer inside the model, so attacks still see [0, 1] pixels. ``image_size`` is only checked:
each stride-2 layer must receive at least 2x2 (PreAct ResNet-18 >= 5, WRN >= 3).
Output: logits (N, num_classes).

Example::

    >>> model = create_model("preact-resnet18", num_classes=10, in_channels=3, image_size=32)
    >>> model(torch.rand(2, 3, 32, 32)).shape
    torch.Size([2, 10])
"""

from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor, nn

from logitpair.errors import ConfigError
from logitpair.models.layers import check_model_args, input_normalization, min_size_for_strides
from logitpair.models.registry import MODELS


class PreActBlock(nn.Module):
    """BN-ReLU-conv3x3(stride)-BN-ReLU-[dropout]-conv3x3 plus the identity or a 1x1 conv of the pre-activation."""

    def __init__(self, in_channels: int, out_channels: int, stride: int = 1, dropout: float = 0.0) -> None:
        super().__init__()
        self.dropout = dropout
        self.bn1 = nn.BatchNorm2d(in_channels)
        self.conv1 = nn.Conv2d(in_channels, out_channels, 3, stride, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(out_channels)
        self.conv2 = nn.Conv2d(out_channels, out_channels, 3, 1, 1, bias=False)
        self.shortcut: nn.Module | None = None
        if stride != 1 or in_channels != out_channels:
            self.shortcut = nn.Conv2d(in_channels, out_channels, 1, stride, bias=False)

    def forward(self, x: Tensor) -> Tensor:
        out = F.relu(self.bn1(x))
        shortcut = x if self.shortcut is None else self.shortcut(out)
        out = F.relu(self.bn2(self.conv1(out)))
        if self.dropout > 0:
            out = F.dropout(out, self.dropout, self.training)
        return self.conv2(out) + shortcut


class PreActResNet(nn.Module):
    """3x3 stem, stages of ``PreActBlock``, final BN-ReLU, global average pool, linear layer."""

    def __init__(
        self,
        stem: int,
        widths: tuple[int, ...],
        blocks: tuple[int, ...],
        strides: tuple[int, ...],
        num_classes: int = 10,
        in_channels: int = 3,
        image_size: int = 32,
        dropout: float = 0.0,
        normalize: str | None = None,
        name: str = "PreActResNet",
    ) -> None:
        super().__init__()
        check_model_args(name, num_classes, in_channels, image_size, min_size_for_strides(sum(s > 1 for s in strides)))
        self.normalize = input_normalization(normalize, in_channels)
        self.conv1 = nn.Conv2d(in_channels, stem, 3, 1, 1, bias=False)
        layers: list[nn.Module] = []
        channels = stem
        for width, n, stride in zip(widths, blocks, strides):
            for j in range(n):
                layers.append(PreActBlock(channels, width, stride if j == 0 else 1, dropout))
                channels = width
        self.layers = nn.Sequential(*layers)
        self.bn = nn.BatchNorm2d(channels)
        self.fc = nn.Linear(channels, num_classes)
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(m, nn.Linear):
                nn.init.zeros_(m.bias)

    def forward(self, x: Tensor) -> Tensor:
        x = self.layers(self.conv1(self.normalize(x)))
        return self.fc(F.relu(self.bn(x)).mean((2, 3)))


class PreActResNet18(PreActResNet):
    """PreAct ResNet-18, CIFAR variant; see the module docstring."""

    def __init__(
        self, num_classes: int = 10, in_channels: int = 3, image_size: int = 32, normalize: str | None = None
    ) -> None:
        super().__init__(
            64, (64, 128, 256, 512), (2, 2, 2, 2), (1, 2, 2, 2), num_classes, in_channels, image_size,
            normalize=normalize, name="preact-resnet18",
        )  # fmt: skip


class WideResNet(PreActResNet):
    """WRN-``depth``-``widen_factor``; ``depth`` must be 6n + 4. See the module docstring."""

    def __init__(
        self,
        depth: int = 28,
        widen_factor: int = 10,
        num_classes: int = 10,
        in_channels: int = 3,
        image_size: int = 32,
        dropout: float = 0.0,
        normalize: str | None = None,
    ) -> None:
        if depth < 10 or (depth - 4) % 6 != 0 or widen_factor < 1:
            raise ConfigError(
                f"WideResNet: depth must be 6n + 4 >= 10 and widen_factor >= 1, got {depth}, {widen_factor}"
            )
        n = (depth - 4) // 6
        k = widen_factor
        super().__init__(
            16, (16 * k, 32 * k, 64 * k), (n, n, n), (1, 2, 2), num_classes, in_channels, image_size,
            dropout, normalize, name=f"wrn-{depth}-{widen_factor}",
        )  # fmt: skip


@MODELS.register("preact-resnet18")
def preact_resnet18(num_classes: int = 10, in_channels: int = 3, image_size: int = 32) -> nn.Module:
    """PreAct ResNet-18 for 32x32 inputs (11.2M parameters), no normalisation inside."""
    return PreActResNet18(num_classes, in_channels, image_size)


@MODELS.register("wrn-28-10")
def wrn_28_10(num_classes: int = 10, in_channels: int = 3, image_size: int = 32) -> nn.Module:
    """WideResNet-28-10 for 32x32 inputs (36.5M parameters), dropout 0, no normalisation inside."""
    return WideResNet(28, 10, num_classes, in_channels, image_size)
