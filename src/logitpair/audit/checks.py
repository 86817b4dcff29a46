"""Gradient-masking audit: named checks on a model's *behaviour* (never its method name).

The checks are those of Carlini et al. 2019, *On Evaluating Adversarial Robustness*
(https://arxiv.org/abs/1902.06705, Section 5 checklist) and Athalye et al. 2018,
*Obfuscated Gradients Give a False Sense of Security* (https://arxiv.org/abs/1802.00420),
written as flags with one documented section each, as AutoAttack's ``checks.py`` and
``flags_doc.md``. :data:`CHECK_DOCS` (in :mod:`logitpair.audit.docs`) holds the sections;
:data:`TOLERANCE_DOC` the rule every "must not rise" comparison uses. The Markdown report and
the plots are made by :mod:`logitpair.audit.report`.

A check is ``passed=True`` (pass), ``False`` (fail) or ``None`` (skipped: it could not
run, e.g. no source model for the transfer check). Skipped is never counted as passed,
and the verdict is ``"suspect"`` exactly when some check failed. L-infinity threat model,
inputs in the threat's bounds (default [0, 1]) of shape (N, C, H, W), labels (N,).

Example::

    report = audit(model, x, y, threat=Linf(0.1), quick=True)
    print(report.verdict, report.reasons)
    audit_run("runs/lsq", quick=True)          # writes audit.json, audit.md and plots (audit.run)

Budget: attacks shared by several checks run once (the PGD-20 run serves the steps, restarts
and eps series). The full audit (standard suite, 500 points by default in :func:`audit_run`)
takes 5-10 minutes for a LeNet-5 on Fashion-MNIST on one CPU core, most of it Square's
5,000 queries; ``quick`` (quick suite, 200 points) about one minute.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from contextlib import ExitStack
from dataclasses import asdict, dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from logitpair.attacks.common import model_device
from logitpair.audit.docs import CHECK_NAMES
from logitpair.errors import ConfigError
from logitpair.evaluation.protocol import run_protocol
from logitpair.evaluation.spec import AttackSpec, pgd_spec
from logitpair.metrics import summarize
from logitpair.modes import attack_context, eval_mode
from logitpair.progress import ProgressFactory, null_progress
from logitpair.threat import Linf


# --------------------------------------------------------------------------- results
@dataclass
class Check:
    """One named check: ``passed`` True (pass), False (fail) or None (skipped: could not run)."""

    name: str
    passed: bool | None
    detail: str
    data: dict[str, Any] = field(default_factory=dict)

    @property
    def status(self) -> str:
        return {True: "pass", False: "FAIL", None: "skipped"}[self.passed]

    def to_dict(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "passed": self.passed,
            "status": self.status,
            "detail": self.detail,
            "data": self.data,
        }


@dataclass
class AuditReport:
    """The verdict, every check, and the curves and loss surfaces behind the plots."""

    verdict: str  # "pass" | "suspect"
    checks: list[Check]
    reasons: list[str]
    settings: dict[str, Any]
    summary: dict[str, Any]
    curves: dict[str, list[dict[str, Any]]]  # "eps", "steps", "restarts": rows with value/n/ci95
    surfaces: list[dict[str, Any]]  # per point: index, label, ticks (offsets), loss[grad sign][random sign]
    seconds: float

    def check(self, name: str) -> Check:
        for c in self.checks:
            if c.name == name:
                return c
        raise KeyError(name)

    def to_dict(self) -> dict[str, Any]:
        return {
            "verdict": self.verdict,
            "reasons": list(self.reasons),
            "checks": [c.to_dict() for c in self.checks],
            "summary": self.summary,
            "settings": self.settings,
            "curves": self.curves,
            "surfaces": self.surfaces,
            "seconds": self.seconds,
        }


# --------------------------------------------------------------------------- settings
@dataclass(frozen=True)
class AuditSettings:
    """Budgets and thresholds. :meth:`preset` gives the full and the ``quick`` audit."""

    suite: str | tuple[AttackSpec, ...] = "standard"  # strong suite for baseline_gap / square
    baseline: AttackSpec = field(default_factory=lambda: pgd_spec(40, 2))
    transfer: AttackSpec = field(default_factory=lambda: pgd_spec(40, 2, transfer=True))
    eps_factors: tuple[float, ...] = (0.25, 0.5, 0.75, 1.0, 1.5, 2.0, 3.0)
    sweep_steps: int = 20  # PGD steps of the eps sweep
    large_eps: float = 0.5  # fraction of the input range
    steps_series: tuple[int, ...] = (5, 10, 20, 40, 100, 200)
    restarts_series: tuple[int, ...] = (1, 2, 4, 8)
    restarts_steps: int = 20
    noise_samples: int = 20
    min_rise: float = 0.01  # the 1-point floor of the tolerance
    large_eps_max_acc: float = 0.02
    gap_max: float = 0.10
    zero_grad_max: float = 0.05
    logit_rtol: float = 1e-4
    surface_points: int = 4
    surface_grid: int = 21
    surface_range: float = 2.0  # in units of eps
    batch_size: int = 500

    @classmethod
    def preset(cls, quick: bool) -> AuditSettings:
        if not quick:
            return cls()
        return cls(
            suite="quick",
            eps_factors=(0.5, 1.0, 1.5, 2.0, 3.0),
            sweep_steps=10,
            steps_series=(5, 10, 20, 50),
            restarts_series=(1, 2, 4),
            restarts_steps=10,
            noise_samples=10,
        )

    def suite_specs(self) -> list[AttackSpec]:
        from logitpair.evaluation.suites import get_suite

        specs = get_suite(self.suite) if isinstance(self.suite, str) else list(self.suite)
        # gradient-free attacks last, so "broken only by Square" is well defined
        return [a for a in specs if a.name not in GRADIENT_FREE] + [a for a in specs if a.name in GRADIENT_FREE]

    def to_dict(self) -> dict[str, Any]:
        out = asdict(self)
        out["suite"] = self.suite if isinstance(self.suite, str) else [a.to_dict() for a in self.suite]
        out["baseline"] = self.baseline.to_dict()
        out["transfer"] = self.transfer.to_dict()
        return out


GRADIENT_FREE = frozenset({"square", "noise"})


class AttackCrashed(RuntimeError):
    """An attack raised on this model (e.g. NaN gradients pushed it out of the threat model)."""


# --------------------------------------------------------------------------- statistics
def paired_rise(ref: Tensor, new: Tensor, floor: float = 0.01) -> dict[str, Any]:
    """How much accuracy ``new`` exceeds accuracy ``ref`` (same points), and whether that
    exceeds the tolerance ``max(floor, 2 * sqrt(b + c) / n)`` (see :data:`TOLERANCE_DOC`)."""
    n = len(ref)
    b = int((new & ~ref).sum())
    c = int((ref & ~new).sum())
    rise = (b - c) / n if n else 0.0
    tol = max(floor, 2.0 * math.sqrt(b + c) / n) if n else floor
    return {"rise": rise, "tolerance": tol, "exceeded": rise > tol, "only_new": b, "only_ref": c, "n": n}


def _acc(flags: Tensor) -> float:
    return float(flags.float().mean()) if len(flags) else float("nan")


def _pct(v: float) -> str:
    return f"{100 * v:.1f}%"


def _worst_pair(series: list[tuple[float, Tensor]], floor: float) -> tuple[dict[str, Any], Any, Any]:
    """Largest paired rise over all pairs (smaller key, larger key) of a series."""
    worst: dict[str, Any] = {"rise": 0.0, "tolerance": floor, "exceeded": False, "only_new": 0, "only_ref": 0}
    pair: tuple[Any, Any] = (None, None)
    first = True
    for i, (ki, fi) in enumerate(series):
        for kj, fj in series[i + 1 :]:
            r = paired_rise(fi, fj, floor)
            if first or (r["exceeded"], r["rise"]) > (worst["exceeded"], worst["rise"]):
                worst, pair, first = r, (ki, kj), False
    return worst, pair[0], pair[1]


# --------------------------------------------------------------------------- the audit
class _Runner:
    """Runs and caches the attacks the checks share (crashes are cached too) and collects curves."""

    def __init__(
        self,
        model: nn.Module,
        x: Tensor,
        y: Tensor,
        threat: Linf,
        source: nn.Module | None,
        seed: int,
        s: AuditSettings,
        progress: ProgressFactory,
    ) -> None:
        self.model, self.x, self.y, self.threat, self.source = model, x, y, threat, source
        self.seed, self.s, self.progress = seed, s, progress
        self.cache: dict[Any, Any] = {}
        self.timings: dict[str, float] = {}
        self.curves: dict[str, list[dict[str, Any]]] = {"eps": [], "steps": [], "restarts": []}

    def protocol(self, key: Any, attacks: list[AttackSpec], desc: str, eps: float | None = None) -> Any:
        if key not in self.cache:
            t0 = time.perf_counter()
            threat = self.threat if eps is None else Linf(eps, self.threat.bounds)
            try:
                self.cache[key] = run_protocol(
                    self.model,
                    self.x,
                    self.y,
                    attacks,
                    threat=threat,
                    source=self.source,
                    seed=self.seed,
                    batch_size=self.s.batch_size,
                    progress=self.progress,
                    desc=desc,
                )
            except (RuntimeError, FloatingPointError) as exc:  # e.g. NaN gradients left the eps-ball
                self.cache[key] = AttackCrashed(f"{desc}: {exc}")
            self.timings[desc] = self.timings.get(desc, 0.0) + time.perf_counter() - t0
        if isinstance(self.cache[key], AttackCrashed):
            raise self.cache[key]
        return self.cache[key]

    def pgd(self, eps: float, steps: int, restarts: int = 1) -> Tensor:
        """Robust flags under PGD-steps x restarts (default step size, same seed: common random starts)."""
        spec = AttackSpec("pgd", {"steps": steps, "restarts": restarts}, f"PGD-{steps}x{restarts}")
        key = ("pgd", round(eps, 12), steps, restarts)
        return self.protocol(key, [spec], f"audit: PGD-{steps}x{restarts} eps={eps:g}", eps).robust

    def clean(self) -> Tensor:
        return self.protocol("clean", [], "audit: clean").clean_correct

    def main(self) -> Any:
        return self.protocol("main", [self.s.baseline, *self.s.suite_specs()], "audit: PGD-40 + suite")

    def baseline(self) -> Tensor:
        res = self.main()
        return res.clean_correct & (res.broken_by != 0)

    def white_box(self) -> Tensor:
        """Robust under every white-box gradient attack run so far at the model's eps."""
        res = self.main()
        robust = res.clean_correct.clone()
        for i, a in enumerate(res.attacks):
            if a.name not in GRADIENT_FREE:
                robust &= res.broken_by != i
        for key, val in self.cache.items():
            if isinstance(key, tuple) and key[:2] == ("pgd", round(self.threat.eps, 12)) and not _crashed(val):
                robust &= val.robust
        return robust

    def large_eps(self) -> float:
        lo, hi = self.threat.bounds
        large = self.s.large_eps * (hi - lo)
        return large if large > self.threat.eps else hi - lo


