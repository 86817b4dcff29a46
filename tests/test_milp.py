"""Exact verification by MILP (MIPVerify, ``logitpair.bounds.milp`` / ``.exact``): the minimum margin
equals an exhaustive LP over the linear regions of tiny networks, the network's own values are a
feasible solution, verdicts agree with the exact minimum, counterexamples are real, a time limit
is a timeout; ``certify(method="milp")`` and ``logitpair certify --method milp`` on LeNet-5."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
import torch
from _exact import exact_min_margins
from torch import nn

import logitpair
from logitpair.bounds import milp
from logitpair.bounds.exact import minimum_margin, prepare, verify_point
from logitpair.certification import DECIDERS, MILP_STATUSES, sandwich
from logitpair.cli import main
from logitpair.errors import ConfigError
from logitpair.evaluation import evaluate
from logitpair.models import create_model
from logitpair.threat import Linf


def _scaled(model: nn.Module, seed: int) -> nn.Module:
    """Weights ×3: more unstable units and regions than the default initialisation gives."""
    torch.manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.mul_(3.0)
    return model.eval()


def _mlp() -> nn.Module:  # 2 inputs, 8 ReLUs
    return nn.Sequential(nn.Linear(2, 4), nn.ReLU(), nn.Linear(4, 4), nn.ReLU(), nn.Linear(4, 3))


def _relu_pool() -> nn.Module:  # 1×2×2 inputs, 8 ReLUs, a max-pool over each channel's 4 (the ReLU fused)
    return nn.Sequential(nn.Conv2d(1, 2, 1), nn.ReLU(), nn.MaxPool2d(2), nn.Flatten(), nn.Linear(2, 3))


def _pool_relu() -> nn.Module:  # a max-pool of signed values first, then 4 ReLUs
    return nn.Sequential(nn.Conv2d(1, 2, 1), nn.MaxPool2d(2), nn.Flatten(), nn.Linear(2, 4), nn.ReLU(), nn.Linear(4, 3))


TINY = {"mlp": (_mlp, (2,)), "relu-pool": (_relu_pool, (1, 2, 2)), "pool-relu": (_pool_relu, (1, 2, 2))}


def _tiny(name: str, seed: int) -> tuple[nn.Module, torch.Tensor, int]:
    make, shape = TINY[name]
    torch.manual_seed(seed)
    model = _scaled(make(), seed)
    x = torch.rand(1, *shape, generator=torch.Generator().manual_seed(seed))
    return model, x, int(model(x).argmax(1))


def _is_real(model: nn.Module, x: torch.Tensor, y: int, adv: torch.Tensor, threat: Linf) -> bool:
    """Inside the ball ∩ [0, 1] and misclassified by a float32 forward pass."""
    adv = adv.reshape_as(x)
    with torch.no_grad():
        return bool(threat.contains(x, adv).all()) and int(model(adv).argmax(1)) != y


@pytest.mark.parametrize("short", [milp.SHORT, 0], ids=["substituted", "variables"])
@pytest.mark.parametrize("name", list(TINY))
def test_minimum_margin_equals_the_exhaustive_lp(name, short, monkeypatch):
    """For 3 seeds and 2 radii: the MILP's minimum of every margin equals the minimum over the
    linear regions (one LP each) within 1e-6, with the expressions substituted (default) or every
    nonlinear unit's input a variable (``SHORT = 0``); ``verify_point`` (every class to the solver)
    says verified iff the minimum is positive, and its counterexample is real."""
    monkeypatch.setattr(milp, "SHORT", short)
    verdicts, binaries = [], 0
    for seed in (0, 1, 2):
        model, x, y = _tiny(name, seed)
        net = milp.network(model, x)
        for eps in (0.05, 0.3):
            exact = exact_min_margins(model, x[0], y, eps)
            got = [minimum_margin(net, x, y, j, threat=Linf(eps)) for j in range(3) if j != y]
            assert all(g.status == 0 for g in got)
            np.testing.assert_allclose([g.value for g in got], np.delete(exact, y), atol=1e-6)
            out = verify_point(net, x, y, threat=Linf(eps), skip_proven=False)
            lowest = float(exact.min())
            assert abs(lowest) > 1e-3, "a case at a tie tells nothing"
            assert out.status == ("verified" if lowest > 0 else "counterexample"), (seed, eps, lowest, out)
            if out.status == "counterexample":
                assert _is_real(model, x, y, out.counterexample, Linf(eps))
            verdicts.append(out.status)
            binaries += out.binaries
    assert binaries > 0, "the cases need unstable units"
    if name != "mlp":
        assert {"verified", "counterexample"} <= set(verdicts), verdicts


@pytest.mark.parametrize("short", [milp.SHORT, 0], ids=["substituted", "variables"])
def test_the_networks_own_values_are_a_feasible_solution(short, monkeypatch):
    """Soundness of the encoding: at random inputs of the box, the values the network computes
    (``Program.assign``) satisfy every row and bound, binaries 0/1, and the logits' expression
    gives the network's float64 logits (a LeNet-5 on 12×12 inputs: conv, ReLU fused into max-pool,
    dense)."""
    monkeypatch.setattr(milp, "SHORT", short)
    torch.manual_seed(0)
    model = create_model("lenet5", num_classes=5, image_size=12).eval()
    x = torch.rand(1, 1, 12, 12, generator=torch.Generator().manual_seed(1))
    threat = Linf(0.05)
    net = milp.network(model, x)
    prep = prepare(net, x, 0, threat)
    enc = milp.encode(net, *prep.box, prep.bounds)
    A, lb, ub = enc.program.rows()
    lo, hi = enc.program.bounds
    assert enc.relus > 0 and enc.pools > 0
    double = net.dag
    for k in range(3):
        point = threat.project(x, x + 0.05 * (2 * torch.rand(x.shape, generator=torch.Generator().manual_seed(k)) - 1))
        v = enc.program.assign(point.double().flatten().numpy())
        rows = A @ v
        assert (rows >= lb - 1e-9).all() and (rows <= ub + 1e-9).all()
        assert (v >= lo - 1e-12).all() and (v <= hi + 1e-12).all()
        binary = enc.program.integrality == 1
        assert set(np.unique(v[binary])) <= {0.0, 1.0}
        logits = enc.logits.M @ v[: enc.logits.M.shape[1]] + enc.logits.c
        with torch.no_grad():
            expected = double.evaluate(point.double(), lambda i, vals: double.ops[i].forward(*vals))
        np.testing.assert_allclose(logits, expected[0].numpy(), atol=1e-10)


def test_a_tiny_time_limit_is_a_timeout():
    """A random 8-48-48-48-10 MLP at ε 0.2: no bound, LP relaxation or walk over linear regions
    settles the point and HiGHS's branch and bound runs past 40 s (measured). A limit of 1 s ends in
    ``timeout`` from HiGHS's own limit, 1 ms before any program; never a verdict."""
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Linear(8, 48), nn.ReLU(), nn.Linear(48, 48), nn.ReLU(), nn.Linear(48, 48), nn.ReLU(), nn.Linear(48, 10)
    ).eval()  # fmt: skip
    x = torch.rand(1, 8, generator=torch.Generator().manual_seed(1))
    y = int(model(x).argmax(1))
    net = milp.network(model, x)
    for limit, detail in ((1.0, "HiGHS: Time limit reached"), (1e-3, "the time limit")):
        out = verify_point(net, x, y, threat=Linf(0.2), time_limit=limit)
        assert out.status == "timeout" and out.counterexample is None, out
        assert out.detail.startswith(detail) and out.seconds < limit + 2


