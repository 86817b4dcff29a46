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
    audit_run("runs/lsq", quick=True, write=True)  # writes audit.json, audit.md and plots (audit.run)

Each check is a function ``check_<name>(inputs, runs)`` of explicit inputs
(:class:`AuditInputs`: model, points, threat, source, seed, settings) and of a keyed
:class:`~logitpair.audit.store.RunStore`, from which it requests the attack runs it needs; a
run is keyed by its attack specs, eps, seed and points, computed on its first request and
reused by every later one. No check reads what another happened to run before it, and
randomness is seeded from ``seed`` alone, so any order of the checks gives the same report
(:data:`RUN_ORDER` is the default one). :data:`CHECKS` maps every name to its function.

Budget: attacks shared by several checks run once (the PGD-20 run serves the steps, restarts
and eps series). The full audit (standard suite, 500 points by default in :func:`audit_run`)
takes 5-10 minutes for a LeNet-5 on Fashion-MNIST on one CPU core, most of it Square's
5,000 queries; ``quick`` (quick suite, 200 points) about one minute.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Sequence
from contextlib import ExitStack
from dataclasses import asdict, dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from logitpair.attacks import attack_info
from logitpair.attacks.common import model_device
from logitpair.audit.docs import CHECK_NAMES
from logitpair.audit.store import AttackCrashed, RunStore
from logitpair.errors import ConfigError
from logitpair.evaluation.protocol import ProtocolResult
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
        free = [attack_info(a.name).gradient_free for a in specs]
        return [a for a, f in zip(specs, free, strict=True) if not f] + [
            a for a, f in zip(specs, free, strict=True) if f
        ]

    def to_dict(self) -> dict[str, Any]:
        out = asdict(self)
        out["suite"] = self.suite if isinstance(self.suite, str) else [a.to_dict() for a in self.suite]
        out["baseline"] = self.baseline.to_dict()
        out["transfer"] = self.transfer.to_dict()
        return out


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


# --------------------------------------------------------------------------- inputs and shared runs
@dataclass(frozen=True, eq=False)
class AuditInputs:
    """What every check is a function of: the model, its points, the threat, the optional
    transfer source, the seed and the settings. The attack results the checks share come from a
    :class:`~logitpair.audit.store.RunStore` of the same model, points and threat."""

    model: nn.Module
    x: Tensor
    y: Tensor
    threat: Linf
    source: nn.Module | None
    seed: int
    settings: AuditSettings


PgdRun = tuple[float, int, int]  # eps the attack runs at, steps, restarts


def _pgd(a: AuditInputs, runs: RunStore, run: PgdRun) -> Tensor:
    """Robust flags under PGD-steps x restarts at eps (default step size, the audit's seed:
    runs that differ only in steps or restarts share their random starts)."""
    eps, steps, restarts = run
    spec = AttackSpec("pgd", {"steps": steps, "restarts": restarts}, f"PGD-{steps}x{restarts}")
    return runs.get([spec], eps, a.seed, f"audit: PGD-{steps}x{restarts} eps={eps:g}").robust


def _clean(a: AuditInputs, runs: RunStore) -> Tensor:
    return runs.get([], a.threat.eps, a.seed, "audit: clean").clean_correct


def _main(a: AuditInputs, runs: RunStore) -> ProtocolResult:
    """The baseline followed by the strong suite (gradient-free attacks last)."""
    s = a.settings
    return runs.get([s.baseline, *s.suite_specs()], a.threat.eps, a.seed, "audit: PGD-40 + suite")


def _fgsm(a: AuditInputs, runs: RunStore) -> Tensor:
    return runs.get([AttackSpec("fgsm", {}, "FGSM")], a.threat.eps, a.seed, "audit: FGSM").robust


def _noise_spec(s: AuditSettings) -> AttackSpec:
    return AttackSpec("noise", {"samples": s.noise_samples}, f"random noise ({s.noise_samples} corners)")


def _noise(a: AuditInputs, runs: RunStore) -> Tensor:
    return runs.get([_noise_spec(a.settings)], a.threat.eps, a.seed, "audit: noise").robust


