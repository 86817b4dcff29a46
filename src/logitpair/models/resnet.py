"""Bottleneck ResNets for ImageNet: ResNet v1 (``resnet50``, ``resnet101``) and ResNet v2 (``resnet-v2-50``).

**ResNet v1** -- He, Zhang, Ren, Sun, *Deep Residual Learning for Image Recognition*, 2016,
https://arxiv.org/abs/1512.03385. The common torchvision layout ("ResNet v1.5"): 7x7/2 stem conv, BN,
ReLU, 3x3/2 max-pool, four stages of bottleneck blocks (widths 64/128/256/512, expansion 4) with
``[3, 4, 6, 3]`` (ResNet-50) or ``[3, 4, 23, 3]`` (ResNet-101) blocks, the stride on the 3x3 conv,
projection shortcuts (1x1 conv + BN) where the shape changes, global average pool, one linear layer.
Convs have no bias. With 1000 classes: ResNet-50 25,557,032 and ResNet-101 44,549,160 parameters,
exactly torchvision's. ResNet-101 is the ALP paper's second ImageNet model (Tables 5, 6).

**ResNet v2** -- He, Zhang, Ren, Sun, *Identity Mappings in Deep Residual Networks*, 2016,
https://arxiv.org/abs/1603.05027. ``resnet-v2-50`` follows TF-slim's ``resnet_v2_50``, the model of
the official ALP code (tensorflow/models ``research/adversarial_logit_pairing/model_lib.py``, used
unmodified on 64x64 ImageNet and Tiny ImageNet): 7x7/2 stem conv *with bias and without BN*, 3x3/2
max-pool with TensorFlow 'SAME' padding (reproduced exactly, it pads bottom/right first), four blocks
of pre-activation bottleneck units (BN-ReLU first; the shortcut is the identity, subsampled by
striding, or a 1x1 conv with bias on the pre-activation when the depth changes; the last 1x1 conv of
each unit has a bias), the stride-2 unit the *last* of blocks 1-3 (slim's layout, not the first as
in v1), final BN-ReLU, global average pool, linear layer. On 64x64 inputs the feature maps are
32, 16, 8, 4, 2, 2: we keep slim's ImageNet stem as the official code does (no small-input stem).
Ours where slim differs: BatchNorm uses PyTorch's momentum 0.1 (slim's decay 0.997 would be
momentum 0.003), He-normal init instead of slim's truncated normal.

**Input.** (N, C, H, W) in [0, 1]; normalisation is a non-persistent buffer layer of the model, on by
default: ImageNet mean/std for ResNet v1 (torchvision's convention), ``2x - 1`` for ResNet v2 (the
[-1, 1] range of the official ALP input pipeline and slim checkpoints); ``normalize=None`` turns it
off. ``image_size`` is only checked: the nets pool globally and take any input from 17x17 up (each of
the five stride-2 layers must receive at least 2x2); native sizes 224 (v1) and 64 (v2, ALP).
Output: logits (N, num_classes).

Example::

    >>> model = create_model("resnet50", num_classes=1000, in_channels=3, image_size=224)
    >>> model(torch.rand(2, 3, 224, 224)).shape
    torch.Size([2, 1000])
"""

from __future__ import annotations

import math

import torch.nn.functional as F
from torch import Tensor, nn

from logitpair.models.layers import check_model_args, input_normalization, min_size_for_strides
from logitpair.models.registry import MODELS


def _init_weights(model: nn.Module, mode: str) -> None:
    for m in model.modules():
        if isinstance(m, nn.Conv2d):
            nn.init.kaiming_normal_(m.weight, mode=mode, nonlinearity="relu")
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, nn.BatchNorm2d):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)


