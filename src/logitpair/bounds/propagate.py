"""The bound computations on a chain of ops: IBP, the CROWN backward pass, intermediate bounds,
alpha-CROWN's slope optimisation.

Round-off: every concretised linear bound ``A·x + bias`` over a box is lowered by
``rtol * M`` where ``M`` is the sum of the absolute values of every term summed into it
(``|A|·max(|l|, |u|)`` plus each layer's bias terms, tracked through the backward pass as
``mag``), and every IBP step widens its radius by ``rtol`` times the magnitude of its terms
(:meth:`~logitpair.bounds.ops.Affine.ibp`). The default ``rtol = 1e-5`` (about 84 float32
units in the last place) is far above the error of the float32 sums of these networks; with
``rtol=0`` the bounds of the cancellation tests in ``tests/test_bounds.py`` exceed the exact
(float64) margins.

Speed (``benchmarks/bounds_speed.py``): the specification has the K-1 non-trivial rows
(:func:`~logitpair.bounds.margins.margin_spec`), a ReLU and the max-pool after it are pulled
back together on the pooled shape, and the coefficients reach a convolution channels-last.
"""

from __future__ import annotations

from math import prod

import torch
from torch import Tensor

from logitpair.bounds.ops import Conv, Dense, MaxPool, Op, Pool, ReLU, relu_lower_slope

Bounds = dict[int, tuple[Tensor, Tensor]]
# Elements of the largest A tensor one backward pass of the intermediate bounds may hold (8 MiB:
# smaller passes stay in the allocator's reused memory; 2**21 ran CROWN on LeNet-5 1.7x faster than 2**24).
CHUNK_ELEMENTS = 2**21


def backward(
    ops: list[Op], end: int, A: Tensor, bounds: Bounds, alphas: dict[int, Tensor] | None = None
) -> tuple[Tensor, Tensor, Tensor]:
    """Pull the linear function ``A · (output of ops[end - 1])`` back to the chain's input.

    Returns ``(A_in, bias, mag)`` with ``A·out ≥ A_in·x + bias`` for every input in the box the
    ``bounds`` (inputs of the nonlinear ops) were computed for."""
    alphas = alphas or {}
    bias = A.new_zeros(A.shape[:2])
    mag = A.new_zeros(A.shape[:2])
    i = end - 1
    while i >= 0:
        A, b, m, used = _pull_back(ops, i, A, bounds, alphas)
        bias, mag, i = bias + b, mag + m, i - used
    return A, bias, mag


def _pull_back(
    ops: list[Op], i: int, A: Tensor, bounds: Bounds, alphas: dict[int, Tensor]
) -> tuple[Tensor, Tensor, Tensor, int]:
    """One step of :func:`backward` through ``ops[i]`` (and a ReLU before a max-pool, fused:
    returns how many ops were pulled back through)."""
    op = ops[i]
    if isinstance(op, MaxPool) and i > 0 and isinstance(ops[i - 1], ReLU):
        return (*op.back_after_relu(A, bounds[i], bounds[i - 1], alphas.get(i - 1)), 2)
    if op.nonlinear:
        return (*op.back(A, *bounds[i], alphas.get(i)), 1)  # type: ignore[attr-defined]
    return (*op.back(A), 1)  # type: ignore[attr-defined]


def concretize(A: Tensor, bias: Tensor, mag: Tensor, lower: Tensor, upper: Tensor, rtol: float) -> Tensor:
    """Lower bound of ``A·x + bias`` over the box ``[lower, upper]`` (per point), minus the
    round-off margin ``rtol * (|A|·max(|l|, |u|) + mag + |bias|)``."""
    A = A.flatten(2)
    lo, hi = lower.flatten(1).unsqueeze(-1), upper.flatten(1).unsqueeze(-1)
    mid, rad = (hi + lo) / 2, (hi - lo) / 2
    value = (A @ mid - A.abs() @ rad).squeeze(-1) + bias
    size = (A.abs() @ torch.maximum(lo.abs(), hi.abs())).squeeze(-1) + mag + bias.abs()
    return value - rtol * size


def ibp_through(ops: list[Op], lower: Tensor, upper: Tensor, rtol: float) -> tuple[Tensor, Tensor]:
    for op in ops:
        lower, upper = op.ibp(lower, upper, rtol)  # type: ignore[attr-defined]
    return lower, upper


def _rows_needed(op: Op, lower: Tensor, upper: Tensor) -> Tensor:
    """Per point (B, n): the neurons CROWN bounds. A ReLU's live ones (``u > 0``): the unstable
    ones (their relaxation depends on the bounds) and the active ones (their interval is passed on
    to the next layers, a max-pool's relaxation among them); a dead neuron's output is 0 whatever
    its bounds. All of a max-pool's."""
    if isinstance(op, ReLU):
        return (upper > 0).flatten(1)
    return torch.ones_like(lower, dtype=torch.bool).flatten(1)