def _crashed(val: Any) -> bool:
    return isinstance(val, AttackCrashed)


def _rise_check(
    name: str,
    r: _Runner,
    key: str,
    values: list[float],
    run: Callable[[float], Tensor],
    what: str,
    fmt: Callable[[float], str],
) -> Check:
    """Fail when accuracy rises from a smaller to a larger value of ``key`` beyond the tolerance."""
    series = [(v, run(v)) for v in sorted(set(values))]
    r.curves[key] += [{key: v, **summarize(f)} for v, f in series]
    accs = ", ".join(f"{fmt(v)}: {_pct(_acc(f))}" for v, f in series)
    worst, v1, v2 = _worst_pair(series, r.s.min_rise)
    data = {"accuracy": {fmt(v): _acc(f) for v, f in series}, "worst_pair": [v1, v2], **worst}
    if len(series) < 2:
        return Check(name, None, f"needs at least two values to compare ({what})", data)
    if worst["exceeded"]:
        return Check(
            name,
            False,
            f"accuracy rises from {fmt(v1)} to {fmt(v2)} by {100 * worst['rise']:.1f} points "
            f"(tolerance {100 * worst['tolerance']:.1f}); accuracy at {accs}",
            data,
        )
    drop = _acc(series[0][1]) - _acc(series[-1][1])
    return Check(
        name,
        True,
        f"no rise beyond the tolerance with {what} ({accs}; {100 * drop:.1f} points lower at "
        f"{fmt(series[-1][0])} than at {fmt(series[0][0])})",
        data,
    )


