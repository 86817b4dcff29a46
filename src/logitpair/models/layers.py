"""Layers and checks shared by the models: input normalisation inside the model, argument checks."""

from __future__ import annotations

import torch
from torch import Tensor, nn

from logitpair.errors import ConfigError


class Normalize(nn.Module):
    """Per-channel ``(x - mean) / std`` inside the model, so attacks see [0, 1] pixels."""

    def __init__(self, mean: tuple[float, ...], std: tuple[float, ...]) -> None:
        super().__init__()
        self.register_buffer("mean", torch.tensor(mean).view(1, -1, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(std).view(1, -1, 1, 1), persistent=False)

    def forward(self, x: Tensor) -> Tensor:
        return (x - self.mean) / self.std


NORMALIZATIONS: dict[str, tuple[tuple[float, ...], tuple[float, ...]]] = {
    "imagenet": ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225)),
    "cifar10": ((0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616)),
    "inception": ((0.5, 0.5, 0.5), (0.5, 0.5, 0.5)),  # x -> 2x - 1: TF-slim and the official ALP code
}


def input_normalization(kind: str | None, in_channels: int) -> nn.Module:
    """``Normalize`` with the named statistics (buffers, not parameters), or identity for ``None``.

    One-channel inputs use the mean of the three channel statistics.
    """
    if kind is None:
        return nn.Identity()
    if kind not in NORMALIZATIONS:
        raise ConfigError(f"unknown normalize {kind!r}; valid: {', '.join(sorted(NORMALIZATIONS))} or None")
    mean, std = NORMALIZATIONS[kind]
    if in_channels == 1:
        mean, std = (sum(mean) / len(mean),), (sum(std) / len(std),)
    elif in_channels != len(mean):
        raise ConfigError(f"normalize={kind!r} is for {len(mean)} channels, not in_channels={in_channels}")
    return Normalize(mean, std)


def check_model_args(model: str, num_classes: int, in_channels: int, image_size: int, minimum: int) -> None:
    """Raise ``ConfigError`` (a ``ValueError``) for a non-positive size or an input smaller than ``minimum``."""
    if num_classes < 1 or in_channels < 1:
        raise ConfigError(f"{model}: num_classes and in_channels must be >= 1, got {num_classes}, {in_channels}")
    if image_size < minimum:
        raise ConfigError(
            f"{model}: image_size {image_size} is too small; this network needs inputs of at least {minimum}x{minimum}"
        )


def min_size_for_strides(num_stride2: int) -> int:
    """Smallest input for which each of ``num_stride2`` stride-2 layers (output ``ceil(n / 2)``) gets >= 2x2."""
    return 2 ** (num_stride2 - 1) + 1
