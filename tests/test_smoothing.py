"""Randomized smoothing (Cohen et al. 2019): CERTIFY and PREDICT against the closed form of a
linear classifier's smoothed classifier, the soundness rate, seeding, resuming, the CLI, and the
Gaussian augmentation of ``regular`` (``noise_std``)."""

from __future__ import annotations

import json
import math
import shutil
from statistics import NormalDist

import pytest
import torch
from torch import nn

from logitpair.certification.smoothing import (
    ABSTAIN,
    binomial_test_half,
    certify_smoothing,
    clopper_pearson_lower,
    gaussian_noise,
    predict_smoothing,
)

PHI = NormalDist()
D = 6


def linear_model(seed: int = 0) -> nn.Linear:
    """f(x) = argmax(Wx + b), two classes, D inputs."""
    torch.manual_seed(seed)
    m = nn.Linear(D, 2)
    with torch.no_grad():
        m.weight.copy_(torch.randn(2, D))
        m.bias.copy_(torch.randn(2))
    return m.eval()


def points_at(model: nn.Linear, p0: list[float], sigma: float) -> torch.Tensor:
    """Points whose smoothed class-0 probability is ``p0`` (analytic: Φ(margin / (σ ‖w0 − w1‖)))."""
    dw = (model.weight[0] - model.weight[1]).detach().double()
    db = float((model.bias[0] - model.bias[1]).detach())
    norm = float(dw.norm())
    base = torch.rand(len(p0), D, dtype=torch.float64, generator=torch.Generator().manual_seed(5))
    out = []
    for x, p in zip(base, p0, strict=True):
        margin = sigma * norm * PHI.inv_cdf(p)  # wanted dw·x + db
        x = x + (margin - (dw @ x + db)) * dw / norm**2
        out.append(x)
    return torch.stack(out).float()


def true_p0(model: nn.Linear, x: torch.Tensor, sigma: float) -> torch.Tensor:
    dw = (model.weight[0] - model.weight[1]).detach().double()
    db = float((model.bias[0] - model.bias[1]).detach())
    z = (x.double() @ dw + db) / (sigma * float(dw.norm()))
    return torch.tensor([PHI.cdf(float(v)) for v in z], dtype=torch.float64)


def test_statistics_match_scipy():
    stats = pytest.importorskip("scipy.stats")
    for k, n, a in (
        (0, 10, 0.05),
        (1, 10, 0.05),
        (7, 10, 0.01),
        (10, 10, 0.001),
        (52, 100, 0.1),
        (99_000, 100_000, 0.001),
    ):
        want = 0.0 if k == 0 else stats.beta.ppf(a, k, n - k + 1)
        got = clopper_pearson_lower(k, n, a)
        assert got <= want + 1e-12 and got == pytest.approx(want, abs=1e-9), (k, n, a)
    for a, b in ((5, 5), (60, 40), (40, 60), (9, 1), (520, 480), (0, 7)):
        assert binomial_test_half(a, b) == pytest.approx(stats.binomtest(a, a + b, 0.5).pvalue, rel=1e-9, abs=1e-15)


def test_noise_is_keyed_per_sample():
    whole = gaussian_noise((3,), 0, 250, seed=1, index=4, phase=1)
    parts = torch.cat([gaussian_noise((3,), a, min(a + 37, 250), seed=1, index=4, phase=1) for a in range(0, 250, 37)])
    assert torch.equal(whole, parts)
    assert not torch.equal(whole, gaussian_noise((3,), 0, 250, seed=1, index=5, phase=1))
    assert not torch.equal(whole, gaussian_noise((3,), 0, 250, seed=1, index=4, phase=0))
    assert abs(float(whole.mean())) < 0.15 and abs(float(whole.std()) - 1) < 0.1


