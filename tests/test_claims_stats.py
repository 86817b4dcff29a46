"""The statistics of the claims page (logitpair.experiments.stats) on known inputs, against SciPy
where it has the same quantity: the t quantile, the t-interval over seeds, the one-sided and the
pooled (stratified) exact McNemar tests, the Mantel–Haenszel chi-square; and the verdict logic on
constructed per-seed evidence."""

from __future__ import annotations

import math

import numpy as np
import pytest

from logitpair.experiments.stats import (
    FAILS,
    HOLDS,
    NOT_SEPARABLE,
    betainc,
    binomial_tail,
    binomial_two_sided,
    bound_verdict,
    mantel_haenszel_pairs,
    mcnemar,
    mcnemar_one_sided,
    noninferiority_verdict,
    stratified_mcnemar,
    superiority_verdict,
    t_cdf,
    t_interval,
    t_ppf,
)

LEVELS = (0.6, 0.75, 0.9, 0.95, 0.975, 0.99, 0.995, 0.999, 0.9995)


@pytest.fixture(scope="module")
def st():
    return pytest.importorskip("scipy.stats")


# --------------------------------------------------------------------------- the t distribution
@pytest.mark.parametrize("df", range(1, 51))
def test_t_quantile_matches_scipy(st, df):
    for p in LEVELS:
        for q in (p, 1 - p):
            assert t_ppf(q, df) == pytest.approx(st.t.ppf(q, df), rel=1e-8, abs=1e-12), (q, df)


def test_t_quantile_non_integer_and_large_df(st):
    for df in (0.5, 2.5, 7.25, 100, 1000):
        for p in (*LEVELS, 1e-6, 1 - 1e-9):
            assert t_ppf(p, df) == pytest.approx(st.t.ppf(p, df), rel=1e-8), (p, df)


def test_t_quantile_near_the_median_matches_the_closed_forms():
    """df 1 and 2 have closed forms; near p = 1/2 they check digits SciPy's own ppf loses there."""
    for c in (1e-12, 1e-7, 1e-3, 0.1, 0.2, 0.3, 0.45):
        p = 0.5 + c
        c = p - 0.5  # exact in floating point
        assert t_ppf(p, 1) == pytest.approx(math.tan(math.pi * c), rel=1e-12)
        assert t_ppf(p, 2) == pytest.approx((2 * p - 1) / math.sqrt(2 * p * (1 - p)), rel=1e-12)
        assert t_ppf(1 - p, 1) == -t_ppf(p, 1)
    assert t_ppf(0.5, 3) == 0.0


def test_t_cdf_and_incomplete_beta_match_scipy(st):
    special = pytest.importorskip("scipy.special")
    for df in (1, 2, 3, 4.5, 10, 49):
        for t in (-40.0, -3.0, -0.2, 0.0, 0.7, 2.1, 12.0, 300.0):
            assert t_cdf(t, df) == pytest.approx(st.t.cdf(t, df), rel=1e-12, abs=1e-15), (t, df)
    for t in (1e-9, -1e-5, 0.3):  # Cauchy: 1/2 + atan(t) / pi (SciPy returns 0.5 at t = 1e-9)
        assert t_cdf(t, 1) == pytest.approx(0.5 + math.atan(t) / math.pi, rel=1e-14)
    for a in (0.5, 1.0, 2.5, 25.0):
        for b in (0.5, 3.0, 40.0):
            for x in (0.0, 1e-8, 0.1, 0.5, 0.93, 1 - 1e-8, 1.0):
                assert betainc(a, b, x) == pytest.approx(special.betainc(a, b, x), rel=1e-12, abs=1e-15), (a, b, x)


def test_t_quantile_inverts_the_cdf():
    for df in (1, 4, 9):
        for p in (0.01, 0.3, 0.8, 0.999):
            assert t_cdf(t_ppf(p, df), df) == pytest.approx(p, rel=1e-12)
    with pytest.raises(ValueError):
        t_ppf(1.0, 3)
    with pytest.raises(ValueError):
        t_ppf(0.5, 0)


@pytest.mark.parametrize("values", [[0.012, 0.034, -0.005], [0.2, 0.25, 0.19, 0.22, 0.3, 0.27], [1.0, 3.0]])
def test_t_interval_matches_scipy(st, values):
    for level in (0.9, 0.95, 0.99):
        ci = t_interval(values, level)
        low, high = st.t.interval(level, len(values) - 1, loc=np.mean(values), scale=st.sem(values))
        assert ci["low"] == pytest.approx(low, rel=1e-9) and ci["high"] == pytest.approx(high, rel=1e-9)
        assert ci["mean"] == pytest.approx(np.mean(values)) and ci["df"] == len(values) - 1


