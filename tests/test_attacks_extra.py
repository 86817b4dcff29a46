"""FAB / FAB-T, MI-FGSM (with source ensembles) and the official ALP attack notation."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from logitpair.attacks import (
    ATTACKS,
    EnsembleLogits,
    OfficialSpec,
    apgd_t,
    fab,
    fab_t,
    fgsm,
    mi_fgsm,
    official_attack,
    official_threat,
    parse_official,
    predict,
)
from logitpair.attacks.fab import project_hyperplane_linf
from logitpair.attacks.official import official_targets
from logitpair.errors import ConfigError
from logitpair.threat import Linf

THREAT = Linf(0.05)
SPEC = parse_official("pgd_13_3_5")  # eps 13/255, a little over 0.05


def _official(model, x, y, *, threat, generator=None):
    return official_attack(model, x, y, spec=SPEC, generator=generator)


ATTACK_FNS = {
    "fab-t": lambda m, x, y, **kw: ATTACKS.get("fab-t")(m, x, y, steps=10, n_target_classes=2, restarts=2, **kw),
    "fab": lambda m, x, y, **kw: ATTACKS.get("fab")(m, x, y, steps=8, restarts=2, **kw),
    "mi-fgsm": lambda m, x, y, **kw: ATTACKS.get("mi-fgsm")(m, x, y, steps=5, **kw),
    "official": _official,
}


def gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def acc(model: nn.Module, x: Tensor, y: Tensor) -> float:
    return float((predict(model, x).argmax(1) == y).float().mean())


def linf(a: Tensor, b: Tensor) -> Tensor:
    return (a - b).flatten(1).abs().amax(1)


# --- invariants over every new attack ----------------------------------------------------


@pytest.mark.parametrize("name", list(ATTACK_FNS))
def test_invariants_and_determinism(name, trained_model, tiny_data):
    x, y = tiny_data[0][:48], tiny_data[1][:48]
    threat = official_threat(SPEC) if name == "official" else THREAT
    a = ATTACK_FNS[name](trained_model, x, y, threat=threat, generator=gen(3))
    assert a.shape == x.shape and a.dtype == x.dtype
    assert threat.contains(x, a).all() and linf(a, x).max() <= threat.eps + 1e-6
    assert a.min() >= 0 and a.max() <= 1
    assert acc(trained_model, a, y) < acc(trained_model, x, y)
    b = ATTACK_FNS[name](trained_model, x, y, threat=threat, generator=gen(3))
    assert torch.equal(a, b)


@pytest.mark.parametrize("name", list(ATTACK_FNS))
def test_model_state_untouched(name, tiny_data):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Flatten(), nn.Linear(784, 16), nn.BatchNorm1d(16), nn.ReLU(), nn.Linear(16, 10))
    model.train()
    model[2].eval()  # a submodule with its own flag
    model[4].weight.requires_grad_(False)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    flags = [p.requires_grad for p in model.parameters()]
    x, y = tiny_data[0][:16], tiny_data[1][:16]
    ATTACK_FNS[name](model, x, y, threat=THREAT, generator=gen())
    assert model.training and not model[2].training and all(model[i].training for i in (0, 1, 3, 4))
    assert [p.requires_grad for p in model.parameters()] == flags
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k]), k
    assert all(p.grad is None for p in model.parameters())


def test_registry_names():
    assert {"fab-t", "fab", "mi-fgsm"} <= set(ATTACKS.names())
    assert "pgdll_16_2_10" not in ATTACKS  # the official notation is parsed, not registered


# --- FAB ---------------------------------------------------------------------------------


def test_hyperplane_projection_is_optimal():
    g = gen(1)
    n, d = 64, 12
    p = torch.rand(n, d, generator=g, dtype=torch.float64)
    w = torch.randn(n, d, generator=g, dtype=torch.float64)
    w[:4, :5] = 0.0
    b = (w * torch.rand(n, d, generator=g, dtype=torch.float64)).sum(1)
    b[-4:] = 1e3  # out of the box's reach
    delta = project_hyperplane_linf(p, w, b)
    z = p + delta
    assert (z >= -1e-12).all() and (z <= 1 + 1e-12).all()
    assert (delta[w == 0] == 0).all()
    c = b - (w * p).sum(1)
    room = torch.where(w * c[:, None] > 0, 1 - p, p)
    reach = (w.abs() * room).sum(1)
    feasible = reach >= c.abs()
    assert not feasible[-4:].any() and feasible.sum() > n // 2
    assert torch.allclose((w * z).sum(1)[feasible], b[feasible], atol=1e-9)
    lam = delta.abs().amax(1)
    # optimality: with a slightly smaller L-inf radius the hyperplane is out of reach
    smaller = (w.abs() * torch.minimum(0.999 * lam[:, None], room)).sum(1)
    assert (smaller[feasible] < c.abs()[feasible]).all()
    # out of reach: the box vertex closest to the hyperplane
    assert torch.allclose(delta[~feasible], (w.sign() * c.sign()[:, None] * room)[~feasible])


def _linear_case(num_classes: int, n: int = 64):
    """A float64 linear model and points whose closed-form distances to misclassification are known."""
    torch.manual_seed(0)
    d = 30
    model = nn.Sequential(nn.Flatten(), nn.Linear(d, num_classes)).double().eval()
    x = (0.5 + 0.04 * torch.randn(n, 1, d, generator=gen(2), dtype=torch.float64)).clamp(0, 1)
    with torch.no_grad():
        z = model(x)
    y = z.argmax(1)
    w = model[1].weight.detach()
    # min L-inf distance to the half-space z_c >= z_y (the box never binds for these points)
    dist = (z.gather(1, y[:, None]) - z) / (w[None] - w[y][:, None]).abs().sum(2)
    dist = dist.scatter(1, y[:, None], float("inf"))
    return model, x, y, dist


def _check_closed_form(model, x, y, xa, dmin, eps):
    reach = dmin < eps
    assert 8 <= reach.sum() < len(x)  # both cases occur
    got = linf(xa, x)
    assert (predict(model, xa[reach]).argmax(1) != y[reach]).all()
    ratio = got[reach] / dmin[reach]
    assert (ratio >= 1 - 1e-9).all() and (ratio <= 1.05).all(), ratio
    assert torch.equal(xa[~reach], x[~reach])  # not broken within eps: the clean point


def test_fab_t_closed_form_on_linear_model():
    model, x, y, dist = _linear_case(2)  # one wrong class: FAB-T's only target is the closest
    eps = float(dist.min(1).values.median())
    xa = fab_t(model, x, y, threat=Linf(eps))
    _check_closed_form(model, x, y, xa, dist.min(1).values, eps)


def test_fab_closed_form_on_linear_model_many_classes():
    model, x, y, dist = _linear_case(6)
    dmin, closest = dist.min(1)
    eps = float(dmin.median())
    _check_closed_form(model, x, y, fab(model, x, y, threat=Linf(eps)), dmin, eps)
    _check_closed_form(model, x, y, fab_t(model, x, y, threat=Linf(eps), target=closest), dmin, eps)


def test_fab_t_accounting_and_strength(trained_model, tiny_data):
    x, y = tiny_data[0][:64].clone(), tiny_data[1][:64].clone()
    y[:4] = (y[:4] + 1) % 10  # misclassified already: returned as they are
    xa = fab_t(trained_model, x, y, threat=THREAT, steps=20, n_target_classes=3)
    pred = predict(trained_model, xa).argmax(1)
    assert torch.equal(xa[:4], x[:4])
    unchanged = (xa == x).flatten(1).all(1)
    assert (unchanged | (pred != y)).all()  # every changed point is adversarial
    clean, robust = acc(trained_model, x, y), float((pred == y).float().mean())
    assert robust <= clean and robust < clean - 0.5, (clean, robust)
    # APGD-T with the same budget breaks about as many (FAB-T is a second opinion, not a weaker copy)
    ref = acc(trained_model, apgd_t(trained_model, x, y, threat=THREAT, steps=20, n_target_classes=3), y)
    assert robust <= ref + 0.1, (robust, ref)


def test_fab_validation(trained_model, tiny_data):
    x, y = tiny_data[0][:4], tiny_data[1][:4]
    for bad in ({"steps": 0}, {"restarts": 0}, {"n_target_classes": 0}, {"beta": 0.0}, {"eta": 0.5}):
        with pytest.raises(ConfigError):
            fab_t(trained_model, x, y, threat=THREAT, **bad)


# --- MI-FGSM ------------------------------------------------------------------------------


def test_mi_fgsm_ensemble_equals_wrapper(trained_model, tiny_data):
    x, y = tiny_data[0][:32], tiny_data[1][:32]
    torch.manual_seed(1)
    other = copy.deepcopy(trained_model)
    with torch.no_grad():
        for p in other.parameters():
            p.add_(0.05 * torch.randn_like(p))
    ens = EnsembleLogits([trained_model, other])
    with torch.no_grad():
        assert torch.allclose(ens(x), (trained_model(x) + other(x)) / 2, atol=1e-6)
    a = mi_fgsm([trained_model, other], x, y, threat=THREAT, steps=4)
    b = mi_fgsm(ens, x, y, threat=THREAT, steps=4)
    assert torch.equal(a, b)
    assert not torch.equal(a, mi_fgsm(trained_model, x, y, threat=THREAT, steps=4))
    with pytest.raises(ConfigError):
        EnsembleLogits([trained_model, other], weights=[1.0])


def test_mi_fgsm_one_step_is_fgsm_and_batch_equals_items(trained_model, tiny_data):
    x, y = tiny_data[0][:6], tiny_data[1][:6]
    assert torch.equal(mi_fgsm(trained_model, x, y, threat=THREAT, steps=1), fgsm(trained_model, x, y, threat=THREAT))
    model = copy.deepcopy(trained_model).double()
    xd = x.double()
    batch = mi_fgsm(model, xd, y, threat=THREAT, steps=6)
    items = torch.cat([mi_fgsm(model, xd[i : i + 1], y[i : i + 1], threat=THREAT, steps=6) for i in range(6)])
    assert torch.equal(batch, items)  # the gradient is normalised per example


def test_mi_fgsm_targeted_and_stronger_than_clean(trained_model, tiny_data):
    x, y = tiny_data[0][:64], tiny_data[1][:64]
    target = (y + 3) % 10
    xa = mi_fgsm(trained_model, x, y, threat=Linf(0.2), steps=10, targeted=True, target=target)
    assert (predict(trained_model, xa).argmax(1) == target).float().mean() > 0.9
    assert acc(trained_model, mi_fgsm(trained_model, x, y, threat=Linf(0.1)), y) < acc(trained_model, x, y) - 0.5


# --- the official notation ----------------------------------------------------------------


def test_parse_official_round_trip():
    spec = parse_official("pgdll_16_2_10")
    assert spec == OfficialSpec("pgdll", 16 / 255, 2 / 255, 10)
    assert spec.name == "pgdll_16_2_10" and parse_official(spec.name) == spec
    assert official_threat(spec) == Linf(16 / 255)
    assert parse_official("pgdrnd_255_1_1") == OfficialSpec("pgdrnd", 1.0, 1 / 255, 1)
    for name in ("pgd", "pgdll", "apgd-ce", "fgsm", "pgdfoo_1_2_3", "clean", "mi-fgsm", ""):
        assert parse_official(name) is None


@pytest.mark.parametrize(
    "name",
    ["pgdll_16_x_10", "pgd_16_2", "pgd_16_2_10_", "pgd_0_2_10", "pgd_256_2_10", "pgd_16_0_10", "pgd_16_2_0",
     "pgdrnd_+16_2_10", "pgd_16__10", "pgd_16_2_1.5", "pgd_"],
)  # fmt: skip
def test_parse_official_rejects_malformed(name):
    with pytest.raises(ConfigError, match="KIND_EPS_STEP_NITER") as err:
        parse_official(name)
    assert repr(name) in str(err.value)


def test_official_pgd_uses_predicted_class(trained_model, tiny_data):
    x, y = tiny_data[0][:64], tiny_data[1][:64]
    pred = predict(trained_model, x).argmax(1)
    wrong = (pred + 1) % 10  # labels that disagree with the prediction everywhere
    spec = parse_official("pgd_26_3_10")
    a = official_attack(trained_model, x, wrong, spec=spec, generator=gen())
    b = official_attack(trained_model, x, y, spec=spec, generator=gen())
    assert torch.equal(a, b)  # the label is ignored
    with torch.no_grad():
        ce_clean = F.cross_entropy(trained_model(x), pred, reduction="none")
        ce_adv = F.cross_entropy(trained_model(a), pred, reduction="none")
    assert (ce_adv > ce_clean).all()  # moved away from the predicted class, not from `wrong`
    assert float((predict(trained_model, a).argmax(1) == pred).float().mean()) < 0.5


def test_official_pgdll_descends_least_likely(trained_model, tiny_data):
    x, y = tiny_data[0][:64], tiny_data[1][:64]
    with torch.no_grad():
        logits = trained_model(x)
    ll = logits.argmin(1)
    xa = official_attack(trained_model, x, y, spec=parse_official("pgdll_26_2_10"), generator=gen())
    with torch.no_grad():
        ce_clean = F.cross_entropy(logits, ll, reduction="none")
        ce_adv = F.cross_entropy(trained_model(xa), ll, reduction="none")
    assert (ce_adv < ce_clean).all()
    assert ce_adv.mean() < 0.5 * ce_clean.mean()


def test_official_pgdrnd_targets_include_the_label():
    logits = torch.zeros(20000, 10)
    t = official_targets(logits, "pgdrnd", gen(0))
    assert set(t.tolist()) == set(range(10))
    # a two-class linear model: the random class is the predicted one half of the time, and
    # descending its loss then keeps the prediction; a target != label would flip every point
    torch.manual_seed(0)
    model = nn.Sequential(nn.Flatten(), nn.Linear(20, 2)).eval()
    x = torch.rand(4000, 1, 20, generator=gen(1))
    pred = predict(model, x).argmax(1)
    xa = official_attack(model, x, pred, spec=parse_official("pgdrnd_255_20_20"), generator=gen(2))
    kept = float((predict(model, xa).argmax(1) == pred).float().mean())
    assert 0.45 < kept < 0.55, kept


@pytest.mark.parametrize("kind", ["pgd", "pgdll"])
def test_official_returns_the_last_iterate(kind, trained_model, tiny_data):
    model = copy.deepcopy(trained_model).double()
    x, y = tiny_data[0][:16].double(), tiny_data[1][:16]
    spec = parse_official(f"{kind}_20_3_7")
    eps, step = 20 / 255, 3 / 255
    init = x + 0.3 * (2 * torch.rand(x.shape, generator=gen(4), dtype=x.dtype) - 1)  # partly outside the ball
    out = official_attack(model, x, y, spec=spec, init=init)
    # the official loop, written out: TF-style clipping, summed CE, sign steps, no best-iterate selection
    with torch.no_grad():
        logits = model(x)
    label = logits.argmax(1) if kind == "pgd" else logits.argmin(1)
    sign = 1.0 if kind == "pgd" else -1.0
    lo, hi = (x - eps).clamp_min(0), (x + eps).clamp_max(1)
    cur = torch.maximum(torch.minimum(init, hi), lo)
    for _ in range(7):
        cur = cur.detach().requires_grad_(True)
        loss = F.cross_entropy(model(cur), label, reduction="sum")
        (grad,) = torch.autograd.grad(loss, cur)
        cur = torch.maximum(torch.minimum(cur + sign * step * grad.sign(), hi), lo)
    assert torch.allclose(out, cur.detach(), atol=1e-12)
    assert official_threat(spec).contains(x, out).all()


def test_official_seeded_start_and_validation(trained_model, tiny_data):
    x, y = tiny_data[0][:16], tiny_data[1][:16]
    spec = parse_official("pgdrnd_16_2_3")
    a = official_attack(trained_model, x, y, spec=spec, generator=gen(1))
    b = official_attack(trained_model, x, y, spec=spec, generator=gen(1))
    c = official_attack(trained_model, x, y, spec=spec, generator=gen(2))
    assert torch.equal(a, b) and not torch.equal(a, c)
    with pytest.raises(ConfigError):
        OfficialSpec("pgdx", 0.1, 0.01, 3)  # type: ignore[arg-type]
    with pytest.raises(ConfigError):
        OfficialSpec("pgd", 0.0, 0.01, 3)
