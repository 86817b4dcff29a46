"""Certified lower bounds on the margins ``f_y(x') - f_j(x')`` over a threat's ball."""

from __future__ import annotations

from math import prod
from typing import Any

import torch
from torch import Tensor, nn

from logitpair.bounds.dag import Dag
from logitpair.bounds.graph import build_dag
from logitpair.bounds.ops import Affine
from logitpair.bounds.propagate import (
    CHUNK_ELEMENTS,
    alpha_crown,
    backward,
    concretize,
    ibp_through,
    intermediate_bounds,
)
from logitpair.errors import ConfigError
from logitpair.threat import Threat

METHODS = ("ibp", "crown-ibp", "crown", "alpha-crown")
ROUNDOFF_RTOL = 1e-5
_DEFAULTS: dict[str, dict[str, Any]] = {
    "ibp": {"rtol": ROUNDOFF_RTOL},
    "crown-ibp": {"rtol": ROUNDOFF_RTOL},
    "crown": {"rtol": ROUNDOFF_RTOL},
    "alpha-crown": {"rtol": ROUNDOFF_RTOL, "iterations": 20, "lr": 0.1},
}


def _options(method: str, opts: dict[str, Any]) -> dict[str, Any]:
    if method not in METHODS:
        raise ConfigError(f"expected one of {', '.join(METHODS)}, got {method!r}", option="method")
    allowed = _DEFAULTS[method]
    for key in opts:
        if key not in allowed:
            raise ConfigError(f"not an option of method {method!r} (options: {', '.join(allowed)})", option=key)
    options = {**allowed, **opts}
    if options["rtol"] < 0 or options.get("iterations", 0) < 0 or options.get("lr", 1) <= 0:
        raise ConfigError(f"expected rtol >= 0, iterations >= 0, lr > 0, got {options}")
    return options


def input_box(x: Tensor, threat: Threat) -> tuple[Tensor, Tensor]:
    """The L-infinity ball of radius ``threat.eps`` around ``x``, intersected with its bounds."""
    if threat.norm != "Linf":
        raise ConfigError(f"bound propagation supports the Linf threat only, got {threat.norm}", option="threat")
    lo, hi = threat.bounds
    return (x - threat.eps).clamp(lo, hi), (x + threat.eps).clamp(lo, hi)


def margin_spec(y: Tensor, num_classes: int, like: Tensor) -> tuple[Tensor, Tensor]:
    """``C`` of shape (N, K-1, K): the rows ``e_y - e_j`` for every ``j != y`` (the trivial row
    ``j = y`` is not propagated), and ``others`` (N, K-1): the ``j`` of each row."""
    eye = torch.eye(num_classes, dtype=like.dtype, device=like.device)
    others = torch.arange(num_classes - 1, device=y.device)[None]
    others = others + (others >= y[:, None]).long()
    return eye[y][:, None, :] - eye[others], others


def _ibp(dag: Dag, spec: Tensor, box: tuple[Tensor, Tensor], opt: dict[str, Any]) -> Tensor:
    """IBP with the specification folded into the last layer when it is affine."""
    last = dag.ops[-1] if dag.ops and isinstance(dag.ops[-1], Affine) else None
    node = dag.inputs[-1][0] if last else dag.output
    lower, upper = ibp_through(dag, *box, opt["rtol"], node)
    if last is None:
        zero = spec.new_zeros(spec.shape[:2])
        return concretize(spec, zero, zero, lower, upper, opt["rtol"])
    return concretize(*last.back(spec), lower, upper, opt["rtol"])


def _crown(dag: Dag, spec: Tensor, box: tuple[Tensor, Tensor], opt: dict[str, Any], *, full: bool) -> Tensor:
    bounds, _ = intermediate_bounds(dag, *box, crown=full, rtol=opt["rtol"])
    return concretize(*backward(dag, dag.output, spec, bounds), *box, opt["rtol"])


def _alpha(dag: Dag, spec: Tensor, box: tuple[Tensor, Tensor], opt: dict[str, Any]) -> Tensor:
    bounds, _ = intermediate_bounds(dag, *box, crown=True, rtol=opt["rtol"])
    return alpha_crown(dag, spec, bounds, box, iterations=opt["iterations"], lr=opt["lr"], rtol=opt["rtol"])


