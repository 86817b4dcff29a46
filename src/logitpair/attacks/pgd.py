"""Projected gradient descent (Madry et al. 2018, https://arxiv.org/abs/1706.06083).

Any threat model (:class:`~logitpair.threat.Threat`; L-infinity: signed-gradient steps), inputs in
its bounds (default [0, 1]), ``x`` of shape (N, C, H, W). The loop is
:func:`~logitpair.attacks.iterative.perturb_iterative`, shared with the other gradient attacks.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from logitpair.attacks.common import attack_objective, check_k, is_success, prepare_target
from logitpair.attacks.iterative import BestIterate, perturb_iterative, start_point
from logitpair.errors import ConfigError
from logitpair.modes import attack_context
from logitpair.threat import Threat


def pgd(
    model: nn.Module,
    x: Tensor,
    y: Tensor,
    *,
    threat: Threat,
    steps: int,
    step_size: float | None = None,
    random_start: bool = True,
    restarts: int = 1,
    targeted: bool = False,
    target: Tensor | None = None,
    keep_best: bool = True,
    generator: torch.Generator | None = None,
    init: Tensor | None = None,
    k: int = 1,
) -> Tensor:
    """PGD with random start and restarts; returns the per-example worst case found.

    Each step ascends the cross-entropy of the label (untargeted) or descends the
    cross-entropy of ``target`` (targeted; a random class other than the label when
    ``target`` is None; the official ``pgdrnd`` instead draws from all classes, see
    :mod:`logitpair.attacks.official`)::

        x <- clip_[0,1](Pi_eps(x + step_size * sign(grad)))      (L-infinity: threat.step)

    Args:
        steps: number of gradient steps k (>= 1).
        step_size: alpha; default ``2.5 * eps / steps`` (Madry et al.).
        random_start: start from a uniform point in the eps-ball (else from ``x``).
        restarts: independent runs; per example the successful (else highest-loss) result wins.
        keep_best: also consider every intermediate iterate, not only the last one (never weaker;
            costs one extra forward). ``False`` returns Madry's last iterate.
        generator: source of the random starts and random targets, for reproducible runs.
        init: starting point of the first restart (projected into the ball), in place of a
            random start; training losses pass starts keyed per sample this way.
        k: top-``k`` success (untargeted): an iterate counts as successful only when ``y`` is
            not among its ``k`` largest logits (``k = 1``: misclassified). The per-example worst
            case is a successful iterate if any (then the highest-loss one).

    The model is run in eval mode with frozen parameters; its mode and ``requires_grad``
    flags are restored afterwards. No host synchronisation happens inside the loop.

    Example::

        x_adv = pgd(model, x, y, threat=Linf(0.1), steps=40, restarts=2)
    """
    _check(steps, restarts, targeted, k)
    alpha = 2.5 * threat.eps / steps if step_size is None else float(step_size)
    x = x.detach()
    with attack_context(model):
        target = prepare_target(model, x, y, targeted, target, generator)
        loss_fn = attack_objective(y, target)
        best = None
        if keep_best or restarts > 1:
            best = BestIterate(x, loss_fn, lambda logits: is_success(logits, y, target, k), every_step=keep_best)
        for r in range(restarts):
            start = start_point(
                x, threat, init=init if r == 0 else None, random_start=random_start, generator=generator
            )
            x_adv = perturb_iterative(
                model, x, start, threat=threat, steps=steps, step_size=alpha, loss_fn=loss_fn, best=best
            )
    return (x_adv if best is None else best.x).detach()


def _check(steps: int, restarts: int, targeted: bool, k: int) -> None:
    """PGD's settings: at least one step and one restart; top-``k`` success untargeted only."""
    if steps < 1:
        raise ValueError(f"steps must be >= 1, got {steps}")
    if restarts < 1:
        raise ValueError(f"restarts must be >= 1, got {restarts}")
    check_k(k)
    if targeted and k != 1:
        raise ConfigError("k (top-k success) is for untargeted attacks; a targeted attack succeeds on the target")