def _boundary_points(model: nn.Module, x: torch.Tensor, eps: float, distances: tuple[float, ...]):
    """Points at L∞ distance ``d · eps`` before the decision boundary on the segment from one
    held-out image to the next (bisection), labelled as predicted (all correct): close ones are
    broken at ``eps``, far ones robust."""
    points, labels = [], []
    with torch.no_grad():
        for k, d in enumerate(distances):
            a, b = x[2 * k], x[2 * k + 1]
            label = int(model(a[None]).argmax(1))
            lo, hi = 0.0, 1.0
            for _ in range(30):
                mid = (lo + hi) / 2
                lo, hi = (mid, hi) if int(model((a + mid * (b - a))[None]).argmax(1)) == label else (lo, mid)
            t = lo - d * eps / float((b - a).abs().max())
            points.append(a + t * (b - a))
            labels.append(label)
    return torch.stack(points), torch.tensor(labels)


def test_trained_lenet5(lenet5_points):
    """LeNet-5 (28×28), ε 0.003, points at 0.5, 2, 16 and 32 ε before the decision boundary: some
    broken, some verified (by α-CROWN or the solver); no verified point is broken by the
    ``standard`` suite; every counterexample is real; the points the attacks broke come out
    ``counterexample`` from the solver alone (``cheap=False``)."""
    model, x, _ = lenet5_points
    threat = Linf(0.003)
    xs, ys = _boundary_points(model, x, threat.eps, (0.5, 2, 16, 32))
    res = logitpair.certify(model, xs, ys, threat=threat, method="milp", options={"time_limit": 30})
    assert {"verified", "counterexample"} <= set(res.status), res.status
    by = [DECIDERS[int(d)] for d in res.decided_by]
    assert ("verified", "milp") in zip(res.status, by), "the solver must verify a point the bounds cannot"
    assert torch.equal(res.certified, torch.tensor([s == "verified" for s in res.status]))
    for i, s in enumerate(res.status):
        if s == "counterexample":
            assert _is_real(model, xs[i : i + 1], int(ys[i]), res.adversarial[i], threat)
    standard = evaluate(model, xs, ys, threat=threat, suite="standard", batch_size=len(xs))
    sandwich(
        res.certified, standard.clean_correct, standard.robust, attack="standard"
    )  # raises on a broken verified point
    summary = res.summary()
    assert sum(summary["counts"].values()) == len(xs) and set(summary["counts"]) == set(MILP_STATUSES)
    assert set(summary["decided_by"]) == set(DECIDERS)

    broken = torch.tensor([d == "attack" for d in by])
    assert broken.any()
    forced = logitpair.certify(model, xs[broken], ys[broken], threat=threat, method="milp",
                               options={"time_limit": 30, "cheap": False})  # fmt: skip
    assert forced.status == ["counterexample"] * int(broken.sum()), forced.status
    assert all(DECIDERS[int(d)] == "milp" for d in forced.decided_by)
    for i in range(len(forced.status)):
        assert _is_real(model, xs[broken][i : i + 1], int(ys[broken][i]), forced.adversarial[i], threat)
    assert forced.summary()["milp_seconds"]["n"] == int(broken.sum())


