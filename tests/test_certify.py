"""The certify stage: per-point statuses, the sandwich's check, resuming, the command line."""

from __future__ import annotations

import json
import shutil

import pytest
import torch

import logitpair
from logitpair import bounds
from logitpair.certification import STATUSES, Contradiction, certify, sandwich
from logitpair.cli import main
from logitpair.evaluation import evaluate
from logitpair.threat import Linf


@pytest.fixture(scope="module")
def points(tiny_data):
    x, y = tiny_data
    return x[:48], y[:48]


def test_statuses(trained_model, points):
    x, y = points
    res = logitpair.certify(trained_model, x, y, threat=Linf(0.01), method="ibp", batch_size=16)
    status = res.status
    assert len(status) == res.n == 48 and set(status) <= set(STATUSES)
    wrong = ~res.clean_correct
    assert not res.certified[wrong].any(), "a point wrong clean is never certified"
    assert all(s == "wrong_clean" for s, w in zip(status, wrong.tolist(), strict=True) if w)
    assert torch.isnan(res.margin[wrong]).all() and (res.margin[res.certified] > 0).all()
    s = res.summary()
    assert s["certified"]["value"] <= s["clean"]["value"] and s["certified"]["n"] == 48
    lo, hi = s["certified"]["ci95"]
    assert lo - 1e-12 <= s["certified"]["value"] <= hi + 1e-12
    assert sum(s["counts"].values()) == 48 and s["seconds_per_point"] > 0


@pytest.mark.parametrize("method", ["ibp", "crown"])
def test_zero_and_huge_eps(trained_model, points, method):
    x, y = points
    logits = trained_model(x).detach()
    top2 = logits.topk(2, dim=1).values
    clear = (logits.argmax(1) == y) & (top2[:, 0] - top2[:, 1] > 1e-3)  # correct, by more than rounding
    at0 = certify(trained_model, x, y, threat=Linf(0.0), method=method, batch_size=48)
    assert clear.any() and at0.certified[clear].all(), "at eps 0 a correctly classified point is certified"
    huge = certify(trained_model, x, y, threat=Linf(1.0), method=method, batch_size=48)
    assert not huge.certified.any(), "the whole [0, 1] cube: nothing is certified"


def test_no_contradictions(trained_model, points):
    """No point certified is broken by the fast suite (the protocol, on the same points)."""
    x, y = points
    threat = Linf(0.004)
    cert = certify(trained_model, x, y, threat=threat, method="crown", batch_size=48)
    attacked = evaluate(trained_model, x, y, threat=threat, suite="fast", batch_size=48)
    assert cert.certified.any(), "the test needs certified points"
    sw = sandwich(cert.certified, attacked.clean_correct, attacked.robust, attack="fast")
    assert sw["certified"]["value"] <= sw["attacked"]["value"] <= sw["clean"]["value"]
    assert sw["undecided"] == int((attacked.robust & ~cert.certified).sum())


def test_contradiction_raises():
    flags = torch.tensor([True, True, False])
    with pytest.raises(Contradiction, match="1 point"):
        sandwich(flags, flags, torch.tensor([True, False, False]), attack="pgd")


def test_resume_skips_finished_batches(trained_model, points, tmp_path, monkeypatch):
    x, y = points
    state = tmp_path / "state.safetensors"
    real = bounds.margin_bounds
    calls: list[int] = []

    def interrupted(*args, **kwargs):
        calls.append(len(args[1]))
        if len(calls) == 2:
            raise KeyboardInterrupt
        return real(*args, **kwargs)

    monkeypatch.setattr(bounds, "margin_bounds", interrupted)
    with pytest.raises(KeyboardInterrupt):
        certify(trained_model, x, y, threat=Linf(0.004), method="ibp", batch_size=16, state_path=state)
    assert state.is_file()
    calls.clear()
    monkeypatch.setattr(bounds, "margin_bounds", lambda *a, **k: (calls.append(len(a[1])), real(*a, **k))[1])
    resumed = certify(trained_model, x, y, threat=Linf(0.004), method="ibp", batch_size=16, state_path=state)
    assert len(calls) == 2, "the first batch is not computed again"
    monkeypatch.setattr(bounds, "margin_bounds", real)
    fresh = certify(trained_model, x, y, threat=Linf(0.004), method="ibp", batch_size=16)
    assert torch.equal(resumed.certified, fresh.certified) and torch.equal(resumed.clean_correct, fresh.clean_correct)
    assert torch.allclose(resumed.margin, fresh.margin, equal_nan=True)


