"""InceptionV3 (``inceptionv3``), the ALP paper's main ImageNet model (Tables 3-6).

Szegedy, Vanhoucke, Ioffe, Shlens, Wojna, *Rethinking the Inception Architecture for Computer Vision*,
2016, https://arxiv.org/abs/1512.00567. The standard layout shared by TF-slim and torchvision:
Conv2d_1a_3x3 .. Conv2d_4a_3x3 with two 3x3/2 max-pools, Mixed_5b-5d (InceptionA), Mixed_6a
(InceptionB), Mixed_6b-6e (InceptionC, 7x7 factorised), Mixed_7a (InceptionD), Mixed_7b-7c
(InceptionE), global average pool, dropout, linear layer. Every conv is bias-free and followed by
BatchNorm (eps 0.001) and ReLU. 23,834,568 parameters at 1000 classes without the auxiliary head,
exactly torchvision's ``inception_v3(aux_logits=False)``.

**Auxiliary head** (``aux_logits=True``, off by default): the auxiliary classifier on Mixed_6e
(5x5/3 average pool, 1x1 conv 128, 5x5 conv 768, linear). ``forward`` still returns only the main
logits; in training mode it also stores the auxiliary logits of that forward in ``model.aux_output``
(with their graph) for a training loss to read, e.g. ``loss + 0.4 * ce(model.aux_output, y)``.
Eval-mode forwards (attacks, evaluation) neither compute nor overwrite it; copies (``deepcopy``) and
pickles of the model drop it. The head needs
299x299 inputs (Mixed_6e must be at least 17x17).

**Ours where the references differ:** dropout 0.2 before the linear layer (TF-slim's keep
probability 0.8, the framework of the paper's models; torchvision uses 0.5); He-normal init.

**Input.** (N, C, H, W) in [0, 1], native 299x299, at least 75x75 (``ValueError`` below that).
ImageNet mean/std normalisation is a buffer layer inside the model by default (torchvision's
convention); ``normalize="inception"`` gives TF-slim's ``2x - 1`` instead, ``None`` turns it off.
Output: logits (N, num_classes).

Example::

    >>> model = create_model("inceptionv3", num_classes=1000, in_channels=3, image_size=299)
    >>> model(torch.rand(2, 3, 299, 299)).shape
    torch.Size([2, 1000])
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from logitpair.errors import ConfigError
from logitpair.models.layers import check_model_args, input_normalization
from logitpair.models.registry import MODELS

MIN_SIZE = 75
MIN_SIZE_AUX = 299

_Size = int | tuple[int, int]


class ConvBN(nn.Module):
    """Conv (no bias) - BatchNorm (eps 0.001) - ReLU."""

    def __init__(self, in_channels: int, out_channels: int, kernel: _Size, stride: int = 1, padding: _Size = 0) -> None:
        super().__init__()
        self.conv = nn.Conv2d(in_channels, out_channels, kernel, stride, padding, bias=False)
        self.bn = nn.BatchNorm2d(out_channels, eps=0.001)

    def forward(self, x: Tensor) -> Tensor:
        return F.relu(self.bn(self.conv(x)))


def _pool_branch(x: Tensor, conv: nn.Module) -> Tensor:
    return conv(F.avg_pool2d(x, 3, 1, 1))


class InceptionA(nn.Module):
    """35x35 module: 1x1 | 1x1-5x5 | 1x1-3x3-3x3 | avgpool-1x1 (``pool`` channels)."""

    def __init__(self, c: int, pool: int) -> None:
        super().__init__()
        self.branch1x1 = ConvBN(c, 64, 1)
        self.branch5x5_1 = ConvBN(c, 48, 1)
        self.branch5x5_2 = ConvBN(48, 64, 5, padding=2)
        self.branch3x3dbl_1 = ConvBN(c, 64, 1)
        self.branch3x3dbl_2 = ConvBN(64, 96, 3, padding=1)
        self.branch3x3dbl_3 = ConvBN(96, 96, 3, padding=1)
        self.branch_pool = ConvBN(c, pool, 1)

    def forward(self, x: Tensor) -> Tensor:
        b5 = self.branch5x5_2(self.branch5x5_1(x))
        b3 = self.branch3x3dbl_3(self.branch3x3dbl_2(self.branch3x3dbl_1(x)))
        return torch.cat([self.branch1x1(x), b5, b3, _pool_branch(x, self.branch_pool)], 1)


class InceptionB(nn.Module):
    """Grid reduction 35 -> 17: 3x3/2 | 1x1-3x3-3x3/2 | maxpool/2."""

    def __init__(self, c: int) -> None:
        super().__init__()
        self.branch3x3 = ConvBN(c, 384, 3, stride=2)
        self.branch3x3dbl_1 = ConvBN(c, 64, 1)
        self.branch3x3dbl_2 = ConvBN(64, 96, 3, padding=1)
        self.branch3x3dbl_3 = ConvBN(96, 96, 3, stride=2)

    def forward(self, x: Tensor) -> Tensor:
        b3 = self.branch3x3dbl_3(self.branch3x3dbl_2(self.branch3x3dbl_1(x)))
        return torch.cat([self.branch3x3(x), b3, F.max_pool2d(x, 3, 2)], 1)


class InceptionC(nn.Module):
    """17x17 module with factorised 7x7 convs (``c7`` channels inside); 768 channels out."""

    def __init__(self, c: int, c7: int) -> None:
        super().__init__()
        self.branch1x1 = ConvBN(c, 192, 1)
        self.branch7x7_1 = ConvBN(c, c7, 1)
        self.branch7x7_2 = ConvBN(c7, c7, (1, 7), padding=(0, 3))
        self.branch7x7_3 = ConvBN(c7, 192, (7, 1), padding=(3, 0))
        self.branch7x7dbl_1 = ConvBN(c, c7, 1)
        self.branch7x7dbl_2 = ConvBN(c7, c7, (7, 1), padding=(3, 0))
        self.branch7x7dbl_3 = ConvBN(c7, c7, (1, 7), padding=(0, 3))
        self.branch7x7dbl_4 = ConvBN(c7, c7, (7, 1), padding=(3, 0))
        self.branch7x7dbl_5 = ConvBN(c7, 192, (1, 7), padding=(0, 3))
        self.branch_pool = ConvBN(c, 192, 1)

    def forward(self, x: Tensor) -> Tensor:
        b7 = self.branch7x7_3(self.branch7x7_2(self.branch7x7_1(x)))
        d = self.branch7x7dbl_1(x)
        d = self.branch7x7dbl_5(self.branch7x7dbl_4(self.branch7x7dbl_3(self.branch7x7dbl_2(d))))
        return torch.cat([self.branch1x1(x), b7, d, _pool_branch(x, self.branch_pool)], 1)


class InceptionD(nn.Module):
    """Grid reduction 17 -> 8: 1x1-3x3/2 | 1x1-1x7-7x1-3x3/2 | maxpool/2."""

    def __init__(self, c: int) -> None:
        super().__init__()
        self.branch3x3_1 = ConvBN(c, 192, 1)
        self.branch3x3_2 = ConvBN(192, 320, 3, stride=2)
        self.branch7x7x3_1 = ConvBN(c, 192, 1)
        self.branch7x7x3_2 = ConvBN(192, 192, (1, 7), padding=(0, 3))
        self.branch7x7x3_3 = ConvBN(192, 192, (7, 1), padding=(3, 0))
        self.branch7x7x3_4 = ConvBN(192, 192, 3, stride=2)

    def forward(self, x: Tensor) -> Tensor:
        b3 = self.branch3x3_2(self.branch3x3_1(x))
        b7 = self.branch7x7x3_4(self.branch7x7x3_3(self.branch7x7x3_2(self.branch7x7x3_1(x))))
        return torch.cat([b3, b7, F.max_pool2d(x, 3, 2)], 1)


class InceptionE(nn.Module):
    """8x8 module with expanded 1x3 / 3x1 branches; 2048 channels out."""

    def __init__(self, c: int) -> None:
        super().__init__()
        self.branch1x1 = ConvBN(c, 320, 1)
        self.branch3x3_1 = ConvBN(c, 384, 1)
        self.branch3x3_2a = ConvBN(384, 384, (1, 3), padding=(0, 1))
        self.branch3x3_2b = ConvBN(384, 384, (3, 1), padding=(1, 0))
        self.branch3x3dbl_1 = ConvBN(c, 448, 1)
        self.branch3x3dbl_2 = ConvBN(448, 384, 3, padding=1)
        self.branch3x3dbl_3a = ConvBN(384, 384, (1, 3), padding=(0, 1))
        self.branch3x3dbl_3b = ConvBN(384, 384, (3, 1), padding=(1, 0))
        self.branch_pool = ConvBN(c, 192, 1)

    def forward(self, x: Tensor) -> Tensor:
        b3 = self.branch3x3_1(x)
        b3 = torch.cat([self.branch3x3_2a(b3), self.branch3x3_2b(b3)], 1)
        d = self.branch3x3dbl_2(self.branch3x3dbl_1(x))
        d = torch.cat([self.branch3x3dbl_3a(d), self.branch3x3dbl_3b(d)], 1)
        return torch.cat([self.branch1x1(x), b3, d, _pool_branch(x, self.branch_pool)], 1)


class InceptionAux(nn.Module):
    """Auxiliary classifier on the 17x17 grid: avgpool 5x5/3, 1x1 conv 128, 5x5 conv 768, linear."""

    def __init__(self, c: int, num_classes: int) -> None:
        super().__init__()
        self.conv0 = ConvBN(c, 128, 1)
        self.conv1 = ConvBN(128, 768, 5)
        self.fc = nn.Linear(768, num_classes)

    def forward(self, x: Tensor) -> Tensor:
        x = self.conv1(self.conv0(F.avg_pool2d(x, 5, 3)))
        return self.fc(x.mean((2, 3)))


class InceptionV3(nn.Module):
    """InceptionV3; see the module docstring. ``aux_output`` holds the last training forward's aux logits."""

    def __init__(
        self,
        num_classes: int = 1000,
        in_channels: int = 3,
        image_size: int = 299,
        aux_logits: bool = False,
        dropout: float = 0.2,
        normalize: str | None = "imagenet",
    ) -> None:
        super().__init__()
        check_model_args("inceptionv3", num_classes, in_channels, image_size, MIN_SIZE)
        if aux_logits and image_size < MIN_SIZE_AUX:
            raise ConfigError(f"inceptionv3: the auxiliary head needs image_size >= {MIN_SIZE_AUX}, got {image_size}")
        self.normalize = input_normalization(normalize, in_channels)
        self.dropout = dropout
        self.Conv2d_1a_3x3 = ConvBN(in_channels, 32, 3, stride=2)
        self.Conv2d_2a_3x3 = ConvBN(32, 32, 3)
        self.Conv2d_2b_3x3 = ConvBN(32, 64, 3, padding=1)
        self.Conv2d_3b_1x1 = ConvBN(64, 80, 1)
        self.Conv2d_4a_3x3 = ConvBN(80, 192, 3)
        self.Mixed_5b = InceptionA(192, 32)
        self.Mixed_5c = InceptionA(256, 64)
        self.Mixed_5d = InceptionA(288, 64)
        self.Mixed_6a = InceptionB(288)
        self.Mixed_6b = InceptionC(768, 128)
        self.Mixed_6c = InceptionC(768, 160)
        self.Mixed_6d = InceptionC(768, 160)
        self.Mixed_6e = InceptionC(768, 192)
        self.AuxLogits = InceptionAux(768, num_classes) if aux_logits else None
        self.Mixed_7a = InceptionD(768)
        self.Mixed_7b = InceptionE(1280)
        self.Mixed_7c = InceptionE(2048)
        self.fc = nn.Linear(2048, num_classes)
        self.aux_output: Tensor | None = None
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")

    def __getstate__(self) -> dict:
        # Copies and pickles drop the stored aux logits: a non-leaf tensor cannot be deep-copied
        # (``ema_model`` deep-copies the model).
        state = self.__dict__.copy()
        state["aux_output"] = None
        return state

    def forward(self, x: Tensor) -> Tensor:
        x = self.Conv2d_2b_3x3(self.Conv2d_2a_3x3(self.Conv2d_1a_3x3(self.normalize(x))))
        x = self.Conv2d_4a_3x3(self.Conv2d_3b_1x1(F.max_pool2d(x, 3, 2)))
        x = self.Mixed_5d(self.Mixed_5c(self.Mixed_5b(F.max_pool2d(x, 3, 2))))
        x = self.Mixed_6e(self.Mixed_6d(self.Mixed_6c(self.Mixed_6b(self.Mixed_6a(x)))))
        if self.AuxLogits is not None and self.training:
            self.aux_output = self.AuxLogits(x)
        x = self.Mixed_7c(self.Mixed_7b(self.Mixed_7a(x)))
        x = F.dropout(x.mean((2, 3)), self.dropout, self.training)
        return self.fc(x)


@MODELS.register("inceptionv3")
def inceptionv3(
    num_classes: int = 1000,
    in_channels: int = 3,
    image_size: int = 299,
    aux_logits: bool = False,
    normalize: str | None = "imagenet",
) -> nn.Module:
    """InceptionV3 (23,834,568 parameters at 1000 classes without the aux head); ImageNet mean/std inside."""
    return InceptionV3(num_classes, in_channels, image_size, aux_logits, normalize=normalize)
