"""Optimisers and learning-rate schedules of the training loop.

``rmsprop-tf`` is TensorFlow's RMSProp as the official ALP code uses it (``tf.train.
RMSPropOptimizer(lr, decay=0.9, momentum=0.9, epsilon=1.0)``), which differs from
``torch.optim.RMSprop`` (our ``rmsprop``) in two ways: the mean square starts at 1 (not 0), and
epsilon sits *inside* the square root::

    ms  <- rho * ms + (1 - rho) * g**2          (ms initialised to 1)
    mom <- mu * mom + lr * g / sqrt(ms + eps)
    w   <- w - mom

The official recipe: lr 0.045 per 32 images of global batch (``lr_reference_batch: 32``),
multiplied by 0.94 every 2 epochs (``schedule: step``), weight decay 1e-4, EMA 0.9999.
"""

from __future__ import annotations

import math
from collections.abc import Iterable

import torch
from torch import Tensor, nn

from logitpair.config import RunConfig


class TFRMSprop(torch.optim.Optimizer):
    """TensorFlow-style RMSProp (see the module docstring). ``weight_decay`` adds
    ``weight_decay * w`` to the gradient (the official L2 term ``1e-4 * sum ||w||^2 / 2``)."""

    def __init__(
        self,
        params: Iterable[nn.Parameter],
        lr: float,
        decay: float = 0.9,
        momentum: float = 0.9,
        eps: float = 1.0,
        weight_decay: float = 0.0,
    ) -> None:
        super().__init__(
            params, {"lr": lr, "decay": decay, "momentum": momentum, "eps": eps, "weight_decay": weight_decay}
        )

    @torch.no_grad()
    def step(self, closure=None):  # type: ignore[override]
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            rho, mu, eps, lr, wd = group["decay"], group["momentum"], group["eps"], group["lr"], group["weight_decay"]
            for p in group["params"]:
                if p.grad is None:
                    continue
                g: Tensor = p.grad if wd == 0 else p.grad.add(p, alpha=wd)
                state = self.state[p]
                if not state:
                    state["ms"] = torch.ones_like(p)
                    state["mom"] = torch.zeros_like(p)
                ms, mom = state["ms"], state["mom"]
                ms.mul_(rho).addcmul_(g, g, value=1.0 - rho)
                mom.mul_(mu).addcdiv_(g, (ms + eps).sqrt_(), value=lr)
                p.sub_(mom)
        return loss


def base_lr(cfg: RunConfig) -> float:
    """``lr``, scaled by ``batch_size / lr_reference_batch`` when a reference batch is set."""
    o = cfg.optim
    return o.lr * o.batch_size / o.lr_reference_batch if o.lr_reference_batch else o.lr


def make_optimizer(params: list[nn.Parameter], cfg: RunConfig) -> torch.optim.Optimizer:
    o = cfg.optim
    lr = base_lr(cfg)
    if o.optimizer == "sgd":
        return torch.optim.SGD(params, lr=lr, momentum=o.momentum, weight_decay=o.weight_decay)
    if o.optimizer == "adam":
        return torch.optim.Adam(params, lr=lr, weight_decay=o.weight_decay)
    if o.optimizer == "rmsprop-tf":
        return TFRMSprop(
            params, lr=lr, decay=o.rmsprop_decay, momentum=o.momentum, eps=o.rmsprop_eps, weight_decay=o.weight_decay
        )
    # torch's RMSprop: mean square starts at 0 and eps is added outside the square root; NOT the
    # official ALP optimiser even with eps 1.0 (that is rmsprop-tf)
    return torch.optim.RMSprop(
        params,
        lr=lr,
        alpha=o.rmsprop_decay,
        eps=o.rmsprop_eps,
        momentum=o.momentum,
        weight_decay=o.weight_decay,
    )


def lr_at(step: int, steps_per_epoch: int, cfg: RunConfig) -> float:
    """Learning rate at optimisation ``step`` (0-based): schedule, then the optional linear warm-up."""
    o = cfg.optim
    lr = base_lr(cfg)
    if o.schedule == "step":
        lr = lr * o.step_gamma ** (step // steps_per_epoch // o.step_every)
    elif o.schedule == "cosine":
        total = steps_per_epoch * o.epochs
        lr = lr * 0.5 * (1.0 + math.cos(math.pi * min(step, total) / total))
    warmup = o.warmup_epochs * steps_per_epoch
    if warmup > 0 and step < warmup:
        lr = lr * (step + 1) / warmup
    return lr