def _transfer(a: AuditInputs, runs: RunStore) -> Tensor:
    return runs.get([a.settings.transfer], a.threat.eps, a.seed, "audit: transfer").robust


def _baseline(a: AuditInputs, runs: RunStore) -> Tensor:
    res = _main(a, runs)
    return res.clean_correct & (res.broken_by != 0)


def _large_eps(a: AuditInputs) -> float:
    """The large eps of ``large_eps_zero``: ``large_eps`` of the input range (the whole range when
    that is not above the model's eps)."""
    lo, hi = a.threat.bounds
    large = a.settings.large_eps * (hi - lo)
    return large if large > a.threat.eps else hi - lo


# --------------------------------------------------------------------------- budget series
@dataclass(frozen=True)
class _Series:
    """A series of budgets whose accuracy must not rise: its values, the PGD run of each value
    (None: clean accuracy), what grows along it and how a value is shown."""

    values: Callable[[AuditInputs], list[float]]
    run: Callable[[AuditInputs, float], PgdRun | None]
    what: Callable[[AuditSettings], str]
    fmt: Callable[[float], str]


def _eps_values(a: AuditInputs) -> list[float]:
    eps = a.threat.eps
    return [0.0, *(round(f * eps, 12) for f in a.settings.eps_factors if f > 0), _large_eps(a)]


def _sweep_run(a: AuditInputs, value: float) -> PgdRun:
    """PGD-``sweep_steps`` at ``value``: at the model's eps itself where ``value`` is that eps
    rounded (so the sweep shares that run with the steps series when it has as many steps)."""
    eps = a.threat.eps if value == round(a.threat.eps, 12) else value
    return (eps, a.settings.sweep_steps, 1)


def _eps_run(a: AuditInputs, value: float) -> PgdRun | None:
    """Clean accuracy at 0, else the sweep's PGD run."""
    return None if value == 0 else _sweep_run(a, value)


_SERIES: dict[str, _Series] = {
    "eps": _Series(
        _eps_values,
        _eps_run,
        lambda s: f"a larger eps (PGD-{s.sweep_steps})",
        lambda e: f"eps {e:g}",
    ),
    "steps": _Series(
        lambda a: list(a.settings.steps_series),
        lambda a, k: (a.threat.eps, int(k), 1),
        lambda s: "more PGD steps",
        lambda k: f"{int(k)} steps",
    ),
    "restarts": _Series(
        lambda a: list(a.settings.restarts_series),
        lambda a, k: (a.threat.eps, a.settings.restarts_steps, int(k)),
        lambda s: f"more restarts (PGD-{s.restarts_steps})",
        lambda k: f"{int(k)} restart" + ("s" if k != 1 else ""),
    ),
}


def _flags(a: AuditInputs, runs: RunStore, run: PgdRun | None) -> Tensor:
    return _clean(a, runs) if run is None else _pgd(a, runs, run)


def _series_flags(a: AuditInputs, runs: RunStore, series: _Series) -> list[tuple[float, Tensor]]:
    """(value, robust flags) in increasing order of the value."""
    return [(v, _flags(a, runs, series.run(a, v))) for v in sorted(set(series.values(a)))]


def _pgd_at_eps(a: AuditInputs) -> list[PgdRun]:
    """The PGD runs of the series at the model's eps (steps, restarts, and the eps sweep's own)."""
    eps = round(a.threat.eps, 12)
    found = {series.run(a, v) for series in _SERIES.values() for v in series.values(a)}
    return sorted(r for r in found if r is not None and round(r[0], 12) == eps)


def _unless_crashed(get: Callable[[], Tensor]) -> Tensor | None:
    try:
        return get()
    except AttackCrashed:
        return None


def _white_box(a: AuditInputs, runs: RunStore) -> Tensor:
    """Robust under every white-box gradient attack of the audit at the model's eps: the
    baseline, the suite's gradient attacks and the series' PGD runs at that eps (a PGD run that
    crashed is left out; a crashed baseline + suite raises :class:`AttackCrashed`)."""
    res = _main(a, runs)
    robust = res.clean_correct.clone()
    for i, spec in enumerate(res.attacks):
        if not attack_info(spec.name).gradient_free:
            robust &= res.broken_by != i
    for run in _pgd_at_eps(a):
        flags = _unless_crashed(lambda run=run: _pgd(a, runs, run))
        if flags is not None:
            robust &= flags
    return robust