def _check_eps(r: _Runner) -> Check:
    s, eps = r.s, r.threat.eps
    grid = [0.0, *(round(f * eps, 12) for f in s.eps_factors if f > 0), r.large_eps()]
    return _rise_check(
        "eps_monotone",
        r,
        "eps",
        grid,
        lambda e: r.clean() if e == 0 else r.pgd(e, s.sweep_steps),
        f"a larger eps (PGD-{s.sweep_steps})",
        lambda e: f"eps {e:g}",
    )


def _check_steps(r: _Runner) -> Check:
    return _rise_check(
        "more_steps_no_better",
        r,
        "steps",
        list(r.s.steps_series),
        lambda k: r.pgd(r.threat.eps, int(k)),
        "more PGD steps",
        lambda k: f"{int(k)} steps",
    )


def _check_restarts(r: _Runner) -> Check:
    s = r.s
    return _rise_check(
        "more_restarts_no_better",
        r,
        "restarts",
        list(s.restarts_series),
        lambda k: r.pgd(r.threat.eps, s.restarts_steps, int(k)),
        f"more restarts (PGD-{s.restarts_steps})",
        lambda k: f"{int(k)} restart" + ("s" if k != 1 else ""),
    )


def _check_large_eps(r: _Runner) -> Check:
    large, s = r.large_eps(), r.s
    acc = _acc(r.pgd(large, s.sweep_steps))
    ok = acc <= s.large_eps_max_acc
    verb = "is" if ok else f"stays above {_pct(s.large_eps_max_acc)}:"
    return Check(
        "large_eps_zero",
        ok,
        f"accuracy under PGD-{s.sweep_steps} at eps {large:g} {verb} {_pct(acc)}",
        {"eps": large, "accuracy": acc, "max_accuracy": s.large_eps_max_acc},
    )


