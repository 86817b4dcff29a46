"""The small CNN of Gowal et al. 2018 (https://arxiv.org/abs/1810.12715), the certified-training baseline.

Conv 16 4x4 stride 2 'valid' → ReLU → conv 32 4x4 stride 1 'valid' → ReLU → flatten → linear 100 →
ReLU → linear classes (the authors' ``small`` model; 28x28 inputs give 13x13 then 10x10 maps).
Input (N, in_channels, image_size, image_size) in [0, 1], no normalisation; output logits (N, classes).
"""

from __future__ import annotations

from torch import nn

from logitpair.models.layers import check_model_args
from logitpair.models.registry import MODELS


@MODELS.register("cnn-small")
def cnn_small(num_classes: int = 10, in_channels: int = 1, image_size: int = 28) -> nn.Module:
    """Gowal et al. 2018's small CNN (conv 16 4x4/2, conv 32 4x4/1, fc 100, fc classes) for IBP/CROWN."""
    check_model_args("cnn-small", num_classes, in_channels, image_size, 10)
    size = (image_size - 4) // 2 + 1 - 3
    return nn.Sequential(
        nn.Conv2d(in_channels, 16, 4, stride=2),
        nn.ReLU(),
        nn.Conv2d(16, 32, 4, stride=1),
        nn.ReLU(),
        nn.Flatten(),
        nn.Linear(32 * size * size, 100),
        nn.ReLU(),
        nn.Linear(100, num_classes),
    )
