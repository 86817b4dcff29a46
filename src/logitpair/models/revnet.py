"""RevNet-9 for 32x32 inputs (``revnet9``): a network of reversible residual blocks, the ALP paper's SVHN model.

Gomez, Ren, Urtasun, Grosse, *The Reversible Residual Network: Backpropagation Without Storing
Activations*, 2017, https://arxiv.org/abs/1707.04585. A reversible block splits its input into two
channel halves and computes ``y1 = x1 + F(x2)``, ``y2 = x2 + G(y1)``; it is inverted exactly by
``x2 = y2 - G(y1)``, ``x1 = y1 - F(x2)`` (``RevBlock.inverse``).

**Our configuration.** The ALP paper names "RevNet-9" for SVHN but does not define it; this is our
reading: 9 blocks, 3 stages of 3. F and G are pre-activation basic residual functions
(BN-ReLU-conv3x3-BN-ReLU-conv3x3); a 3x3 stem conv with 32 channels; stage widths 32/64/112 channels
(both halves together) and strides 1/2/2, the widths, block counts and stem of Gomez et al.'s
RevNet-38 (their code's ``filters = [32, 32, 64, 112]``, ``num_residual_units = [3, 3, 3]``), so with
basic residual functions revnet9 has RevNet-38's layout and its 38 weighted layers. The first block of
stages 2 and 3 downsamples and widens and is therefore not reversible (Gomez et al. likewise keep
their downsampling layers non-reversible): its F is strided and its shortcuts are a 2x2 average pool
(ceil mode) plus zero channel padding, our choice; the other 7 blocks are reversible. Final BN-ReLU, global average pool, linear layer. 464,858 parameters at 10
classes. Plain autograd only: the memory-saving backward pass that recomputes activations from the
inverse is not implemented, so activations are stored as in any network.

**Input.** (N, C, H, W) in [0, 1], native 32x32 (SVHN, CIFAR); 28x28 one-channel inputs work too. No
normalisation by default; ``RevNet(normalize="cifar10")`` adds a buffer layer inside the model.
``image_size`` is only checked (>= 3: each stride-2 layer must receive at least 2x2).
Output: logits (N, num_classes).

Example::

    >>> model = create_model("revnet9", num_classes=10, in_channels=3, image_size=32)
    >>> model(torch.rand(2, 3, 32, 32)).shape
    torch.Size([2, 10])
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from logitpair.errors import ConfigError
from logitpair.models.layers import check_model_args, input_normalization, min_size_for_strides
from logitpair.models.registry import MODELS


class ResidualFunction(nn.Module):
    """Pre-activation basic residual function: BN-ReLU-conv3x3(stride)-BN-ReLU-conv3x3."""

    def __init__(self, in_channels: int, out_channels: int, stride: int = 1) -> None:
        super().__init__()
        self.bn1 = nn.BatchNorm2d(in_channels)
        self.conv1 = nn.Conv2d(in_channels, out_channels, 3, stride, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(out_channels)
        self.conv2 = nn.Conv2d(out_channels, out_channels, 3, 1, 1, bias=False)

    def forward(self, x: Tensor) -> Tensor:
        return self.conv2(F.relu(self.bn2(self.conv1(F.relu(self.bn1(x))))))


class RevBlock(nn.Module):
    """``y1 = s(x1) + F(x2)``, ``y2 = s(x2) + G(y1)`` on channel halves; ``s`` is the identity when reversible.

    With ``stride == 1`` and ``in_channels == out_channels`` the block is reversible (``inverse``);
    otherwise ``s`` average-pools and zero-pads channels and F is strided, and there is no inverse.
    In training mode BatchNorm uses batch statistics, so ``inverse`` matches ``forward`` in eval mode
    (or on the same batch in training mode, where it also updates the running statistics again).
    """

    def __init__(self, in_channels: int, out_channels: int, stride: int = 1) -> None:
        super().__init__()
        if in_channels % 2 or out_channels % 2 or out_channels < in_channels:
            raise ConfigError(f"RevBlock: channels must be even and not shrink, got {in_channels} -> {out_channels}")
        self.stride = stride
        self.pad = (out_channels - in_channels) // 2
        self.f = ResidualFunction(in_channels // 2, out_channels // 2, stride)
        self.g = ResidualFunction(out_channels // 2, out_channels // 2)

    @property
    def reversible(self) -> bool:
        return self.stride == 1 and self.pad == 0

    def _shortcut(self, x: Tensor) -> Tensor:
        if self.stride > 1:
            x = F.avg_pool2d(x, self.stride, ceil_mode=True)
        return F.pad(x, (0, 0, 0, 0, 0, self.pad)) if self.pad else x

    def forward(self, x: Tensor) -> Tensor:
        x1, x2 = x.chunk(2, dim=1)
        y1 = self._shortcut(x1) + self.f(x2)
        y2 = self._shortcut(x2) + self.g(y1)
        return torch.cat([y1, y2], dim=1)

    def inverse(self, y: Tensor) -> Tensor:
        """The input ``x`` with ``forward(x) == y``; only for reversible (stride-1, same-width) blocks."""
        if not self.reversible:
            raise ValueError("a downsampling RevBlock is not reversible")
        y1, y2 = y.chunk(2, dim=1)
        x2 = y2 - self.g(y1)
        x1 = y1 - self.f(x2)
        return torch.cat([x1, x2], dim=1)


class RevNet(nn.Module):
    """Stem conv, stages of ``RevBlock`` (the first of a stage may downsample), BN-ReLU, pool, linear."""

    def __init__(
        self,
        num_classes: int = 10,
        in_channels: int = 3,
        image_size: int = 32,
        stem: int = 32,
        widths: tuple[int, ...] = (32, 64, 112),
        blocks: tuple[int, ...] = (3, 3, 3),
        strides: tuple[int, ...] = (1, 2, 2),
        normalize: str | None = None,
    ) -> None:
        super().__init__()
        check_model_args(
            "revnet", num_classes, in_channels, image_size, min_size_for_strides(sum(s > 1 for s in strides))
        )
        self.normalize = input_normalization(normalize, in_channels)
        self.conv1 = nn.Conv2d(in_channels, stem, 3, 1, 1, bias=False)
        layers: list[nn.Module] = []
        channels = stem
        for width, n, stride in zip(widths, blocks, strides):
            for j in range(n):
                layers.append(RevBlock(channels, width, stride if j == 0 else 1))
                channels = width
        self.blocks = nn.Sequential(*layers)
        self.bn = nn.BatchNorm2d(channels)
        self.fc = nn.Linear(channels, num_classes)
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")

    def forward(self, x: Tensor) -> Tensor:
        x = self.blocks(self.conv1(self.normalize(x)))
        return self.fc(F.relu(self.bn(x)).mean((2, 3)))


@MODELS.register("revnet9")
def revnet9(num_classes: int = 10, in_channels: int = 3, image_size: int = 32) -> nn.Module:
    """RevNet-9 (our configuration: 3 stages x 3 reversible blocks, widths 32/64/112), no normalisation inside."""
    return RevNet(num_classes, in_channels, image_size)