# --------------------------------------------------------------------------- the checks
def _rise_check(name: str, a: AuditInputs, runs: RunStore, series: _Series) -> Check:
    """Fail when accuracy rises from a smaller to a larger value of the series beyond the tolerance."""
    flags, fmt, what = _series_flags(a, runs, series), series.fmt, series.what(a.settings)
    accs = ", ".join(f"{fmt(v)}: {_pct(_acc(f))}" for v, f in flags)
    worst, v1, v2 = _worst_pair(flags, a.settings.min_rise)
    data = {"accuracy": {fmt(v): _acc(f) for v, f in flags}, "worst_pair": [v1, v2], **worst}
    if len(flags) < 2:
        return Check(name, None, f"needs at least two values to compare ({what})", data)
    if worst["exceeded"]:
        return Check(
            name,
            False,
            f"accuracy rises from {fmt(v1)} to {fmt(v2)} by {100 * worst['rise']:.1f} points "
            f"(tolerance {100 * worst['tolerance']:.1f}); accuracy at {accs}",
            data,
        )
    drop = _acc(flags[0][1]) - _acc(flags[-1][1])
    return Check(
        name,
        True,
        f"no rise beyond the tolerance with {what} ({accs}; {100 * drop:.1f} points lower at "
        f"{fmt(flags[-1][0])} than at {fmt(flags[0][0])})",
        data,
    )


def check_eps_monotone(a: AuditInputs, runs: RunStore) -> Check:
    """Accuracy must not rise with eps (clean at 0, PGD sweep, the large eps)."""
    return _rise_check("eps_monotone", a, runs, _SERIES["eps"])


def check_more_steps_no_better(a: AuditInputs, runs: RunStore) -> Check:
    """Accuracy must not rise with the number of PGD steps."""
    return _rise_check("more_steps_no_better", a, runs, _SERIES["steps"])


def check_more_restarts_no_better(a: AuditInputs, runs: RunStore) -> Check:
    """Accuracy must not rise with the number of PGD restarts."""
    return _rise_check("more_restarts_no_better", a, runs, _SERIES["restarts"])


def check_large_eps_zero(a: AuditInputs, runs: RunStore) -> Check:
    """PGD at the large eps must leave (almost) no point correct."""
    large, s = _large_eps(a), a.settings
    acc = _acc(_pgd(a, runs, _sweep_run(a, large)))
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


def check_fgsm_not_stronger(a: AuditInputs, runs: RunStore) -> Check:
    """One-step FGSM must not break what the baseline left robust."""
    fg = _fgsm(a, runs)
    s = a.settings
    return _extra_check("fgsm_not_stronger", "FGSM", s.baseline.label, _baseline(a, runs), fg, s.min_rise)


def check_noise_not_stronger(a: AuditInputs, runs: RunStore) -> Check:
    """Random corners of the eps-ball must not break what the gradient attacks left robust."""
    nz = _noise(a, runs)
    label = _noise_spec(a.settings).label
    return _extra_check(
        "noise_not_stronger", label, "the gradient attacks", _white_box(a, runs), nz, a.settings.min_rise
    )


def check_transfer_not_stronger(a: AuditInputs, runs: RunStore) -> Check:
    """Transfer from the source model must not break what the gradient attacks left robust."""
    if a.source is None:
        return Check("transfer_not_stronger", None, "no source model given: transfer not tested")
    tr = _transfer(a, runs)
    return _extra_check(
        "transfer_not_stronger",
        f"{a.settings.transfer.label} from the source",
        "the gradient attacks",
        _white_box(a, runs),
        tr,
        a.settings.min_rise,
    )


