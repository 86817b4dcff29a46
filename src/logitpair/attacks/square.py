"""Square Attack, L-infinity (Andriushchenko et al. 2020, https://arxiv.org/abs/1912.00049).

A score-based black-box attack: random search over square-shaped updates at the corners
of the eps-ball. It reads logits only, under ``torch.no_grad()``, and never differentiates
the model, so gradient masking does not fool it.

Inputs are images in the threat model's bounds (default [0, 1]) of shape (N, C, H, W);
labels have shape (N,). Example::

    x_adv = square(model, x, y, threat=Linf(8 / 255), queries=5000)
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from logitpair.attacks.common import check_k, is_success, prepare_target
from logitpair.errors import ConfigError
from logitpair.modes import eval_mode
from logitpair.threat import Threat, require_linf


def square_p_schedule(i: int, queries: int, p_init: float = 0.8) -> float:
    """Fraction p of pixels changed at iteration ``i`` (the paper's piecewise-constant schedule).

    The schedule is written for 10,000 iterations; as in the reference code, ``i`` is
    rescaled to that budget first (``int(i / queries * 10000)``). p halves after
    iterations 10, 50, 200, 500, 1000, 2000, 4000, 6000 and 8000.
    """
    it = int(i / queries * 10000)
    halvings = sum(it > bound for bound in (10, 50, 200, 500, 1000, 2000, 4000, 6000, 8000))
    return p_init / 2**halvings


def _square_loss(logits: Tensor, y: Tensor, target: Tensor | None, k: int = 1) -> Tensor:
    """Loss to *minimise*: margin ``z_y - max_{i!=y} z_i`` (untargeted), CE of the target (targeted).

    With ``k > 1``: ``sum_{j<=k} max(z_y - z_(j), 0)`` over the ``k`` largest other logits ``z_(j)``,
    zero exactly when ``y`` left the top ``k``. Unlike the top-``k`` margin ``z_y - z_(k)`` alone it
    has no plateaus: raising any of those classes towards ``z_y`` lowers it, and random search
    only keeps strict improvements.
    """
    if target is not None:
        return F.cross_entropy(logits, target, reduction="none")
    z_y = logits.gather(1, y[:, None]).squeeze(1)
    others = logits.scatter(1, y[:, None], -float("inf"))
    if k > 1:
        return (z_y[:, None] - others.topk(k, dim=1).values).clamp_min(0).sum(1)
    return z_y - others.max(1).values


def _random_signs(shape: tuple[int, ...], generator: torch.Generator | None, like: Tensor) -> Tensor:
    bits = torch.randint(0, 2, shape, generator=generator, device=like.device)
    return 2.0 * bits.to(like.dtype) - 1.0


def _square_run(
    model: nn.Module,
    x: Tensor,
    y: Tensor,
    target: Tensor | None,
    threat: Threat,
    queries: int,
    p_init: float,
    generator: torch.Generator | None,
    k: int = 1,
) -> tuple[Tensor, Tensor, Tensor]:
    """One run of at most ``queries`` forward passes per example: (point, loss, success)."""
    n, c, h, w = x.shape
    eps = threat.eps
    # Vertical stripes: one random sign per (example, channel, column).
    stripes = _random_signs((n, c, 1, w), generator, x)
    x_best = threat.project(x, x + eps * stripes)
    logits = model(x_best)
    loss_best = _square_loss(logits, y, target, k)
    succ = is_success(logits, y, target, k)
    active = (~succ).nonzero().squeeze(1)
    rows = torch.arange(h, device=x.device)
    cols = torch.arange(w, device=x.device)

    for i in range(queries - 1):
        if active.numel() == 0:
            break
        m = active.numel()
        p = square_p_schedule(i, queries, p_init)
        s = min(max(round(math.sqrt(p * h * w)), 1), h, w)
        top = torch.randint(0, h - s + 1, (m, 1), generator=generator, device=x.device)
        left = torch.randint(0, w - s + 1, (m, 1), generator=generator, device=x.device)
        in_rows = (rows >= top) & (rows < top + s)  # (m, h)
        in_cols = (cols >= left) & (cols < left + s)  # (m, w)
        window = (in_rows[:, :, None] & in_cols[:, None, :])[:, None]  # (m, 1, h, w)
        colours = _random_signs((m, c, 1, 1), generator, x)

        x_act, best_act = x[active], x_best[active]
        x_new = threat.project(x_act, torch.where(window, best_act + 2.0 * eps * colours, best_act))
        logits = model(x_new)
        t_act = None if target is None else target[active]
        loss = _square_loss(logits, y[active], t_act, k)
        new_succ = is_success(logits, y[active], t_act, k)
        improved = (loss < loss_best[active]) | new_succ
        x_best[active] = torch.where(improved[:, None, None, None], x_new, best_act)
        loss_best[active] = torch.where(improved, loss, loss_best[active])
        succ[active] = new_succ
        active = active[~new_succ]  # only the unbroken examples are queried again
    return x_best, loss_best, succ


def square(
    model: nn.Module,
    x: Tensor,
    y: Tensor,
    *,
    threat: Threat,
    queries: int = 5000,
    p_init: float = 0.8,
    restarts: int = 1,
    targeted: bool = False,
    target: Tensor | None = None,
    generator: torch.Generator | None = None,
    k: int = 1,
) -> Tensor:
    """Square Attack (Algorithms 1 and 2 of Andriushchenko et al. 2020), L-infinity.

    Starts from vertical stripes of height H at ``x +- eps`` and then, for each example
    still not broken, tries one random square of side ``round(sqrt(p * H * W))`` whose
    channels are each moved to the opposite side of the ball (``+-2 eps``, projected),
    keeping it when the loss decreases. p follows :func:`square_p_schedule`.

    Args:
        queries: forward passes per example and run, the initial point included.
        p_init: initial fraction of pixels changed (0.8 in AutoAttack).
        restarts: runs from fresh stripes, each on the examples not yet broken.
        targeted: minimise the cross-entropy of ``target`` (a random other class when
            None) instead of the margin loss.
        generator: source of all randomness, for reproducible runs.
        k: top-``k`` success (untargeted): a point is broken only once ``y`` left its ``k``
            largest logits, with the loss of :func:`_square_loss` (``k = 1``: misclassification).

    Returns per example a successful point (``y`` not in the top ``k``, or classified as the target) if
    one was found, else the lowest-loss point. Examples already successful on ``x`` are
    returned unchanged. The model runs in eval mode (restored afterwards) and is never
    differentiated.
    """
    require_linf(threat, "square")
    if x.dim() != 4:
        raise ConfigError(f"square expects images of shape (N, C, H, W), got {tuple(x.shape)}")
    if queries < 1:
        raise ConfigError(f"queries must be >= 1, got {queries}")
    if restarts < 1:
        raise ConfigError(f"restarts must be >= 1, got {restarts}")
    if not 0.0 < p_init <= 1.0:
        raise ConfigError(f"p_init must be in (0, 1], got {p_init}")
    check_k(k)
    if targeted and k != 1:
        raise ConfigError("k (top-k success) is for untargeted attacks; a targeted attack succeeds on the target")
    x = x.detach()
    with eval_mode(model), torch.no_grad():
        target = prepare_target(model, x, y, targeted, target, generator)
        logits = model(x)
        check_k(k, logits.shape[1])
        best_x = x.clone()
        best_loss = _square_loss(logits, y, target, k)
        best_succ = is_success(logits, y, target, k)
        for _ in range(restarts):
            idx = (~best_succ).nonzero().squeeze(1)
            if idx.numel() == 0:
                break
            t = None if target is None else target[idx]
            run = _square_run(model, x[idx], y[idx], t, threat, queries, p_init, generator, k)
            run_x, run_loss, run_succ = run
            better = run_succ | (run_loss < best_loss[idx])
            best_x[idx] = torch.where(better[:, None, None, None], run_x, best_x[idx])
            best_loss[idx] = torch.where(better, run_loss, best_loss[idx])
            best_succ[idx] = run_succ
    return best_x
