"""Exact verification of one point by mixed-integer programming (MIPVerify: Tjeng, Xiao, Tedrake
2019, https://arxiv.org/abs/1711.07356), solved by HiGHS through ``scipy.optimize.milp``.

The question: is there an ``x'`` in the L∞ ball ∩ [0, 1] with ``f_y(x') − f_j(x') ≤ τ`` for some
``j ≠ y``? (``τ`` = :data:`VERIFY_MARGIN` = 1e-4, clear of the solver's tolerances.) The network is
encoded by :mod:`.milp` with big-M constants from CROWN's intermediate bounds intersected with
IBP's (:func:`~logitpair.bounds.propagate.intermediate_bounds`, on a float64 copy of the model), and
each margin's CROWN lower bound (or a tighter one the caller knows, e.g. α-CROWN's) drops the
classes it already proves and orders the rest, smallest bound first. Outcomes per point:

- ``verified``: every margin is > 1e-4 over the whole ball: each class proven by a bound (CROWN's,
  the caller's), by the LP relaxation, or by the MILP's infeasibility.
- ``counterexample``: the solver's input, projected into the ball ∩ [0, 1] in float32, is
  misclassified by the (float32) model, or becomes so after a tiny push along the sign of the
  margin's gradient (1e-6 to 1e-4). If neither and the float64 margin at the solver's input is
  clearly positive (> τ + :data:`BUG_TOLERANCE`) the encoding disagrees with the network:
  :class:`MilpError`, a bug of ours.
- ``timeout``: the time limit (model building included) ran out, HiGHS gave up, or the solver's
  input lies within its tolerances of the decision boundary and no float32 input near it is
  misclassified (a tie it cannot settle). Never counted as robust.

Before any MILP, per class: the LP relaxation's minimum of the margin (> τ proves the class) and,
from its optimum, a walk over linear regions (the exact minimum over one activation pattern is an
LP; :func:`_walk`), which finds most counterexamples in a second or two where HiGHS's branch and
bound found none in 40 s. The classes left go to the MILP.

Formulations (``formulation=``): ``"per-class"`` solves one feasibility program per class
(objective 0, the row ``margin_j ≤ τ``), stopping at the first counterexample; ``"disjunctive"``
(the default, :data:`DEFAULT_FORMULATION`) solves one program with a binary per class
(``Σ s_j = 1``, ``margin_j ≤ τ + (U_j − τ)(1 − s_j)``). Measured (one loaded CPU core, HiGHS 1.12):
on a trained LeNet-5 (the tests' at ε 0.003 near the decision boundary, the demo's M-PGD model at
ε 0.0075) every point was decided before the MILP (same time with both) or both hit the time
limit (20 s); where branch and bound decided (a 49-128-128-10 MLP, ε 0.06, 5 points) per-class
took 0.70, 8.5, 23.4, 0.19, 0.41 s and disjunctive 3.6, 2.5, 14.2, 0.19, 0.36 s: 33 s against 21 s.

Example::

    >>> net = network(model, x[:1])
    >>> out = verify_point(net, x[:1], y[:1], threat=Linf(0.02), time_limit=60)
    >>> out.status, out.seconds      # "verified" | "counterexample" | "timeout"
    >>> minimum_margin(net, x[:1], y[:1], j=3, threat=Linf(0.02)).value   # the exact minimum
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from logitpair.bounds.margins import ROUNDOFF_RTOL, input_box, margin_spec
from logitpair.bounds.milp import Encoding, Network, encode, network, widen
from logitpair.bounds.propagate import backward, concretize, intermediate_bounds
from logitpair.errors import ConfigError
from logitpair.threat import Threat

OUTCOMES = ("verified", "counterexample", "timeout")
FORMULATIONS = ("per-class", "disjunctive")
DEFAULT_FORMULATION = "disjunctive"
VERIFY_MARGIN = 1e-4
BUG_TOLERANCE = 1e-2  # HiGHS's integrality slack (1e-6) times big-M constants of tens, summed over layers
PUSHES = (1e-6, 1e-5, 1e-4)
WALK_STEPS = 6  # linear regions a walk visits at most
HEURISTIC_SHARE = 0.25  # of the time left, for the walks before the MILP


class MilpError(RuntimeError):
    """The MILP's counterexample is not one for the network: a bug of ours, never a user error."""