def test_cli(tiny_run, tmp_path, capsys):
    run = tmp_path / "run"
    shutil.copytree(tiny_run, run)
    for f in ("evaluation.json", "evaluation.md"):
        (run / f).unlink(missing_ok=True)
    for argv, flag in ((["certify", str(run), "--method", "bogus"], "--method"),
                       (["evaluate", str(run), "--certify", "bogus"], "--certify"),
                       (["certify", str(run), "--eps-curve", "2"], "--eps-curve")):  # fmt: skip
        assert main(argv) == 2
        err = capsys.readouterr().err.strip()
        assert len(err.splitlines()) == 1 and flag in err, err
    assert not any((run / f).exists() for f in ("certify.json", "certify.md", "certify.png", "evaluation.json"))

    fast = ["--n", "20", "--batch-size", "10", "--quiet"]
    assert (
        main(["evaluate", str(run), *fast, "--suite", "none", "--steps", "3", "--restarts", "1", "--certify", "ibp"])
        == 0
    )
    ev = json.loads((run / "evaluation.json").read_text())
    sw = ev["certified"]["sandwich"]
    assert ev["certified"]["method"] == "ibp" and sw["n"] == 20 and "note" not in sw
    assert sw["certified"]["value"] <= sw["attacked"]["value"] <= sw["clean"]["value"]
    assert "## Certified (ibp)" in (run / "evaluation.md").read_text()

    assert main(["certify", str(run), *fast, "--method", "ibp", "--eps-curve", "0.05"]) == 0
    doc = json.loads((run / "certify.json").read_text())
    assert (run / "certify.png").read_bytes()[:4] == b"\x89PNG"
    assert doc["settings"]["method"] == "ibp" and doc["settings"]["eps_curve"] == [0.05, 0.1]
    assert len(doc["points"]["status"]) == 20 and doc["environment"]["torch"] == torch.__version__
    attacks = [s["attack"] for s in doc["sandwich"]]
    assert attacks[0] == "the fast suite" and attacks[1].startswith("the evaluation's attacks"), attacks
    md = (run / "certify.md").read_text()
    assert "## The sandwich at ε = 0.1" in md and "certify.png" in md


def test_trained_lenet5_alpha_crown_beats_crown_and_nothing_certified_is_broken(lenet5_points):
    """The issue's checks on a trained LeNet-5 (8 points, eps 0.01, where CROWN certifies some
    points and not others): alpha-CROWN is never looser than CROWN and tighter somewhere, and no
    point either certifies is broken by any attack of the fast suite (``sandwich`` raises on one)."""
    model, x, y = lenet5_points
    x, y, threat = x[:8], y[:8], Linf(0.01)
    crown = bounds.margin_bounds(model, x, y, threat=threat, method="crown")
    alpha = bounds.margin_bounds(model, x, y, threat=threat, method="alpha-crown")
    finite = torch.isfinite(crown)
    assert (alpha >= crown - 1e-6)[finite].all(), "alpha-CROWN keeps the best bound, CROWN's slopes included"
    gain = (alpha - crown)[finite]
    assert (gain > 1e-3).any(), f"alpha-CROWN tightened no margin bound (largest gain {gain.max():.2e})"

    attacked = evaluate(model, x, y, threat=threat, suite="fast", batch_size=8)
    for lower in (crown, alpha):
        flags = attacked.clean_correct & (lower > 0).all(1)
        assert 0 < int(flags.sum()) < 8, "the check needs certified and uncertified points"
        sw = sandwich(flags, attacked.clean_correct, attacked.robust, attack="fast")
        assert sw["certified"]["value"] <= sw["attacked"]["value"] <= sw["clean"]["value"]