def test_t_interval_of_one_seed_is_undefined():
    ci = t_interval([0.3])
    assert ci["k"] == 1 and ci["mean"] == 0.3 and ci["low"] is None and ci["high"] is None
    same = t_interval([0.1, 0.1, 0.1])
    assert same["low"] == pytest.approx(0.1) and same["high"] == pytest.approx(0.1)


# --------------------------------------------------------------------------- exact tests
@pytest.mark.parametrize(("k", "n"), [(0, 0), (0, 5), (3, 5), (5, 5), (9, 20), (14, 20), (61, 100), (480, 1000)])
def test_one_sided_binomial_and_mcnemar_match_scipy(st, k, n):
    greater = st.binomtest(k, n, 0.5, alternative="greater").pvalue if n else 1.0
    less = st.binomtest(k, n, 0.5, alternative="less").pvalue if n else 1.0
    assert binomial_tail(k, n, upper=True) == pytest.approx(greater, rel=1e-12)
    assert binomial_tail(k, n, upper=False) == pytest.approx(less, rel=1e-12)
    assert mcnemar_one_sided(k, n - k, "greater") == pytest.approx(greater, rel=1e-12)
    assert mcnemar_one_sided(k, n - k, "less") == pytest.approx(less, rel=1e-12)
    if n:
        assert binomial_two_sided(k, n) == pytest.approx(st.binomtest(k, n, 0.5).pvalue, rel=1e-12)


def test_one_sided_mcnemar_on_flags():
    a = [True] * 7 + [False] * 2 + [True] * 5 + [False] * 6  # A only 7, B only 2, both 5, neither 6
    b = [False] * 7 + [True] * 2 + [True] * 5 + [False] * 6
    res = mcnemar(a, b)
    assert (res["a_only"], res["b_only"]) == (7, 2)
    p = mcnemar_one_sided(res["a_only"], res["b_only"])
    assert p == pytest.approx(sum(math.comb(9, i) for i in range(7, 10)) / 2**9)
    assert p < res["p_value"] and mcnemar_one_sided(7, 2, "less") > 0.9
    with pytest.raises(ValueError, match="alternative"):
        mcnemar_one_sided(7, 2, "two-sided")


STRATA = [([12, 9, 15, 7, 11], [5, 8, 4, 6, 3]), ([3, 0, 2], [4, 6, 5]), ([0, 0], [0, 0]), ([250, 270], [230, 240])]


@pytest.mark.parametrize(("a_only", "b_only"), STRATA)
def test_stratified_test_is_the_pooled_binomial(st, a_only, b_only):
    res = stratified_mcnemar(a_only, b_only)
    big_b, n = sum(a_only), sum(a_only) + sum(b_only)
    assert (res["strata"], res["a_only"], res["discordant"]) == (len(a_only), big_b, n)
    if n == 0:
        assert res["p_value"] == res["p_greater"] == res["p_less"] == 1.0
        return
    for key, alt in (("p_value", "two-sided"), ("p_greater", "greater"), ("p_less", "less")):
        assert res[key] == pytest.approx(st.binomtest(big_b, n, 0.5, alternative=alt).pvalue, rel=1e-10), key


def test_stratified_null_is_the_convolution_of_the_strata(st):
    """The stated identity: Σ Bin(n_k, 1/2) is Bin(Σ n_k, 1/2), so the pooled exact test is the exact
    conditional test of the stratified null (per-stratum binomials convolved, independently)."""
    a_only, b_only = [6, 2, 9], [1, 5, 3]
    pmf = np.array([1.0])
    for b, c in zip(a_only, b_only, strict=True):
        pmf = np.convolve(pmf, st.binom.pmf(np.arange(b + c + 1), b + c, 0.5))
    big_b = sum(a_only)
    res = stratified_mcnemar(a_only, b_only)
    assert res["p_greater"] == pytest.approx(pmf[big_b:].sum(), rel=1e-12)
    assert res["p_less"] == pytest.approx(pmf[: big_b + 1].sum(), rel=1e-12)


def _cmh_by_hand(a_only: list[int], b_only: list[int], both: list[int], neither: list[int]) -> float:
    """The general Cochran–Mantel–Haenszel statistic with one 2x2 table per point (rows: model A, B;
    columns: correct, wrong), strata pooled over seeds: (Σ (a_i - E a_i))^2 / Σ Var a_i."""
    num = var = 0.0
    for counts in zip(a_only, b_only, both, neither, strict=True):
        for kind, count in zip(("a_only", "b_only", "both", "neither"), counts, strict=True):
            a_correct = kind in ("a_only", "both")
            b_correct = kind in ("b_only", "both")
            table = np.array([[a_correct, not a_correct], [b_correct, not b_correct]], dtype=float)
            n, r1, c1 = table.sum(), table[0].sum(), table[:, 0].sum()
            e = r1 * c1 / n
            v = r1 * (n - r1) * c1 * (n - c1) / (n * n * (n - 1))
            num += count * (table[0, 0] - e)
            var += count * v
    return num * num / var