@dataclass
class MilpOutcome:
    """One point's outcome: ``status`` (:data:`OUTCOMES`), the ``counterexample`` (1, ...) on the
    model's device and dtype (None unless ``status`` is ``counterexample``) and its class ``target``,
    ``seconds`` (bounds, encoding and solving), ``solves`` (programs solved), ``binaries``
    (unstable ReLUs + max-pool windows with a choice) and a ``detail`` in words."""

    status: str
    seconds: float
    counterexample: Tensor | None = None
    target: int | None = None
    solves: int = 0
    binaries: int = 0
    detail: str = ""


@dataclass
class Prepared:
    """A point's box (float64), the intermediate bounds of the nonlinear nodes' inputs and the
    CROWN lower bound of each margin ((K,), +inf at ``y``)."""

    box: tuple[Tensor, Tensor]
    bounds: dict[int, tuple[Tensor, Tensor]]
    crown: np.ndarray


def _milp() -> Any:
    try:
        from scipy import optimize
    except ImportError as exc:  # pragma: no cover - scipy is in the test extra
        raise ConfigError("exact verification needs SciPy (pip install 'logitpair[certify]')", option="method") from exc
    return optimize


def prepare(net: Network, x: Tensor, y: int, threat: Threat, rtol: float = ROUNDOFF_RTOL) -> Prepared:
    """The box of ``x`` (1, ...) in float64, CROWN ∩ IBP intermediate bounds and CROWN's margins."""
    x64 = x.detach().to("cpu", torch.float64)
    box = input_box(x64, threat)
    with torch.no_grad():
        bounds, _ = intermediate_bounds(net.dag, *box, crown=True, rtol=rtol)
        spec, others = margin_spec(torch.tensor([y]), net.num_classes, x64)
        lower = concretize(*backward(net.dag, net.dag.output, spec, bounds), *box, rtol)
    crown = np.full(net.num_classes, np.inf)
    crown[others[0].numpy()] = lower[0].numpy()
    return Prepared(box, bounds, crown)


def margin_row(enc: Encoding, y: int, j: int, size: int) -> tuple[Any, float]:
    """``(a, c)`` with ``f_y − f_j = a @ v + c`` (``a`` a 1-row CSR over ``size`` variables)."""
    M = enc.logits.over(size)
    return M[y] - M[j], float(enc.logits.c[y] - enc.logits.c[j])


def _solve(enc: Encoding, extra: list[tuple[Any, float, float]], objective: Any | None, time_limit: float, *,
           gap: float | None = None, fixed: np.ndarray | None = None, relax: bool = False) -> Any:  # fmt: skip
    """HiGHS on the encoding plus ``extra`` rows ``(a, lb, ub)``, minimising ``objective`` (a 1-row
    sparse matrix; None: feasibility). ``fixed``: the binaries fixed at these values (an LP over
    one linear region); ``relax``: the LP relaxation."""
    opt = _milp()
    from scipy import sparse

    A, lb, ub = enc.program.rows()
    size = enc.program.size
    if extra:
        A = sparse.vstack([A, *[widen(a, size) for a, _, _ in extra]], format="csr")
        lb = np.concatenate([lb, [lo for _, lo, _ in extra]])
        ub = np.concatenate([ub, [hi for _, _, hi in extra]])
    lower, upper = enc.program.bounds
    integrality = enc.program.integrality
    if fixed is not None:
        binary = integrality == 1
        lower, upper = lower.copy(), upper.copy()
        lower[binary] = upper[binary] = np.round(fixed[binary])
    options: dict[str, Any] = {"time_limit": max(time_limit, 1e-3), "presolve": True, "disp": False}
    if gap is not None:
        options["mip_rel_gap"] = gap
    c = np.zeros(size) if objective is None else widen(objective, size).toarray().ravel()
    return opt.milp(c, integrality=None if relax else integrality, bounds=opt.Bounds(lower, upper),
                    constraints=opt.LinearConstraint(A, lb, ub), options=options)  # fmt: skip