def test_certify_matches_the_closed_form():
    """Radius σ Φ⁻¹(p_A) of the linear classifier's smoothed classifier, within the Clopper–Pearson
    slack: the observed count k ~ Bin(n, p_A) lies within k* ± 3.5 sd (k* = n p_A; probability of
    leaving it about 5e-4 per point), so the radius lies between σ Φ⁻¹ of the CP lower bounds of
    those two counts; a point abstains when even the upper count's bound is ≤ ½ (α = 1e-4: the
    CP bound sits 3.7 sd below the count, so points with p_A within 0.0008 of ½ must abstain)."""
    sigma, n, alpha = 0.5, 20_000, 1e-4
    model = linear_model()
    p0 = [0.001, 0.2, 0.4995, 0.5, 0.5005, 0.52, 0.6, 0.8, 0.95, 0.999]
    x = points_at(model, p0, sigma)
    p_true = true_p0(model, x, sigma)
    assert torch.allclose(p_true, torch.tensor(p0, dtype=torch.float64), atol=1e-5)
    top = torch.where(p_true >= 0.5, 0, 1)
    res = certify_smoothing(model, x, top, sigma=sigma, n0=100, n=n, alpha=alpha, batch_size=4096, seed=3)
    checked = {"abstain": 0, "radius": 0}
    for i, p in enumerate(p_true.tolist()):
        pa = max(p, 1 - p)
        sd = math.sqrt(n * pa * (1 - pa))
        k_lo, k_hi = max(0, math.floor(n * pa - 3.5 * sd)), min(n, math.ceil(n * pa + 3.5 * sd))
        b_lo, b_hi = clopper_pearson_lower(k_lo, n, alpha), clopper_pearson_lower(k_hi, n, alpha)
        if b_hi <= 0.5:
            assert res.prediction[i] == ABSTAIN, (i, pa, res.p_lower[i])
            checked["abstain"] += 1
        elif b_lo > 0.5:
            assert res.prediction[i] == top[i], (i, pa)
            r = float(res.radius[i])
            assert sigma * PHI.inv_cdf(b_lo) <= r <= sigma * PHI.inv_cdf(b_hi), (i, pa, r)
            assert r < sigma * PHI.inv_cdf(pa) + 1e-12  # below the true radius (with prob. 1 - α; here always)
            checked["radius"] += 1
    assert checked["abstain"] >= 3 and checked["radius"] >= 5, checked
    # the summary: certified accuracy at radii, abstentions, N and Wilson intervals
    s = res.summary([0.0, 0.5])
    assert s["threat"]["norm"] == "L2" and s["abstained"] == int((res.prediction == ABSTAIN).sum())
    acc = s["certified_accuracy"]
    assert acc[0]["n"] == len(x) and acc[0]["value"] >= acc[1]["value"] and len(acc[1]["ci95"]) == 2
    assert acc[1]["value"] == int(((res.radius >= 0.5) & res.correct).sum()) / len(x)


def test_wrong_certified_class_rate_is_at_most_alpha():
    """200 independent CERTIFY runs (200 copies of a point: each index has its own noise) at
    p_A = 0.51, where a wrong class is often selected. A sound procedure gives the wrong class
    with probability ≤ α = 0.1; we fail when the errors exceed 34, whose probability under
    Bin(200, 0.1) is below 0.001. (Counting the point estimate p̂ > ½ instead of the
    Clopper–Pearson bound errs about 23% of the time: about 46 errors.)"""
    sigma, alpha, runs = 0.25, 0.1, 200
    model = linear_model(1)
    x = points_at(model, [0.51], sigma).expand(runs, D).contiguous()
    y = torch.zeros(runs, dtype=torch.long)
    res = certify_smoothing(model, x, y, sigma=sigma, n0=20, n=200, alpha=alpha, batch_size=256, seed=11)
    wrong = int(((res.prediction != ABSTAIN) & (res.prediction != 0)).sum())
    assert wrong <= 34, wrong
    assert int((res.prediction == ABSTAIN).sum()) > runs // 2  # near the boundary most runs abstain


def test_predict_abstains_near_ties_and_is_right_far_away():
    sigma = 0.5
    model = linear_model(2)
    x = points_at(model, [0.5, 0.5, 0.5, 0.5, 0.9999, 0.0001], sigma)
    pred = predict_smoothing(model, x, sigma=sigma, n=2000, alpha=0.001, batch_size=500, seed=0)
    assert pred.tolist() == [ABSTAIN, ABSTAIN, ABSTAIN, ABSTAIN, 0, 1]


def _small_problem():
    model = linear_model(3)
    x = points_at(model, [0.3, 0.6, 0.9, 0.99, 0.5], 0.5)
    y = torch.tensor([1, 0, 0, 1, 0])
    return model, x, y


def _same(a, b) -> bool:
    return all(
        torch.equal(getattr(a, k), getattr(b, k)) for k in ("prediction", "radius", "p_lower", "count", "correct")
    )


