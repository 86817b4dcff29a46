"""``certify(..., method="milp")``: every point decided exactly, the cheapest way that can.

Exact verification by mixed-integer programming (MIPVerify: Tjeng, Xiao, Tedrake 2019,
https://arxiv.org/abs/1711.07356; the encoder :mod:`logitpair.bounds.milp`, the solver
:mod:`logitpair.bounds.exact`, HiGHS through ``scipy.optimize.milp``: SciPy is the optional
dependency ``logitpair[certify]``). Per point, cheap first, each step only on the points the
steps before left open (:data:`~logitpair.certification.result.DECIDERS`):

1. ``clean``: classified wrongly without attack → ``wrong_clean``;
2. ``attack``: broken by the ``fast`` suite (the evaluation protocol on the same points; option
   ``suite``) → ``counterexample``, the attack's example kept;
3. ``alpha-crown``: every margin's α-CROWN (∨ IBP) lower bound > 0 → ``verified``;
4. ``milp``: the rest go to the solver, ``time_limit`` seconds each (default 60, bounds and
   encoding included) → ``verified``, ``counterexample`` (checked by a float32 forward pass) or
   ``timeout`` (never counted robust). α-CROWN's bounds order the classes for it.

``options={"cheap": False}`` skips steps 2 and 3 (every correct point goes to the solver).
Steps 1–3 run in batches of ``batch_size``, step 4 one point at a time; with a ``state_path``
both are resumable, the solver's record in ``<state>-milp.safetensors`` saved after every point.
On the M-PGD LeNet-5 of the demo (Fashion-MNIST, ε 0.02, 1 CPU thread) the first 10 test points
left 5 for the solver after steps 1–3 (see the CHANGELOG for the timings).
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from logitpair import bounds
from logitpair.attacks.common import model_device, predict
from logitpair.bounds.exact import DEFAULT_FORMULATION, FORMULATIONS, verify_point
from logitpair.bounds.milp import network
from logitpair.certification.result import DECIDERS, MILP_STATUSES, CertifyResult, certify_fingerprint
from logitpair.errors import ConfigError
from logitpair.evaluation.cache import EvalCache, Fingerprint, run_batches
from logitpair.evaluation.protocol import run_protocol
from logitpair.evaluation.suites import get_suite
from logitpair.modes import eval_mode
from logitpair.progress import ProgressFactory
from logitpair.threat import Linf

MILP_DEFAULTS: dict[str, Any] = {
    "time_limit": 60.0,
    "formulation": DEFAULT_FORMULATION,
    "cheap": True,
    "suite": "fast",
    "seed": 0,
    "iterations": 20,
}
PENDING = -1
_CODE = {s: i for i, s in enumerate(MILP_STATUSES)}
_BY = {d: i for i, d in enumerate(DECIDERS)}


def milp_options(options: dict[str, Any]) -> dict[str, Any]:
    """The options of ``method="milp"`` with their defaults (:data:`MILP_DEFAULTS`), checked."""
    unknown = set(options) - set(MILP_DEFAULTS)
    if unknown:
        raise ConfigError(f"not an option of method 'milp' (options: {', '.join(MILP_DEFAULTS)})", option=min(unknown))
    opts = {**MILP_DEFAULTS, **options}
    if not float(opts["time_limit"]) > 0:
        raise ConfigError(f"expected > 0 seconds, got {opts['time_limit']}", option="time_limit")
    if opts["formulation"] not in FORMULATIONS:
        raise ConfigError(
            f"expected one of {', '.join(FORMULATIONS)}, got {opts['formulation']!r}", option="formulation"
        )
    get_suite(opts["suite"])
    return opts


def _fresh(x: Tensor, num_classes: int) -> dict[str, Tensor]:
    n = len(x)
    return {
        "clean": torch.zeros(n, dtype=torch.bool),
        "code": torch.full((n,), PENDING, dtype=torch.int8),
        "by": torch.full((n,), PENDING, dtype=torch.int8),
        "margin": torch.full((n,), float("nan"), dtype=torch.float64),
        "lower": torch.full((n, num_classes), float("nan"), dtype=torch.float64),
        "seconds": torch.zeros(n, dtype=torch.float64),
        "adv": x.detach().cpu().clone(),
    }


def _decide(st: dict[str, Tensor], at: Tensor, status: str, by: str) -> None:
    st["code"][at] = _CODE[status]
    st["by"][at] = _BY[by]


def _attacks(model: nn.Module, xb: Tensor, yb: Tensor, idx: Tensor, threat: Linf, opts: dict[str, Any], b: int
             ) -> tuple[Tensor, Tensor]:  # fmt: skip
    """The points of ``idx`` (correct clean) the suite breaks, and their adversarial examples."""
    res = run_protocol(model, xb[idx], yb[idx], get_suite(opts["suite"]), threat=threat, batch_size=len(idx),
                       seed=int(opts["seed"]) + 7919 * b, keep_adversarial=True)  # fmt: skip
    broken = ~res.robust.to(idx.device)
    assert res.adversarial is not None
    return idx[broken], res.adversarial[broken.cpu()]


def _alpha(model: nn.Module, xb: Tensor, yb: Tensor, threat: Linf, iterations: int) -> Tensor:
    """α-CROWN's margin bounds, each at least IBP's (both sound), (n, K)."""
    with eval_mode(model), torch.no_grad():
        lower = bounds.margin_bounds(model, xb, yb, threat=threat, method="alpha-crown", iterations=iterations)
        return torch.maximum(lower, bounds.margin_bounds(model, xb, yb, threat=threat, method="ibp"))


def _cheap_batch(model: nn.Module, x: Tensor, y: Tensor, sl: slice, b: int, threat: Linf, opts: dict[str, Any],
                 st: dict[str, Tensor]) -> None:  # fmt: skip
    """Steps 1–3 on one batch: wrong clean, broken by the attacks, certified by α-CROWN."""
    device = model_device(model)
    xb, yb = x[sl].to(device), y[sl].to(device)
    at = torch.arange(sl.start, sl.stop)
    correct = (predict(model, xb).argmax(1) == yb).cpu()
    st["clean"][sl] = correct
    _decide(st, at[~correct], "wrong_clean", "clean")
    if not opts["cheap"]:
        return
    idx = correct.nonzero().flatten().to(device)
    if len(idx):
        broken, adv = _attacks(model, xb, yb, idx, threat, opts, b)
        _decide(st, at[broken.cpu()], "counterexample", "attack")
        st["adv"][at[broken.cpu()]] = adv.to(st["adv"].dtype)
        left = idx[~torch.isin(idx, broken)]
        if len(left):
            lower = _alpha(model, xb[left], yb[left], threat, int(opts["iterations"])).to("cpu", torch.float64)
            rows = at[left.cpu()]
            st["lower"][rows] = lower
            st["margin"][rows] = lower.min(1).values
            _decide(st, rows[(lower > 0).all(1)], "verified", "alpha-crown")


def _milp_state_path(state_path: str | Path | None) -> Path | None:
    if state_path is None:
        return None
    path = Path(state_path)
    return path.with_name(f"{path.stem}-milp{path.suffix or '.safetensors'}")


def _solve_pending(model: nn.Module, x: Tensor, y: Tensor, threat: Linf, opts: dict[str, Any], st: dict[str, Tensor],
                   cache: EvalCache, bar: Any) -> dict[str, Tensor]:  # fmt: skip
    """Step 4: the solver on every point still open, one at a time, resumable per point."""
    pending = (st["code"] == PENDING).nonzero().flatten()
    m = len(pending)
    fresh = {"code": torch.zeros(m, dtype=torch.int8), "seconds": torch.zeros(m, dtype=torch.float64),
             "adv": x[pending].detach().cpu().clone()}  # fmt: skip
    net = None
    device = model_device(model)

    def step(b: int, start: int, stop: int, ms: dict[str, Tensor]) -> None:
        nonlocal net
        i = int(pending[start])
        xi = x[i : i + 1].to(device)
        net = net or network(model, xi)
        lower = st["lower"][i]
        with eval_mode(model):
            out = verify_point(net, xi, int(y[i]), threat=threat, time_limit=float(opts["time_limit"]),
                               formulation=opts["formulation"], lower=None if lower.isnan().any() else lower)  # fmt: skip
        ms["code"][start] = _CODE[out.status]
        ms["seconds"][start] = out.seconds
        if out.counterexample is not None:
            ms["adv"][start] = out.counterexample[0].detach().cpu().to(ms["adv"].dtype)

    return run_batches(m, 1, cache, fresh=lambda: fresh, step=step, bar=bar)


def certify_milp(
    model: nn.Module,
    x: Tensor,
    y: Tensor,
    *,
    threat: Linf,
    options: dict[str, Any],
    batch_size: int,
    state_path: str | Path | None,
    progress: ProgressFactory,
    desc: str,
) -> CertifyResult:
    """``certify(..., method="milp")`` (see the module's docstring): every point ``wrong_clean``,
    ``verified``, ``counterexample`` or ``timeout``, with who decided it and the solver's seconds."""
    opts = milp_options(options)
    device = model_device(model)
    settings = {"options": opts, "batch_size": batch_size, "device": str(device)}
    fp = certify_fingerprint(model, x, y, threat, "milp", settings)
    num_classes = int(predict(model, x[:1].to(device)).shape[1])

    def step(b: int, start: int, stop: int, st: dict[str, Tensor]) -> None:
        t0 = time.perf_counter()
        _cheap_batch(model, x, y, slice(start, stop), b, threat, opts, st)
        st["seconds"][start:stop] = (time.perf_counter() - t0) / (stop - start)

    bar = progress(len(x), desc)
    st = run_batches(len(x), batch_size, EvalCache(Path(state_path) if state_path else None, fp),
                     fresh=lambda: _fresh(x, num_classes), step=step, bar=bar)  # fmt: skip
    bar.close()
    pending = (st["code"] == PENDING).nonzero().flatten()
    fp2 = Fingerprint("certify-milp").text(fp).tensors(pending, st["lower"][pending]).hexdigest()
    bar = progress(len(pending), f"{desc} (milp)")
    ms = _solve_pending(model, x, y, threat, opts, st, EvalCache(_milp_state_path(state_path), fp2), bar)
    bar.close()
    return _result(st, ms, pending, threat, opts)


def _result(st: dict[str, Tensor], ms: dict[str, Tensor], pending: Tensor, threat: Linf, opts: dict[str, Any]
            ) -> CertifyResult:  # fmt: skip
    code, by = st["code"].clone(), st["by"].clone()
    code[pending], by[pending] = ms["code"], _BY["milp"]
    milp_seconds = torch.full((len(code),), float("nan"), dtype=torch.float64)
    milp_seconds[pending] = ms["seconds"]
    adv = st["adv"].clone()
    adv[pending] = ms["adv"]
    return CertifyResult(
        clean_correct=st["clean"], certified=code == _CODE["verified"], margin=st["margin"],
        seconds=st["seconds"] + milp_seconds.nan_to_num(0.0), threat=threat, method="milp", options=opts,
        outcome=code, decided_by=by, milp_seconds=milp_seconds, adversarial=adv,
    )  # fmt: skip