def _wrong(model: nn.Module, x: Tensor, y: int) -> bool:
    with torch.no_grad():
        return int(model(x).argmax(1)) != y


def _pushed(model: nn.Module, x: Tensor, cand: Tensor, y: int, j: int, threat: Threat) -> Tensor | None:
    """``cand`` pushed by 1e-6 to 1e-4 against the sign of the margin's gradient, if that misclassifies."""
    with torch.enable_grad():
        z = cand.clone().requires_grad_(True)
        logits = model(z)
        (grad,) = torch.autograd.grad(logits[0, y] - logits[0, j], z)
    for eta in PUSHES:
        moved = threat.project(x, cand - eta * grad.sign())
        if _wrong(model, moved, y):
            return moved
    return None


def real_counterexample(net: Network, x: Tensor, y: int, j: int, solution: np.ndarray, threat: Threat) -> Tensor | None:
    """The solver's input as a float32 counterexample of ``net.model`` (checked by a forward pass),
    or None for a tie within the solver's tolerances; :class:`MilpError` if the float64 margin at
    the solver's input is clearly positive (the encoding disagrees with the network)."""
    n = int(np.prod(net.in_shape))
    raw = torch.from_numpy(solution[:n].copy()).view(1, *net.in_shape)
    cand = threat.project(x, raw.to(x.device, x.dtype))
    if _wrong(net.model, cand, y):
        return cand
    pushed = _pushed(net.model, x, cand, y, j, threat)
    if pushed is not None:
        return pushed
    with torch.no_grad():
        x64 = x.detach().to("cpu", torch.float64)
        logits = net.dag.evaluate(threat.project(x64, raw), lambda k, v: net.dag.ops[k].forward(*v))
    margin = float(logits[0, y] - logits[0, j])
    if margin > VERIFY_MARGIN + BUG_TOLERANCE:
        raise MilpError(
            f"the MILP's counterexample for class {j} has margin {margin:.3g} > 0 on the network: "
            "the encoding is wrong -- a bug, please report it"
        )
    return None


@dataclass
class _Task:
    """One point's question: its network, input (1, ...), label, threat, encoding and deadline."""

    net: Network
    x: Tensor
    y: int
    threat: Threat
    enc: Encoding
    deadline: float


def _found(task: _Task, j: int, res: Any, out: MilpOutcome) -> MilpOutcome:
    cand = real_counterexample(task.net, task.x, task.y, j, res.x, task.threat)
    if cand is None:
        out.status, out.detail = "timeout", f"a tie within the solver's tolerances (class {j})"
    else:
        out.status, out.counterexample, out.target = "counterexample", cand, j
    return out


def _per_class(task: _Task, classes: list[int], out: MilpOutcome) -> MilpOutcome:
    """One feasibility program per class, in order; the first counterexample ends the search."""
    enc = task.enc
    for j in classes:
        left = task.deadline - time.perf_counter()
        if left <= 0:
            out.status, out.detail = "timeout", "the time limit"
            return out
        a, c = margin_row(enc, task.y, j, enc.program.size)
        res = _solve(enc, [(a, -np.inf, VERIFY_MARGIN - c)], None, left)
        out.solves += 1
        if res.status == 2:  # infeasible: no x' with margin_j ≤ τ
            continue
        if res.x is not None:
            return _found(task, j, res, out)
        out.status, out.detail = "timeout", f"HiGHS: {res.message} (class {j})"
        return out
    out.status, out.detail = "verified", f"infeasible for classes {classes}"
    return out