def test_seeded_batch_independent_and_resumable(tmp_path):
    model, x, y = _small_problem()
    kw = {"sigma": 0.5, "n0": 30, "n": 1000, "alpha": 0.01}
    ref = certify_smoothing(model, x, y, **kw, batch_size=1000, seed=7)
    assert _same(ref, certify_smoothing(model, x, y, **kw, batch_size=1000, seed=7))
    assert _same(ref, certify_smoothing(model, x, y, **kw, batch_size=33, seed=7, points_per_save=2))
    assert not torch.equal(ref.count, certify_smoothing(model, x, y, **kw, batch_size=1000, seed=8).count)

    class Crash(nn.Module):  # the same model, failing at its 13th forward pass (the third point; 5 per point)
        def __init__(self) -> None:
            super().__init__()
            self.inner, self.calls = model, 0

        def forward(self, t):
            self.calls += 1
            if self.calls == 13:
                raise KeyboardInterrupt
            return self.inner(t)

    crash, state = Crash(), tmp_path / "state.safetensors"
    with pytest.raises(KeyboardInterrupt):
        certify_smoothing(crash, x, y, **kw, batch_size=300, seed=7, state_path=state)
    assert state.is_file()
    crash.calls = -(10**6)  # no more crashes; count the forward passes of the rest
    resumed = certify_smoothing(crash, x, y, **kw, batch_size=300, seed=7, state_path=state)
    assert _same(ref, resumed)
    assert crash.calls + 10**6 == 3 * 5  # the first two points were not recomputed


def test_cli_smoothing(tiny_run, tmp_path, capsys):
    from logitpair.cli.main import main

    run = tmp_path / "run"
    shutil.copytree(tiny_run, run)
    assert main(["certify", str(run), "--method", "smoothing", "--n", "4", "--quiet"]) == 2  # no --sigma
    assert "--sigma" in capsys.readouterr().err
    argv = ["certify", str(run), "--method", "smoothing", "--sigma", "0.25", "--n", "4", "--n0", "10",
            "--n-samples", "60", "--alpha", "0.05", "--radii", "0.1", "0.25", "--quiet"]  # fmt: skip
    assert main(argv) == 0
    doc = json.loads((run / "certify.json").read_text())
    c = doc["certify"]
    assert c["method"] == "smoothing" and c["threat"]["norm"] == "L2" and c["n"] == 4
    assert c["options"]["n"] == 60 and c["options"]["n0"] == 10 and c["options"]["sigma"] == 0.25
    assert [r["radius"] for r in c["certified_accuracy"]] == [0.0, 0.1, 0.25]
    assert len(doc["points"]["prediction"]) == 4 and (run / "certify.png").read_bytes()[:4] == b"\x89PNG"
    md = (run / "certify.md").read_text()
    assert "Randomized smoothing" in md and "L2 radius" in md and "certify.png" in md
    assert main(argv) == 0  # resumed from the state: the same record
    assert json.loads((run / "certify.json").read_text())["points"] == doc["points"]


def test_regular_noise_std():
    """``regular`` with noise_std 0 (the default) is plain cross-entropy on the clean inputs, bit
    for bit and without drawing noise; with noise_std > 0 the loss differs, is deterministic under
    the per-sample key, and the noise is not clipped (Cohen et al.)."""
    from logitpair.methods import METHODS
    from logitpair.methods.context import BatchContext

    loss_fn, cls = METHODS.get("regular"), METHODS.settings("regular")
    assert cls().noise_std == 0.0
    torch.manual_seed(0)
    model = nn.Sequential(nn.Flatten(), nn.Linear(16, 3))
    x, y = torch.rand(8, 1, 4, 4), torch.randint(0, 3, (8,))
    ctx = BatchContext(indices=torch.arange(8), noise_key=123)
    rng = torch.get_rng_state()
    clean, _ = loss_fn(model, x, y, cls(), ctx)
    assert torch.equal(clean, nn.functional.cross_entropy(model(x), y))
    assert torch.equal(rng, torch.get_rng_state())
    noisy, _ = loss_fn(model, x, y, cls(noise_std=0.5), ctx)
    assert not torch.equal(noisy, clean)
    assert torch.equal(noisy, loss_fn(model, x, y, cls(noise_std=0.5), ctx)[0])
    other = BatchContext(indices=torch.arange(8), noise_key=124)
    assert not torch.equal(noisy, loss_fn(model, x, y, cls(noise_std=0.5), other)[0])
    seen = []
    probe = nn.Sequential(nn.Identity(), model)
    probe[0].register_forward_hook(lambda m, i, o: seen.append(o))
    loss_fn(probe, torch.zeros_like(x), y, cls(noise_std=0.5), ctx)
    assert float(seen[0].min()) < 0  # not clipped to [0, 1]
