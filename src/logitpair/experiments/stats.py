"""Paired comparisons over seeds for the reproduction reports and the claims page.

Two models (or two attacks) evaluated on the same N points give paired per-example flags; only
the *discordant* points (one right, the other wrong) carry information about which is better.
McNemar's exact test asks whether the discordant points split evenly: under the null hypothesis
"equally accurate", the number ``b`` of points only A gets right among the ``b + c`` discordant
ones is Binomial(b + c, 1/2); the two-sided p-value is ``min(1, 2 P(X <= min(b, c)))``
(McNemar 1947; the exact conditional form, no continuity correction). Example::

    res = mcnemar(alp_robust, mpgd_robust)    # {"a_only": b, "b_only": c, "p_value": ...}

Over K training seeds (the claims page, :mod:`logitpair.experiments.claims`):

- :func:`mcnemar_one_sided`: the exact one-sided test of a directional claim ("A is better").
- :func:`t_interval`: the mean of K per-seed values (paired differences, or accuracies) with the
  Student-t interval over seeds, ``mean ± t_{1-α/2, K-1} sd / √K``; the t quantile
  (:func:`t_ppf`) is computed here from the regularized incomplete beta function
  (:func:`betainc`, a continued fraction), so the library needs no SciPy.
- :func:`stratified_mcnemar`: the pooled exact test over seeds (strata) on the same points.
  Under H0 each stratum's split ``b_k | n_k ~ Bin(n_k, 1/2)`` independently, so the pooled
  ``Σ b_k | Σ n_k ~ Bin(Σ n_k, 1/2)``: the exact binomial test on the pooled discordant pairs.
  :func:`mantel_haenszel_pairs` is the Mantel–Haenszel chi-square of the same pooling, for
  comparison.
- the verdicts of the three kinds of claim (:func:`superiority_verdict`,
  :func:`noninferiority_verdict`, :func:`bound_verdict`): holds / does not hold / not
  separable, with the reason, from the 95% t-intervals over seeds; fewer seeds than a claim's
  minimum K is "not separable". No bootstrap (too few seeds for it).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor


def _binomial_count(m: int, n: int) -> int:
    """``sum_{i <= m} C(n, i)`` in exact integers (``C(n, i + 1) = C(n, i) (n - i) / (i + 1)``)."""
    term = total = 1  # C(n, 0)
    for i in range(m):
        term = term * (n - i) // (i + 1)
        total += term
    return total


def _check_counts(k: int, n: int) -> None:
    if not 0 <= k <= n:
        raise ValueError(f"expected 0 <= k <= n, got k={k}, n={n}")


def binomial_two_sided(k: int, n: int) -> float:
    """Exact two-sided p-value of ``k`` successes in ``n`` fair coin flips: ``min(1, 2 P(X <= min(k, n - k)))``."""
    _check_counts(k, n)
    if n == 0:
        return 1.0
    return min(1.0, 2 * _binomial_count(min(k, n - k), n) / 2**n)  # one rounding at the end


def binomial_tail(k: int, n: int, *, upper: bool) -> float:
    """Exact one-sided p-value of ``k`` successes in ``n`` fair coin flips: ``P(X >= k)`` if
    ``upper``, else ``P(X <= k)`` (``X ~ Bin(n, 1/2)``; by symmetry ``P(X >= k) = P(X <= n - k)``)."""
    _check_counts(k, n)
    return _binomial_count(n - k if upper else k, n) / 2**n


def mcnemar(a: Tensor | Sequence[bool], b: Tensor | Sequence[bool]) -> dict[str, Any]:
    """McNemar's exact test on paired boolean flags (e.g. robust per point for models A and B).

    Returns ``n`` (pairs), ``a_only`` (A right, B wrong), ``b_only`` (B right, A wrong),
    ``both``, ``neither``, the accuracies ``a`` and ``b``, their difference ``a - b`` and the
    exact two-sided ``p_value``.
    """
    a = torch.as_tensor(a, dtype=torch.bool).flatten().cpu()
    b = torch.as_tensor(b, dtype=torch.bool).flatten().cpu()
    if a.shape != b.shape:
        raise ValueError(f"paired flags need the same points, got {a.numel()} and {b.numel()}")
    n = int(a.numel())
    a_only, b_only = int((a & ~b).sum()), int((~a & b).sum())
    out: dict[str, Any] = {
        "n": n,
        "a_only": a_only,
        "b_only": b_only,
        "both": int((a & b).sum()),
        "neither": int((~a & ~b).sum()),
        "a": float(a.float().mean()) if n else float("nan"),
        "b": float(b.float().mean()) if n else float("nan"),
        "p_value": binomial_two_sided(a_only, a_only + b_only),
    }
    out["difference"] = out["a"] - out["b"]
    return out


def spread(values: Sequence[float]) -> dict[str, Any]:
    """Mean, sample standard deviation (None for one value), min and max of per-seed values."""
    vals = [float(v) for v in values]
    if not vals:
        return {"k": 0, "mean": None, "sd": None, "min": None, "max": None, "values": []}
    mean = sum(vals) / len(vals)
    sd = math.sqrt(sum((v - mean) ** 2 for v in vals) / (len(vals) - 1)) if len(vals) > 1 else None
    return {"k": len(vals), "mean": mean, "sd": sd, "min": min(vals), "max": max(vals), "values": vals}


# --------------------------------------------------------------------------- one-sided and pooled tests
ALTERNATIVES = ("greater", "less")


def mcnemar_one_sided(a_only: int, b_only: int, alternative: str = "greater") -> float:
    """Exact one-sided McNemar p-value from the discordant counts: ``alternative="greater"`` tests
    "A is more accurate than B", ``P(X >= a_only)`` with ``X ~ Bin(a_only + b_only, 1/2)``;
    ``"less"`` tests "A is less accurate", ``P(X <= a_only)``."""
    if alternative not in ALTERNATIVES:
        raise ValueError(f"alternative must be one of {', '.join(ALTERNATIVES)}, got {alternative!r}")
    return binomial_tail(a_only, a_only + b_only, upper=alternative == "greater")


def stratified_mcnemar(a_only: Sequence[int], b_only: Sequence[int]) -> dict[str, Any]:
    """The pooled exact test over strata (seeds), each a McNemar table on the same points.

    Under H0 ("equally accurate" in every stratum) each stratum's split of its ``n_k = b_k + c_k``
    discordant points is ``b_k | n_k ~ Bin(n_k, 1/2)``, independently across strata, so the pooled
    ``B = Σ b_k`` given ``N = Σ n_k`` is ``Bin(N, 1/2)``: the exact binomial test on the pooled
    discordant pairs (the exact conditional form of the Mantel–Haenszel pooling of matched pairs;
    :func:`mantel_haenszel_pairs` is its chi-square approximation). Returns the pooled counts, the
    two-sided p-value and both one-sided ones (``p_greater``: A more accurate; ``p_less``: less).
    """
    if len(a_only) != len(b_only):
        raise ValueError(f"one count of each kind per stratum, got {len(a_only)} and {len(b_only)}")
    if any(int(v) < 0 for v in (*a_only, *b_only)):
        raise ValueError("discordant counts must be >= 0")
    big_b, big_c = sum(int(v) for v in a_only), sum(int(v) for v in b_only)
    n = big_b + big_c
    return {
        "strata": len(a_only),
        "a_only": big_b,
        "b_only": big_c,
        "discordant": n,
        "p_value": binomial_two_sided(big_b, n),
        "p_greater": binomial_tail(big_b, n, upper=True),
        "p_less": binomial_tail(big_b, n, upper=False),
    }


def mantel_haenszel_pairs(a_only: Sequence[int], b_only: Sequence[int]) -> dict[str, float]:
    """The Mantel–Haenszel chi-square (1 df, no continuity correction) of matched pairs pooled over strata.

    Each test point of each seed is one stratum: a 2x2 table (model A / B x correct / wrong) with
    both margins 1, 1. A concordant point has a fixed table (variance 0) and contributes nothing;
    a discordant one has ``E[a] = 1/2`` and hypergeometric variance ``1/4``. The statistic
    ``(Σ (a_i - E a_i))^2 / Σ Var a_i`` is then ``(B - C)^2 / (B + C)`` with ``B = Σ b_k`` and
    ``C = Σ c_k`` pooled over seeds (McNemar's chi-square on the pooled discordant pairs); its
    p-value is the chi-square(1) tail ``erfc(sqrt(chi2 / 2))``. An approximation of
    :func:`stratified_mcnemar`, shown beside it.
    """
    pooled = stratified_mcnemar(a_only, b_only)
    n = pooled["discordant"]
    chi2 = (pooled["a_only"] - pooled["b_only"]) ** 2 / n if n else 0.0
    return {"chi2": float(chi2), "p_value": math.erfc(math.sqrt(chi2 / 2))}


# --------------------------------------------------------------------------- Student t, without SciPy
_TINY = 1e-300
_CF_EPS = 1e-16
_CF_MAX = 10_000


def _beta_cf(a: float, b: float, x: float) -> float:
    """The continued fraction of ``I_x(a, b)`` (modified Lentz; Numerical Recipes ``betacf``),
    converging fast for ``x < (a + 1) / (a + b + 2)``."""
    qab, qap, qam = a + b, a + 1.0, a - 1.0
    c, d = 1.0, 1.0 - qab * x / qap
    d = 1.0 / (d if abs(d) > _TINY else _TINY)
    h = d
    for m in range(1, _CF_MAX):
        for aa in (m * (b - m) * x / ((qam + 2 * m) * (a + 2 * m)),
                   -(a + m) * (qab + m) * x / ((a + 2 * m) * (qap + 2 * m))):  # fmt: skip
            d = 1.0 + aa * d
            d = 1.0 / (d if abs(d) > _TINY else _TINY)
            c = 1.0 + aa / c
            c = c if abs(c) > _TINY else _TINY
            h *= d * c
        if abs(d * c - 1.0) < _CF_EPS:
            return h
    raise ArithmeticError(f"incomplete beta: no convergence for a={a}, b={b}, x={x}")


def betainc(a: float, b: float, x: float, y: float | None = None) -> float:
    """The regularized incomplete beta function ``I_x(a, b)`` (a, b > 0, 0 <= x <= 1).

    ``y``: ``1 - x`` when the caller has it more accurately than ``1 - x`` (e.g. ``t^2 / (df + t^2)``).
    The continued fraction on whichever side converges fast, the other by ``I_x(a, b) = 1 - I_y(b, a)``.
    """
    y = 1.0 - x if y is None else y
    if a <= 0 or b <= 0 or not (0 <= x <= 1 and 0 <= y <= 1):
        raise ValueError(f"expected a, b > 0 and 0 <= x, y <= 1, got a={a}, b={b}, x={x}, y={y}")
    if x == 0:
        return 0.0
    if y == 0:
        return 1.0
    front = math.exp(math.lgamma(a + b) - math.lgamma(a) - math.lgamma(b) + a * math.log(x) + b * math.log(y))
    if x < (a + 1.0) / (a + b + 2.0):
        return front * _beta_cf(a, b, x) / a
    return 1.0 - front * _beta_cf(b, a, y) / b


def _t_mass(t: float, df: float, central: bool) -> float:
    """For ``t >= 0``: ``P(0 < T < t) = I_{t^2 / (df + t^2)}(1/2, df / 2) / 2`` if ``central``, else the
    tail ``P(T > t) = I_{df / (df + t^2)}(df / 2, 1/2) / 2``; each computed directly, so neither a
    small central mass nor a small tail loses digits to cancellation."""
    s = t * t
    x, y = s / (df + s), df / (df + s)
    return 0.5 * (betainc(0.5, df / 2.0, x, y) if central else betainc(df / 2.0, 0.5, y, x))


def _t_pdf(t: float, df: float) -> float:
    log_c = math.lgamma((df + 1) / 2) - math.lgamma(df / 2) - 0.5 * math.log(df * math.pi)
    return math.exp(log_c - (df + 1) / 2 * math.log1p(t * t / df))


def t_cdf(t: float, df: float) -> float:
    """Student's t distribution function with ``df > 0`` degrees of freedom."""
    if df <= 0:
        raise ValueError(f"expected df > 0, got {df}")
    tail = _t_mass(abs(t), df, central=False)
    return tail if t < 0 else 1.0 - tail


def t_ppf(p: float, df: float) -> float:
    """The ``p``-quantile of Student's t with ``df > 0`` degrees of freedom (0 < p < 1).

    For ``t >= 0`` solves ``P(0 < T < t) = |p - 1/2|`` (``p`` within 1/4 of 1/2) or ``P(T > t) =
    min(p, 1 - p)`` (otherwise; both right-hand sides exact in floating point) by Newton's method,
    kept inside a bracket (bisection where a step would leave it), to ~1e-15 relative; the sign
    by symmetry. Agrees with ``scipy.stats.t.ppf`` to 1e-8 (tests/test_claims_stats.py).
    """
    if not 0 < p < 1:
        raise ValueError(f"expected 0 < p < 1, got {p}")
    if df <= 0:
        raise ValueError(f"expected df > 0, got {df}")
    c = abs(p - 0.5)
    if c == 0:
        return 0.0
    central = c < 0.25
    target = c if central else min(p, 1.0 - p)

    def g(t: float) -> float:  # increasing in t, zero at the quantile
        return _t_mass(t, df, True) - target if central else target - _t_mass(t, df, False)

    lo, hi = 0.0, 1.0
    while g(hi) < 0:
        lo, hi = hi, 2.0 * hi
    t = hi
    for _ in range(200):
        f = g(t)
        if f < 0:
            lo = t
        else:
            hi = t
        new = t - f / _t_pdf(t, df)
        if not lo < new < hi:
            new = 0.5 * (lo + hi)
        done = abs(new - t) <= 1e-15 * t or hi - lo <= 1e-15 * t
        t = new
        if done:
            break
    return t if p > 0.5 else -t


def t_interval(values: Sequence[float], level: float = 0.95) -> dict[str, Any]:
    """The mean of ``values`` (one per seed) with its two-sided Student-t interval over seeds.

    ``mean ± t_{(1 + level) / 2, K - 1} · sd / √K`` (``sd``: the sample standard deviation). With
    one value the interval is undefined (``low``/``high`` None). Returns ``k``, ``mean``, ``sd``,
    ``se``, ``df``, ``t`` (the quantile), ``low``, ``high``, ``level``, ``values``.
    """
    if not 0 < level < 1:
        raise ValueError(f"expected 0 < level < 1, got {level}")
    sp = spread(values)
    k = sp["k"]
    out: dict[str, Any] = {"k": k, "mean": sp["mean"], "sd": sp["sd"], "se": None, "df": k - 1 if k else None,
                           "t": None, "low": None, "high": None, "level": level, "values": sp["values"]}  # fmt: skip
    if k >= 2:
        se = sp["sd"] / math.sqrt(k)
        t = t_ppf((1 + level) / 2, k - 1)
        out.update(se=se, t=t, low=sp["mean"] - t * se, high=sp["mean"] + t * se)
    return out


# --------------------------------------------------------------------------- verdicts
HOLDS, FAILS, NOT_SEPARABLE = "holds", "does not hold", "not separable"
LEVEL = 0.95  # every interval of the verdicts: two-sided 95% (one-sided 97.5% for each bound)


@dataclass(frozen=True)
class Verdict:
    """A claim's verdict: ``outcome`` (holds / does not hold / not separable) and why."""

    outcome: str
    reason: str

    def line(self) -> str:
        return f"**{self.outcome}**: {self.reason}"


# A criterion reads one t-interval (low, high): +1 it shows the claim, -1 it excludes the claimed effect, 0 neither.
Criterion = Callable[[float, float], int]


def _interval_text(name: str, low: float, high: float, signed: bool) -> str:
    """``name [+1.20, +3.40] points`` (differences) or ``name [1.20, 3.40]%`` (accuracies), from fractions."""
    f = "{:+.2f}" if signed else "{:.2f}"
    return f"{name} [{f.format(100 * low)}, {f.format(100 * high)}]" + (" points" if signed else "%")


def _judge(measures: Mapping[str, Sequence[float]], k_min: int, criterion: Criterion, claim: str,
           signed: bool = True) -> tuple[int, str]:  # fmt: skip
    """Apply ``criterion`` to the 95% t-interval of every measure (name -> per-seed values).
    Returns +1 (every measure shows ``claim``), -1 (one excludes it), 0 (otherwise, or fewer than
    ``k_min`` seeds) and the reason in words."""
    if not measures:
        raise ValueError("a verdict needs at least one measure")
    k = min(len(v) for v in measures.values())
    if k < max(k_min, 2):  # one seed has no interval
        return 0, f"K = {k} seed{'s' if k != 1 else ''} < {max(k_min, 2)}, the minimum for this claim"
    marks = []
    for name, values in measures.items():
        ci = t_interval(values, LEVEL)
        marks.append((criterion(ci["low"], ci["high"]), _interval_text(name, ci["low"], ci["high"], signed)))
    against = [text for mark, text in marks if mark < 0]
    if against:
        return -1, f"the 95% interval excludes {claim} under " + "; ".join(against)
    undecided = [text for mark, text in marks if mark == 0]
    if undecided:
        return 0, f"the 95% interval neither shows nor excludes {claim} under " + "; ".join(undecided)
    return 1, f"the 95% interval shows {claim} under " + "; ".join(text for _, text in marks)


def _verdict(mark: int, reason: str) -> Verdict:
    return Verdict({1: HOLDS, -1: FAILS, 0: NOT_SEPARABLE}[mark], reason)


def superiority_verdict(diffs: Mapping[str, Sequence[float]], *, k_min: int, direction: int = 1) -> Verdict:
    """The claim that A is more accurate than B (``direction`` +1; -1: less accurate), from
    per-seed paired differences ``a - b`` (fractions) under each measure (name -> values; e.g.
    the paper's attack and the strong worst case).

    Holds when every measure's 95% t-interval of the mean difference excludes zero in the claimed
    direction; does not hold when one excludes zero the other way; otherwise (or with fewer than
    ``k_min`` seeds) not separable. Intervals are written in percentage points.
    """
    if direction not in (1, -1):
        raise ValueError(f"direction must be +1 or -1, got {direction}")

    def criterion(low: float, high: float) -> int:
        low, high = sorted((direction * low, direction * high))
        return 1 if low > 0 else -1 if high < 0 else 0

    claim = "a mean difference " + ("> 0" if direction > 0 else "< 0")
    return _verdict(*_judge(diffs, k_min, criterion, claim))


def noninferiority_verdict(diffs: Mapping[str, Sequence[float]], *, k_min: int, delta: float,
                           cost_ratio: float | None, max_cost_ratio: float) -> Verdict:  # fmt: skip
    """The claim that A is at most ``delta`` less accurate than B at no more than ``max_cost_ratio``
    of B's training cost, from per-seed paired differences ``a - b`` (fractions) per measure and
    the cost ratio (A's over B's).

    Holds when every measure's lower 95% t-bound is above ``-delta`` and ``cost_ratio <=
    max_cost_ratio``; does not hold when an upper bound is below ``-delta`` (the interval excludes
    the margin) or the cost ratio is above its limit; otherwise (fewer than ``k_min`` seeds, or
    no cost measured) not separable.
    """
    if delta <= 0:
        raise ValueError(f"the margin delta must be > 0, got {delta}")
    mark, reason = _judge(diffs, k_min, lambda lo, hi: 1 if lo > -delta else -1 if hi < -delta else 0,
                          f"a mean difference > -{100 * delta:g} points")  # fmt: skip
    if cost_ratio is None:
        return _verdict(min(mark, 0), reason + "; the training cost was not measured")
    cost = f"training cost {cost_ratio:.2f}x the reference's (limit {max_cost_ratio:g}x)"
    if cost_ratio > max_cost_ratio:
        return _verdict(-1, f"{cost}; {reason}")
    return _verdict(mark, f"{reason}; {cost}")


def bound_verdict(values: Mapping[str, Sequence[float]], *, k_min: int, bound: float) -> Verdict:
    """The claim that A's accuracy is at most ``bound`` (fractions; e.g. robust accuracy <= 10%),
    from per-seed accuracies per measure.

    The bound tested is the upper end of the 95% Student-t interval of the mean accuracy over
    seeds (training seeds evaluated on the same test points). Holds when every measure's upper end
    is ``<= bound``; does not hold when a lower end is above it; otherwise (or with fewer than
    ``k_min`` seeds) not separable.
    """
    if not 0 <= bound <= 1:
        raise ValueError(f"expected a bound in [0, 1], got {bound}")

    def criterion(low: float, high: float) -> int:
        return 1 if high <= bound else -1 if low > bound else 0

    return _verdict(*_judge(values, k_min, criterion, f"a mean accuracy <= {100 * bound:g}%", signed=False))