def _disjunctive(task: _Task, classes: list[int], out: MilpOutcome) -> MilpOutcome:
    """One program: a binary ``s_j`` per class picks the margin that must be ≤ τ."""
    from scipy import sparse

    enc, prog = task.enc, task.enc.program
    rows = [margin_row(enc, task.y, j, prog.size) for j in classes]
    lo, hi = prog.bounds
    upper = [max(float((a.maximum(0) @ hi + a.minimum(0) @ lo)[0]) + c, VERIFY_MARGIN) for a, c in rows]
    s = prog.add_vars(np.zeros(len(classes)), np.ones(len(classes)), integer=True)
    extra = []
    for (a, c), u, sj in zip(rows, upper, s):
        pick = sparse.csr_matrix(([u - VERIFY_MARGIN], ([0], [sj])), shape=(1, prog.size))
        extra.append((widen(a, prog.size) + pick, -np.inf, u - c))  # margin_j ≤ τ + (U_j − τ)(1 − s_j)
    extra.append((sparse.csr_matrix((np.ones(len(s)), (np.zeros(len(s)), s)), shape=(1, prog.size)), 1.0, 1.0))
    left = task.deadline - time.perf_counter()
    if left <= 0:
        out.status, out.detail = "timeout", "the time limit"
        return out
    res = _solve(enc, extra, None, left)
    out.solves += 1
    if res.status == 2:
        out.status, out.detail = "verified", f"infeasible for classes {classes}"
        return out
    if res.x is not None:
        return _found(task, classes[int(np.argmax(res.x[s]))], res, out)
    out.status, out.detail = "timeout", f"HiGHS: {res.message}"
    return out


def _next_start(task: _Task, j: int, point: np.ndarray) -> np.ndarray:
    """A step of ``ε / 50`` from ``point`` against the sign of the margin's gradient, into the box:
    past the facet of the linear region where the region's minimum sits, into the next region."""
    n = len(point)
    z = torch.from_numpy(point.copy()).view(1, *task.net.in_shape).to(task.x.device, task.x.dtype)
    with torch.enable_grad():
        z.requires_grad_(True)
        logits = task.net.model(z)
        (grad,) = torch.autograd.grad(logits[0, task.y] - logits[0, j], z)
    lo, hi = (b[:n] for b in task.enc.program.bounds)
    step = task.threat.eps / 50 * grad.sign().flatten().cpu().double().numpy()
    return np.clip(point - step, lo, hi)


def _walk(task: _Task, j: int, start: np.ndarray, deadline: float) -> Tensor | None:
    """A primal heuristic: the exact minimum of margin ``j`` over the linear region (activation
    pattern) of ``start`` (an LP: the binaries fixed at the network's own values there), then over
    the region just past it, while the minimum falls (at most :data:`WALK_STEPS` regions). A region
    whose minimum is ≤ τ holds a counterexample (checked like the MILP's)."""
    a, c = margin_row(task.enc, task.y, j, task.enc.program.size)
    point, best = start, np.inf
    for _ in range(WALK_STEPS):
        left = deadline - time.perf_counter()
        if left <= 0:
            return None
        res = _solve(task.enc, [], a, left, fixed=task.enc.program.assign(point))
        if res.x is None or res.fun + c >= best - 1e-9:
            return None
        best = res.fun + c
        if best <= VERIFY_MARGIN:
            return real_counterexample(task.net, task.x, task.y, j, res.x, task.threat)
        point = _next_start(task, j, res.x[: len(point)])
    return None


def _screen(task: _Task, classes: list[int], out: MilpOutcome) -> list[int]:
    """Before the MILP, per class: the LP relaxation's minimum of the margin (> τ proves the class:
    no MILP needed), and from its optimum a :func:`_walk` over linear regions, within
    :data:`HEURISTIC_SHARE` of the time left. Returns the classes the MILP must decide; a
    counterexample found ends the point (``out`` says so)."""
    budget = time.perf_counter() + HEURISTIC_SHARE * (task.deadline - time.perf_counter())
    n = len(task.enc.inputs)
    left_classes = []
    for k, j in enumerate(classes):
        left = task.deadline - time.perf_counter()
        if left <= 0:
            return left_classes + classes[k:]
        a, c = margin_row(task.enc, task.y, j, task.enc.program.size)
        res = _solve(task.enc, [], a, left, relax=True)
        out.solves += 1
        if res.status == 0 and res.fun + c > VERIFY_MARGIN:
            continue
        left_classes.append(j)
        cand = None if res.x is None else _walk(task, j, res.x[:n], min(budget, task.deadline))
        if cand is not None:
            out.status, out.counterexample, out.target = "counterexample", cand, j
            out.detail = f"a linear region's minimum (class {j})"
            return []
    return left_classes


