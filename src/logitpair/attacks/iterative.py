"""The iterative core shared by the gradient attacks (after advertorch's ``perturb_iterative``).

PGD, the official ``pgd|pgdll|pgdrnd_EPS_STEP_NITER`` attacks, MI-FGSM, FGSM and the training
attacks FGSM-RS and TRADES' KL adversary are one loop with different settings:

1. a start: :func:`start_point` (a given point projected into the ball, a random point of the
   ball, or the clean input);
2. ``steps`` times: the gradient of a per-example loss, turned into an ascent direction
   (the gradient itself, or MI-FGSM's momentum), then :meth:`Threat.step
   <logitpair.threat.Threat.step>` (the steepest-ascent step of the threat's norm, sign for
   L-infinity, and the projection);
3. the last iterate, or with a :class:`BestIterate` the per-example worst case over the
   iterates it was shown.

Inputs are tensors of shape (N, ...) inside the threat's bounds; callers enter
:func:`~logitpair.modes.attack_context` (eval mode, frozen parameters) themselves. Example::

    loss_fn = lambda logits: attack_loss(logits, y, None)      # ascend CE(y)
    start = start_point(x, threat, random_start=True, generator=g)
    x_adv = perturb_iterative(model, x, start, threat=threat, steps=10, step_size=0.01, loss_fn=loss_fn)
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor, nn

from logitpair.attacks.common import loss_grad
from logitpair.threat import Threat

LossFn = Callable[[Tensor], Tensor]
"""Logits ``(N, K)`` -> per-example loss ``(N,)`` to maximise."""
Direction = Callable[[Tensor], Tensor]
"""The loss gradient -> the direction handed to :meth:`Threat.step` (may keep state, e.g. a momentum)."""


def start_point(
    x: Tensor,
    threat: Threat,
    *,
    init: Tensor | None = None,
    random_start: bool = True,
    generator: torch.Generator | None = None,
) -> Tensor:
    """Where the iterations start: ``init`` projected into the ball if given, else a random
    point of the ball (:meth:`Threat.random_init`, one draw from ``generator``) if
    ``random_start``, else a copy of ``x``."""
    if init is not None:
        return threat.project(x, init.detach())
    return threat.random_init(x, generator) if random_start else x.clone()


class BestIterate:
    """The per-example worst case over the iterates shown to it: a successful one if any (the
    highest-loss one among them), else the highest-loss one; ``x`` itself (loss ``-inf``) until
    an iterate is shown.

    Args:
        x: the clean inputs (N, ...); the starting "best" point.
        loss_fn: the loss to maximise, on logits.
        success_fn: per-example success on logits, e.g. misclassified.
        every_step: offer every iterate (the points the gradients are taken at) as well as the
            last one; ``False``: the last iterate only (best over restarts of last iterates).
    """

    def __init__(self, x: Tensor, loss_fn: LossFn, success_fn: Callable[[Tensor], Tensor], every_step: bool) -> None:
        self.x = x.clone()
        self.loss = torch.full((len(x),), -float("inf"), device=x.device, dtype=x.dtype)
        self.success = torch.zeros(len(x), dtype=torch.bool, device=x.device)
        self.loss_fn, self.success_fn, self.every_step = loss_fn, success_fn, every_step

    def consider(self, candidate: Tensor, loss: Tensor, logits: Tensor) -> None:
        """Keep ``candidate`` for the examples where it beats the current best."""
        succ = self.success_fn(logits)
        better = (succ & ~self.success) | ((succ == self.success) & (loss > self.loss))
        self.x = torch.where(better.view(-1, *[1] * (candidate.dim() - 1)), candidate, self.x)
        self.loss = torch.where(better, loss, self.loss)
        self.success = self.success | succ

    def consider_last(self, model: nn.Module, candidate: Tensor) -> None:
        """:meth:`consider` the last iterate (one forward without gradient)."""
        with torch.no_grad():
            logits = model(candidate)
        self.consider(candidate, self.loss_fn(logits).detach(), logits)


def perturb_iterative(
    model: nn.Module,
    x: Tensor,
    start: Tensor,
    *,
    threat: Threat,
    steps: int,
    step_size: float | Tensor,
    loss_fn: LossFn,
    direction: Direction | None = None,
    best: BestIterate | None = None,
) -> Tensor:
    """``steps`` ascent steps on ``loss_fn`` from ``start``; returns the last iterate.

    Each step: one forward and backward at ``x_adv`` (:func:`~logitpair.attacks.common.loss_grad`),
    then ``x_adv <- threat.step(x, x_adv, direction(grad), step_size)``. ``direction`` None: the
    gradient itself. ``best``: shown every iterate (when ``best.every_step``) and the last one
    (one more forward); the caller reads ``best.x``. ``start`` is used as given (see
    :func:`start_point`).
    """
    x_adv = start
    for _ in range(steps):
        loss, logits, grad = loss_grad(model, x_adv, loss_fn)
        if best is not None and best.every_step:
            best.consider(x_adv, loss, logits)
        x_adv = threat.step(x, x_adv, grad if direction is None else direction(grad), step_size)
    if best is not None:
        best.consider_last(model, x_adv)
    return x_adv