def _point_rows(needed: Tensor) -> Tensor:
    """(B, R): each point's needed rows first (R the largest count), padded with ``n``."""
    n = needed.shape[1]
    count = needed.sum(1)
    width = int(count.max()) if needed.numel() else 0
    order = torch.argsort((~needed).to(torch.int8), dim=1, stable=True)[:, :width]
    valid = torch.arange(width, device=needed.device) < count[:, None]
    return torch.where(valid, order, n)


def crown_node(ops: list[Op], i: int, bounds: Bounds, box: tuple[Tensor, Tensor], rtol: float) -> Tensor:
    """CROWN bounds ``(2, B, n)`` (lower, upper) on the input of ``ops[i]`` for each point's rows
    needed, NaN elsewhere, in chunks of rows that keep each backward pass under ``CHUNK_ELEMENTS``."""
    lower, upper = box
    n, b = prod(ops[i].in_shape), lower.shape[0]
    rows = _point_rows(_rows_needed(ops[i], *bounds[i]))
    out = lower.new_full((2, b, n + 1), float("nan"))
    widest = max(max(prod(op.in_shape), prod(op.out_shape)) for op in ops[: i + 1])
    chunk = max(1, CHUNK_ELEMENTS // (2 * b * widest))
    for part in rows.split(chunk, dim=1):
        r = part.shape[1]
        eye = lower.new_zeros(b, r, n + 1).scatter_(2, part[..., None], 1.0)[..., :n]
        spec = torch.cat([eye, -eye], 1).reshape(b, 2 * r, *ops[i].in_shape)
        value = concretize(*backward(ops, i, spec, bounds), lower, upper, rtol)
        out[0].scatter_(1, part, value[:, :r])
        out[1].scatter_(1, part, -value[:, r:])
    return out[..., :n]


def _tighten(found: Tensor, lower: Tensor, upper: Tensor) -> tuple[Tensor, Tensor]:
    """The intersection of the IBP interval with CROWN's (NaN: not computed)."""
    cl, cu = (t.view_as(lower) for t in found)
    lower = torch.where(cl.isnan(), lower, torch.maximum(lower, cl))
    upper = torch.where(cu.isnan(), upper, torch.minimum(upper, cu))
    return lower, upper


def intermediate_bounds(
    ops: list[Op], lower: Tensor, upper: Tensor, *, crown: bool, rtol: float
) -> tuple[Bounds, tuple[Tensor, Tensor]]:
    """The interval of each nonlinear op's input: IBP, intersected with CROWN's where ``crown``.

    CROWN runs only where a Linear, Conv or pool lies between the previous nonlinear op and this
    one: before the first nonlinear op IBP is exact, and the interval of a ReLU's output is the
    ReLU of its input's, tighter than CROWN through the relaxation. Returns the intervals and
    the IBP interval of the chain's output."""
    bounds: Bounds = {}
    box = (lower, upper)
    seen_nonlinear = mixed = False
    for i, op in enumerate(ops):
        if op.nonlinear:
            bounds[i] = (lower, upper)
            if crown and seen_nonlinear and mixed:
                bounds[i] = lower, upper = _tighten(crown_node(ops, i, bounds, box, rtol), lower, upper)
            seen_nonlinear, mixed = True, False
        mixed = mixed or isinstance(op, (Dense, Conv, Pool))
        lower, upper = op.ibp(lower, upper, rtol)  # type: ignore[attr-defined]
    return bounds, (lower, upper)


def alpha_crown(
    ops: list[Op],
    spec: Tensor,
    bounds: Bounds,
    box: tuple[Tensor, Tensor],
    *,
    iterations: int,
    lr: float,
    rtol: float,
) -> Tensor:
    """alpha-CROWN (Xu et al. 2021): the ReLUs' lower slopes, one per point, spec row and neuron,
    start at CROWN's and are optimised with Adam on the sum of the final bounds, clamped to
    [0, 1] after each step; the best bound seen per point and row is returned (detached)."""
    bounds = {i: (lo.detach(), up.detach()) for i, (lo, up) in bounds.items()}
    spec = spec.detach()
    alphas = {
        i: _initial_slopes(bounds[i], spec.shape[1]).requires_grad_()
        for i, op in enumerate(ops)
        if isinstance(op, ReLU)
    }
    if not alphas:
        return concretize(*backward(ops, len(ops), spec, bounds), *box, rtol)
    optimizer = torch.optim.Adam(list(alphas.values()), lr=lr)
    best = None
    for step in range(iterations + 1):
        with torch.enable_grad():
            value = concretize(*backward(ops, len(ops), spec, bounds, alphas), *box, rtol)
            best = value.detach() if best is None else torch.maximum(best, value.detach())
            if step == iterations:
                break
            grads = torch.autograd.grad(-value.sum(), list(alphas.values()))
        for a, g in zip(alphas.values(), grads):
            a.grad = g
        optimizer.step()
        with torch.no_grad():
            for a in alphas.values():
                a.clamp_(0.0, 1.0)
    assert best is not None
    return best


def _initial_slopes(bound: tuple[Tensor, Tensor], rows: int) -> Tensor:
    """CROWN's lower slopes, repeated for each of ``rows`` specification rows."""
    slope = relu_lower_slope(*bound)
    return slope[:, None].expand(slope.shape[0], rows, *slope.shape[1:]).clone()