class Bottleneck(nn.Module):
    """ResNet v1 bottleneck: 1x1, 3x3 (stride here), 1x1 x4, each followed by BN; ReLU after the sum."""

    def __init__(self, in_channels: int, width: int, stride: int = 1) -> None:
        super().__init__()
        out = 4 * width
        self.conv1 = nn.Conv2d(in_channels, width, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(width)
        self.conv2 = nn.Conv2d(width, width, 3, stride, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(width)
        self.conv3 = nn.Conv2d(width, out, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(out)
        self.downsample: nn.Module | None = None
        if stride != 1 or in_channels != out:
            self.downsample = nn.Sequential(nn.Conv2d(in_channels, out, 1, stride, bias=False), nn.BatchNorm2d(out))

    def forward(self, x: Tensor) -> Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        out = F.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        shortcut = x if self.downsample is None else self.downsample(x)
        return F.relu(out + shortcut)


class ResNet(nn.Module):
    """ResNet v1 with bottleneck blocks (torchvision layout); see the module docstring."""

    def __init__(
        self,
        layers: tuple[int, int, int, int],
        num_classes: int = 1000,
        in_channels: int = 3,
        image_size: int = 224,
        normalize: str | None = "imagenet",
    ) -> None:
        super().__init__()
        check_model_args(f"ResNet-{3 * sum(layers) + 2}", num_classes, in_channels, image_size, min_size_for_strides(5))
        self.normalize = input_normalization(normalize, in_channels)
        self.conv1 = nn.Conv2d(in_channels, 64, 7, 2, 3, bias=False)
        self.bn1 = nn.BatchNorm2d(64)
        self.maxpool = nn.MaxPool2d(3, 2, 1)
        stages: list[nn.Module] = []
        channels = 64
        for i, (width, blocks) in enumerate(zip((64, 128, 256, 512), layers)):
            stage = []
            for j in range(blocks):
                stage.append(Bottleneck(channels, width, 2 if i > 0 and j == 0 else 1))
                channels = 4 * width
            stages.append(nn.Sequential(*stage))
        self.layer1, self.layer2, self.layer3, self.layer4 = stages
        self.fc = nn.Linear(channels, num_classes)
        _init_weights(self, "fan_out")

    def forward(self, x: Tensor) -> Tensor:
        x = self.maxpool(F.relu(self.bn1(self.conv1(self.normalize(x)))))
        x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
        return self.fc(x.mean((2, 3)))


def max_pool_tf_same(x: Tensor, kernel: int = 3, stride: int = 2) -> Tensor:
    """Max-pool with TensorFlow 'SAME' padding: output ceil(n / stride), the odd pad at the bottom/right."""
    pads: list[int] = []
    for n in (x.shape[-1], x.shape[-2]):
        total = max((math.ceil(n / stride) - 1) * stride + kernel - n, 0)
        pads += [total // 2, total - total // 2]
    return F.max_pool2d(F.pad(x, pads, value=float("-inf")), kernel, stride)


class PreActBottleneck(nn.Module):
    """TF-slim ``bottleneck_v2``: BN-ReLU, then 1x1, BN-ReLU, 3x3 (stride), BN-ReLU, 1x1 (bias) plus the shortcut."""

    def __init__(self, in_channels: int, depth: int, bottleneck: int, stride: int = 1) -> None:
        super().__init__()
        self.stride = stride
        self.preact = nn.BatchNorm2d(in_channels)
        self.shortcut: nn.Module | None = None
        if in_channels != depth:
            self.shortcut = nn.Conv2d(in_channels, depth, 1, stride)
        self.conv1 = nn.Conv2d(in_channels, bottleneck, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(bottleneck)
        self.conv2 = nn.Conv2d(bottleneck, bottleneck, 3, stride, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(bottleneck)
        self.conv3 = nn.Conv2d(bottleneck, depth, 1)

    def forward(self, x: Tensor) -> Tensor:
        preact = F.relu(self.preact(x))
        if self.shortcut is not None:
            shortcut = self.shortcut(preact)
        else:  # slim's ``subsample``: a 1x1 max-pool with this stride
            shortcut = x[:, :, :: self.stride, :: self.stride] if self.stride > 1 else x
        out = F.relu(self.bn1(self.conv1(preact)))
        out = F.relu(self.bn2(self.conv2(out)))
        return shortcut + self.conv3(out)


class ResNetV2(nn.Module):
    """ResNet v2 (pre-activation bottlenecks) in TF-slim's ``resnet_v2`` layout; see the module docstring."""

    def __init__(
        self,
        units: tuple[int, int, int, int] = (3, 4, 6, 3),
        num_classes: int = 1000,
        in_channels: int = 3,
        image_size: int = 64,
        normalize: str | None = "inception",
    ) -> None:
        super().__init__()
        check_model_args(
            f"ResNet-v2-{3 * sum(units) + 2}", num_classes, in_channels, image_size, min_size_for_strides(5)
        )
        self.normalize = input_normalization(normalize, in_channels)
        self.conv1 = nn.Conv2d(in_channels, 64, 7, 2, 3)
        blocks: list[nn.Module] = []
        channels = 64
        for base, n, stride in zip((64, 128, 256, 512), units, (2, 2, 2, 1)):
            block = []
            for j in range(n):
                block.append(PreActBottleneck(channels, 4 * base, base, stride if j == n - 1 else 1))
                channels = 4 * base
            blocks.append(nn.Sequential(*block))
        self.block1, self.block2, self.block3, self.block4 = blocks
        self.postnorm = nn.BatchNorm2d(channels)
        self.fc = nn.Linear(channels, num_classes)
        _init_weights(self, "fan_in")

    def forward(self, x: Tensor) -> Tensor:
        x = max_pool_tf_same(self.conv1(self.normalize(x)))
        x = self.block4(self.block3(self.block2(self.block1(x))))
        return self.fc(F.relu(self.postnorm(x)).mean((2, 3)))


@MODELS.register("resnet50")
def resnet50(
    num_classes: int = 1000, in_channels: int = 3, image_size: int = 224, normalize: str | None = "imagenet"
) -> nn.Module:
    """ResNet-50 v1 (torchvision layout), 25,557,032 parameters at 1000 classes; ImageNet mean/std inside."""
    return ResNet((3, 4, 6, 3), num_classes, in_channels, image_size, normalize)


@MODELS.register("resnet101")
def resnet101(
    num_classes: int = 1000, in_channels: int = 3, image_size: int = 224, normalize: str | None = "imagenet"
) -> nn.Module:
    """ResNet-101 v1 (torchvision layout), 44,549,160 parameters at 1000 classes; the ALP paper's ResNet-101."""
    return ResNet((3, 4, 23, 3), num_classes, in_channels, image_size, normalize)


@MODELS.register("resnet-v2-50")
def resnet_v2_50(num_classes: int = 1000, in_channels: int = 3, image_size: int = 64) -> nn.Module:
    """TF-slim ResNet-v2-50, the official ALP code's model for 64x64 ImageNet / Tiny ImageNet; 2x - 1 inside."""
    return ResNetV2((3, 4, 6, 3), num_classes, in_channels, image_size)