def verify_point(
    net: Network,
    x: Tensor,
    y: Tensor | int,
    *,
    threat: Threat,
    time_limit: float = 60.0,
    formulation: str = DEFAULT_FORMULATION,
    lower: Tensor | np.ndarray | None = None,
    skip_proven: bool = True,
    rtol: float = ROUNDOFF_RTOL,
) -> MilpOutcome:
    """Decide one point ``x`` (1, ...) of label ``y`` exactly (see the module's docstring) within
    ``time_limit`` seconds, everything included. ``lower`` (K,): sound lower bounds on the margins
    the caller knows (α-CROWN's), used with CROWN's to skip the classes they prove
    (``skip_proven=False``: the solver decides every class) and to order the rest."""
    t0 = time.perf_counter()
    if formulation not in FORMULATIONS:
        raise ConfigError(f"expected one of {', '.join(FORMULATIONS)}, got {formulation!r}", option="formulation")
    y = int(y)
    prep = prepare(net, x, y, threat, rtol)
    if lower is not None:
        given = torch.as_tensor(lower).detach().to("cpu", torch.float64).reshape(-1).numpy()
        prep.crown = np.maximum(prep.crown, given)
    known = prep.crown
    known[y] = np.inf
    classes = [
        int(j) for j in np.argsort(known, kind="stable") if j != y and (known[j] <= VERIFY_MARGIN or not skip_proven)
    ]
    out = MilpOutcome("verified", 0.0, detail="every margin's bound > 1e-4")
    if classes:
        enc = encode(net, *prep.box, prep.bounds)
        out.binaries = int(enc.program.integrality.sum())
        task = _Task(net, x, y, threat, enc, t0 + time_limit)
        open_classes = _screen(task, classes, out)
        if open_classes:
            out = (_per_class if formulation == "per-class" else _disjunctive)(task, open_classes, out)
        elif out.status == "verified":
            out.detail = f"the LP relaxation proves classes {classes}"
    out.seconds = time.perf_counter() - t0
    return out


@dataclass
class MarginMinimum:
    """The MILP's minimum of ``f_y − f_j`` over the ball: ``value`` (attained at ``argmin``, up to
    the solver's tolerances), ``lower`` (HiGHS's proven dual bound) and HiGHS's ``status``."""

    value: float
    lower: float
    argmin: np.ndarray | None
    status: int


def minimum_margin(
    net: Network, x: Tensor, y: Tensor | int, j: int, *, threat: Threat, time_limit: float = 600.0,
    gap: float = 0.0,
) -> MarginMinimum:  # fmt: skip
    """Minimise ``f_y − f_j`` over the ball exactly (relative gap ``gap``): the optimisation
    counterpart of :func:`verify_point`, for tests and studies."""
    y = int(y)
    prep = prepare(net, x, y, threat)
    enc = encode(net, *prep.box, prep.bounds)
    a, c = margin_row(enc, y, j, enc.program.size)
    res = _solve(enc, [], a, time_limit, gap=gap)
    value = float(res.fun) + c if res.fun is not None else float("nan")
    dual = res.get("mip_dual_bound")
    lower = float(dual) + c if dual is not None else float("nan")
    return MarginMinimum(value, lower, None if res.x is None else res.x[: a.shape[1]], int(res.status))


def verify(
    model: nn.Module, x: Tensor, y: Tensor, *, threat: Threat, time_limit: float = 60.0,
    formulation: str = DEFAULT_FORMULATION,
) -> list[MilpOutcome]:  # fmt: skip
    """:func:`verify_point` for every point of ``x`` (N, ...), the model read once (:func:`network`)."""
    net = network(model, x)
    return [
        verify_point(net, x[i : i + 1], y[i], threat=threat, time_limit=time_limit, formulation=formulation)
        for i in range(len(x))
    ]