def check_square_not_stronger(a: AuditInputs, runs: RunStore) -> Check:
    """The suite's Square must not break what the gradient attacks left robust."""
    res = _main(a, runs)
    idx = [i for i, spec in enumerate(res.attacks) if spec.name == "square"]
    if not idx:
        return Check("square_not_stronger", None, "the suite has no Square attack")
    by_square = torch.zeros_like(res.robust)
    for i in idx:
        by_square |= res.broken_by == i
    return _extra_check(
        "square_not_stronger",
        res.attacks[idx[0]].label,
        "the gradient attacks",
        _white_box(a, runs),
        ~by_square,
        a.settings.min_rise,
        standalone=False,
    )


def check_baseline_gap(a: AuditInputs, runs: RunStore) -> Check:
    """The baseline must not exceed the worst case with the strong suite by more than ``gap_max``."""
    res, base, s = _main(a, runs), _baseline(a, runs), a.settings
    gap = _acc(base) - _acc(res.robust)
    broken = {spec.label: int((res.broken_by == i).sum()) for i, spec in enumerate(res.attacks)}
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


def check_deterministic_forward(a: AuditInputs, runs: RunStore) -> Check:
    """The same input must give the same logits, twice and alone (uses no attack)."""
    model, xb = a.model, a.x[:256].to(model_device(a.model))
    k = min(8, len(xb))
    with torch.no_grad():
        z1, z2 = model(xb).nan_to_num(), model(xb).nan_to_num()
        single = torch.cat([model(xb[i : i + 1]) for i in range(k)]).nan_to_num()
    tol = a.settings.logit_rtol * (1.0 + float(z1.abs().max()))
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


def check_gradient_health(a: AuditInputs, runs: RunStore) -> Check:
    """Input gradients at the clean points and at one random point of each eps-ball (drawn from
    a generator seeded with the audit's seed) must be finite and rarely all zero (uses no attack)."""
    s = a.settings
    gen = torch.Generator(device=a.x.device).manual_seed(a.seed)
    stats: dict[str, Any] = {"zero_grad_max": s.zero_grad_max}
    bad, shares = [], []
    for where, pts in (("clean", a.x), ("random", a.threat.random_init(a.x, gen))):
        z, g = _input_grads(a.model, pts, a.y, s.batch_size)
        nonfinite = ~(torch.isfinite(g.flatten(1)).all(1) & torch.isfinite(z).all(1))
        zero = (g.flatten(1) == 0).all(1) & ~nonfinite
        stats[where] = {"zero_share": _acc(zero), "nonfinite_share": _acc(nonfinite)}
        shares.append(f"{where} {_pct(_acc(zero))}")
        if _acc(zero) >= s.zero_grad_max:
            bad.append(f"{_pct(_acc(zero))} of the {where} points have an all-zero input gradient")
        if nonfinite.any():
            bad.append(f"{int(nonfinite.sum())} {where} points have non-finite logits or gradients")
        if where == "clean":
            stats.update(_logit_scale(z, a.y))
    scale = (
        f"median logit norm {stats['median_logit_norm']:.3g}, median margin {stats['median_margin']:.3g}, "
        f"max margin {stats['max_margin']:.3g}, softmax saturated (CE = 0) for "
        f"{_pct(stats['saturated_share'])} of the correct points"
    )
    if bad:
        return Check("gradient_health", False, "; ".join(bad) + f" ({scale})", stats)
    return Check("gradient_health", True, f"gradients finite; all-zero gradients: {', '.join(shares)} ({scale})", stats)


CheckFn = Callable[[AuditInputs, RunStore], Check]

# every check by name: a function of the inputs, whose attacks come from the keyed store
CHECKS: dict[str, CheckFn] = {
    "eps_monotone": check_eps_monotone,
    "large_eps_zero": check_large_eps_zero,
    "more_steps_no_better": check_more_steps_no_better,
    "more_restarts_no_better": check_more_restarts_no_better,
    "fgsm_not_stronger": check_fgsm_not_stronger,
    "noise_not_stronger": check_noise_not_stronger,
    "transfer_not_stronger": check_transfer_not_stronger,
    "square_not_stronger": check_square_not_stronger,
    "baseline_gap": check_baseline_gap,
    "deterministic_forward": check_deterministic_forward,
    "gradient_health": check_gradient_health,
}

