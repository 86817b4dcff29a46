"""Auto-PGD, L-infinity and L2 (Croce & Hein 2020, https://arxiv.org/abs/2003.01690).

APGD is PGD with momentum and a step size that adapts itself: it starts at ``2 * eps``
and is halved, per example, at fixed checkpoints when progress has stalled; each halving
restarts from the best point found so far. Three losses: cross-entropy (``apgd_ce``),
the Difference of Logits Ratio (``apgd_dlr``) and its targeted version, which
``apgd_t`` runs once for each of the top-ranked wrong classes.

The step is the threat's steepest-ascent step (:meth:`Threat.step <logitpair.threat.Threat.step>`):
the signed gradient for L-infinity, the L2-normalised gradient for L2 (AutoAttack's L2 APGD, whose
step size also starts at ``2 * eps``, in L2 units), each followed by the threat's projection.

Inputs are images in the threat model's bounds (default [0, 1]) of shape (N, ...);
labels have shape (N,). Example::

    x_adv = apgd_ce(model, x, y, threat=Linf(8 / 255), steps=100)
    x_adv = apgd_t(model, x, y, threat=Linf(8 / 255), n_target_classes=9)
    x_adv = apgd_ce(model, x, y, threat=L2(0.5), steps=100)

Where the paper and the authors' code (fra31/auto-attack) differ, this follows the paper:
checkpoints are ``ceil(p_j * N)`` (the code uses ``int(0.22 * N)`` and integer
decrements), condition 1 is a strict ``<``, and condition 2 may already fire at the first
checkpoint (the step size was not reduced at ``w_0 = 0``).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field
from fractions import Fraction
from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from logitpair.attacks.common import ahead_logit, check_k, is_success, loss_grad
from logitpair.errors import ConfigError
from logitpair.modes import attack_context
from logitpair.threat import Threat, require_norm

ApgdLoss = Literal["ce", "dlr", "dlr-targeted"]
LossFn = Callable[[Tensor], Tensor]
NORMS = ("Linf", "L2")
"""The threat models APGD supports (its registry entries declare the same)."""


def dlr_loss(logits: Tensor, y: Tensor, k: int = 1) -> Tensor:
    """Difference of Logits Ratio, per example: ``-(z_y - max_{i!=y} z_i) / (z_pi1 - z_pi3 + 1e-12)``.

    ``z_pi1 >= z_pi2 >= ...`` are the sorted logits. Needs at least 3 classes. With ``k > 1``
    the numerator is the top-``k`` margin ``z_y - (k-th largest other logit)``
    (:func:`~logitpair.attacks.common.ahead_logit`), which is negative once ``y`` left the top ``k``,
    and the denominator ``z_pi1 - z_pi(k+2)`` (the logits the numerator moves stay out of it).
    """
    if logits.shape[1] < 3:
        raise ConfigError(f"the DLR loss needs at least 3 classes, the model has {logits.shape[1]}")
    z_y = logits.gather(1, y[:, None]).squeeze(1)
    if k == 1:
        top, top_idx = logits.topk(3, dim=1)
        ahead = torch.where(top_idx[:, 0] == y, top[:, 1], top[:, 0])
        return -(z_y - ahead) / (top[:, 0] - top[:, 2] + 1e-12)
    top = logits.topk(min(k + 2, logits.shape[1]), dim=1).values
    return -(z_y - ahead_logit(logits, y, k)) / (top[:, 0] - top[:, -1] + 1e-12)


def dlr_targeted_loss(logits: Tensor, y: Tensor, target: Tensor, k: int = 1) -> Tensor:
    """Targeted DLR: ``-(z_y - z_t) / (z_pi1 - (z_pi3 + z_pi4) / 2 + 1e-12)``. Needs 4 classes.

    With ``k > 1``, ``z_t`` becomes ``min(z_t, (k-1)-th largest logit of the classes other than y
    and t)`` (:func:`~logitpair.attacks.common.ahead_logit`): the target and ``k - 1`` other
    classes must get ahead of ``y`` for it to leave the top ``k``, and the denominator uses
    ``z_pi(k+2)`` and ``z_pi(k+3)``.
    """
    if logits.shape[1] < 4:
        raise ConfigError(f"the targeted DLR loss needs at least 4 classes, the model has {logits.shape[1]}")
    top = logits.topk(min(k + 3, logits.shape[1]), dim=1).values
    z_y = logits.gather(1, y[:, None]).squeeze(1)
    z_t = ahead_logit(logits, y, k, target)
    return -(z_y - z_t) / (top[:, 0] - 0.5 * (top[:, -2] + top[:, -1]) + 1e-12)


def apgd_checkpoints(n_iter: int) -> list[int]:
    """The checkpoints ``w_j = ceil(p_j * n_iter)`` for all ``p_j <= 1``, duplicates dropped.

    ``p_0 = 0``, ``p_1 = 0.22``, ``p_{j+1} = p_j + max(p_j - p_{j-1} - 0.03, 0.06)``, computed
    with exact fractions (0.41 * 100 must give 41, not 42). For 100 iterations:
    ``[0, 22, 41, 57, 70, 80, 87, 93, 99]``.
    """
    if n_iter < 1:
        raise ConfigError(f"steps must be >= 1, got {n_iter}")
    p = [Fraction(0), Fraction(22, 100)]
    while True:
        nxt = p[-1] + max(p[-1] - p[-2] - Fraction(3, 100), Fraction(6, 100))
        if nxt > 1:
            break
        p.append(nxt)
    w: list[int] = []
    for pj in p:
        wj = math.ceil(pj * n_iter)
        if not w or wj > w[-1]:
            w.append(wj)
    return w


def halving_condition(
    losses: Tensor,
    *,
    rho: float,
    halved_last: Tensor,
    best_last: Tensor,
    best_now: Tensor,
) -> Tensor:
    """Per example: should the step size be halved at checkpoint ``w_j``?

    Args:
        losses: ``(w_j - w_{j-1} + 1, N)``, the objective at iterates ``x^(w_{j-1}) .. x^(w_j)``.
        rho: fraction of increasing steps below which the step size is halved (0.75).
        halved_last: ``(N,)`` bool, was the step size halved at checkpoint ``w_{j-1}``?
        best_last: ``(N,)`` best objective value found up to ``w_{j-1}``.
        best_now: ``(N,)`` best objective value found up to ``w_j``.

    Condition 1: ``sum_i 1[f(x^(i+1)) > f(x^(i))] < rho * (w_j - w_{j-1})``.
    Condition 2: the step size was not halved at ``w_{j-1}`` and the best value has not improved.
    """
    n_steps = losses.shape[0] - 1
    increases = (losses[1:] > losses[:-1]).sum(0)
    condition1 = increases < rho * n_steps
    condition2 = ~halved_last & (best_now <= best_last)
    return condition1 | condition2


@dataclass
class _Output:
    """The point a run returns: a successful iterate if there is one (the highest-loss one),
    else the highest-loss iterate."""

    x: Tensor
    loss: Tensor
    succ: Tensor

    def update(self, x_cur: Tensor, loss: Tensor, succ: Tensor, view: tuple[int, ...]) -> None:
        better = (succ & ~self.succ) | ((succ == self.succ) & (loss > self.loss))
        self.x = torch.where(better.view(view), x_cur, self.x)
        self.loss = torch.where(better, loss, self.loss)
        self.succ = self.succ | succ


@dataclass
class _Schedule:
    """APGD's step size per example and what it is decided on: the loss history, the best-loss
    point (with its gradient: a halving restarts there) and the state at the last checkpoint."""

    eta: Tensor
    history: Tensor
    x_max: Tensor
    f_max: Tensor
    grad_max: Tensor
    halved_last: Tensor
    best_last: Tensor
    w_last: int = 0

    @classmethod
    def start(cls, x: Tensor, loss: Tensor, grad: Tensor, steps: int, eps: float) -> _Schedule:
        history = loss.new_empty(steps + 1, len(x))
        history[0] = loss
        return cls(
            eta=torch.full((len(x),), 2.0 * eps, device=x.device, dtype=x.dtype),
            history=history,
            x_max=x,
            f_max=loss,
            grad_max=grad,
            halved_last=torch.zeros(len(x), dtype=torch.bool, device=x.device),
            best_last=loss,
        )

    def record(self, k: int, x_cur: Tensor, loss: Tensor, grad: Tensor | None, view: tuple[int, ...]) -> None:
        """Iterate ``k + 1`` and its loss (its gradient, except after the last step)."""
        self.history[k + 1] = loss
        improved = loss > self.f_max
        self.x_max = torch.where(improved.view(view), x_cur, self.x_max)
        if grad is not None:
            self.grad_max = torch.where(improved.view(view), grad, self.grad_max)
        self.f_max = torch.where(improved, loss, self.f_max)

    def checkpoint(self, k: int, rho: float) -> Tensor:
        """At checkpoint ``k + 1``: halve the step where progress stalled; returns where."""
        halve = halving_condition(
            self.history[self.w_last : k + 2],
            rho=rho,
            halved_last=self.halved_last,
            best_last=self.best_last,
            best_now=self.f_max,
        )
        self.eta = torch.where(halve, 0.5 * self.eta, self.eta)
        self.history[k + 1] = torch.where(halve, self.f_max, self.history[k + 1])
        self.halved_last, self.best_last, self.w_last = halve, self.f_max, k + 1
        return halve


@dataclass
class _Trace:
    """What a run records into ``trace`` (nothing when ``trace`` is None)."""

    on: bool
    raw_loss: list[Tensor] = field(default_factory=list)
    best_loss: list[Tensor] = field(default_factory=list)
    step_sizes: list[Tensor] = field(default_factory=list)
    halved: list[Tensor] = field(default_factory=list)

    def point(self, loss: Tensor, best: Tensor) -> None:
        if self.on:
            self.raw_loss.append(loss)
            self.best_loss.append(best)

    def step(self, eta: Tensor) -> None:
        if self.on:
            self.step_sizes.append(eta)

    def halve(self, halve: Tensor) -> None:
        if self.on:
            self.halved.append(halve)

    def write(self, trace: dict[str, Any] | None, checkpoints: list[int], n: int, info: dict[str, Any]) -> None:
        if trace is None:
            return
        trace.setdefault("runs", []).append(
            {
                "checkpoints": checkpoints,
                "step_size": torch.stack(self.step_sizes),  # (steps, N): eta used for step k -> k+1
                "loss": torch.stack(self.raw_loss),  # (steps + 1, N): f(x^(k)) before any restart
                "best_loss": torch.stack(self.best_loss),  # (steps + 1, N): f_max after iterate k
                "halved": torch.stack(self.halved) if self.halved else torch.zeros(0, n, dtype=torch.bool),
                **info,
            }
        )


def _momentum_step(
    threat: Threat, x: Tensor, x_cur: Tensor, x_prev: Tensor, grad: Tensor, eta: Tensor, momentum: float, k: int
) -> Tensor:
    """``x^(k+1)`` from ``x^(k)``: the threat's steepest-ascent step of size ``eta`` (L-infinity:
    signed gradient; L2: normalised gradient), then (after the first step) APGD's momentum towards
    it, each projected into the ball."""
    view = (-1,) + (1,) * (x.dim() - 1)
    with torch.no_grad():
        z = threat.step(x, x_cur, grad, eta.view(view))
        if k > 0:
            z = threat.project(x, x_cur + momentum * (z - x_cur) + (1.0 - momentum) * (x_cur - x_prev))
    return z


def _loss_at(model: nn.Module, x: Tensor, loss_fn: LossFn, need_grad: bool) -> tuple[Tensor, Tensor, Tensor | None]:
    """(loss, logits, input gradient or None) at ``x``; the last iterate needs no gradient."""
    if need_grad:
        return loss_grad(model, x, loss_fn)
    with torch.no_grad():
        logits = model(x)
        return loss_fn(logits), logits, None


def _apgd_run(
    model: nn.Module,
    x: Tensor,
    loss_fn: LossFn,
    success_fn: Callable[[Tensor], Tensor],
    threat: Threat,
    steps: int,
    rho: float,
    momentum: float,
    generator: torch.Generator | None,
    trace: dict[str, Any] | None,
    trace_info: dict[str, Any],
    start: Tensor | None = None,
) -> tuple[Tensor, Tensor, Tensor]:
    """One APGD run from a random start (or from ``start``, projected into the ball): (best point,
    its loss, its success flag) per example.

    "Best" is a successful iterate if there is one (the highest-loss one), else the
    highest-loss iterate. Costs ``steps`` forward-backward passes and one forward.
    """
    view = (-1,) + (1,) * (x.dim() - 1)
    checkpoints = [w for w in apgd_checkpoints(steps) if 0 < w < steps]

    x_cur = threat.random_init(x, generator) if start is None else threat.project(x, start.detach())
    loss, logits, grad = loss_grad(model, x_cur, loss_fn)
    out = _Output(x_cur, loss, success_fn(logits))
    schedule = _Schedule.start(x_cur, loss, grad, steps, threat.eps)
    record = _Trace(on=trace is not None)
    record.point(loss, loss)
    x_prev = x_cur
    for k in range(steps):
        x_prev, x_cur = x_cur, _momentum_step(threat, x, x_cur, x_prev, grad, schedule.eta, momentum, k)
        record.step(schedule.eta)
        loss, logits, grad = _loss_at(model, x_cur, loss_fn, need_grad=k + 1 < steps)
        schedule.record(k, x_cur, loss, grad, view)
        out.update(x_cur, loss, success_fn(logits), view)
        record.point(loss, schedule.f_max)
        if k + 1 in checkpoints:  # never the last step: grad is set
            halve = schedule.checkpoint(k, rho)
            x_cur = torch.where(halve.view(view), schedule.x_max, x_cur)
            grad = torch.where(halve.view(view), schedule.grad_max, grad)
            record.halve(halve)
    record.write(trace, checkpoints, len(x), trace_info)
    return out.x, out.loss, out.succ


def _make_loss(name: str, y: Tensor, target: Tensor | None, k: int = 1) -> LossFn:
    if name == "ce":
        return lambda logits: F.cross_entropy(logits, y, reduction="none")
    if name == "dlr":
        return lambda logits: dlr_loss(logits, y, k)
    assert target is not None
    return lambda logits: dlr_targeted_loss(logits, y, target, k)


def _check(threat: Threat, steps: int, restarts: int, rho: float, momentum: float, k: int = 1) -> None:
    check_k(k)
    require_norm(threat, NORMS, "APGD")
    if steps < 1:
        raise ConfigError(f"steps must be >= 1, got {steps}")
    if restarts < 1:
        raise ConfigError(f"restarts must be >= 1, got {restarts}")
    if not 0.0 < rho <= 1.0:
        raise ConfigError(f"rho must be in (0, 1], got {rho}")
    if not 0.0 < momentum <= 1.0:
        raise ConfigError(f"momentum (alpha) must be in (0, 1], got {momentum}")


class _Best:
    """Per-example worst case across runs: successful beats unsuccessful, then higher loss."""

    def __init__(self, x: Tensor, loss: Tensor, succ: Tensor) -> None:
        self.x, self.loss, self.succ = x.clone(), loss.clone(), succ.clone()

    def todo(self) -> Tensor:
        """Indices of the examples not broken yet (one host synchronisation)."""
        return (~self.succ).nonzero().squeeze(1)

    def merge(self, idx: Tensor, x: Tensor, loss: Tensor, succ: Tensor) -> None:
        old_succ, old_loss = self.succ[idx], self.loss[idx]
        better = (succ & ~old_succ) | ((succ == old_succ) & (loss > old_loss))
        view = (-1,) + (1,) * (x.dim() - 1)
        self.x[idx] = torch.where(better.view(view), x, self.x[idx])
        self.loss[idx] = torch.where(better, loss, old_loss)
        self.succ[idx] = old_succ | succ


def apgd(
    model: nn.Module,
    x: Tensor,
    y: Tensor,
    *,
    threat: Threat,
    steps: int = 100,
    loss: ApgdLoss = "ce",
    restarts: int = 1,
    target: Tensor | None = None,
    rho: float = 0.75,
    momentum: float = 0.75,
    generator: torch.Generator | None = None,
    trace: dict[str, Any] | None = None,
    k: int = 1,
    init: Tensor | None = None,
) -> Tensor:
    """Auto-PGD (Algorithm 1 of Croce & Hein 2020), L-infinity or L2.

    From a uniform random start, with step size ``eta = 2 * eps`` per example::

        z       = P(x_k + eta * sign(grad f(x_k)))          (L2: grad / ||grad||_2)
        x_{k+1} = P(x_k + alpha * (z - x_k) + (1 - alpha) * (x_k - x_{k-1}))   (first step: x_1 = z)

    At each checkpoint of :func:`apgd_checkpoints` the step size of an example is halved
    when :func:`halving_condition` holds, and that example restarts from its best point.

    Args:
        loss: ``"ce"`` (cross-entropy), ``"dlr"`` or ``"dlr-targeted"`` (needs ``target``).
        steps: iterations N (N forward-backward passes per run, plus one forward).
        restarts: runs from fresh random starts, each on the examples not yet broken.
        target: ``(N,)`` target classes for ``"dlr-targeted"``.
        rho: threshold of condition 1 (0.75). momentum: alpha (0.75).
        generator: source of the random starts, for reproducible runs.
        trace: if a dict, each run appends ``{"checkpoints", "step_size", "loss",
            "best_loss", "halved", "index", "target"}`` to ``trace["runs"]`` (for tests and plots).
        k: top-``k`` success criterion of the untargeted losses: a point counts as broken (and
            is no longer attacked) only once ``y`` left its ``k`` largest logits; the DLR loss then
            uses the top-``k`` margin. ``k = 1``: misclassification.
        init: start of the first run (projected into the ball) instead of a random point, e.g.
            where an earlier attack left each example; later restarts start at random points.

    Returns per example a successful point if one was found (``y`` not in the top ``k``; for
    ``"dlr-targeted"``: classified as ``target``), else the highest-loss point seen,
    which is ``x`` itself when no iterate beat it. Examples already successful on ``x``
    are returned unchanged. The model runs in eval mode with frozen parameters; both are
    restored afterwards.
    """
    _check(threat, steps, restarts, rho, momentum, k)
    if loss not in ("ce", "dlr", "dlr-targeted"):
        raise ConfigError(f"loss must be 'ce', 'dlr' or 'dlr-targeted', got {loss!r}")
    if loss == "dlr-targeted" and target is None:
        raise ConfigError("loss='dlr-targeted' needs target= (or use apgd_t)")
    if loss != "dlr-targeted" and target is not None:
        raise ConfigError(f"target given but loss={loss!r} is untargeted")
    if loss == "dlr-targeted" and k != 1:
        raise ConfigError("k (top-k success) is for the untargeted losses; 'dlr-targeted' succeeds on the target")
    x = x.detach()
    target = None if target is None else target.to(y.device)
    with attack_context(model):
        with torch.no_grad():
            logits = model(x)
            check_k(k, logits.shape[1])
            best = _Best(x, _make_loss(loss, y, target, k)(logits), is_success(logits, y, target, k))
        for r in range(restarts):
            idx = best.todo()
            if idx.numel() == 0:
                break
            t = None if target is None else target[idx]
            yi = y[idx]
            run = _apgd_run(
                model,
                x[idx],
                _make_loss(loss, yi, t, k),
                lambda lg, yi=yi, t=t: is_success(lg, yi, t, k),
                threat,
                steps,
                rho,
                momentum,
                generator,
                trace,
                {"index": idx, "target": t},
                start=init[idx] if init is not None and r == 0 else None,
            )
            best.merge(idx, *run)
    return best.x.detach()


def apgd_ce(
    model: nn.Module,
    x: Tensor,
    y: Tensor,
    *,
    threat: Threat,
    steps: int = 100,
    restarts: int = 1,
    rho: float = 0.75,
    momentum: float = 0.75,
    generator: torch.Generator | None = None,
    trace: dict[str, Any] | None = None,
    k: int = 1,
) -> Tensor:
    """APGD on the cross-entropy loss (AutoAttack's ``apgd-ce``); ``k``: top-k success. See :func:`apgd`."""
    return apgd(
        model, x, y, threat=threat, steps=steps, loss="ce", restarts=restarts, rho=rho,
        momentum=momentum, generator=generator, trace=trace, k=k,
    )  # fmt: skip


def apgd_dlr(
    model: nn.Module,
    x: Tensor,
    y: Tensor,
    *,
    threat: Threat,
    steps: int = 100,
    restarts: int = 1,
    rho: float = 0.75,
    momentum: float = 0.75,
    generator: torch.Generator | None = None,
    trace: dict[str, Any] | None = None,
    k: int = 1,
) -> Tensor:
    """APGD on the (untargeted) DLR loss. Needs at least 3 classes; ``k``: top-k success. See :func:`apgd`."""
    return apgd(
        model, x, y, threat=threat, steps=steps, loss="dlr", restarts=restarts, rho=rho,
        momentum=momentum, generator=generator, trace=trace, k=k,
    )  # fmt: skip


def apgd_t(
    model: nn.Module,
    x: Tensor,
    y: Tensor,
    *,
    threat: Threat,
    steps: int = 100,
    n_target_classes: int = 9,
    restarts: int = 1,
    rho: float = 0.75,
    momentum: float = 0.75,
    generator: torch.Generator | None = None,
    trace: dict[str, Any] | None = None,
    k: int = 1,
    rank_by: Tensor | None = None,
    init: Tensor | None = None,
) -> Tensor:
    """APGD on the targeted DLR loss (AutoAttack's ``apgd-t``). Needs at least 4 classes.

    The targets of an example are the classes other than ``y`` ranked by its clean logits
    (or, with ``rank_by``, by its logits at the point ``rank_by``, e.g. where an earlier attack
    left it: the classes it drifted towards), highest first; the i-th run (``restarts`` times each) targets the i-th of them, for
    ``i < min(n_target_classes, num_classes - 1)``. Each run attacks only the examples not
    yet misclassified, so per example the first success is kept. The aim is
    misclassification (robust accuracy): a run succeeds when the prediction leaves ``y``,
    whichever class it lands on. Unbroken examples get their highest-loss point over all
    runs. ``trace`` as in :func:`apgd`.

    ``k > 1`` (top-``k`` success): a run succeeds once ``y`` left the top ``k``, and its loss
    asks the target *and* ``k - 1`` other classes to get ahead of ``y``
    (:func:`dlr_targeted_loss`).

    ``init``: the first run of every target starts there (projected into the ball) instead of
    at a random point; later restarts start at random points.
    """
    _check(threat, steps, restarts, rho, momentum, k)
    if n_target_classes < 1:
        raise ConfigError(f"n_target_classes must be >= 1, got {n_target_classes}")
    for name, other in (("rank_by", rank_by), ("init", init)):
        if other is not None and other.shape != x.shape:
            raise ConfigError(f"{name} must have the shape of x {tuple(x.shape)}, got {tuple(other.shape)}")
    x = x.detach()
    with attack_context(model):
        with torch.no_grad():
            logits = model(x)
            ranking = logits if rank_by is None else model(rank_by.detach())
        num_classes = logits.shape[1]
        if num_classes < 4:
            raise ConfigError(f"apgd_t needs at least 4 classes, the model has {num_classes}")
        check_k(k, num_classes)
        order = ranking.argsort(dim=1, descending=True)
        others = order[order != y[:, None]].view(len(x), num_classes - 1)  # ranked, y removed
        no_loss = torch.full((len(x),), -float("inf"), device=x.device, dtype=logits.dtype)
        best = _Best(x, no_loss, is_success(logits, y, None, k))
        for i in range(min(n_target_classes, num_classes - 1)):
            for r in range(restarts):
                idx = best.todo()
                if idx.numel() == 0:
                    return best.x.detach()
                t, yi = others[idx, i], y[idx]
                run = _apgd_run(
                    model,
                    x[idx],
                    _make_loss("dlr-targeted", yi, t, k),
                    lambda lg, yi=yi: is_success(lg, yi, None, k),
                    threat,
                    steps,
                    rho,
                    momentum,
                    generator,
                    trace,
                    {"index": idx, "target": t},
                    start=init[idx] if init is not None and r == 0 else None,
                )
                best.merge(idx, *run)
    return best.x.detach()