def _extra_check(
    name: str,
    label: str,
    ref_label: str,
    ref: Tensor,
    attack_robust: Tensor,
    floor: float,
    standalone: bool = True,
) -> Check:
    """Fail when ``label`` breaks more of the points the reference attacks left robust than allowed.

    ``attack_robust``: per point, not broken by the attack (run alone, or after the reference
    attacks when ``standalone`` is False)."""
    both = ref & attack_robust
    r = paired_rise(both, ref, floor)
    k = r["only_new"]
    data = {"extra_broken": k, "reference_accuracy": _acc(ref), "combined_accuracy": _acc(both), **r}
    msg = (
        f"{label} breaks {k} of {len(ref)} points ({_pct(k / max(len(ref), 1))}) that {ref_label} left robust "
        f"(tolerance {_pct(r['tolerance'])}); {ref_label}: {_pct(_acc(ref))}, with {label}: {_pct(_acc(both))}"
    )
    if standalone:
        data["attack_accuracy"] = _acc(attack_robust)
        msg += f", {label} alone: {_pct(_acc(attack_robust))}"
    return Check(name, not r["exceeded"], msg, data)


def _check_fgsm(r: _Runner) -> Check:
    fg = r.protocol("fgsm", [AttackSpec("fgsm", {}, "FGSM")], "audit: FGSM").robust
    return _extra_check("fgsm_not_stronger", "FGSM", r.s.baseline.label, r.baseline(), fg, r.s.min_rise)


def _check_noise(r: _Runner) -> Check:
    spec = AttackSpec("noise", {"samples": r.s.noise_samples}, f"random noise ({r.s.noise_samples} corners)")
    nz = r.protocol("noise", [spec], "audit: noise").robust
    return _extra_check("noise_not_stronger", spec.label, "the gradient attacks", r.white_box(), nz, r.s.min_rise)


def _check_transfer(r: _Runner) -> Check:
    if r.source is None:
        return Check("transfer_not_stronger", None, "no source model given (--source): transfer not tested")
    tr = r.protocol("transfer", [r.s.transfer], "audit: transfer").robust
    return _extra_check(
        "transfer_not_stronger",
        f"{r.s.transfer.label} from the source",
        "the gradient attacks",
        r.white_box(),
        tr,
        r.s.min_rise,
    )


