"""The L2 threat model and the L2 attacks (issue 22, items 1 and 2).

The threat: projection, random start and step stay inside the ball and [0, 1] (random tensors of
several shapes, points at the box's corners), the projection is idempotent and equals the exact
projection onto ball ∩ box (a float64 bisection on the Lagrange multiplier, written here), steps
are in L2 units. The attacks (every registered attack that declares L2): inside the ball and
[0, 1], lower the accuracy of a trained model, seeded runs repeat; APGD-L2 is no weaker than
PGD-L2 on the same points. ``evaluate --norm l2`` end to end, and the refusals: an L-inf-only
attack, the ``fast`` suite, ``--norm l2`` without ``--eps``, bound propagation under L2.
"""

from __future__ import annotations

import json
import math

import pytest
import torch
from conftest import train_small_cnn
from torch import Tensor, nn

from logitpair.attacks import ATTACKS, apgd_ce, attack_info, attacks_for, pgd
from logitpair.attacks.fab import project_hyperplane_l2
from logitpair.attacks.square import square_l2_pattern
from logitpair.errors import ConfigError
from logitpair.evaluation import AttackSpec, evaluate, get_suite, run_protocol, suite_norms, transfer_matrix
from logitpair.evaluation.protocol import _fingerprint
from logitpair.evaluation.spec import pgd_spec
from logitpair.evaluation.transfer import transfer_markdown
from logitpair.threat import L2, Linf, lp_norm, make_threat

