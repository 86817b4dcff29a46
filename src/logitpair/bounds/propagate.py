"""The bound computations on a :class:`~logitpair.bounds.dag.Dag` of ops (a chain, or with residual
additions): IBP, the CROWN backward pass, intermediate bounds, alpha-CROWN's slope optimisation.

On a DAG, IBP runs forward over the nodes (an addition adds its terms' intervals); the backward
pass visits the nodes in reverse, each node's coefficients the sum of its consumers' pull-backs
(an addition passes its ``A`` to both terms), the bias and ``mag`` summed over every node; the
intermediate bounds of a nonlinear node's input are such a pass from that input node over the
sub-DAG before it; alpha-CROWN keeps one set of slopes per ReLU node. A chain is the DAG whose
every node reads the one before: the same steps in the same order as a loop over a list.

Round-off: every concretised linear bound ``A·x + bias`` over a box is lowered by
``rtol * M`` where ``M`` is the sum of the absolute values of every term summed into it
(``|A|·max(|l|, |u|)`` plus each layer's bias terms, tracked through the backward pass as
``mag``), and every IBP step widens its radius by ``rtol`` times the magnitude of its terms
(:meth:`~logitpair.bounds.ops.Affine.ibp`). The default ``rtol = 1e-5`` (about 84 float32
units in the last place) is far above the error of the float32 sums of these networks; with
``rtol=0`` the bounds of the cancellation tests in ``tests/test_bounds.py`` exceed the exact
(float64) margins.

Speed (``benchmarks/bounds_speed.py``): the specification has the K-1 non-trivial rows
(:func:`~logitpair.bounds.margins.margin_spec`), a ReLU and the max-pool after it (its only
consumer) are pulled back together on the pooled shape, and the coefficients reach a convolution
channels-last.
"""

from __future__ import annotations

from math import prod

import torch
from torch import Tensor

from logitpair.bounds.dag import INPUT, Dag
from logitpair.bounds.ops import Add, Conv, Dense, MaxPool, Op, Pool, ReLU, relu_lower_slope

Bounds = dict[int, tuple[Tensor, Tensor]]
# Elements of the largest A tensor one backward pass of the intermediate bounds may hold (8 MiB:
# smaller passes stay in the allocator's reused memory; 2**21 ran CROWN on LeNet-5 1.7x faster than 2**24).
CHUNK_ELEMENTS = 2**21


def backward(
    dag: Dag, node: int, A: Tensor, bounds: Bounds, alphas: dict[int, Tensor] | None = None
) -> tuple[Tensor, Tensor, Tensor]:
    """Pull the linear function ``A · (output of node)`` back to the DAG's input.

    The nodes are visited in reverse topological order; a node's ``A`` is the sum of what its
    consumers pulled back to it (an addition gives its ``A`` to both terms), complete once the
    nodes after it are done. Returns ``(A_in, bias, mag)`` with ``A·out ≥ A_in·x + bias`` for
    every input in the box the ``bounds`` (inputs of the nonlinear ops) were computed for."""
    alphas = alphas or {}
    bias = A.new_zeros(A.shape[:2])
    mag = A.new_zeros(A.shape[:2])
    pending = {node: A}
    for k in range(node, INPUT, -1):
        if k not in pending:
            continue
        A, b, m, reader = _pull_back(dag, k, pending.pop(k), bounds, alphas)
        bias, mag = bias + b, mag + m
        for j in dag.inputs[reader]:
            pending[j] = pending[j] + A if j in pending else A
    return pending[INPUT], bias, mag


def _fused_relu(dag: Dag, k: int) -> int | None:
    """The ReLU node a max-pool node ``k`` reads, where the max-pool is its only consumer."""
    j = dag.inputs[k][0]
    if isinstance(dag.ops[k], MaxPool) and j != INPUT and isinstance(dag.ops[j], ReLU) and dag.consumers[j] == [k]:
        return j
    return None


def _pull_back(
    dag: Dag, k: int, A: Tensor, bounds: Bounds, alphas: dict[int, Tensor]
) -> tuple[Tensor, Tensor, Tensor, int]:
    """One step of :func:`backward` through node ``k`` (and a ReLU before a max-pool, fused):
    ``(A, bias, mag)`` on the inputs of the node returned (``k``, or the fused ReLU's)."""
    op = dag.ops[k]
    relu = _fused_relu(dag, k)
    if relu is not None:
        return (*op.back_after_relu(A, bounds[k], bounds[relu], alphas.get(relu)), relu)  # type: ignore[attr-defined]
    if op.nonlinear:
        return (*op.back(A, *bounds[k], alphas.get(k)), k)  # type: ignore[attr-defined]
    return (*op.back(A), k)  # type: ignore[attr-defined]


def concretize(A: Tensor, bias: Tensor, mag: Tensor, lower: Tensor, upper: Tensor, rtol: float) -> Tensor:
    """Lower bound of ``A·x + bias`` over the box ``[lower, upper]`` (per point), minus the
    round-off margin ``rtol * (|A|·max(|l|, |u|) + mag + |bias|)``."""
    A = A.flatten(2)
    lo, hi = lower.flatten(1).unsqueeze(-1), upper.flatten(1).unsqueeze(-1)
    mid, rad = (hi + lo) / 2, (hi - lo) / 2
    value = (A @ mid - A.abs() @ rad).squeeze(-1) + bias
    size = (A.abs() @ torch.maximum(lo.abs(), hi.abs())).squeeze(-1) + mag + bias.abs()
    return value - rtol * size


