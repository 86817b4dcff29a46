"""Fast Adaptive Boundary attack, L-infinity and L2 (Croce & Hein 2020, https://arxiv.org/abs/1907.02044).

FAB looks for the *smallest* perturbation that changes the decision. Each iteration
linearises the model at the current iterate ``x_k``, projects both ``x_k`` and the clean
``x_0`` onto the linearised decision boundary (exactly, with the box constraint, see
:func:`project_hyperplane_linf`), and moves to a convex combination of the two
projections with an overshoot ``eta``::

    d_k, d_0 = proj(x_k) - x_k, proj(x_0) - x_0
    a        = min(|d_k| / (|d_k| + |d_0|), alpha_max)          (|.| = the threat's norm)
    x_{k+1}  = clip((1 - a) * (x_k + eta * d_k) + a * (x_0 + eta * d_0))

The norm decides three things (:data:`GEOMETRIES`): the projection onto a hyperplane inside the
box (:func:`project_hyperplane_linf`, :func:`project_hyperplane_l2`), the distance to a linearised
boundary (``|f| / ||grad f||_*`` with the dual norm: L1 for L-infinity, L2 for L2) and the distance
of an iterate (and the random restarts, at distance ``eps / 2`` in the norm).

When ``x_{k+1}`` is misclassified it is recorded if closer than the best so far, and the
iterate is pulled back towards ``x_0``: ``x_{k+1} <- x_0 + beta * (x_{k+1} - x_0)``.

``fab_t`` is AutoAttack's ``fab-t``: the boundary of ``z_y`` and ``z_t`` only, for the
targets ``t`` ranked 2nd, 3rd, ... by the clean logits. ``fab`` is the untargeted version
(the closest linearised boundary among all classes; one backward pass per class).

Since FAB minimises the distance, it has no eps; for robust accuracy, the point returned
for an example is its closest adversarial point if that lies within ``threat.eps`` (and is
still misclassified after projection into the ball, to guard against rounding), else
the clean ``x``. Inputs are images in the threat's bounds of shape (N, ...). Example::

    x_adv = fab_t(model, x, y, threat=Linf(8 / 255))                  # AutoAttack settings
    x_adv = fab(model, x, y, threat=Linf(0.3), steps=100, restarts=5)
    x_adv = fab_t(model, x, y, threat=L2(0.5))
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from logitpair.attacks.common import ahead_logit, check_k, is_success, loss_grad
from logitpair.errors import ConfigError
from logitpair.modes import attack_context
from logitpair.threat import Threat, lp_norm, require_norm

# (x_k, indices of the examples) -> (f, grad f): f (n, m) linearised boundary values
# z_c - z_y for m candidate classes, grad f of shape (n, m, d) with d = prod(x.shape[1:]).
BoundaryFn = Callable[[Tensor], tuple[Tensor, Tensor]]


def project_hyperplane_linf(p: Tensor, w: Tensor, b: Tensor, bounds: tuple[float, float] = (0.0, 1.0)) -> Tensor:
    """Smallest L-inf step onto a hyperplane inside a box, per row.

    For each row, returns ``delta`` minimising ``max_i |delta_i|`` subject to
    ``w . (p + delta) = b`` and ``lo <= p + delta <= hi``. If the box does not reach the
    hyperplane, ``delta`` goes as far towards it as the box allows (a vertex of the box).

    Args:
        p: (n, d) points inside ``bounds``. w: (n, d) normals. b: (n,) offsets.

    With ``c = b - w . p`` and ``s = sign(c)``, the largest ``s * w . delta`` reachable with
    ``|delta_i| <= lam`` is ``g(lam) = sum_i |w_i| min(lam, room_i)``, where ``room_i`` is
    the distance to the box in the direction ``s * sign(w_i)``. ``g`` is piecewise linear
    and increasing, so the optimal ``lam`` solves ``g(lam) = |c|`` on the segment found by
    sorting the ``room_i``; then ``delta_i = s * sign(w_i) * min(lam, room_i)``.
    """
    lo, hi = bounds
    c = b - (w * p).sum(1)
    ws = torch.where(c[:, None] >= 0, w, -w)  # orientation in which w . delta must increase by |c|
    target = c.abs()
    room = torch.where(ws > 0, hi - p, p - lo).clamp_min(0.0)
    room = torch.where(ws == 0, torch.zeros_like(room), room)
    a = ws.abs()
    u, order = room.sort(1)
    a_s = a.gather(1, order)
    au = a_s * u
    cum_au = au.cumsum(1)
    cum_a = a_s.cumsum(1)
    total_a = cum_a[:, -1:]
    # g at the k-th sorted breakpoint: sum_{j<=k} a_j u_j + u_k * sum_{j>k} a_j (non-decreasing in k)
    g_at = cum_au + u * (total_a - cum_a)
    k = (g_at < target[:, None]).sum(1)
    feasible = k < p.shape[1]
    k = k.clamp(max=p.shape[1] - 1)[:, None]
    before = (cum_au - au).gather(1, k).squeeze(1)  # sum_{j<k} a_j u_j
    slope = (total_a - cum_a + a_s).gather(1, k).squeeze(1)  # sum_{j>=k} a_j
    lam = (target - before) / slope.clamp_min(torch.finfo(p.dtype).tiny)
    lam = torch.where(feasible, lam.clamp_min(0.0), torch.full_like(lam, float("inf")))
    return ws.sign() * torch.minimum(lam[:, None], room)


def project_hyperplane_l2(p: Tensor, w: Tensor, b: Tensor, bounds: tuple[float, float] = (0.0, 1.0)) -> Tensor:
    """Smallest L2 step onto a hyperplane inside a box, per row.

    For each row, returns ``delta`` minimising ``||delta||_2`` subject to ``w . (p + delta) = b``
    and ``lo <= p + delta <= hi``. If the box does not reach the hyperplane, ``delta`` goes as far
    towards it as the box allows (the box's vertex in the direction of ``w``).

    Args:
        p: (n, d) points inside ``bounds``. w: (n, d) normals. b: (n,) offsets.

    With ``c = b - w . p`` and ``s = sign(c)``, the optimality conditions give
    ``delta_i = s * sign(w_i) * min(lam * |w_i|, room_i)`` for a multiplier ``lam >= 0``, where
    ``room_i`` is the distance to the box in the direction ``s * sign(w_i)``. The reached offset
    ``g(lam) = sum_i |w_i| min(lam |w_i|, room_i)`` is piecewise linear and increasing, with
    breakpoints ``room_i / |w_i|``; sorting them finds the segment where ``g(lam) = |c|``.
    """
    lo, hi = bounds
    c = b - (w * p).sum(1)
    ws = torch.where(c[:, None] >= 0, w, -w)
    target = c.abs()
    a = ws.abs()
    room = torch.where(ws > 0, hi - p, p - lo).clamp_min(0.0)
    room = torch.where(a > 0, room, torch.zeros_like(room))
    brk = room / torch.where(a > 0, a, torch.ones_like(a))  # lam at which coordinate i hits the box
    t, order = brk.sort(1)
    a_s, room_s = a.gather(1, order), room.gather(1, order)
    cum_ar = (a_s * room_s).cumsum(1)  # offset of the coordinates at the box
    a2 = a_s.square()
    rest_a2 = a2.sum(1, keepdim=True) - a2.cumsum(1)  # sum of a_j^2 over the coordinates still free
    g_at = cum_ar + t * rest_a2  # g at the k-th sorted breakpoint (non-decreasing in k)
    k = (g_at < target[:, None]).sum(1)
    feasible = k < p.shape[1]
    k = k.clamp(max=p.shape[1] - 1)[:, None]
    before = (cum_ar - a_s * room_s).gather(1, k).squeeze(1)  # sum_{j<k} a_j room_j
    slope = (rest_a2 + a2).gather(1, k).squeeze(1)  # sum_{j>=k} a_j^2
    lam = (target - before) / slope.clamp_min(torch.finfo(p.dtype).tiny)
    lam = torch.where(feasible, lam.clamp_min(0.0), torch.full_like(lam, float("inf")))
    return ws.sign() * torch.minimum(lam[:, None] * a, room)


@dataclass(frozen=True)
class Geometry:
    """What FAB needs of a norm: the projection onto a hyperplane inside the box and the dual
    norm (the distance of ``x`` to ``{w . z = b}`` is ``|w . x - b| / ||w||_*``)."""

    project: Callable[[Tensor, Tensor, Tensor, tuple[float, float]], Tensor]
    dual: str  # the dual norm of the gradients: "L1" for L-infinity, "L2" for L2
    norm: str  # the norm itself (lp_norm's name)


def _dual_norm(w: Tensor, dual: str) -> Tensor:
    """The dual norm of the last dimension of ``w`` (n, m, d): ``"L1"`` or ``"L2"``."""
    return w.abs().sum(-1) if dual == "L1" else w.norm(dim=-1)


GEOMETRIES: dict[str, Geometry] = {
    "Linf": Geometry(project_hyperplane_linf, "L1", "Linf"),
    "L2": Geometry(project_hyperplane_l2, "L2", "L2"),
}
NORMS = tuple(GEOMETRIES)
"""The threat models FAB supports (its registry entries declare the same)."""


def _targeted_boundary(model: nn.Module, y: Tensor, t: Tensor) -> BoundaryFn:
    """The boundary ``z_t - z_y`` (one forward-backward pass)."""

    def margin(logits: Tensor) -> Tensor:
        return logits.gather(1, t[:, None]).squeeze(1) - logits.gather(1, y[:, None]).squeeze(1)

    def fn(x: Tensor) -> tuple[Tensor, Tensor]:
        f, _, grad = loss_grad(model, x, margin)
        return f[:, None], grad.flatten(1)[:, None]

    return fn


def _topk_boundary(model: nn.Module, y: Tensor, k: int, t: Tensor | None) -> BoundaryFn:
    """The top-``k`` boundary ``ahead - z_y`` (:func:`~logitpair.attacks.common.ahead_logit`; one
    forward-backward pass): positive once ``y`` left the top ``k`` (with ``t``: behind ``t`` and
    ``k - 1`` other classes). Piecewise linear; FAB linearises the piece active at ``x_k``."""

    def margin(logits: Tensor) -> Tensor:
        return ahead_logit(logits, y, k, t) - logits.gather(1, y[:, None]).squeeze(1)

    def fn(x: Tensor) -> tuple[Tensor, Tensor]:
        f, _, grad = loss_grad(model, x, margin)
        return f[:, None], grad.flatten(1)[:, None]

    return fn


def _untargeted_boundary(model: nn.Module, y: Tensor) -> BoundaryFn:
    """All boundaries ``z_c - z_y`` (one forward, one backward pass per class); the label's own is +inf."""

    def fn(x: Tensor) -> tuple[Tensor, Tensor]:
        x = x.detach().requires_grad_(True)
        logits = model(x)
        z_y = logits.gather(1, y[:, None])
        num_classes = logits.shape[1]
        grads = []
        for c in range(num_classes):
            (g,) = torch.autograd.grad(logits[:, c].sum(), x, retain_graph=c + 1 < num_classes)
            grads.append(g.flatten(1))
        jac = torch.stack(grads, 1)  # (n, K, d)
        f = (logits - z_y).detach().scatter(1, y[:, None], float("inf"))
        return f, jac - jac.gather(1, y[:, None, None].expand(-1, 1, jac.shape[2]))

    return fn


def _fab_run(
    model: nn.Module,
    x0: Tensor,
    y: Tensor,
    boundary: BoundaryFn,
    start: Tensor,
    threat: Threat,
    steps: int,
    alpha_max: float,
    eta: float,
    beta: float,
    k: int = 1,
) -> tuple[Tensor, Tensor]:
    """One FAB run from ``start``: (closest successful iterate, its distance in the threat's norm;
    inf if none)."""
    lo, hi = threat.bounds
    geo = GEOMETRIES[threat.norm]
    n = len(x0)
    view = (-1,) + (1,) * (x0.dim() - 1)
    flat0 = x0.flatten(1)
    x_k = start
    best_x = x0.clone()
    best_d = torch.full((n,), float("inf"), device=x0.device, dtype=x0.dtype)
    rows = torch.arange(n, device=x0.device)
    for _ in range(steps):
        f, grad = boundary(x_k)
        with torch.no_grad():
            flat = x_k.flatten(1)
            # the closest linearised boundary in the threat's norm: |f| / ||grad f||_* (dual norm)
            dist = f.abs() / (_dual_norm(grad, geo.dual) + 1e-12)
            c = dist.argmin(1)
            w, fc = grad[rows, c], f[rows, c]
            b = (w * flat).sum(1) - fc  # the hyperplane {z : w . (z - x_k) + f(x_k) = 0}
            deltas = geo.project(torch.cat((flat, flat0)), torch.cat((w, w)), torch.cat((b, b)), (lo, hi))
            d_k, d_0 = deltas[:n], deltas[n:]
            a_k = lp_norm(d_k, geo.norm).clamp_min(1e-8)
            a_0 = lp_norm(d_0, geo.norm).clamp_min(1e-8)
            alpha = (a_k / (a_k + a_0)).clamp(0.0, alpha_max)[:, None]
            flat_new = ((1 - alpha) * (flat + eta * d_k) + alpha * (flat0 + eta * d_0)).clamp(lo, hi)
            x_k = flat_new.view_as(x0)
            adv = is_success(model(x_k), y, None, k)
            d = lp_norm(x_k - x0, geo.norm)
            closer = adv & (d < best_d)
            best_x = torch.where(closer.view(view), x_k, best_x)
            best_d = torch.where(closer, d, best_d)
            x_k = torch.where(adv.view(view), x0 + beta * (x_k - x0), x_k)
    return best_x, best_d


def _check(threat: Threat, steps: int, restarts: int, alpha_max: float, eta: float, beta: float, k: int = 1) -> None:
    check_k(k)
    require_norm(threat, NORMS, "FAB")
    if steps < 1:
        raise ConfigError(f"steps must be >= 1, got {steps}")
    if restarts < 1:
        raise ConfigError(f"restarts must be >= 1, got {restarts}")
    if not 0.0 <= alpha_max <= 1.0:
        raise ConfigError(f"alpha_max must be in [0, 1], got {alpha_max}")
    if not eta >= 1.0:
        raise ConfigError(f"eta (overshoot) must be >= 1, got {eta}")
    if not 0.0 < beta <= 1.0:
        raise ConfigError(f"beta must be in (0, 1], got {beta}")


class _Result:
    """Per example: the returned point (clean until broken) and whether it is broken (``y`` not in the top ``k``)."""

    def __init__(self, model: nn.Module, x: Tensor, y: Tensor, threat: Threat, k: int = 1) -> None:
        self.model, self.x, self.y, self.threat, self.k = model, x, y, threat, k
        self.out = x.clone()
        with torch.no_grad():
            logits = model(x)
            check_k(k, logits.shape[1])
            self.broken = is_success(logits, y, None, k)

    def todo(self) -> Tensor:
        """Indices of the examples not broken yet (one host synchronisation)."""
        return (~self.broken).nonzero().squeeze(1)

    def merge(self, idx: Tensor, x_adv: Tensor, dist: Tensor) -> None:
        """Accept the run's points that lie within eps and are still successful after projection."""
        x = self.x[idx]
        candidate = self.threat.project(x, x_adv)
        with torch.no_grad():
            ok = (dist <= self.threat.eps) & is_success(self.model(candidate), self.y[idx], None, self.k)
        view = (-1,) + (1,) * (x.dim() - 1)
        self.out[idx] = torch.where(ok.view(view), candidate, x)
        self.broken[idx] = ok


def _start(x: Tensor, restart: int, threat: Threat, generator: torch.Generator | None) -> Tensor:
    """First run from ``x``; later runs from a random point at distance eps / 2 in the threat's norm
    (AutoAttack: a uniform direction for L-infinity, a Gaussian one for L2), clipped to the bounds."""
    if restart == 0:
        return x.clone()
    if threat.norm == "L2":
        t = torch.randn(x.shape, generator=generator, device=x.device, dtype=x.dtype)
    else:
        t = 2.0 * torch.rand(x.shape, generator=generator, device=x.device, dtype=x.dtype) - 1.0
    scale = lp_norm(t, threat.norm).clamp_min(1e-12).view((-1,) + (1,) * (x.dim() - 1))
    return (x + 0.5 * threat.eps * t / scale).clamp(*threat.bounds)


def fab_t(
    model: nn.Module,
    x: Tensor,
    y: Tensor,
    *,
    threat: Threat,
    steps: int = 100,
    n_target_classes: int = 9,
    restarts: int = 1,
    alpha_max: float = 0.1,
    eta: float = 1.05,
    beta: float = 0.9,
    generator: torch.Generator | None = None,
    target: Tensor | None = None,
    k: int = 1,
) -> Tensor:
    """Targeted FAB, L-infinity or L2 (AutoAttack's ``fab-t``; the defaults are its standard settings).

    The targets of an example are the classes other than ``y`` ranked by its clean logits,
    highest first; target ``i`` (``restarts`` runs each) is tried for
    ``i < min(n_target_classes, num_classes - 1)``, each time on the examples not broken yet.
    The first run of a target starts at ``x``, later ones at a random point at distance
    ``eps / 2`` (drawn from ``generator``). A run succeeds when the prediction leaves ``y``
    (whichever class it lands on) within ``threat.eps``.

    Args:
        steps: FAB iterations per run (each one forward-backward pass and one forward).
        n_target_classes: how many top-ranked wrong classes to try.
        restarts: runs per target.
        alpha_max, eta, beta: FAB's bias towards ``x``, overshoot and backward step.
        target: optional ``(N,)`` target classes; then only these are tried (``restarts`` runs).
        k: top-``k`` success: a point is broken once ``y`` left its ``k`` largest logits; with
            ``k > 1`` the boundary of target ``t`` is the top-``k`` boundary (``t`` and ``k - 1``
            other classes ahead of ``y``, :func:`_topk_boundary`).

    Returns the closest adversarial point found within eps (projected into the ball), else ``x``.
    The model runs in eval mode with frozen parameters; both are restored afterwards.
    """
    _check(threat, steps, restarts, alpha_max, eta, beta, k)
    if n_target_classes < 1:
        raise ConfigError(f"n_target_classes must be >= 1, got {n_target_classes}")
    x = x.detach()
    with attack_context(model):
        with torch.no_grad():
            logits = model(x)
        num_classes = logits.shape[1]
        if num_classes < 2:
            raise ConfigError(f"fab_t needs at least 2 classes, the model has {num_classes}")
        if target is not None:
            targets = target.to(y.device)[:, None]
        else:
            order = logits.argsort(dim=1, descending=True)
            targets = order[order != y[:, None]].view(len(x), num_classes - 1)  # ranked, y removed
            targets = targets[:, : min(n_target_classes, num_classes - 1)]
        res = _Result(model, x, y, threat, k)
        for i in range(targets.shape[1]):
            for r in range(restarts):
                idx = res.todo()
                if idx.numel() == 0:
                    return res.out.detach()
                xi, yi, ti = x[idx], y[idx], targets[idx, i]
                boundary = _targeted_boundary(model, yi, ti) if k == 1 else _topk_boundary(model, yi, k, ti)
                start = _start(xi, r, threat, generator)
                res.merge(idx, *_fab_run(model, xi, yi, boundary, start, threat, steps, alpha_max, eta, beta, k))
    return res.out.detach()


def fab(
    model: nn.Module,
    x: Tensor,
    y: Tensor,
    *,
    threat: Threat,
    steps: int = 100,
    restarts: int = 1,
    alpha_max: float = 0.1,
    eta: float = 1.05,
    beta: float = 0.9,
    generator: torch.Generator | None = None,
    k: int = 1,
) -> Tensor:
    """Untargeted FAB, L-infinity or L2: each step heads for the closest linearised boundary of any class.

    Costs one forward and ``num_classes`` backward passes per iteration (use :func:`fab_t`
    for many classes). Runs, restarts and the returned point as in :func:`fab_t`. With
    ``k > 1`` (top-``k`` success) it heads for the top-``k`` boundary (:func:`_topk_boundary`,
    one backward pass per iteration).
    """
    _check(threat, steps, restarts, alpha_max, eta, beta, k)
    x = x.detach()
    with attack_context(model):
        res = _Result(model, x, y, threat, k)
        for r in range(restarts):
            idx = res.todo()
            if idx.numel() == 0:
                break
            xi, yi = x[idx], y[idx]
            boundary = _untargeted_boundary(model, yi) if k == 1 else _topk_boundary(model, yi, k, None)
            start = _start(xi, r, threat, generator)
            res.merge(idx, *_fab_run(model, xi, yi, boundary, start, threat, steps, alpha_max, eta, beta, k))
    return res.out.detach()
