"""Exponential moving average of the weights (used for validation and export)."""

from __future__ import annotations

from copy import deepcopy

import torch
from torch import Tensor, nn


def update_ema(ema: dict[str, Tensor], model: nn.Module, decay: float) -> None:
    """``ema <- decay * ema + (1 - decay) * weights`` for float tensors; integer buffers copied."""
    with torch.no_grad():
        for k, v in model.state_dict().items():
            if v.is_floating_point():
                ema[k].mul_(decay).add_(v, alpha=1.0 - decay)
            else:
                ema[k].copy_(v)


def ema_model(model: nn.Module, ema: dict[str, Tensor] | None) -> nn.Module:
    """The model itself without EMA, else a copy holding the EMA weights (used for validation and export)."""
    if ema is None:
        return model
    copy = deepcopy(model)
    copy.load_state_dict(ema)
    return copy


def ema_decay_at(decay: float, schedule: str, t: int) -> float:
    """The EMA decay after ``t`` updates: constant, or the official code's
    ``min(decay, (1 + t) / (10 + t))`` (``schedule="tf"``, as ``tf.train.ExponentialMovingAverage``
    with ``num_updates``), which lets early weights be forgotten quickly."""
    return min(decay, (1.0 + t) / (10.0 + t)) if schedule == "tf" else decay