def ibp_step(op: Op, intervals: list[tuple[Tensor, Tensor]], rtol: float) -> tuple[Tensor, Tensor]:
    """IBP through one node from the intervals of its inputs (an addition's further terms are
    passed to :meth:`~logitpair.bounds.ops.Add.ibp` after ``rtol``)."""
    (lower, upper), *others = intervals
    return op.ibp(lower, upper, rtol, *others)  # type: ignore[attr-defined]


def ibp_through(dag: Dag, lower: Tensor, upper: Tensor, rtol: float, node: int | None = None) -> tuple[Tensor, Tensor]:
    """IBP: the interval of ``node``'s output (default: the DAG's) over the box ``[lower, upper]``."""
    return dag.evaluate((lower, upper), lambda k, intervals: ibp_step(dag.ops[k], intervals, rtol), node)


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


def crown_node(dag: Dag, i: int, bounds: Bounds, box: tuple[Tensor, Tensor], rtol: float) -> Tensor:
    """CROWN bounds ``(2, B, n)`` (lower, upper) on the input of node ``i`` for each point's rows
    needed, NaN elsewhere, in chunks of rows that keep each backward pass under ``CHUNK_ELEMENTS``."""
    lower, upper = box
    op = dag.ops[i]
    n, b = prod(op.in_shape), lower.shape[0]
    rows = _point_rows(_rows_needed(op, *bounds[i]))
    out = lower.new_full((2, b, n + 1), float("nan"))
    widest = max(max(prod(o.in_shape), prod(o.out_shape)) for o in dag.ops[: i + 1])
    chunk = max(1, CHUNK_ELEMENTS // (2 * b * widest))
    for part in rows.split(chunk, dim=1):
        r = part.shape[1]
        eye = lower.new_zeros(b, r, n + 1).scatter_(2, part[..., None], 1.0)[..., :n]
        spec = torch.cat([eye, -eye], 1).reshape(b, 2 * r, *op.in_shape)
        value = concretize(*backward(dag, dag.inputs[i][0], spec, bounds), lower, upper, rtol)
        out[0].scatter_(1, part, value[:, :r])
        out[1].scatter_(1, part, -value[:, r:])
    return out[..., :n]


def _tighten(found: Tensor, lower: Tensor, upper: Tensor) -> tuple[Tensor, Tensor]:
    """The intersection of the IBP interval with CROWN's (NaN: not computed)."""
    cl, cu = (t.view_as(lower) for t in found)
    lower = torch.where(cl.isnan(), lower, torch.maximum(lower, cl))
    upper = torch.where(cu.isnan(), upper, torch.minimum(upper, cu))
    return lower, upper


def crown_worthy(dag: Dag) -> set[int]:
    """The nonlinear nodes whose input interval CROWN may tighten: on some path from the input to
    the node, a Linear, Conv, pool or addition lies after the last nonlinear node, and a nonlinear
    node or an addition lies before. Before the first nonlinear op IBP is exact (one affine map of
    the box; the sum of two such maps is not, so an addition counts), and the interval of a ReLU's
    output is the ReLU of its input's, tighter than CROWN through the relaxation. On a chain: a
    Linear, Conv or pool lies between the previous nonlinear op and this one."""
    seen, mixed, worthy = {INPUT: False}, {INPUT: False}, set()
    for k, op in enumerate(dag.ops):
        s = any(seen[j] for j in dag.inputs[k])
        m = any(mixed[j] for j in dag.inputs[k])
        if op.nonlinear and s and m:
            worthy.add(k)
        if op.nonlinear:
            s, m = True, False
        seen[k] = s or isinstance(op, Add)
        mixed[k] = m or isinstance(op, (Dense, Conv, Pool, Add))
    return worthy


def intermediate_bounds(
    dag: Dag, lower: Tensor, upper: Tensor, *, crown: bool, rtol: float
) -> tuple[Bounds, tuple[Tensor, Tensor]]:
    """The interval of each nonlinear node's input: IBP, intersected with CROWN's where ``crown``
    (on the :func:`crown_worthy` nodes; the tightened interval is then the one every consumer of
    that input reads). Returns the intervals and the IBP interval of the DAG's output."""
    bounds: Bounds = {}
    box = (lower, upper)
    worthy = crown_worthy(dag) if crown else set()
    intervals = {INPUT: box}
    for i, op in enumerate(dag.ops):
        if op.nonlinear:
            j = dag.inputs[i][0]
            bounds[i] = intervals[j]
            if i in worthy:
                bounds[i] = intervals[j] = _tighten(crown_node(dag, i, bounds, box, rtol), *intervals[j])
        intervals[i] = ibp_step(op, [intervals[j] for j in dag.inputs[i]], rtol)
        dag.release(intervals, i)
    return bounds, intervals[dag.output]


def alpha_crown(
    dag: Dag,
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
        for i, op in enumerate(dag.ops)
        if isinstance(op, ReLU)
    }
    if not alphas:
        return concretize(*backward(dag, dag.output, spec, bounds), *box, rtol)
    optimizer = torch.optim.Adam(list(alphas.values()), lr=lr)
    best = None
    for step in range(iterations + 1):
        with torch.enable_grad():
            value = concretize(*backward(dag, dag.output, spec, bounds, alphas), *box, rtol)
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
