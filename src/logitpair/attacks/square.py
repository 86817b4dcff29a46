"""Square Attack, L-infinity and L2 (Andriushchenko et al. 2020, https://arxiv.org/abs/1912.00049).

A score-based black-box attack: random search over square-shaped updates, at the corners of
the eps-ball for L-infinity, and for L2 square windows of concentric-rectangle patterns that
move the perturbation's mass around on the sphere of radius eps (the paper's Algorithm 3). It
reads logits only, under ``torch.no_grad()``, and never differentiates the model, so gradient
masking does not fool it.

Inputs are images in the threat model's bounds (default [0, 1]) of shape (N, C, H, W);
labels have shape (N,). Example::

    x_adv = square(model, x, y, threat=Linf(8 / 255), queries=5000)
    x_adv = square(model, x, y, threat=L2(0.5), queries=5000)
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from logitpair.attacks.common import check_k, is_success, prepare_target
from logitpair.errors import ConfigError
from logitpair.modes import eval_mode
from logitpair.threat import Threat, require_norm


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


_Window = tuple[Tensor, Tensor, Tensor]


def _window(m: int, h: int, w: int, s: int, generator: torch.Generator | None, device: torch.device) -> _Window:
    """A random ``s x s`` window per example: its mask ``(m, 1, h, w)`` and top-left corner ``(m, 1)`` each."""
    top = torch.randint(0, h - s + 1, (m, 1), generator=generator, device=device)
    left = torch.randint(0, w - s + 1, (m, 1), generator=generator, device=device)
    rows, cols = torch.arange(h, device=device), torch.arange(w, device=device)
    in_rows = (rows >= top) & (rows < top + s)  # (m, h)
    in_cols = (cols >= left) & (cols < left + s)  # (m, w)
    return (in_rows[:, :, None] & in_cols[:, None, :])[:, None], top, left


def _linf_init(x: Tensor, threat: Threat, generator: torch.Generator | None) -> Tensor:
    """Vertical stripes: one random sign per (example, channel, column), at ``x +- eps``."""
    n, c, _, w = x.shape
    return threat.project(x, x + threat.eps * _random_signs((n, c, 1, w), generator, x))


def _linf_propose(x: Tensor, best: Tensor, threat: Threat, p: float, generator: torch.Generator | None) -> Tensor:
    """One random square of side ``round(sqrt(p * H * W))`` per example, each channel moved to the
    opposite side of the ball (``+-2 eps``, projected)."""
    m, c, h, w = x.shape
    s = min(max(round(math.sqrt(p * h * w)), 1), h, w)
    window, _, _ = _window(m, h, w, s, generator, x.device)
    colours = _random_signs((m, c, 1, 1), generator, x)
    return threat.project(x, torch.where(window, best + 2.0 * threat.eps * colours, best))


def _rectangles(a: int, b: int, like: Tensor) -> Tensor:
    """An ``a x b`` block of concentric rectangles around ``(a // 2, b // 2)``: the cell at Chebyshev
    distance ``r`` from the centre holds ``sum_{k >= r} 1 / (k + 1)^2`` (k < max(a, b) // 2 + 1),
    unit L2 norm."""
    if a == 0:
        return like.new_zeros(0, b)
    rows = (torch.arange(a, device=like.device) - a // 2).abs()
    cols = (torch.arange(b, device=like.device) - b // 2).abs()
    r = torch.maximum(rows[:, None], cols[None, :])
    levels = max(a // 2, b // 2) + 1
    weights = 1.0 / (torch.arange(levels, device=like.device, dtype=like.dtype) + 1.0).square()
    tail = weights.flip(0).cumsum(0).flip(0)  # tail[k] = sum_{k' >= k} weights[k']
    block = tail[r]
    return block / block.norm()


def square_l2_pattern(s: int, like: Tensor) -> Tensor:
    """The L2 Square Attack's ``s x s`` update (Andriushchenko et al. 2020, Sec. 3.2): two halves of
    concentric rectangles of opposite signs (top ``+``, bottom ``-``), unit L2 norm."""
    pattern = torch.cat((_rectangles(s // 2, s, like), -_rectangles(s - s // 2, s, like)))
    return pattern / pattern.norm()


def _oriented(pattern: Tensor, m: int, generator: torch.Generator | None) -> Tensor:
    """``pattern`` (s, s) per example ``(m, s, s)``, transposed for a random half of them."""
    flip = torch.randint(0, 2, (m, 1, 1), generator=generator, device=pattern.device).bool()
    return torch.where(flip, pattern.T, pattern)


def _place(patterns: Tensor, top: Tensor, left: Tensor, window: Tensor) -> Tensor:
    """``patterns`` (m, s, s) written into ``(m, 1, h, w)`` zeros at each example's ``(top, left)``."""
    m, s, _ = patterns.shape
    h, w = window.shape[-2:]
    r = (torch.arange(h, device=top.device) - top).clamp(0, s - 1)  # (m, h)
    c = (torch.arange(w, device=top.device) - left).clamp(0, s - 1)  # (m, w)
    batch = torch.arange(m, device=top.device)[:, None, None]
    return torch.where(window, patterns[batch, r[:, :, None], c[:, None, :]][:, None], 0.0)


def _to_sphere(x: Tensor, delta: Tensor, threat: Threat) -> Tensor:
    """``x + eps * delta / ||delta||_2`` clipped to the bounds, which is its projection onto the
    ball and the bounds (clipping moves every coordinate towards ``x`` inside the bounds, so the
    point stays in the ball)."""
    norms = delta.flatten(1).norm(dim=1).clamp_min(1e-12).view(-1, 1, 1, 1)
    return (x + threat.eps * delta / norms).clamp(*threat.bounds)


def _l2_init(x: Tensor, threat: Threat, generator: torch.Generator | None) -> Tensor:
    """A grid of ``s x s`` tiles (``s = min(H, W) // 5``, centred), each :func:`square_l2_pattern`
    (randomly transposed per example) with a random sign per (example, channel), scaled to the
    sphere of radius eps and clipped."""
    n, c, h, w = x.shape
    s = max(min(h, w) // 5, 1)
    top0, left0 = (h - s * (h // s)) // 2, (w - s * (w // s)) // 2
    pattern = square_l2_pattern(s, x)
    delta = torch.zeros_like(x)
    for i in range(h // s):
        for j in range(w // s):
            tile = _oriented(pattern, n, generator)[:, None] * _random_signs((n, c, 1, 1), generator, x)
            rows, cols = slice(top0 + i * s, top0 + (i + 1) * s), slice(left0 + j * s, left0 + (j + 1) * s)
            delta[:, :, rows, cols] = tile
    return _to_sphere(x, delta, threat)


def _channel_norm(v: Tensor) -> Tensor:
    return v.square().sum((-2, -1), keepdim=True).sqrt()


def _l2_propose(x: Tensor, best: Tensor, threat: Threat, p: float, generator: torch.Generator | None) -> Tensor:
    """The L2 update (Algorithm 3 of Andriushchenko et al. 2020) per example: in a random window
    ``W1`` of side ``s`` (odd, >= 3, ``~ sqrt(p * H * W)``) the current perturbation, normalised per
    channel, plus :func:`square_l2_pattern` with a random sign per channel, rescaled so that the
    perturbation's mass in ``W1`` and a second random window ``W2`` (set to zero) plus the budget
    left in the ball (``eps^2 - ||delta||^2``, shared by the channels) moves into ``W1``; then the
    whole perturbation is scaled to the sphere of radius eps and clipped."""
    m, c, h, w = x.shape
    s = max(round(math.sqrt(p * h * w)), 3)
    s = min(s + 1 - s % 2, h, w)  # odd, inside the image
    w1, top, left = _window(m, h, w, s, generator, x.device)
    w2, _, _ = _window(m, h, w, s, generator, x.device)
    delta = best - x
    old = torch.where(w1, delta, 0.0)
    budget = (threat.eps**2 - delta.flatten(1).square().sum(1)).clamp_min(0.0).view(-1, 1, 1, 1) / c
    mass = _channel_norm(torch.where(w1 | w2, delta, 0.0)).square()
    patterns = _place(_oriented(square_l2_pattern(s, x), m, generator), top, left, w1)
    new = patterns * _random_signs((m, c, 1, 1), generator, x) + old / (_channel_norm(old) + 1e-12)
    new = new / (_channel_norm(new) + 1e-12) * (budget + mass).sqrt()
    delta = torch.where(w1, new, torch.where(w2, 0.0, delta))
    return _to_sphere(x, delta, threat)


_SCHEMES = {"Linf": (_linf_init, _linf_propose), "L2": (_l2_init, _l2_propose)}
NORMS = tuple(_SCHEMES)
"""The threat models Square supports (its registry entry declares the same)."""


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
    init, propose = _SCHEMES[threat.norm]
    x_best = init(x, threat, generator)
    logits = model(x_best)
    loss_best = _square_loss(logits, y, target, k)
    succ = is_success(logits, y, target, k)
    active = (~succ).nonzero().squeeze(1)

    for i in range(queries - 1):
        if active.numel() == 0:
            break
        p = square_p_schedule(i, queries, p_init)
        x_act, best_act = x[active], x_best[active]
        x_new = propose(x_act, best_act, threat, p, generator)
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
    """Square Attack (Andriushchenko et al. 2020), L-infinity (Algorithms 1 and 2) or L2 (Algorithm 3).

    L-infinity: starts from vertical stripes of height H at ``x +- eps`` and then, for each example
    still not broken, tries one random square of side ``round(sqrt(p * H * W))`` whose
    channels are each moved to the opposite side of the ball (``+-2 eps``, projected),
    keeping it when the loss decreases. L2: starts from a grid of :func:`square_l2_pattern` tiles
    on the sphere of radius eps and tries one :func:`_l2_propose` update at a time. p follows
    :func:`square_p_schedule`. Points are clipped to the bounds after every update.

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
    require_norm(threat, NORMS, "square")
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