# the order the checks run in by default: cheap ones first, then the runs the later ones share.
# It decides when each attack runs (progress, timings), never a result: those are keyed.
RUN_ORDER: tuple[str, ...] = (
    "deterministic_forward",
    "gradient_health",
    "more_steps_no_better",
    "more_restarts_no_better",
    "eps_monotone",
    "large_eps_zero",
    "baseline_gap",
    "fgsm_not_stronger",
    "noise_not_stronger",
    "transfer_not_stronger",
    "square_not_stronger",
)


def _run_check(name: str, a: AuditInputs, runs: RunStore) -> Check:
    """Check ``name``; a failing one when an attack it needs crashed on the model."""
    try:
        return CHECKS[name](a, runs)
    except AttackCrashed as exc:
        return Check(
            name,
            False,
            f"an attack this check needs crashed on the model ({exc}); gradient-based results cannot be trusted",
            {"error": str(exc)},
        )


# --------------------------------------------------------------------------- curves, surfaces, summary
def _curves(a: AuditInputs, runs: RunStore) -> dict[str, list[dict[str, Any]]]:
    """Accuracy (with its CI) along each series; empty for a series with a crashed run."""
    out: dict[str, list[dict[str, Any]]] = {}
    for key, series in _SERIES.items():
        try:
            out[key] = [{key: v, **summarize(f)} for v, f in _series_flags(a, runs, series)]
        except AttackCrashed:
            out[key] = []
    return out


