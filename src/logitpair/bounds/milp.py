"""A network over an input box as a mixed-integer linear program (MIPVerify: Tjeng, Xiao, Tedrake
2019, https://arxiv.org/abs/1711.07356): the encoder. Solving it is :mod:`.exact`.

The variables are the input pixels (bounded by the box: the ε-ball ∩ [0, 1]), then, layer by
layer, those of the nonlinear units that need one. Every node's output is an affine expression
``M @ v + c`` of the variables (``M`` a ``scipy.sparse`` CSR matrix, float64), so an affine layer
adds no variable and no row: its matrix (probed once per network from its linear part, exact: each
column is one weight) multiplies the expression of its input. Linear, Conv2d, BatchNorm (eval),
the input normalisation, Flatten and average pools are affine; a residual addition adds two
expressions. Each nonlinear unit reads the interval of its input: the bounds given (CROWN ∩ IBP,
:mod:`.exact`) intersected with the expression's own interval over the variables' bounds.

- **ReLU** ``r = max(z, 0)`` on ``[l, u]``: stable active (``l ≥ 0``) ``r = z``; stable dead
  (``u ≤ 0``) ``r = 0``; unstable: a variable ``r ∈ [0, u]`` and a binary ``δ`` with ``r ≥ z``,
  ``r ≤ u δ``, ``r ≤ z − l (1 − δ)`` (big-M, the bounds as M).
- **Max-pool** ``y = max_i z_i`` over a window: an input is no candidate when a kept one is never
  below it (the upper bound of their difference ≤ 0: exact on the first layer, where both are affine
  in the input); one candidate: ``y = z_i``; else a variable ``y ∈ [l*, max u]`` (``l*`` the largest
  lower bound) and binaries ``a_i`` (``Σ a_i = 1``) with ``y ≥ z_i`` and
  ``y ≤ z_i + (U_i − l_i)(1 − a_i)``, ``U_i`` the largest upper bound of the other candidates.
- **ReLU then max-pool** (the pool its only reader, LeNet's): ``maxpool(relu(z)) = relu(maxpool(z))``,
  so the window of ``z`` is pooled (inputs with ``u ≤ 0`` are no candidates) and one ReLU follows:
  a binary per window instead of one per input (on the demo's LeNet-5 at ε 0.02, 7,400 binaries
  instead of 13,000).

Each new variable also records how the network computes it (:meth:`Program.assign`): the network's
own values at any input of the box are a feasible solution, its activation pattern the binaries.

Example::

    >>> net = network(model, x[:1])
    >>> enc = encode(net, lower, upper, bounds)     # bounds: {node: (lower, upper)} of nonlinear inputs
    >>> enc.logits.M.shape, enc.program.integrality.sum()    # (K, variables), binaries
"""

from __future__ import annotations

import copy
from collections.abc import Callable
from dataclasses import dataclass, field
from math import prod
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from logitpair.bounds.dag import INPUT, Dag
from logitpair.bounds.graph import build_dag, unsupported
from logitpair.bounds.ops import Add, ChannelAffine, Conv, Dense, MaxPool, Op, Pool, ReLU, Reshape

# Elements of one probe of an affine layer's matrix (columns at a time): 32 MiB of float64.
PROBE_ELEMENTS = 2**22
# A nonlinear unit's input with more terms than this becomes a variable (one equality row). Never, by
# default: HiGHS's LP relaxation of the demo's LeNet-5 (ε 0.02) took 41 s with every expression
# substituted, 108 s with variables for those over 450 terms, > 120 s over 32; at ε 0.01 on the tests'
# LeNet-5, 1.0 s, 2.1 s and 12.5 s (dual simplex; HiGHS 1.12, one loaded core).
SHORT = 2**62


def _sparse() -> Any:
    from scipy import sparse  # the optional dependency (extra "certify"), imported when used

    return sparse


def _linear_part(op: Op, z: Tensor) -> Tensor:
    """The affine op without its constant: ``L(z)`` with ``op.forward(z) = L(z) + op.forward(0)``."""
    if isinstance(op, Dense):
        return F.linear(z, op.weight)
    if isinstance(op, Conv):
        return F.conv2d(z, op.weight, None, op.stride, op.padding)
    if isinstance(op, ChannelAffine):
        return z * op.scale
    if isinstance(op, (Reshape, Pool)):
        return op.forward(z)
    raise unsupported(f"{type(op).__name__} in a MILP")