def _run(method: str, dag: Dag, spec: Tensor, box: tuple[Tensor, Tensor], opt: dict[str, Any]) -> Tensor:
    if method == "ibp":
        return _ibp(dag, spec, box, opt)
    if method == "crown-ibp":
        return _crown(dag, spec, box, opt, full=False)
    # Full CROWN and alpha-CROWN: no autograd graph, points in groups that bound the memory.
    widest = max((max(prod(op.in_shape), prod(op.out_shape)) for op in dag.ops), default=1)
    group = max(1, CHUNK_ELEMENTS // (128 * widest))
    parts = []
    with torch.no_grad():
        for sl, su, sc in zip(box[0].split(group), box[1].split(group), spec.split(group)):
            run = _alpha if method == "alpha-crown" else _crown
            kwargs = {} if method == "alpha-crown" else {"full": True}
            parts.append(run(dag, sc, (sl, su), opt, **kwargs))
    return torch.cat(parts)


def margin_bounds(
    model: nn.Module, x: Tensor, y: Tensor, *, threat: Threat, method: str = "crown", **opts: Any
) -> Tensor:
    """Certified lower bounds on ``f_y(x') - f_j(x')`` over every ``x'`` of the threat's ball.

    ``model`` maps inputs in [0, 1] to logits (N, K) through supported layers, in a chain or
    with residual additions (:data:`logitpair.bounds.graph.SUPPORTED`; BatchNorm uses its
    running statistics);
    ``x`` (N, ...) on the model's device and dtype, ``y`` (N,) labels; ``threat`` an
    L-infinity threat (the ball is intersected with ``threat.bounds``). Returns (N, K): entry
    ``[i, j]`` ≤ the margin over class ``j`` for every point of the ball, column ``y`` is
    ``+inf``; a point is certified iff every entry is > 0.

    ``method``: ``"ibp"`` (Gowal et al. 2018, https://arxiv.org/abs/1810.12715), ``"crown-ibp"``
    (CROWN's backward pass on IBP intermediate bounds, Zhang et al. 2020,
    https://arxiv.org/abs/1906.06316), ``"crown"`` (intermediate bounds by CROWN too, Zhang et
    al. 2018, https://arxiv.org/abs/1811.00866), ``"alpha-crown"`` (lower ReLU slopes optimised,
    Xu et al. 2021, https://arxiv.org/abs/2011.13824). The specification ``e_y - e_j`` is folded
    into the last layer. ``"ibp"`` and ``"crown-ibp"`` are differentiable with respect to the
    parameters (certified training); ``"crown"`` and ``"alpha-crown"`` are computed without
    gradients. Options: ``rtol`` (the round-off margin, :mod:`logitpair.bounds.propagate`,
    default 1e-5); for ``"alpha-crown"`` also ``iterations`` (20) and ``lr`` (Adam, 0.1).

    Example::

        >>> lb = margin_bounds(model, x, y, threat=Linf(0.1), method="crown")
        >>> certified = (lb > 0).all(1)
    """
    opt = _options(method, opts)
    box = input_box(x, threat)
    dag = build_dag(model, x)
    num_classes = prod(dag.ops[-1].out_shape) if dag.ops else prod(x.shape[1:])
    spec, others = margin_spec(y, num_classes, x)
    bound = _run(method, dag, spec, box, opt)
    full = bound.new_full((len(y), num_classes), float("inf"))
    return full.scatter(1, others, bound)


def certified(model: nn.Module, x: Tensor, y: Tensor, *, threat: Threat, method: str = "crown", **opts: Any) -> Tensor:
    """Boolean (N,): is every margin of the point certified positive by ``method``?"""
    return (margin_bounds(model, x, y, threat=threat, method=method, **opts) > 0).all(1)


def interval_bounds(
    model: nn.Module, lower: Tensor, upper: Tensor, *, rtol: float = ROUNDOFF_RTOL
) -> tuple[Tensor, Tensor]:
    """IBP: the interval of the logits over the input box ``[lower, upper]`` (N, ...), differentiable
    with respect to the parameters and the box (the certified-training losses use it)."""
    return ibp_through(build_dag(model, lower), lower, upper, rtol)