def _check_square(r: _Runner) -> Check:
    res = r.main()
    idx = [i for i, a in enumerate(res.attacks) if a.name == "square"]
    if not idx:
        return Check("square_not_stronger", None, "the suite has no Square attack")
    by_square = torch.zeros_like(res.robust)
    for i in idx:
        by_square |= res.broken_by == i
    return _extra_check(
        "square_not_stronger",
        res.attacks[idx[0]].label,
        "the gradient attacks",
        r.white_box(),
        ~by_square,
        r.s.min_rise,
        standalone=False,
    )


def _check_gap(r: _Runner) -> Check:
    res, base, s = r.main(), r.baseline(), r.s
    gap = _acc(base) - _acc(res.robust)
    broken = {a.label: int((res.broken_by == i).sum()) for i, a in enumerate(res.attacks)}
    data = {
        "baseline": summarize(base),
        "worst_case": summarize(res.robust),
        "gap": gap,
        "max_gap": s.gap_max,
        "broken_by": broken,
    }
    text = (
        f"{res.attacks[0].label} {_pct(_acc(base))} vs worst case with the suite {_pct(_acc(res.robust))}: "
        f"gap {100 * gap:.1f} points (limit {100 * s.gap_max:.0f}); points broken first by {broken}"
    )
    return Check("baseline_gap", gap <= s.gap_max, text, data)


def _check_deterministic(r: _Runner) -> Check:
    model, xb = r.model, r.x[:256].to(model_device(r.model))
    k = min(8, len(xb))
    with torch.no_grad():
        z1, z2 = model(xb).nan_to_num(), model(xb).nan_to_num()
        single = torch.cat([model(xb[i : i + 1]) for i in range(k)]).nan_to_num()
    tol = r.s.logit_rtol * (1.0 + float(z1.abs().max()))
    twice, alone = float((z1 - z2).abs().max()), float((z1[:k] - single).abs().max())
    data = {"max_diff_repeat": twice, "max_diff_batch_vs_single": alone, "tolerance": tol, "points": len(xb)}
    if twice > tol:
        return Check(
            "deterministic_forward",
            False,
            f"the same batch gives different logits twice (max diff "
            f"{twice:.3g}, tolerance {tol:.3g}): randomised model, needs EOT",
            data,
        )
    if alone > tol:
        return Check(
            "deterministic_forward",
            False,
            f"logits depend on the rest of the batch (max diff {alone:.3g}, "
            f"tolerance {tol:.3g}): batch-dependent model",
            data,
        )
    return Check(
        "deterministic_forward",
        True,
        f"repeated and single-example forwards agree (max diff {max(twice, alone):.2g}, tolerance {tol:.2g})",
        data,
    )


def _input_grads(model: nn.Module, x: Tensor, y: Tensor, batch: int) -> tuple[Tensor, Tensor]:
    """Logits and d CE / d x, in batches (eval mode, frozen parameters), computed on the model's
    device and returned on ``x``'s."""
    logits, grads = [], []
    dev = model_device(model)
    with attack_context(model):
        for i in range(0, len(x), batch):
            xb = x[i : i + batch].to(dev).detach().requires_grad_(True)
            z = model(xb)
            (g,) = torch.autograd.grad(F.cross_entropy(z, y[i : i + batch].to(dev), reduction="sum"), xb)
            logits.append(z.detach().to(x.device))
            grads.append(g.detach().to(x.device))
    return torch.cat(logits), torch.cat(grads)


def _logit_scale(z: Tensor, y: Tensor) -> dict[str, float]:
    """Median logit norm, median / max top-1 margin and softmax saturation over correct points."""
    z, y = z[torch.isfinite(z).all(1)], y[torch.isfinite(z).all(1)]
    correct = z.argmax(1) == y
    top2 = z.topk(min(2, z.shape[1]), dim=1).values
    margin = (top2[:, 0] - top2[:, -1])[correct]
    ce = F.cross_entropy(z, y, reduction="none")[correct]
    nan = float("nan")
    return {
        "median_logit_norm": float(z.norm(dim=1).median()) if len(z) else nan,
        "median_margin": float(margin.median()) if len(margin) else nan,
        "max_margin": float(margin.max()) if len(margin) else nan,
        "saturated_share": _acc(ce == 0) if len(ce) else 0.0,  # softmax exactly 1.0 in float32
    }