def _loss_surfaces(a: AuditInputs, runs: RunStore) -> list[dict[str, Any]]:
    """CE loss on x + a sign(grad) + b (random signs), a, b in [-R eps, R eps], for the first
    correctly classified points (the loss-surface plots of Engstrom et al. 2018, Fig. 1); the
    random signs come from a generator seeded with the audit's seed + 1."""
    s, x, y = a.settings, a.x, a.y
    idx = _clean(a, runs).nonzero().flatten()[: max(s.surface_points, 0)]
    if len(idx) == 0:
        return []
    gen = torch.Generator(device=x.device).manual_seed(a.seed + 1)
    dev = model_device(a.model)
    _, grads = _input_grads(a.model, x[idx], y[idx], s.batch_size)
    span = s.surface_range * max(a.threat.eps, 1e-3)
    ticks = torch.linspace(-span, span, s.surface_grid, device=x.device, dtype=x.dtype)
    ga, gb = (t.reshape(-1, *[1] * (x.dim() - 1)) for t in torch.meshgrid(ticks, ticks, indexing="ij"))
    out = []
    with eval_mode(a.model), torch.no_grad():
        for j, i in enumerate(idx.tolist()):
            rand = torch.randint(0, 2, grads[j].shape, generator=gen, device=x.device).to(x.dtype) * 2 - 1
            pts = (x[i] + ga * grads[j].sign() + gb * rand).clamp(*a.threat.bounds)
            loss = torch.cat(
                [
                    F.cross_entropy(a.model(c.to(dev)), y[i].expand(len(c)).to(dev), reduction="none").cpu()
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


def _summary(a: AuditInputs, runs: RunStore) -> dict[str, Any]:
    """Clean, baseline and worst-case accuracy at the model's eps over every attack of the audit
    at that eps (baseline + suite, FGSM, noise, transfer with a source, the series' PGD runs;
    crashed runs left out)."""
    clean = _clean(a, runs)
    out: dict[str, Any] = {"clean": summarize(clean)}
    main = _unless_crashed(lambda: _main(a, runs).robust)
    if main is not None:
        out["baseline"] = summarize(_baseline(a, runs))
        out["suite_worst_case"] = summarize(main)
    at_eps: list[Callable[[], Tensor]] = [lambda: _fgsm(a, runs), lambda: _noise(a, runs)]
    if a.source is not None:
        at_eps.append(lambda: _transfer(a, runs))
    at_eps += [lambda run=run: _pgd(a, runs, run) for run in _pgd_at_eps(a)]
    worst = clean.clone() if main is None else clean & main
    for flags in (_unless_crashed(get) for get in at_eps):
        if flags is not None:
            worst &= flags
    out["worst_case_all"] = summarize(worst)
    return out


# --------------------------------------------------------------------------- the audit
def _enter_eval_modes(stack: ExitStack, model: nn.Module, source: nn.Module | None, x: Tensor) -> None:
    """Eval mode for the model and source (restored when ``stack`` closes); the source must
    give outputs of the model's shape."""
    for m in (model, source):
        if m is not None:
            stack.enter_context(eval_mode(m))
    if source is None:
        return
    with torch.no_grad():
        shapes = (
            tuple(model(x[:1].to(model_device(model))).shape),
            tuple(source(x[:1].to(model_device(source))).shape),
        )
    if shapes[0] != shapes[1]:
        raise ConfigError(f"audit: the source model's output {shapes[1]} differs from the model's {shapes[0]}")


def _settings_doc(a: AuditInputs, quick: bool, timings: dict[str, float]) -> dict[str, Any]:
    s = a.settings
    attacks = [
        s.baseline,
        *s.suite_specs(),
        AttackSpec("fgsm", {}, "FGSM"),
        AttackSpec("noise", {"samples": s.noise_samples}),
    ]
    return {
        "n": len(a.y),
        "eps": a.threat.eps,
        "bounds": list(a.threat.bounds),
        "seed": a.seed,
        "quick": quick,
        "source": a.source is not None,
        **s.to_dict(),
        "attacks": [spec.to_dict() for spec in attacks],
        "timings": timings,
    }


def _validate(x: Tensor, y: Tensor, order: Sequence[str]) -> None:
    if len(x) != len(y) or len(y) == 0:
        raise ConfigError(f"audit: expected as many labels as images and at least one, got {len(x)} and {len(y)}")
    if sorted(order) != sorted(CHECK_NAMES):
        raise ConfigError(f"audit: order must name every check once ({', '.join(CHECK_NAMES)}), got {list(order)}")


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
    order: Sequence[str] = RUN_ORDER,
) -> AuditReport:
    """Run every check of :data:`CHECK_NAMES` on ``model`` at ``threat`` (L-infinity).

    ``x``: (N, C, H, W) images in the threat's bounds; ``y``: (N,) labels. ``source``: an
    independently trained model for the transfer check (skipped without one). ``quick``:
    the quick suite and shorter series (:meth:`AuditSettings.preset`); ``settings``
    overrides both. Attacks shared by several checks run once (a keyed
    :class:`~logitpair.audit.store.RunStore`); randomness is seeded by ``seed``. ``order``:
    the order the checks run in (every check once); it changes when an attack runs, never the
    report. The model (and source) run in eval mode; their modes are restored.

    Example::

        rep = audit(model, x[:200], y[:200], threat=Linf(0.1), quick=True)
        assert rep.verdict in ("pass", "suspect")
    """
    s = settings if settings is not None else AuditSettings.preset(quick)
    _validate(x, y, order)
    t0 = time.perf_counter()
    with ExitStack() as stack:
        _enter_eval_modes(stack, model, source, x)
        a = AuditInputs(model, x, y, threat, source, seed, s)
        runs = RunStore(model, x, y, threat=threat, source=source, batch_size=s.batch_size, progress=progress)
        checks = {name: _run_check(name, a, runs) for name in order}
        t_surf = time.perf_counter()
        try:
            surfaces = _loss_surfaces(a, runs)
        except RuntimeError:  # a model whose loss cannot be differentiated at all: no plot
            surfaces = []
        timings = {**runs.timings, "audit: loss surfaces": time.perf_counter() - t_surf}
        curves, summary = _curves(a, runs), _summary(a, runs)
    ordered = [checks[name] for name in CHECK_NAMES]
    reasons = [f"{c.name}: {c.detail}" for c in ordered if c.passed is False]
    return AuditReport(
        verdict="suspect" if reasons else "pass",
        checks=ordered,
        reasons=reasons,
        settings=_settings_doc(a, quick, timings),
        summary=summary,
        curves=curves,
        surfaces=surfaces,
        seconds=time.perf_counter() - t0,
    )
