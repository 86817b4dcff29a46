"""Layers shared by the models."""

from __future__ import annotations

import torch
from torch import Tensor, nn


class Normalize(nn.Module):
    """Per-channel ``(x - mean) / std`` inside the model, so attacks see [0, 1] pixels."""

    def __init__(self, mean: tuple[float, ...], std: tuple[float, ...]) -> None:
        super().__init__()
        self.register_buffer("mean", torch.tensor(mean).view(1, -1, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(std).view(1, -1, 1, 1), persistent=False)

    def forward(self, x: Tensor) -> Tensor:
        return (x - self.mean) / self.std