def test_mantel_haenszel_chi_square_by_hand(st):
    a_only, b_only, both, neither = [12, 9, 15], [5, 8, 4], [600, 610, 590], [383, 373, 391]
    res = mantel_haenszel_pairs(a_only, b_only)
    chi2 = _cmh_by_hand(a_only, b_only, both, neither)
    assert res["chi2"] == pytest.approx(chi2, rel=1e-12) == pytest.approx((36 - 17) ** 2 / 53)
    assert res["p_value"] == pytest.approx(st.chi2.sf(chi2, 1), rel=1e-10)
    assert mantel_haenszel_pairs([0], [0]) == {"chi2": 0.0, "p_value": 1.0}
    with pytest.raises(ValueError, match="per stratum"):
        stratified_mcnemar([1, 2], [3])


# --------------------------------------------------------------------------- verdicts
CLEAR = [0.031, 0.024, 0.040, 0.028, 0.035]  # a clear positive paired difference (fractions)
NOISE = [0.012, -0.015, 0.004, -0.009, 0.011]


def test_superiority_verdicts():
    holds = superiority_verdict({"paper's attack": CLEAR, "worst case": [v / 2 for v in CLEAR]}, k_min=5)
    assert holds.outcome == HOLDS and "paper's attack [+" in holds.reason
    reverse = superiority_verdict({"paper's attack": [-v for v in CLEAR]}, k_min=5)
    assert reverse.outcome == FAILS and "excludes" in reverse.reason
    assert superiority_verdict({"paper's attack": NOISE}, k_min=5).outcome == NOT_SEPARABLE
    few = superiority_verdict({"paper's attack": CLEAR[:4]}, k_min=5)
    assert few.outcome == NOT_SEPARABLE and "K = 4 seeds < 5" in few.reason
    # the claimed direction -1 (A less accurate): a clear negative difference holds
    assert superiority_verdict({"transfer": [-v for v in CLEAR]}, k_min=3, direction=-1).outcome == HOLDS
    # holding under the paper's attack but reversed under the worst case: does not hold
    mixed = superiority_verdict({"paper's attack": CLEAR, "worst case": [-v for v in CLEAR]}, k_min=5)
    assert mixed.outcome == FAILS and "worst case" in mixed.reason and "paper's attack" not in mixed.reason
    # a clear effect under one measure, noise under the other: not separable
    assert superiority_verdict({"paper's attack": CLEAR, "worst case": NOISE}, k_min=5).outcome == NOT_SEPARABLE


def test_noninferiority_verdicts():
    near = [-0.01, -0.02, 0.005, -0.012, -0.004]
    kw = {"k_min": 3, "delta": 0.05, "max_cost_ratio": 0.5}
    assert noninferiority_verdict({"paper's attack": near}, cost_ratio=0.3, **kw).outcome == HOLDS
    costly = noninferiority_verdict({"paper's attack": near}, cost_ratio=0.8, **kw)
    assert costly.outcome == FAILS and "0.80x" in costly.reason
    far = noninferiority_verdict({"paper's attack": [v - 0.12 for v in near]}, cost_ratio=0.3, **kw)
    assert far.outcome == FAILS and "> -5 points" in far.reason
    wide = [0.02, -0.09, 0.01, -0.11, 0.0]  # the interval straddles -5 points
    assert noninferiority_verdict({"paper's attack": wide}, cost_ratio=0.3, **kw).outcome == NOT_SEPARABLE
    assert noninferiority_verdict({"paper's attack": near[:2]}, cost_ratio=0.3, **kw).outcome == NOT_SEPARABLE
    assert noninferiority_verdict({"paper's attack": near}, cost_ratio=None, **kw).outcome == NOT_SEPARABLE


def test_bound_verdicts():
    assert bound_verdict({"worst case": [0.01, 0.02, 0.015]}, k_min=3, bound=0.10).outcome == HOLDS
    above = bound_verdict({"worst case": [0.31, 0.29, 0.33]}, k_min=3, bound=0.10)
    assert above.outcome == FAILS and "[" in above.reason and "%" in above.reason
    assert bound_verdict({"worst case": [0.02, 0.16, 0.09]}, k_min=3, bound=0.10).outcome == NOT_SEPARABLE
    assert bound_verdict({"worst case": [0.01, 0.02]}, k_min=3, bound=0.10).outcome == NOT_SEPARABLE
    one = bound_verdict({"worst case": [0.01]}, k_min=1, bound=0.10)  # one seed: no interval, whatever k_min says
    assert one.outcome == NOT_SEPARABLE and "K = 1 seed < 2" in one.reason
