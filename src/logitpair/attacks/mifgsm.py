"""Momentum iterative FGSM (Dong et al. 2018, https://arxiv.org/abs/1710.06081), L-infinity.

Iterative FGSM with a momentum on the L1-normalised gradient, which makes the adversarial
examples transfer better; attacking an ensemble of source models (their logits averaged,
the paper's "ensemble in logits") transfers better still::

    g <- mu * g + grad / ||grad||_1          (per example)
    x <- clip_[0,1](Pi_eps(x + alpha * sign(g))),   alpha = eps / steps

The loop is :func:`~logitpair.attacks.iterative.perturb_iterative` with the direction
:class:`L1Momentum`; another threat model takes the same ``g`` through its own ``threat.step``.

Inputs are images in the threat's bounds of shape (N, ...), labels (N,). Example::

    x_adv = mi_fgsm([source_a, source_b], x, y, threat=Linf(16 / 255), steps=10)
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor, nn

from logitpair.attacks.common import attack_objective, prepare_target
from logitpair.attacks.iterative import perturb_iterative, start_point
from logitpair.errors import ConfigError
from logitpair.models.ensemble import EnsembleLogits
from logitpair.modes import attack_context
from logitpair.threat import Threat


def as_model(model: nn.Module | Sequence[nn.Module]) -> nn.Module:
    """A module as it is; a sequence of modules (or an ``nn.ModuleList``) as
    :class:`~logitpair.models.ensemble.EnsembleLogits`."""
    if isinstance(model, nn.Module) and not isinstance(model, nn.ModuleList):
        return model
    return EnsembleLogits(list(model))


def mi_fgsm(
    model: nn.Module | Sequence[nn.Module],
    x: Tensor,
    y: Tensor,
    *,
    threat: Threat,
    steps: int = 10,
    decay: float = 1.0,
    step_size: float | None = None,
    targeted: bool = False,
    target: Tensor | None = None,
    generator: torch.Generator | None = None,
) -> Tensor:
    """Momentum iterative FGSM (MI-FGSM, Dong et al. 2018) for transfer attacks; returns the last iterate.

    Args:
        model: a model, or a sequence of source models attacked as one ensemble (mean logits).
        steps: iterations T (>= 1). decay: momentum mu (1.0 in the paper).
        step_size: alpha; default ``eps / steps``.
        targeted: descend the cross-entropy of ``target`` instead of ascending that of ``y``
            (``target`` None: a random class other than the label, drawn from ``generator``).

    Each member runs in eval mode with frozen parameters; all are restored afterwards.
    """
    if steps < 1:
        raise ConfigError(f"steps must be >= 1, got {steps}")
    if not decay >= 0.0:
        raise ConfigError(f"decay must be >= 0, got {decay}")
    alpha = threat.eps / steps if step_size is None else float(step_size)
    model = as_model(model)
    x = x.detach()
    with attack_context(model):
        target = prepare_target(model, x, y, targeted, target, generator)
        loss_fn, direction = attack_objective(y, target), L1Momentum(decay)
        start = start_point(x, threat, random_start=False)  # the clean input
        x_adv = perturb_iterative(
            model, x, start, threat=threat, steps=steps, step_size=alpha, loss_fn=loss_fn, direction=direction
        )
    return x_adv.detach()


class L1Momentum:
    """MI-FGSM's ascent direction: ``g <- decay * g + grad / ||grad||_1`` (per example, from
    ``g = 0``); each call takes the step's gradient and returns the new ``g``."""

    def __init__(self, decay: float) -> None:
        self.decay = decay
        self.g: Tensor | None = None

    def __call__(self, grad: Tensor) -> Tensor:
        l1 = grad.abs().flatten(1).sum(1).clamp_min(torch.finfo(grad.dtype).tiny)
        g = torch.zeros_like(grad) if self.g is None else self.g
        self.g = self.decay * g + grad / l1.view((-1,) + (1,) * (grad.dim() - 1))
        return self.g