def test_milp_options_are_checked(lenet5_points):
    model, x, y = lenet5_points
    for options, option in (({"bogus": 1}, "bogus"), ({"time_limit": 0}, "time_limit"),
                            ({"formulation": "or"}, "formulation")):  # fmt: skip
        with pytest.raises(ConfigError, match=option):
            logitpair.certify(model, x[:1], y[:1], threat=Linf(0.01), method="milp", options=options)


def test_cli(tiny_run, tmp_path, capsys):
    """``logitpair certify RUN --method milp``: the report counts every state and who decided it."""
    run = tmp_path / "run"
    shutil.copytree(tiny_run, run)
    assert main(["certify", str(run), "--method", "milp", "--time-limit", "0"]) == 2
    assert "--time-limit" in capsys.readouterr().err
    args = ["--n", "4", "--batch-size", "4", "--eps-curve", "0.1", "--time-limit", "3", "--quiet"]
    assert main(["certify", str(run), "--method", "milp", *args]) == 0
    doc = json.loads((run / "certify.json").read_text())
    c = doc["certify"]
    assert doc["settings"]["method"] == "milp" and doc["settings"]["time_limit"] == 3
    assert set(c["counts"]) == set(MILP_STATUSES) and sum(c["counts"].values()) == 4
    assert sum(c["decided_by"].values()) == 4 and len(doc["points"]["decided_by"]) == 4
    assert set(doc["points"]["status"]) <= set(MILP_STATUSES)
    md = (run / "certify.md").read_text()
    assert "verified" in md and "Decided by" in md and "not broken" in md
