"""Fast gradient sign method (Goodfellow et al. 2015, https://arxiv.org/abs/1412.6572)."""

from __future__ import annotations

import torch
from torch import Tensor, nn

from logitpair.attacks.common import attack_objective, prepare_target
from logitpair.attacks.iterative import perturb_iterative
from logitpair.modes import attack_context
from logitpair.threat import Threat


def fgsm(
    model: nn.Module,
    x: Tensor,
    y: Tensor,
    *,
    threat: Threat,
    targeted: bool = False,
    target: Tensor | None = None,
    generator: torch.Generator | None = None,
) -> Tensor:
    """One signed-gradient step of size eps from ``x``: ``clip(x + eps * sign(grad))``.

    L-infinity (another threat: one steepest-ascent step of size eps in its norm, ``threat.step``),
    inputs in the threat's bounds, shape (N, C, H, W). Targeted mode descends
    the cross-entropy of ``target`` (random other class when None).
    """
    x = x.detach()
    with attack_context(model):
        target = prepare_target(model, x, y, targeted, target, generator)
        loss_fn = attack_objective(y, target)
        return perturb_iterative(model, x, x, threat=threat, steps=1, step_size=threat.eps, loss_fn=loss_fn).detach()
