"""Projected gradient descent (Madry et al. 2018, https://arxiv.org/abs/1706.06083).

L-infinity, inputs in the threat model's bounds (default [0, 1]), ``x`` of shape (N, C, H, W).
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from logitpair.attacks.common import attack_loss, check_k, input_grad, is_success, prepare_target
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

        x <- clip_[0,1](Pi_eps(x + step_size * sign(grad)))

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
    if steps < 1:
        raise ValueError(f"steps must be >= 1, got {steps}")
    if restarts < 1:
        raise ValueError(f"restarts must be >= 1, got {restarts}")
    check_k(k)
    if targeted and k != 1:
        raise ConfigError("k (top-k success) is for untargeted attacks; a targeted attack succeeds on the target")
    alpha = 2.5 * threat.eps / steps if step_size is None else float(step_size)
    x = x.detach()
    with attack_context(model):
        target = prepare_target(model, x, y, targeted, target, generator)
        best_x = x.clone()
        best_loss = torch.full((len(x),), -float("inf"), device=x.device, dtype=x.dtype)
        best_succ = torch.zeros(len(x), dtype=torch.bool, device=x.device)

        def consider(candidate: Tensor, loss: Tensor, logits: Tensor) -> None:
            nonlocal best_x, best_loss, best_succ
            succ = is_success(logits, y, target, k)
            better = (succ & ~best_succ) | ((succ == best_succ) & (loss > best_loss))
            best_x = torch.where(better.view(-1, *[1] * (x.dim() - 1)), candidate, best_x)
            best_loss = torch.where(better, loss, best_loss)
            best_succ = best_succ | succ

        for r in range(restarts):
            if r == 0 and init is not None:
                x_adv = threat.project(x, init.detach())
            else:
                x_adv = threat.random_init(x, generator) if random_start else x.clone()
            for _ in range(steps):
                loss, logits, grad = input_grad(model, x_adv, y, target)
                if keep_best:
                    consider(x_adv, loss, logits)
                x_adv = threat.step(x, x_adv, grad, alpha)
            if keep_best or restarts > 1:
                with torch.no_grad():
                    logits = model(x_adv)
                consider(x_adv, attack_loss(logits, y, target).detach(), logits)
            else:
                best_x = x_adv
    return best_x.detach()