def affine_matrix(op: Op) -> tuple[Any, np.ndarray]:
    """``(L, b)``: the affine op as a sparse CSR matrix (out × in, flattened) and its constant,
    float64. ``L``'s columns are the linear part applied to unit vectors, in chunks of
    :data:`PROBE_ELEMENTS`: each entry is one weight (or an average's 1/k), so the matrix is exact."""
    n_in, n_out = prod(op.in_shape), prod(op.out_shape)
    dtype = torch.float64
    rows, cols, vals = [], [], []
    chunk = max(1, PROBE_ELEMENTS // max(n_in, n_out))
    with torch.no_grad():
        for start in range(0, n_in, chunk):
            stop = min(start + chunk, n_in)
            probe = torch.zeros(stop - start, n_in, dtype=dtype)
            probe[torch.arange(stop - start), torch.arange(start, stop)] = 1.0
            out = _linear_part(op, probe.view(-1, *op.in_shape)).reshape(stop - start, n_out)
            col, row = out.nonzero(as_tuple=True)
            rows.append(row.numpy())
            cols.append(col.numpy() + start)
            vals.append(out[col, row].numpy())
        bias = op.forward(torch.zeros(1, *op.in_shape, dtype=dtype)).flatten().numpy()
    data = (np.concatenate(vals), (np.concatenate(rows), np.concatenate(cols)))
    return _sparse().csr_matrix(data, shape=(n_out, n_in)), bias.copy()


@dataclass(eq=False)
class Network:
    """The model read for the MILP: its float64 DAG on the CPU and each affine node's matrix.

    ``model`` is the caller's (float32) model: counterexamples are checked on it."""

    model: nn.Module
    dag: Dag
    affine: dict[int, tuple[Any, np.ndarray]]
    in_shape: tuple[int, ...]

    @property
    def num_classes(self) -> int:
        return prod(self.dag.ops[-1].out_shape) if self.dag.ops else prod(self.in_shape)


def network(model: nn.Module, example: Tensor) -> Network:
    """Read ``model`` (eval mode, layers of :data:`~logitpair.bounds.graph.SUPPORTED`) once for
    MILPs on inputs shaped like ``example`` (N, ...): a float64 copy on the CPU, traced into a DAG,
    and the sparse matrix of every affine node."""
    twin = copy.deepcopy(model).to("cpu", torch.float64).eval()
    dag = build_dag(twin, example[:1].detach().to("cpu", torch.float64))
    affine = {k: affine_matrix(op) for k, op in enumerate(dag.ops) if not op.nonlinear and not isinstance(op, Add)}
    return Network(model, dag, affine, tuple(example.shape[1:]))


@dataclass(eq=False)
class Program:
    """A growing MILP: variable bounds and integrality, and blocks of rows ``lb ≤ A v ≤ ub``
    (each block's ``A`` has as many columns as there were variables when it was added)."""

    lower: list[np.ndarray] = field(default_factory=list)
    upper: list[np.ndarray] = field(default_factory=list)
    integer: list[np.ndarray] = field(default_factory=list)
    blocks: list[tuple[Any, np.ndarray, np.ndarray]] = field(default_factory=list)
    size: int = 0
    rules: list[tuple[np.ndarray, Callable[[np.ndarray], np.ndarray]]] = field(default_factory=list)
    _stacked: tuple[tuple[int, int], tuple[Any, np.ndarray, np.ndarray]] | None = None

    def add_vars(self, lower: np.ndarray, upper: np.ndarray, *, integer: bool = False) -> np.ndarray:
        """New variables with these bounds; returns their indices."""
        n = len(lower)
        self.lower.append(np.asarray(lower, dtype=np.float64))
        self.upper.append(np.asarray(upper, dtype=np.float64))
        self.integer.append(np.full(n, 1 if integer else 0, dtype=np.int8))
        self.size += n
        return np.arange(self.size - n, self.size)

    def add_rows(self, A: Any, lb: np.ndarray, ub: np.ndarray) -> None:
        self.blocks.append((A.tocsr(), np.asarray(lb, dtype=np.float64), np.asarray(ub, dtype=np.float64)))

    def unit(self, rows: int, at: np.ndarray, cols: np.ndarray, values: np.ndarray | float = 1.0) -> Any:
        """A ``rows × size`` matrix with ``values`` at ``(at, cols)``."""
        vals = np.broadcast_to(np.asarray(values, dtype=np.float64), (len(at),))
        return _sparse().csr_matrix((vals, (at, cols)), shape=(rows, self.size))

    def define(self, cols: np.ndarray, rule: Callable[[np.ndarray], np.ndarray]) -> None:
        """How to compute the variables ``cols`` from the earlier ones (for :meth:`assign`)."""
        self.rules.append((cols, rule))

    def assign(self, inputs: np.ndarray) -> np.ndarray:
        """The solution the network's own computation at ``inputs`` gives: every variable's value
        (the input's, then each rule in order): a feasible point of the MILP, its binaries the
        activation pattern (ReLU on or off, each window's winner) at ``inputs``."""
        values = np.zeros(self.size)
        values[: len(inputs)] = inputs
        for cols, rule in self.rules:
            values[cols] = rule(values)
        return values

    @property
    def bounds(self) -> tuple[np.ndarray, np.ndarray]:
        return np.concatenate(self.lower), np.concatenate(self.upper)

    @property
    def integrality(self) -> np.ndarray:
        return np.concatenate(self.integer)

    def rows(self) -> tuple[Any, np.ndarray, np.ndarray]:
        """All rows so far, over all variables: ``(A, lb, ub)`` (kept until a row or variable is added)."""
        key = (len(self.blocks), self.size)
        if self._stacked is None or self._stacked[0] != key:
            sparse = _sparse()
            if not self.blocks:
                stacked = (sparse.csr_matrix((0, self.size)), np.zeros(0), np.zeros(0))
            else:
                A = sparse.vstack([widen(a, self.size) for a, _, _ in self.blocks], format="csr")
                stacked = (A, np.concatenate([b[1] for b in self.blocks]), np.concatenate([b[2] for b in self.blocks]))
            self._stacked = (key, stacked)
        return self._stacked[1]


def widen(M: Any, columns: int) -> Any:
    """``M`` (CSR) with ``columns`` columns: the variables added after it have coefficient 0."""
    M = M.tocsr()
    return _sparse().csr_matrix((M.data, M.indices, M.indptr), shape=(M.shape[0], columns))


@dataclass(eq=False)
class Expr:
    """The rows ``M @ v + c`` (``M`` CSR over the first ``M.shape[1]`` variables)."""

    M: Any
    c: np.ndarray

    def over(self, columns: int) -> Any:
        return widen(self.M, columns)

    def interval(self, lower: np.ndarray, upper: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Each row's range over the variables' box (the first ``M.shape[1]`` of them)."""
        n = self.M.shape[1]
        lo, hi = lower[:n], upper[:n]
        pos, neg = self.M.maximum(0), self.M.minimum(0)
        return self.c + pos @ lo + neg @ hi, self.c + pos @ hi + neg @ lo


@dataclass(eq=False)
class Encoding:
    """The MILP of a network over a box: ``program`` and the logits' expression ``logits``;
    ``inputs``: the input variables' indices (the first ones), ``relus``: unstable ReLUs,
    ``pools``: max-pool windows with a binary choice."""

    program: Program
    logits: Expr
    inputs: np.ndarray
    relus: int = 0
    pools: int = 0


def _numpy(given: tuple[Tensor, Tensor]) -> tuple[np.ndarray, np.ndarray]:
    return tuple(t.detach().flatten().cpu().double().numpy() for t in given)  # type: ignore[return-value]


def _tightest(expr: Expr, prog: Program, given: tuple[np.ndarray, np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
    """The intersection of the given interval with the expression's own over the variables' box."""
    lo, hi = expr.interval(*prog.bounds)
    lo, hi = np.maximum(lo, given[0]), np.minimum(hi, given[1])
    return lo, np.maximum(hi, lo)


def materialise(prog: Program, z: Expr, rows: np.ndarray, lo: np.ndarray, hi: np.ndarray) -> Expr:
    """The rows ``rows`` of ``z``, each with more than :data:`SHORT` terms replaced by a new
    variable (bounded by ``lo``/``hi`` there) and the equality ``v − M v = c``: the big-M rows and
    the next layer then read one column instead of a long expression."""
    M = widen(z.M[rows], prog.size)
    c = z.c[rows].copy()
    long = np.flatnonzero(np.diff(M.indptr) > SHORT)
    k = len(long)
    v = prog.add_vars(lo[rows[long]], hi[rows[long]])
    defining, const = M[long], c[long]
    prog.add_rows(prog.unit(k, np.arange(k), v) - widen(defining, prog.size), const, const)
    prog.define(v, lambda x: defining @ x[: defining.shape[1]] + const)
    keep = np.ones(len(rows), dtype=bool)
    keep[long] = False
    kept = _sparse().diags(keep.astype(np.float64)) @ widen(M, prog.size)
    c[long] = 0.0
    return Expr(kept + prog.unit(len(rows), long, v), c)


def _place(prog: Program, n: int, parts: list[tuple[np.ndarray, Expr]]) -> Expr:
    """An ``n``-row expression with each part's rows at its positions (zero elsewhere)."""
    M = _sparse().csr_matrix((n, prog.size))
    c = np.zeros(n)
    for at, e in parts:
        pick = _sparse().csr_matrix((np.ones(len(at)), (at, np.arange(len(at)))), shape=(n, len(at)))
        M = M + pick @ widen(e.M, prog.size)
        c = c + pick @ e.c
    return Expr(M.tocsr(), c)


def _unit_expr(prog: Program, cols: np.ndarray) -> Expr:
    return Expr(prog.unit(len(cols), np.arange(len(cols)), cols), np.zeros(len(cols)))


def encode_relu(prog: Program, z: Expr, given: tuple[np.ndarray, np.ndarray]) -> tuple[Expr, int]:
    """``max(z, 0)``: zero where dead, ``z`` where stable active, big-M where unstable."""
    lo, hi = _tightest(z, prog, given)
    n = len(lo)
    active = np.flatnonzero((lo >= 0) & (hi > 0))  # [0, 0]: dead
    idx = np.flatnonzero((lo < 0) & (hi > 0))
    live = materialise(prog, z, np.concatenate([active, idx]), lo, hi)
    m, l, u = len(idx), lo[idx], hi[idx]
    r = prog.add_vars(np.zeros(m), u)
    d = prog.add_vars(np.zeros(m), np.ones(m), integer=True)
    k = np.arange(m)
    R, D = prog.unit(m, k, r), prog.unit(m, k, d)
    Z, c = widen(live.M[len(active) :], prog.size), live.c[len(active) :]
    prog.add_rows(R - Z, c, np.full(m, np.inf))  # r ≥ z
    prog.add_rows(R - D.multiply(u[:, None]), np.full(m, -np.inf), np.zeros(m))  # r ≤ u δ
    prog.add_rows(R - Z - D.multiply(l[:, None]), np.full(m, -np.inf), c - l)  # r ≤ z − l (1 − δ)
    prog.define(r, lambda x: np.maximum(Z @ x[: Z.shape[1]] + c, 0.0))
    prog.define(d, lambda x: (Z @ x[: Z.shape[1]] + c > 0).astype(np.float64))
    kept = Expr(live.M[: len(active)], live.c[: len(active)])
    return _place(prog, n, [(active, kept), (idx, _unit_expr(prog, r))]), m


def _windows(op: MaxPool) -> np.ndarray:
    """(outputs, k·k): the flat input index of every element of every window."""
    c, h, w = op.in_shape
    k = op.kernel
    _, ho, wo = op.out_shape
    ch, i, j, a, b = np.meshgrid(np.arange(c), np.arange(ho), np.arange(wo), np.arange(k), np.arange(k), indexing="ij")
    flat = ch * h * w + (i * k + a) * w + (j * k + b)
    return flat.reshape(c * ho * wo, k * k)


def _never_above(prog: Program, z: Expr, lo: np.ndarray, hi: np.ndarray, win: np.ndarray) -> np.ndarray:
    """(windows, k², k²): is ``z_a ≤ z_b`` over the whole box, for elements ``a`` and ``b`` of a window?
    The upper bound of ``z_a − z_b`` is the smaller of ``u_a − l_b`` and the interval of the difference
    of their expressions (exact where both are affine in the input: the first layer's)."""
    n, kk = win.shape
    ea, eb = np.meshgrid(np.arange(kk), np.arange(kk), indexing="ij")
    ia, ib = win[:, ea.ravel()].ravel(), win[:, eb.ravel()].ravel()
    diff = Expr(z.M[ia] - z.M[ib], z.c[ia] - z.c[ib])
    upper = np.minimum(diff.interval(*prog.bounds)[1], hi[ia] - lo[ib])
    return (upper <= 0).reshape(n, kk, kk)


def _pool_candidates(
    prog: Program, z: Expr, lo: np.ndarray, hi: np.ndarray, win: np.ndarray, relu: bool
) -> tuple[np.ndarray, np.ndarray]:
    """Per window: which inputs may be the max (``cand``) and the one with the largest lower bound
    (``best``). An input is dropped, in order, when one still kept is never below it
    (:func:`_never_above`), so the max over the window is kept. With ``relu`` (the pool of a ReLU's
    input, followed by the ReLU) an input with ``u ≤ 0`` is no candidate either: its ReLU is 0
    whatever the others are (a window without candidates pools to 0)."""
    wl = lo[win]
    cand = hi[win] > 0 if relu else np.ones(win.shape, dtype=bool)
    below = _never_above(prog, z, lo, hi, win)
    kk = win.shape[1]
    for e in range(kk):
        others = cand.copy()
        others[:, e] = False
        cand[:, e] &= ~(below[:, e, :] & others).any(1)
    best = np.where(cand, wl, -np.inf).argmax(1)
    return best, cand


def _window_max(values: np.ndarray, window: np.ndarray, n: int) -> tuple[np.ndarray, np.ndarray]:
    """The max of each of ``n`` windows (``values[i]`` in window ``window[i]``, windows in order)
    and the one-hot of its first winner among the values."""
    top = np.full(n, -np.inf)
    np.maximum.at(top, window, values)
    hits = np.flatnonzero(values >= top[window])
    _, first = np.unique(window[hits], return_index=True)
    onehot = np.zeros(len(values))
    onehot[hits[first]] = 1.0
    return top, onehot


def encode_maxpool(
    prog: Program, z: Expr, given: tuple[np.ndarray, np.ndarray], op: MaxPool, *, relu: bool = False
) -> tuple[Expr, int, tuple[np.ndarray, np.ndarray]]:
    """The max over each window: the one candidate, or a new variable with binaries. Returns the
    pooled expression, the windows with binaries and the pooled interval."""
    lo, hi = _tightest(z, prog, given)
    win = _windows(op)
    best, cand = _pool_candidates(prog, z, lo, hi, win, relu)
    n = len(win)
    count = cand.sum(1)
    single = np.flatnonzero(count == 1)
    w = np.flatnonzero(count >= 2)
    wi, ei = np.nonzero(cand[w])  # candidate pairs: window (position in w), element
    src = win[w[wi], ei]
    used = materialise(prog, z, np.concatenate([win[single, best[single]], src]), lo, hi)
    out_lo, out_hi = np.zeros(n), np.zeros(n)  # windows without candidates: 0
    out_lo[single], out_hi[single] = lo[win[single, best[single]]], hi[win[single, best[single]]]
    cu = np.where(cand[w], hi[win[w]], -np.inf)
    top2 = np.sort(cu, axis=1)[:, -2:]
    others_max = np.where(cu[wi, ei] == top2[wi, 1], top2[wi, 0], top2[wi, 1])  # largest u of the others
    out_lo[w], out_hi[w] = lo[win[w, best[w]]], top2[:, 1]
    y = prog.add_vars(out_lo[w], out_hi[w])
    a = prog.add_vars(np.zeros(len(wi)), np.ones(len(wi)), integer=True)
    p, big, s = len(wi), others_max - lo[src], len(single)
    Y, Z, c = prog.unit(p, np.arange(p), y[wi]), widen(used.M[s:], prog.size), used.c[s:]
    prog.add_rows(Y - Z, c, np.full(p, np.inf))  # y ≥ z_i
    A = prog.unit(p, np.arange(p), a, big)
    prog.add_rows(Y - Z + A, np.full(p, -np.inf), c + big)  # y ≤ z_i + big (1 − a_i)
    prog.add_rows(prog.unit(len(w), wi, a), np.ones(len(w)), np.ones(len(w)))  # Σ a_i = 1
    prog.define(y, lambda x: _window_max(Z @ x[: Z.shape[1]] + c, wi, len(w))[0])
    prog.define(a, lambda x: _window_max(Z @ x[: Z.shape[1]] + c, wi, len(w))[1])
    out = _place(prog, n, [(single, Expr(used.M[:s], used.c[:s])), (w, _unit_expr(prog, y))])
    return out, len(w), (out_lo, out_hi)


def _affine(z: Expr, L: Any, b: np.ndarray) -> Expr:
    return Expr(L @ z.M, L @ z.c + b)


def _fused_relu(dag: Dag, k: int) -> bool:
    """Node ``k`` is a ReLU whose only consumer is a max-pool: ``maxpool(relu(z)) = relu(maxpool(z))``
    (the ReLU is monotone), so the pool is encoded on ``z`` and one ReLU follows it per window."""
    users = dag.consumers[k]
    return isinstance(dag.ops[k], ReLU) and len(users) == 1 and isinstance(dag.ops[users[0]], MaxPool)


def _nonlinear(prog: Program, enc: Encoding, net: Network, k: int, z: Expr, bounds: dict) -> Expr:
    """Node ``k``'s output; a max-pool after a fused ReLU (whose ``z`` is passed on unchanged)
    pools ``z`` and applies the ReLU to the pooled value."""
    dag, op = net.dag, net.dag.ops[k]
    if isinstance(op, ReLU):
        if _fused_relu(dag, k):
            return z
        out, m = encode_relu(prog, z, _numpy(bounds[k]))
        enc.relus += m
        return out
    assert isinstance(op, MaxPool)
    j = dag.inputs[k][0]
    fused = j != INPUT and _fused_relu(dag, j)
    out, m, pooled = encode_maxpool(prog, z, _numpy(bounds[j] if fused else bounds[k]), op, relu=fused)
    enc.pools += m
    if fused:
        out, m = encode_relu(prog, out, pooled)
        enc.relus += m
    return out


def encode(net: Network, lower: Tensor, upper: Tensor, bounds: dict[int, tuple[Tensor, Tensor]]) -> Encoding:
    """The MILP of ``net`` over the input box ``[lower, upper]`` (one point, shaped like the
    model's input), ``bounds[k]`` the interval of nonlinear node ``k``'s input (any sound one;
    the tighter, the smaller the big-M constants and the fewer unstable units)."""
    sparse = _sparse()
    prog = Program()
    lo = lower.detach().flatten().cpu().double().numpy()
    hi = upper.detach().flatten().cpu().double().numpy()
    inputs = prog.add_vars(lo, hi)
    exprs = {INPUT: Expr(sparse.identity(len(lo), format="csr"), np.zeros(len(lo)))}
    enc = Encoding(prog, exprs[INPUT], inputs)
    dag = net.dag
    for k, op in enumerate(dag.ops):
        ins = [exprs[j] for j in dag.inputs[k]]
        if op.nonlinear:
            exprs[k] = _nonlinear(prog, enc, net, k, ins[0], bounds)
        elif isinstance(op, Add):
            first, *rest = ins
            M, c = first.over(prog.size), first.c
            for e in rest:
                M, c = M + e.over(prog.size), c + e.c
            exprs[k] = Expr(M, c)
        else:
            exprs[k] = _affine(ins[0], *net.affine[k])
        dag.release(exprs, k)
    enc.logits = exprs[dag.output]
    return enc