SHAPES = [(64, 3), (32, 1, 6, 6), (16, 3, 4, 5)]


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _points(shape: tuple[int, ...], seed: int) -> Tensor:
    """Random points in [0, 1]; the first quarter at corners of the box, the next on its faces."""
    g = _gen(seed)
    x = torch.rand(shape, generator=g)
    q = max(shape[0] // 4, 1)
    x[:q] = (x[:q] > 0.5).float()
    x[q : 2 * q] = torch.where(torch.rand(x[q : 2 * q].shape, generator=g) < 0.5, x[q : 2 * q].round(), x[q : 2 * q])
    return x


def _exact_projection(x: Tensor, z: Tensor, eps: float) -> Tensor:
    """Float64 reference: the projection of ``z`` onto {||d|| <= eps} ∩ [0, 1] around ``x`` is
    ``x + clip(d / (1 + mu), -x, 1 - x)`` with the smallest multiplier ``mu >= 0`` that puts it in
    the ball (KKT); ``mu`` by bisection, one example at a time."""
    x, z = x.double(), z.double()
    out = []
    for xi, zi in zip(x, z, strict=True):
        d, lo, hi = zi - xi, -xi, 1 - xi

        def at(mu: float, d=d, lo=lo, hi=hi) -> Tensor:
            return torch.minimum(torch.maximum(d / (1 + mu), lo), hi)

        if at(0.0).norm() <= eps:
            out.append(xi + at(0.0))
            continue
        a, b = 0.0, 1.0
        while at(b).norm() > eps:
            b *= 2
        for _ in range(200):
            m = (a + b) / 2
            a, b = (a, m) if at(m).norm() <= eps else (m, b)
        out.append(xi + at(b))
    return torch.stack(out)


# --- the threat --------------------------------------------------------------------------------


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("eps", [0.05, 0.5, 3.0])
def test_projection_inside_idempotent_and_exact(shape, eps):
    x = _points(shape, 0)
    z = x + 1.5 * torch.randn(shape, generator=_gen(1))
    threat = L2(eps)
    p = threat.project(x, z)
    assert threat.contains(x, p).all()
    assert p.min() >= 0 and p.max() <= 1
    assert (lp_norm(p - x, "L2") <= eps * (1 + 1e-6)).all()
    assert torch.allclose(threat.project(x, p), p, atol=1e-6)  # idempotent
    ref = _exact_projection(x, z, eps)
    assert (p.double() - ref).abs().max() < 5e-6  # the exact projection, up to float32 round-off
    # float64 inputs: exact to round-off
    p64 = threat.project(x.double(), z.double())
    assert (p64 - ref).abs().max() < 1e-12
    # never farther from z than AutoAttack's rescale-then-clip, which is inside both sets too
    d = z - x
    aa = (x + d * (eps / d.flatten(1).norm(dim=1)).clamp(max=1).view(-1, *[1] * (x.dim() - 1))).clamp(0, 1)
    assert threat.contains(x, aa).all()
    assert (lp_norm(p - z, "L2") <= lp_norm(aa - z, "L2") + 1e-5).all()


def test_projection_keeps_points_inside_and_moves_only_what_it_must():
    x = _points((32, 10), 2)
    threat = L2(0.7)
    inside = threat.random_init(x, _gen(3))
    assert torch.equal(threat.project(x, inside), inside)  # a point inside both sets stays put
    # clipping alone suffices when the clipped point is in the ball (the AutoAttack order would shrink it)
    z = x + torch.full_like(x, 0.6)
    p = threat.project(x, z)
    assert torch.allclose(p, _exact_projection(x, z, 0.7).float(), atol=5e-6)
    # at a corner x = 1 every coordinate pushed outwards stays at 1: the projection is x itself
    one = torch.ones(4, 10)
    assert torch.equal(threat.project(one, one + 5.0), one)
    assert torch.equal(L2(0.0).project(x, z), x)


@pytest.mark.parametrize("shape", SHAPES)
def test_random_init_and_step_stay_inside(shape):
    x = _points(shape, 4)
    threat = L2(0.8)
    x0 = threat.random_init(x, _gen(5))
    assert threat.contains(x, x0).all() and x0.min() >= 0 and x0.max() <= 1
    assert torch.equal(threat.random_init(x, _gen(5)), x0)  # seeded
    grad = torch.randn(shape, generator=_gen(6))
    grad[0] = 0.0  # a zero gradient: no move
    x1 = threat.step(x, x0, grad, 0.5)
    assert threat.contains(x, x1).all() and x1.min() >= 0 and x1.max() <= 1
    assert torch.equal(x1[0], x0[0])
    assert torch.isfinite(x1).all()


def test_random_init_is_uniform_in_the_ball():
    """Away from the box, ``||x0 - x|| / eps`` raised to the dimension is uniform on [0, 1] and the
    direction has mean zero (a radius without ``U^(1/d)`` fails the first, a sign pattern the second)."""
    x = torch.full((4000, 4), 0.5)
    x0 = L2(0.2).random_init(x, _gen(7))
    r = lp_norm(x0 - x, "L2") / 0.2
    u = r.pow(4)
    assert r.max() <= 1 + 1e-6
    assert abs(u.mean().item() - 0.5) < 0.02 and abs((u < 0.25).float().mean().item() - 0.25) < 0.025
    assert (x0 - x).mean(0).abs().max() < 0.01


def test_step_is_in_l2_units():
    x = torch.full((8, 3, 4, 4), 0.5)
    grad = torch.randn(x.shape, generator=_gen(8))
    x1 = L2(1.0).step(x, x, grad, 0.1)
    delta = (x1 - x).flatten(1)
    assert torch.allclose(delta.norm(dim=1), torch.full((8,), 0.1), atol=1e-6)
    unit = grad.flatten(1) / grad.flatten(1).norm(dim=1, keepdim=True)
    assert torch.allclose(delta / 0.1, unit, atol=1e-5)  # along the gradient
    per_example = L2(1.0).step(x, x, grad, torch.linspace(0.1, 0.8, 8).view(-1, 1, 1, 1))
    assert torch.allclose(lp_norm(per_example - x, "L2"), torch.linspace(0.1, 0.8, 8), atol=1e-5)


def test_contains_tolerance_and_records():
    x = torch.full((2, 5), 0.5)
    d = torch.tensor([1.0, 0, 0, 0, 0]) * 0.3
    threat = L2(0.3)
    assert threat.contains(x, x + d).all()
    assert not threat.contains(x, x + d * (1 + 1e-4)).any()
    assert not threat.contains(x, x + torch.tensor([0.6, 0, 0, 0, 0])).any()  # inside no ball of 0.3... and box
    assert threat.to_dict() == {"norm": "L2", "eps": 0.3, "bounds": [0.0, 1.0]}
    assert make_threat("l2", 0.5) == L2(0.5) and make_threat("linf", 0.1) == Linf(0.1) and make_threat("L2", 1) == L2(1)
    with pytest.raises(ConfigError, match="norm: unknown norm 'l3'"):
        make_threat("l3", 0.5)
    with pytest.raises(ConfigError, match="eps"):
        L2(-0.1)
    assert torch.allclose(threat.distance(x, x + d), torch.full((2,), 0.3))


# --- FAB's L2 projection onto a hyperplane inside the box -----------------------------------------


def _hyperplane_reference(p: Tensor, w: Tensor, b: Tensor) -> Tensor:
    """Float64 bisection on the multiplier: ``delta = s * clip(lam * s * w, box)``, ``w . delta = c``."""
    out = []
    for pi, wi, bi in zip(p.double(), w.double(), b.double(), strict=True):
        c = bi - wi @ pi
        ws = wi if c >= 0 else -wi
        lo, hi = -pi, 1 - pi

        def at(lam: float, ws=ws, lo=lo, hi=hi) -> Tensor:
            return torch.minimum(torch.maximum(lam * ws, lo), hi)

        big = 1e12
        if ws @ at(big) < abs(c):  # unreachable: as far as the box goes
            out.append(torch.where(ws > 0, hi, torch.where(ws < 0, lo, torch.zeros_like(lo))) * (ws != 0))
            continue
        a, z = 0.0, 1.0
        while ws @ at(z) < abs(c):
            z *= 2
        for _ in range(200):
            m = (a + z) / 2
            a, z = (m, z) if ws @ at(m) < abs(c) else (a, m)
        out.append(at(z))
    return torch.stack(out)


def test_fab_l2_hyperplane_projection_is_exact():
    g = _gen(9)
    p = _points((40, 6), 10).double()
    w = torch.randn(40, 6, generator=g, dtype=torch.float64)
    w[:4, :2] = 0.0
    b = (w * torch.rand(40, 6, generator=g, dtype=torch.float64)).sum(1)
    b[-3:] += 50.0  # beyond the box
    delta = project_hyperplane_l2(p, w, b)
    assert ((p + delta) >= -1e-12).all() and ((p + delta) <= 1 + 1e-12).all()
    reachable = torch.arange(40) < 37
    assert torch.allclose(((w * (p + delta)).sum(1) - b)[reachable], torch.zeros(37, dtype=torch.float64), atol=1e-9)
    assert torch.allclose(delta, _hyperplane_reference(p, w, b), atol=1e-8)


def test_square_l2_pattern():
    for s in (1, 3, 5, 8, 13):
        pat = square_l2_pattern(s, torch.zeros(1))
        assert pat.shape == (s, s) and math.isclose(pat.norm().item(), 1.0, rel_tol=1e-6)
        assert (pat[: s // 2] >= 0).all() and (pat[s // 2 :] < 0).all()
    pat = square_l2_pattern(9, torch.zeros(1))
    assert pat[2, 4] == pat[: 9 // 2].max() and pat[6, 4] == pat[9 // 2 :].min()  # the halves' centres
    assert torch.equal(pat[:, :4], pat[:, 5:].flip(1))  # symmetric about the middle column


# --- the attacks -------------------------------------------------------------------------------

L2_ATTACKS = {
    "pgd": {"steps": 10},
    "fgsm": {},
    "mi-fgsm": {"steps": 5},
    "apgd-ce": {"steps": 10},
    "apgd-dlr": {"steps": 10},
    "apgd-t": {"steps": 10, "n_target_classes": 2},
    "fab-t": {"steps": 10, "n_target_classes": 2},
    "fab": {"steps": 5},
    "square": {"queries": 250},
}
EPS = 2.0  # every gradient attack above breaks points of the trained model at this radius
RADIUS = {"square": 3.0}  # random search needs a larger one within a few hundred queries


def test_the_l2_attacks_are_declared():
    assert sorted(L2_ATTACKS) == attacks_for("L2")
    assert attacks_for("Linf") == ATTACKS.names()


@pytest.fixture(scope="module")
def points(tiny_data):
    x, y = tiny_data
    return x[:48], y[:48]


def _acc(model: nn.Module, x: Tensor, y: Tensor) -> float:
    with torch.no_grad():
        return (model(x).argmax(1) == y).float().mean().item()


@pytest.mark.parametrize("name", sorted(L2_ATTACKS))
def test_l2_attack_invariants(name, trained_model, points):
    x, y = points
    threat = L2(RADIUS.get(name, EPS))
    fn = ATTACKS.get(name)
    runs = [fn(trained_model, x, y, threat=threat, generator=_gen(11), **L2_ATTACKS[name]) for _ in range(2)]
    x_adv = runs[0]
    assert x_adv.shape == x.shape and x_adv.dtype == x.dtype
    assert threat.contains(x, x_adv).all() and x_adv.min() >= 0 and x_adv.max() <= 1
    assert _acc(trained_model, x_adv, y) < _acc(trained_model, x, y) - 0.2, name
    assert torch.equal(runs[0], runs[1])  # seeded: the same result


def test_apgd_l2_steps_along_the_normalised_gradient(trained_model, points):
    """One APGD step from the clean point is ``threat.step`` with the initial size ``2 eps``
    (AutoAttack's L2 APGD), not a signed step."""
    from logitpair.attacks import apgd
    from logitpair.attacks.common import loss_grad

    x, y = points
    threat = L2(0.3)
    out = apgd(trained_model, x, y, threat=threat, steps=1, init=x)
    _, _, grad = loss_grad(trained_model, x, lambda logits: nn.functional.cross_entropy(logits, y, reduction="none"))
    expected = threat.step(x, x, grad, 2 * 0.3)
    same = (out - expected).flatten(1).abs().amax(1) < 1e-6
    assert same.float().mean() > 0.9  # the rest kept x itself (the step did not raise their loss)
    assert torch.allclose(lp_norm(expected - x, "L2"), torch.full((len(x),), 0.3), atol=1e-5)


def test_fab_l2_finds_the_closest_boundary_of_a_linear_model():
    """For a linear model the smallest L2 perturbation that changes the decision is known:
    ``min_t (z_y - z_t) / ||w_y - w_t||``. FAB (L2) breaks every point whose distance is a little
    below eps and none above (no attack can); with the L-inf geometry it breaks none at all."""
    from logitpair.attacks import fab, fab_t

    torch.manual_seed(0)
    model = nn.Linear(20, 3)
    with torch.no_grad():
        model.weight.normal_()
        model.bias.zero_()
        x = 0.5 + 0.02 * torch.randn(64, 20)  # far from the box: the plain distances apply
        z = model(x)
    y, w = z.argmax(1), model.weight.detach()
    gap = (z.gather(1, y[:, None]) - z) / (w[y][:, None, :] - w[None]).norm(dim=2).clamp_min(1e-12)
    dist = gap.scatter(1, y[:, None], float("inf")).min(1).values
    eps = float(dist.median()) * 1.1
    for attack, extra in ((fab_t, {"n_target_classes": 2}), (fab, {})):
        x_adv = attack(model, x, y, threat=L2(eps), steps=20, **extra)
        with torch.no_grad():
            broken = model(x_adv).argmax(1) != y
        assert not (broken & (dist > eps)).any()
        assert broken[dist * 1.05 < eps].all(), attack.__name__


def test_apgd_l2_no_weaker_than_pgd_l2(trained_model, tiny_data):
    """Same points, same number of gradient steps, paired: APGD-CE breaks every point PGD breaks
    but a few, and more in all."""
    x, y = tiny_data[0][:96], tiny_data[1][:96]
    threat = L2(1.0)
    with torch.no_grad():
        ok_pgd = trained_model(pgd(trained_model, x, y, threat=threat, steps=25, generator=_gen(12))).argmax(1) == y
        ok_apgd = (
            trained_model(apgd_ce(trained_model, x, y, threat=threat, steps=25, generator=_gen(12))).argmax(1) == y
        )
    only_pgd_broke = int((ok_apgd & ~ok_pgd).sum())
    assert ok_apgd.sum() <= ok_pgd.sum() and only_pgd_broke <= 2, (ok_apgd.sum(), ok_pgd.sum(), only_pgd_broke)
    assert ok_pgd.float().mean() < 0.95  # the radius matters: not a comparison of two no-ops


def test_linf_only_attacks_refused_under_l2(trained_model, points):
    x, y = points
    assert attack_info("noise").norms == ("Linf",)
    with pytest.raises(ConfigError, match="noise .*supports the Linf threat model only"):
        ATTACKS.get("noise")(trained_model, x, y, threat=L2(1.0))
    with pytest.raises(
        ConfigError, match=r"^the L2 threat model: attack\(s\) noise do not support it; attacks for L2: apgd-ce"
    ):
        run_protocol(trained_model, x, y, [AttackSpec("apgd-ce", {"steps": 2}), AttackSpec("noise")], threat=L2(1.0))


# --- suites, the protocol, transfer ----------------------------------------------------------------


def test_suites_under_l2(trained_model, points):
    assert [n for n in ("quick", "standard", "thorough", "pgd40", "targeted") if "L2" in suite_norms(n)] == [
        "quick", "standard", "thorough", "pgd40", "targeted"
    ]  # fmt: skip
    assert suite_norms("fast") == ("Linf",)
    assert [a.name for a in get_suite("standard", "L2")] == ["apgd-ce", "apgd-t", "fab-t", "square"]
    with pytest.raises(
        ConfigError, match=r"'fast' does not support the L2 threat model .*; suites for L2: quick, standard"
    ):
        get_suite("fast", "L2")
    x, y = points
    with pytest.raises(ConfigError, match="fast"):
        evaluate(trained_model, x, y, threat=L2(1.0), suite="fast")
    with pytest.raises(ConfigError, match="gates of .* were measured under Linf only"):
        run_protocol(trained_model, x, y, get_suite("fast"), threat=L2(1.0))
    res = evaluate(trained_model, x[:16], y[:16], threat=L2(EPS), suite=[pgd_spec(5, 1)])
    assert res.summary()["threat"] == {"norm": "L2", "eps": EPS, "bounds": [0.0, 1.0]}
    assert res.robust.float().mean() < res.clean_correct.float().mean()


def test_resumable_state_keyed_by_the_norm(points):
    x, y = points
    spec = [pgd_spec(5, 1)]
    fp = {t: _fingerprint(spec, t, x, y, seed=0) for t in (Linf(0.5), L2(0.5))}
    assert fp[Linf(0.5)] != fp[L2(0.5)]


def test_transfer_under_l2(trained_model, points, tiny_data):
    x, y = points
    other = train_small_cnn(*tiny_data, seed=1)
    res = transfer_matrix({"a": trained_model, "b": other}, x[:24], y[:24], attack=pgd_spec(5, 1), threat=L2(EPS))
    doc = res.to_dict()
    assert doc["threat"]["norm"] == "L2"
    for adv in res.adversarial.values():
        assert L2(EPS).contains(x[:24], adv).all()
    assert "L2 ε = 2" in transfer_markdown({**doc, "dataset": "tiny"})
    assert res.matrix("robust")[0][0] < res.matrix("robust")[0][1] + 1e-9  # white-box no weaker than transfer


def test_bound_propagation_refuses_l2(trained_model, points):
    from logitpair.bounds import margin_bounds

    x, y = points
    with pytest.raises(ConfigError, match="bound propagation supports the Linf threat only, got L2"):
        margin_bounds(trained_model, x[:2], y[:2], threat=L2(0.5), method="ibp")


# --- the command line --------------------------------------------------------------------------


def test_evaluate_norm_l2_end_to_end(tiny_run, tmp_path, capsys):
    import shutil

    from logitpair.cli import main

    run = tmp_path / "run"
    shutil.copytree(tiny_run, run)
    attacks = "apgd-ce:steps=10,apgd-t:steps=5;n_target_classes=2,fab-t:steps=5;n_target_classes=2,square:queries=50"
    # a baseline too weak to break anything (the 1-epoch model is fragile), so the L2 attacks run
    argv = ["evaluate", str(run), "--norm", "l2", "--eps", "0.5", "--n", "40", "--steps", "1", "--restarts", "1",
            "--step-size", "0.001", "--attacks", attacks, "--json", "--quiet"]  # fmt: skip
    assert main(argv) == 0
    ev = json.loads(capsys.readouterr().out)
    assert ev["threat"] == {"norm": "L2", "eps": 0.5, "bounds": [0.0, 1.0]} and ev["eps"] == 0.5
    assert ev["white_box"]["threat"]["norm"] == "L2"
    written = json.loads((run / "evaluation.json").read_text())
    assert written["threat"]["norm"] == "L2"
    assert "L2 ε = 0.5" in (run / "evaluation.md").read_text()
    assert ev["white_box"]["robust"]["value"] < ev["clean"]["value"]
    assert ev["white_box"]["attacked"]["apgd-ce {'steps': 10}"] > 0
    assert ev["pgd"]["attack"]["params"]["step_size"] == 0.001
    # an L-inf evaluation at the same number keeps its own state and says L∞
    assert main(["evaluate", str(run), "--eps", "0.5", "--n", "20", "--steps", "2", "--restarts", "1",
                 "--suite", "none", "--quiet"]) == 0  # fmt: skip
    assert "L∞ ε = 0.5" in (run / "evaluation.md").read_text()


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (["--norm", "l2"], "the L2 threat model needs an explicit --eps"),
        (["--norm", "l2", "--eps", "1", "--suite", "fast"], "--suite: 'fast' does not support the L2 threat model"),
        (["--norm", "l2", "--eps", "1", "--attacks", "noise"], "attack(s) noise do not support it"),
        (["--norm", "l2", "--eps", "1", "--certify", "ibp"], "certifies the Linf threat model only"),
        (["--norm", "l2", "--eps", "-1"], "--eps: expected a finite L2 radius >= 0"),
    ],
)
def test_evaluate_norm_l2_refusals(tiny_run, tmp_path, capsys, extra, message):
    from logitpair.cli import main

    assert main(["evaluate", str(tiny_run), "--n", "4", "--quiet", *extra]) == 2
    assert message in capsys.readouterr().err
    assert not (tiny_run / "eval-state").exists()  # refused before any work


def test_transfer_command_norm_l2(tiny_run, tmp_path, capsys):
    from logitpair.cli import main

    out = tmp_path / "t"
    argv = ["transfer", str(tiny_run), "--norm", "l2", "--eps", "0.5", "--n", "10", "--attack", "pgd:steps=3;restarts=1",
            "--out", str(out), "--json", "--quiet"]  # fmt: skip
    assert main(argv) == 0
    doc = json.loads(capsys.readouterr().out)
    assert doc["threat"]["norm"] == "L2" and doc["eps"] == 0.5
    assert "L2 ε = 0.5" in (out / "transfer.md").read_text()
    assert main(["transfer", str(tiny_run), "--norm", "l2", "--out", str(tmp_path / "u"), "--quiet"]) == 2
    assert "needs an explicit --eps" in capsys.readouterr().err
