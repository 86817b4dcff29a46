"""Optimisers and learning-rate schedules of the training loop."""

from __future__ import annotations

import math

import torch
from torch import nn

from logitpair.config import RunConfig


def make_optimizer(params: list[nn.Parameter], cfg: RunConfig) -> torch.optim.Optimizer:
    o = cfg.optim
    if o.optimizer == "sgd":
        return torch.optim.SGD(params, lr=o.lr, momentum=o.momentum, weight_decay=o.weight_decay)
    if o.optimizer == "adam":
        return torch.optim.Adam(params, lr=o.lr, weight_decay=o.weight_decay)
    return torch.optim.RMSprop(
        params,
        lr=o.lr,
        alpha=o.rmsprop_decay,
        eps=o.rmsprop_eps,
        momentum=o.momentum,
        weight_decay=o.weight_decay,
    )


def lr_at(step: int, steps_per_epoch: int, cfg: RunConfig) -> float:
    o = cfg.optim
    if o.schedule == "constant":
        return o.lr
    if o.schedule == "step":
        return o.lr * o.step_gamma ** (step // steps_per_epoch // o.step_every)
    total = steps_per_epoch * o.epochs
    return o.lr * 0.5 * (1.0 + math.cos(math.pi * min(step, total) / total))