def _check_gradients(r: _Runner) -> Check:
    gen = torch.Generator(device=r.x.device).manual_seed(r.seed)
    stats: dict[str, Any] = {"zero_grad_max": r.s.zero_grad_max}
    bad, shares = [], []
    for where, pts in (("clean", r.x), ("random", r.threat.random_init(r.x, gen))):
        z, g = _input_grads(r.model, pts, r.y, r.s.batch_size)
        nonfinite = ~(torch.isfinite(g.flatten(1)).all(1) & torch.isfinite(z).all(1))
        zero = (g.flatten(1) == 0).all(1) & ~nonfinite
        stats[where] = {"zero_share": _acc(zero), "nonfinite_share": _acc(nonfinite)}
        shares.append(f"{where} {_pct(_acc(zero))}")
        if _acc(zero) >= r.s.zero_grad_max:
            bad.append(f"{_pct(_acc(zero))} of the {where} points have an all-zero input gradient")
        if nonfinite.any():
            bad.append(f"{int(nonfinite.sum())} {where} points have non-finite logits or gradients")
        if where == "clean":
            stats.update(_logit_scale(z, r.y))
    scale = (
        f"median logit norm {stats['median_logit_norm']:.3g}, median margin {stats['median_margin']:.3g}, "
        f"max margin {stats['max_margin']:.3g}, softmax saturated (CE = 0) for "
        f"{_pct(stats['saturated_share'])} of the correct points"
    )
    if bad:
        return Check("gradient_health", False, "; ".join(bad) + f" ({scale})", stats)
    return Check("gradient_health", True, f"gradients finite; all-zero gradients: {', '.join(shares)} ({scale})", stats)


def _loss_surfaces(r: _Runner) -> list[dict[str, Any]]:
    """CE loss on x + a sign(grad) + b (random signs), a, b in [-R eps, R eps], for the first
    correctly classified points (the loss-surface plots of Engstrom et al. 2018, Fig. 1)."""
    s, x, y = r.s, r.x, r.y
    idx = r.clean().nonzero().flatten()[: max(s.surface_points, 0)]
    if len(idx) == 0:
        return []
    gen = torch.Generator(device=x.device).manual_seed(r.seed + 1)
    dev = model_device(r.model)
    _, grads = _input_grads(r.model, x[idx], y[idx], s.batch_size)
    span = s.surface_range * max(r.threat.eps, 1e-3)
    ticks = torch.linspace(-span, span, s.surface_grid, device=x.device, dtype=x.dtype)
    a, b = (t.reshape(-1, *[1] * (x.dim() - 1)) for t in torch.meshgrid(ticks, ticks, indexing="ij"))
    out = []
    with eval_mode(r.model), torch.no_grad():
        for j, i in enumerate(idx.tolist()):
            rand = torch.randint(0, 2, grads[j].shape, generator=gen, device=x.device).to(x.dtype) * 2 - 1
            pts = (x[i] + a * grads[j].sign() + b * rand).clamp(*r.threat.bounds)
            loss = torch.cat(
                [
                    F.cross_entropy(r.model(c.to(dev)), y[i].expand(len(c)).to(dev), reduction="none").cpu()
                    for c in pts.split(512)
                ]
            )
            out.append(
                {
                    "index": i,
                    "label": int(y[i]),
                    "ticks": ticks.tolist(),
                    "loss": loss.view(s.surface_grid, s.surface_grid).tolist(),
                }
            )
    return out


# computation order: cheap checks first, then the runs later checks reuse
_CHECKS: tuple[tuple[str, Callable[[_Runner], Check]], ...] = (
    ("deterministic_forward", _check_deterministic),
    ("gradient_health", _check_gradients),
    ("more_steps_no_better", _check_steps),
    ("more_restarts_no_better", _check_restarts),
    ("eps_monotone", _check_eps),
    ("large_eps_zero", _check_large_eps),
    ("baseline_gap", _check_gap),
    ("fgsm_not_stronger", _check_fgsm),
    ("noise_not_stronger", _check_noise),
    ("transfer_not_stronger", _check_transfer),
    ("square_not_stronger", _check_square),
)


