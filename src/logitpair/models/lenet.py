"""LeNet-style networks for 28x28 (MNIST, Fashion-MNIST) and 32x32 inputs."""

from __future__ import annotations

from torch import Tensor, nn
from torch.nn import Conv2d

from logitpair.models.registry import MODELS


class LeNet(nn.Module):
    """Two 5x5 conv + 2x2 max-pool stages, then fully connected layers.

    ``LeNet.madry()`` is the MNIST network of Madry et al. used by the ALP paper
    (conv 5x5x32 'same', pool, conv 5x5x64 'same', pool, fc 1024, fc classes);
    ``LeNet.lenet5()`` a small fast LeNet-5 variant for demos and tests.
    Input: (N, in_channels, image_size, image_size) in [0, 1]; output: logits (N, classes).
    """

    def __init__(
        self,
        channels: tuple[int, int],
        hidden: tuple[int, ...],
        num_classes: int = 10,
        in_channels: int = 1,
        image_size: int = 28,
        same_padding: tuple[bool, bool] = (True, True),
    ) -> None:
        super().__init__()
        c1, c2 = channels
        size = image_size
        pad1 = 2 if same_padding[0] else 0
        size = (size + 2 * pad1 - 4) // 2
        pad2 = 2 if same_padding[1] else 0
        size = (size + 2 * pad2 - 4) // 2
        if size < 1:
            raise ValueError(f"image_size {image_size} is too small for this network")
        self.features = nn.Sequential(
            Conv2d(in_channels, c1, 5, padding=pad1),
            nn.ReLU(),
            nn.MaxPool2d(2),
            Conv2d(c1, c2, 5, padding=pad2),
            nn.ReLU(),
            nn.MaxPool2d(2),
            nn.Flatten(),
        )
        layers: list[nn.Module] = []
        width = c2 * size * size
        for h in hidden:
            layers += [nn.Linear(width, h), nn.ReLU()]
            width = h
        layers.append(nn.Linear(width, num_classes))
        self.classifier = nn.Sequential(*layers)

    def forward(self, x: Tensor) -> Tensor:
        return self.classifier(self.features(x))


@MODELS.register("lenet")
def lenet(num_classes: int = 10, in_channels: int = 1, image_size: int = 28) -> nn.Module:
    """Madry et al.'s MNIST network (the ALP paper's MNIST model), about 3.3M parameters at 28x28."""
    return LeNet((32, 64), (1024,), num_classes, in_channels, image_size, (True, True))


@MODELS.register("lenet5")
def lenet5(num_classes: int = 10, in_channels: int = 1, image_size: int = 28) -> nn.Module:
    """A small, fast LeNet-5 (conv 5x5x16 'same', pool, conv 5x5x32, pool, fc 128, fc classes)."""
    return LeNet((16, 32), (128,), num_classes, in_channels, image_size, (True, False))