def _run_check(name: str, fn: Callable[[_Runner], Check], r: _Runner) -> Check:
    try:
        return fn(r)
    except AttackCrashed as exc:
        return Check(
            name,
            False,
            f"an attack this check needs crashed on the model ({exc}); gradient-based results cannot be trusted",
            {"error": str(exc)},
        )


def audit(
    model: nn.Module,
    x: Tensor,
    y: Tensor,
    *,
    threat: Linf,
    source: nn.Module | None = None,
    quick: bool = False,
    seed: int = 0,
    progress: ProgressFactory = null_progress,
    settings: AuditSettings | None = None,
) -> AuditReport:
    """Run every check of :data:`CHECK_NAMES` on ``model`` at ``threat`` (L-infinity).

    ``x``: (N, C, H, W) images in the threat's bounds; ``y``: (N,) labels. ``source``: an
    independently trained model for the transfer check (skipped without one). ``quick``:
    the quick suite and shorter series (:meth:`AuditSettings.preset`); ``settings``
    overrides both. Attacks shared by several checks run once; randomness is seeded by
    ``seed``. The model (and source) run in eval mode; their modes are restored.

    Example::

        rep = audit(model, x[:200], y[:200], threat=Linf(0.1), quick=True)
        assert rep.verdict in ("pass", "suspect")
    """
    s = settings if settings is not None else AuditSettings.preset(quick)
    if len(x) != len(y) or len(y) == 0:
        raise ConfigError(f"audit: expected as many labels as images and at least one, got {len(x)} and {len(y)}")
    t0 = time.perf_counter()
    with ExitStack() as stack:
        for m in (model, source):
            if m is not None:
                stack.enter_context(eval_mode(m))
        if source is not None:
            with torch.no_grad():
                shapes = (
                    tuple(model(x[:1].to(model_device(model))).shape),
                    tuple(source(x[:1].to(model_device(source))).shape),
                )
            if shapes[0] != shapes[1]:
                raise ConfigError(f"audit: the source model's output {shapes[1]} differs from the model's {shapes[0]}")
        r = _Runner(model, x, y, threat, source, seed, s, progress)
        checks = {name: _run_check(name, fn, r) for name, fn in _CHECKS}
        t_surf = time.perf_counter()
        try:
            surfaces = _loss_surfaces(r)
        except RuntimeError:  # a model whose loss cannot be differentiated at all: no plot
            surfaces = []
        r.timings["audit: loss surfaces"] = time.perf_counter() - t_surf
    ordered = [checks[name] for name in CHECK_NAMES]
    reasons = [f"{c.name}: {c.detail}" for c in ordered if c.passed is False]
    attacks = [
        s.baseline,
        *s.suite_specs(),
        AttackSpec("fgsm", {}, "FGSM"),
        AttackSpec("noise", {"samples": s.noise_samples}),
    ]
    settings_doc = {
        "n": len(y),
        "eps": threat.eps,
        "bounds": list(threat.bounds),
        "seed": seed,
        "quick": quick,
        "source": source is not None,
        **s.to_dict(),
        "attacks": [a.to_dict() for a in attacks],
        "timings": r.timings,
    }
    return AuditReport(
        verdict="suspect" if reasons else "pass",
        checks=ordered,
        reasons=reasons,
        settings=settings_doc,
        summary=_summary(r),
        curves=r.curves,
        surfaces=surfaces,
        seconds=time.perf_counter() - t0,
    )


def _summary(r: _Runner) -> dict[str, Any]:
    """Clean, baseline and worst-case accuracy at the model's eps over every attack that ran."""
    clean = r.clean()
    out: dict[str, Any] = {"clean": summarize(clean)}
    if "main" in r.cache and not _crashed(r.cache["main"]):
        out["baseline"] = summarize(r.baseline())
        out["suite_worst_case"] = summarize(r.cache["main"].robust)
    worst = clean.clone()
    for key, val in r.cache.items():
        if not _crashed(val) and key != "clean" and (not isinstance(key, tuple) or key[1] == round(r.threat.eps, 12)):
            worst &= val.robust
    out["worst_case_all"] = summarize(worst)
    return out
