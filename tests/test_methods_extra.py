"""The added training methods (ls, mixup, vat, trades, kurakin, ens-adv, fgsm-rs), the options of
mpgd / alp (adv_fraction, attack, feature pairing) and the KL pairing distances: each checked
against hand-computed values on tiny inputs."""

from __future__ import annotations

import copy
import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from logitpair.attacks.pgd import pgd
from logitpair.config import loss_for, make_config
from logitpair.errors import ConfigError
from logitpair.methods import METHODS, BatchContext, kurakin, mixup
from logitpair.methods.context import NOISE
from logitpair.methods.crafting import craft, fgsm_rs, fgsm_rs_start
from logitpair.methods.vat import VATSettings, kl_logit_gradient, l2_unit, vat_perturbation
from logitpair.models import create_model
from logitpair.pairing import DISTANCES, pair_distance
from logitpair.settings import accepted_keys, alias_map
from logitpair.threat import Linf

SETTINGS = {"eps": 0.1, "attack_steps": 2, "attack_step_size": 0.05, "lam": 0.7}


def cfg_for(name: str, **values: object):
    """Method ``name``'s settings: ``SETTINGS`` where it has them, then ``values``."""
    return METHODS.settings(name)(**{**loss_for(name, SETTINGS), **values})


CFG = cfg_for("alp")


def seeded(seed: int = 0) -> BatchContext:
    return BatchContext(generator=torch.Generator().manual_seed(seed))


class Recorder(nn.Module):
    """Small MLP with BatchNorm that records (training flag, batch size) of every forward."""

    def __init__(self, seed: int = 0) -> None:
        super().__init__()
        torch.manual_seed(seed)
        self.net = nn.Sequential(nn.Flatten(), nn.Linear(784, 32), nn.BatchNorm1d(32), nn.ReLU(), nn.Linear(32, 10))
        self.calls: list[tuple[bool, int]] = []

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.calls.append((self.training, len(x)))
        return self.net(x)


class Linear(nn.Module):
    """``logits = W flatten(x) + b``: input gradients in closed form."""

    def __init__(self, d: int, k: int, seed: int = 0, dtype: torch.dtype = torch.float32) -> None:
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        self.w = nn.Parameter(torch.randn(k, d, generator=g, dtype=dtype))
        self.b = nn.Parameter(torch.randn(k, generator=g, dtype=dtype))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.flatten(1) @ self.w.T + self.b


class Fixed(nn.Module):
    """Returns fixed logits (whatever the input), with a gradient path to the input."""

    def __init__(self, logits: torch.Tensor) -> None:
        super().__init__()
        self.z = nn.Parameter(logits.clone())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.z + 0 * x.sum()


def batch(n: int = 16) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(42)
    return 0.2 + 0.6 * torch.rand(n, 1, 28, 28, generator=g), torch.randint(0, 10, (n,), generator=g)


# ---------------------------------------------------------------- label smoothing


def test_label_smoothing_hand_computed():
    z = torch.tensor([[2.0, 0.0, -1.0], [0.5, 1.5, 0.0]])
    y = torch.tensor([0, 2])
    loss, _ = METHODS.get("ls")(
        Fixed(z), torch.zeros(2, 1, 2, 2), y, METHODS.settings("ls")(label_smoothing=0.3), BatchContext()
    )
    expected = 0.0
    for row, label in zip(z.tolist(), y.tolist()):
        log_norm = math.log(sum(math.exp(v) for v in row))
        targets = [0.7 * (j == label) + 0.3 / 3 for j in range(3)]  # (1 - delta) one-hot + delta / K
        expected += -sum(t * (v - log_norm) for t, v in zip(targets, row)) / 2
    assert abs(loss.item() - expected) < 1e-6


# ---------------------------------------------------------------- mixup


def test_mixup_at_half_equals_mixed_target_ce(monkeypatch):
    monkeypatch.setattr(mixup, "mix_lambda", lambda x, alpha, ctx: torch.tensor(0.5, dtype=torch.float64))
    perm = torch.tensor([3, 2, 0, 1])
    monkeypatch.setattr(mixup, "mix_permutation", lambda x, ctx: perm)
    model = Linear(12, 5)
    x, y = torch.rand(4, 1, 3, 4), torch.tensor([0, 1, 4, 1])
    loss, m = METHODS.get("mixup")(model, x, y, METHODS.settings("mixup")(), BatchContext())
    logp = F.log_softmax(model(0.5 * x + 0.5 * x[perm]), 1)
    soft = 0.5 * F.one_hot(y, 5) + 0.5 * F.one_hot(y[perm], 5)  # mixed one-hot targets
    assert torch.allclose(loss, -(soft * logp).sum(1).mean(), atol=1e-6)
    assert m["lam"] == 0.5


def test_mixup_randomness_from_context():
    x, y = batch(8)
    model = Linear(784, 10)
    a, ma = METHODS.get("mixup")(model, x, y, METHODS.settings("mixup")(), seeded(3))
    torch.manual_seed(123)  # the global RNG must not matter
    b, _ = METHODS.get("mixup")(model, x, y, METHODS.settings("mixup")(), seeded(3))
    assert torch.equal(a, b) and 0 < ma["lam"] < 1
    _, mc = METHODS.get("mixup")(model, x, y, METHODS.settings("mixup")(), seeded(4))
    assert mc["lam"] != ma["lam"]
    perm = mixup.mix_permutation(x, BatchContext(indices=torch.arange(8), noise_key=9))
    assert sorted(perm.tolist()) == list(range(8))


@pytest.mark.parametrize("alpha", [0.2, 1.0, 4.0])
def test_beta_sampler_moments(alpha):
    g = torch.Generator().manual_seed(0)
    rows = 20000
    normals = torch.randn(rows, 2, mixup.CANDIDATES, generator=g, dtype=torch.float64)
    uniforms = torch.rand(rows, 2, mixup.CANDIDATES + 1, generator=g, dtype=torch.float64)
    lam = mixup.sample_beta(alpha, normals, uniforms)
    assert ((lam >= 0) & (lam <= 1)).all()
    var = 1.0 / (4.0 * (2.0 * alpha + 1.0))  # Beta(a, a): mean 1/2, variance 1 / (4 (2a + 1))
    assert abs(lam.mean().item() - 0.5) < 4 * math.sqrt(var / rows)
    assert abs(lam.var().item() / var - 1) < 0.05


# ---------------------------------------------------------------- kurakin / ens-adv


def test_kurakin_loss_formula(monkeypatch):
    eps = torch.tensor([0.05, 0.1, 0.07, 0.02])
    monkeypatch.setattr(kurakin, "example_eps", lambda x, cfg, ctx: eps)
    model = Linear(6, 3, seed=1)
    x = 0.2 + 0.6 * torch.rand(4, 1, 2, 3, generator=torch.Generator().manual_seed(0))
    y = torch.tensor([0, 1, 2, 1])
    loss, m = METHODS.get("kurakin")(model, x, y, METHODS.settings("kurakin")(eps=0.1), BatchContext())
    with torch.no_grad():
        w = model.w
        logits = model(x[:2])
        y_ll = logits.argmin(1)
        grad = (F.softmax(logits, 1) - F.one_hot(y_ll, 3)) @ w  # d CE(f(x), y_ll) / dx, linear model
        x_adv = (x[:2].flatten(1) - eps[:2, None] * grad.sign()).clamp(0, 1).view(2, 1, 2, 3)
        ce_adv = F.cross_entropy(model(x_adv), y[:2], reduction="sum")
        ce_clean = F.cross_entropy(model(x[2:]), y[2:], reduction="sum")
    expected = (ce_clean + 0.3 * ce_adv) / (4 - 2 + 0.3 * 2)
    assert torch.allclose(loss, expected, atol=1e-6)
    assert m["eps_mean"] == eps[:2].mean()


def test_kurakin_attacks_in_eval_and_trains_on_one_mixed_batch():
    model = Recorder().train()
    x, y = batch(16)
    METHODS.get("kurakin")(model, x, y, cfg_for("kurakin"), seeded())
    assert [c for c in model.calls if c[0]] == [(True, 16)]
    assert all(n == 8 for train, n in model.calls if not train)


def test_truncated_normal_eps():
    eps = 0.3
    u = torch.rand(200_000, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    t = kurakin.truncated_normal_eps(u, eps)
    assert t.min() >= 0 and t.max() <= eps
    sigma = eps / 2
    mean = sigma * math.sqrt(2 / math.pi) * (1 - math.exp(-2)) / math.erf(math.sqrt(2))  # about 0.361 eps
    assert abs(t.mean().item() - mean) < 0.005 * eps
    # quantiles: P(T <= t) = erf(t / (sigma sqrt 2)) / erf(sqrt 2)
    for q in (0.1, 0.5, 0.9):
        cdf = math.erf(t.quantile(q).item() / (sigma * math.sqrt(2))) / math.erf(math.sqrt(2))
        assert abs(cdf - q) < 0.01
    x = torch.zeros(5, 1, 2, 2)
    fixed = kurakin.example_eps(x, METHODS.settings("kurakin")(eps=0.2, random_eps=False), BatchContext())
    assert torch.equal(fixed, torch.full((5,), 0.2))
    drawn = kurakin.example_eps(
        x, METHODS.settings("kurakin")(eps=0.2), BatchContext(indices=torch.arange(5), noise_key=1)
    )
    assert ((drawn >= 0) & (drawn <= 0.2)).all() and len(set(drawn.tolist())) == 5


def test_ensemble_rotation_and_static_models_untouched():
    x, y = batch(8)
    model = Recorder(0).train()
    statics = (Recorder(1).eval(), Recorder(2).eval())
    before = [{k: v.clone() for k, v in s.state_dict().items()} for s in statics]
    used = []
    for step in range(3):
        for s in statics:
            s.calls.clear()
        model.calls.clear()
        ctx = BatchContext(generator=torch.Generator().manual_seed(step), step=step, static_models=statics)
        index, _ = kurakin.source_model(model, ctx)
        loss, _ = METHODS.get("ens-adv")(model, x, y, cfg_for("ens-adv"), ctx)
        loss.backward()
        attacked = [i for i, s in enumerate((model, *statics)) if any(not train for train, _ in s.calls)]
        assert attacked == [index]
        used.append(index)
        assert all(not train for s in statics for train, _ in s.calls)
    assert sorted(used) == [0, 1, 2], "1 + S consecutive steps visit every source"
    for s, state in zip(statics, before):
        assert all(torch.equal(v, s.state_dict()[k]) for k, v in state.items())
        assert all(p.grad is None and p.requires_grad for p in s.parameters())
        assert not s.training


def test_ens_adv_without_static_models_is_kurakin():
    x, y = batch(8)
    model = Recorder().eval()
    a, _ = METHODS.get("kurakin")(model, x, y, cfg_for("kurakin"), seeded(1))
    b, _ = METHODS.get("ens-adv")(model, x, y, cfg_for("ens-adv"), seeded(1))
    assert torch.equal(a, b)
    c, _ = METHODS.get("ens-adv")(model, x, y, cfg_for("ens-adv", ens_attack="fgsm"), seeded(1))
    assert not torch.equal(a, c)


# ---------------------------------------------------------------- TRADES


def test_trades_kl_zero_without_perturbation_and_positive_with():
    x, y = batch(8)
    model = Recorder().train()
    loss, m = METHODS.get("trades")(model, x, y, cfg_for("trades", eps=0.0), seeded())
    assert m["kl"].abs() < 1e-6
    assert torch.allclose(loss, m["ce"] + 6.0 * m["kl"])
    model.calls.clear()
    loss, m = METHODS.get("trades")(model, x, y, cfg_for("trades"), seeded())
    assert m["kl"] > 0
    assert [c for c in model.calls if c[0]] == [(True, 16)], "clean and adversarial as one train-mode batch"
    assert sum(not train for train, _ in model.calls) == 1 + CFG.attack_steps


def test_trades_kl_as_reference():
    x, y = batch(6)
    model = Linear(784, 10)
    cfg = cfg_for("trades", beta=1.0)
    loss, m = METHODS.get("trades")(model, x, y, cfg, seeded(2))
    from logitpair.methods.trades import trades_adversary

    x_adv = trades_adversary(model, x, cfg, seeded(2))
    assert Linf(cfg.eps).contains(x, x_adv).all()
    clean, adv = model(x), model(x_adv)
    kl = F.kl_div(F.log_softmax(adv, 1), F.softmax(clean, 1), reduction="sum") / len(x)  # reference: sum / batch
    assert torch.allclose(m["kl"], kl, atol=1e-6)
    assert torch.allclose(loss, F.cross_entropy(clean, y) + kl, atol=1e-6)


# ---------------------------------------------------------------- VAT


def test_vat_perturbation_norm_and_loss():
    x, y = batch(8)
    x[:, :, :4] = 1.0  # some pixels at the bound: clipping must happen after scaling
    model = Recorder().train()
    cfg = VATSettings(vat_eps=2.0)
    r = vat_perturbation(model, x, cfg, seeded())
    assert torch.allclose(r.flatten(1).norm(dim=1), torch.full((8,), 2.0), rtol=1e-5)
    loss, m = METHODS.get("vat")(model, x, y, cfg, seeded())
    assert m["kl"] > 0 and torch.allclose(loss, m["ce"] + m["kl"])
    assert [c for c in model.calls if c[0]] == [(True, 16)]


def test_vat_direction_beats_random_in_float64():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Flatten(), nn.Linear(64, 32), nn.Tanh(), nn.Linear(32, 10)).double()
    x = 0.25 + 0.5 * torch.rand(16, 1, 8, 8, dtype=torch.float64)
    cfg = VATSettings(vat_eps=0.5)
    with torch.no_grad():
        p = model(x)
    gains = []
    for seed in range(4):
        r_adv = vat_perturbation(model, x, cfg, seeded(seed))
        r_rand = 0.5 * l2_unit(torch.randn(x.shape, generator=torch.Generator().manual_seed(100 + seed), dtype=x.dtype))
        with torch.no_grad():
            gains.append(pair_distance(p, model(x + r_adv), "kl") / pair_distance(p, model(x + r_rand), "kl"))
    assert torch.stack(gains).mean() > 2.0


def exact_vat_direction(model: nn.Module, x: torch.Tensor, d: torch.Tensor) -> torch.Tensor:
    """``H d / ||H d||`` per example, ``H`` the Hessian in ``r`` of ``KL(p(x) || p(x + r))`` at ``r = 0``: the
    direction one power iteration approximates, here by double backward (no finite difference)."""
    with torch.no_grad():
        target = model(x)
    r = torch.zeros_like(x, requires_grad=True)
    (g,) = torch.autograd.grad(pair_distance(target, model(x + r), "kl", "sum"), r, create_graph=True)
    (hd,) = torch.autograd.grad((g * d).sum(), r)
    return l2_unit(hd)


def test_kl_logit_gradient_is_the_kl_gradient():
    g = torch.Generator().manual_seed(0)
    target, logits = 3 * torch.randn(6, 10, generator=g, dtype=torch.float64), torch.randn(6, 10, dtype=torch.float64)
    z = logits.clone().requires_grad_(True)
    (autograd,) = torch.autograd.grad(pair_distance(target, z, "kl", "sum"), z)
    assert torch.allclose(kl_logit_gradient(target, logits), autograd, atol=1e-12)
    assert torch.allclose(kl_logit_gradient(target, logits), logits.softmax(1) - target.softmax(1), atol=1e-12)
    jump = target.float().clone()
    jump[:, 3] += 200.0  # overflows expm1 in float32: the plain difference, still finite
    plain = jump.softmax(1) - target.float().softmax(1)
    assert torch.allclose(kl_logit_gradient(target.float(), jump), plain) and torch.isfinite(plain).all()


def test_vat_direction_on_confident_points_in_float32():
    """Points the model is sure of (1 - max p down to 1e-10): softmax(x + r) - softmax(x) rounds its top class
    away in float32; the power iteration must still give the exact float64 direction."""
    model = Linear(784, 10, seed=0)  # logits spread over tens of units on [0, 1] inputs
    x = torch.rand(8, 1, 28, 28, generator=torch.Generator().manual_seed(0))
    ctx = BatchContext(indices=torch.arange(8), noise_key=7)  # keyed draws: the same d in float32 and float64
    model64 = copy.deepcopy(model).double()
    exact = exact_vat_direction(model64, x.double(), l2_unit(ctx.normal(x.double(), NOISE)))
    with torch.no_grad():
        sure = 1 - model64(x.double()).softmax(1).amax(1) < 1e-4
    assert sure.sum() >= 4, "the test needs confident points"
    r = vat_perturbation(model, x, VATSettings(vat_xi=1e-3), ctx)
    cosine = F.cosine_similarity(r.flatten(1).double(), exact.flatten(1), dim=1)
    assert (cosine > 0.999).all(), cosine


def test_vat_default_xi_recovers_the_direction_in_float32():
    """In float32 the default xi gives the exact float64 direction on every example; Miyato et al.'s
    xi = 1e-6 does not (x + xi d mostly rounds back to x)."""
    torch.manual_seed(0)
    model = create_model("lenet5", num_classes=10).eval()
    model64 = copy.deepcopy(model).double()
    x = torch.rand(8, 1, 28, 28, generator=torch.Generator().manual_seed(0))  # Fashion-MNIST-shaped, [0, 1]
    ctx = BatchContext(indices=torch.arange(8), noise_key=7)  # keyed draws: the same d in float32 and float64
    exact = exact_vat_direction(model64, x.double(), l2_unit(ctx.normal(x.double(), NOISE)))

    def cosine(cfg: VATSettings) -> torch.Tensor:
        r = vat_perturbation(model, x, cfg, ctx)
        assert r.dtype == torch.float32
        return F.cosine_similarity(r.flatten(1).double(), exact.flatten(1), dim=1)

    default = cosine(VATSettings())
    assert (default > 0.99).all(), default
    paper = cosine(VATSettings(vat_xi=1e-6))
    assert paper.min() < 0.5, paper


def test_vat_xi_of_miyato_et_al_stays_available():
    from logitpair.cli.flags import config_overrides
    from logitpair.cli.main import build_parser

    args = build_parser().parse_args(["train", "--method", "vat", "--vat-xi", "1e-6", "--out", "unused"])
    assert make_config(None, config_overrides(args)).loss.vat_xi == 1e-6
    assert make_config(None, {"method": "vat"}).loss.vat_xi == VATSettings().vat_xi == 1e-3


# ---------------------------------------------------------------- pairing distances


def test_pair_distances_zero_and_symmetry():
    g = torch.Generator().manual_seed(0)
    a, b = torch.randn(5, 7, generator=g, dtype=torch.float64), 2 * torch.randn(5, 7, generator=g, dtype=torch.float64)
    for distance in DISTANCES:
        for reduction in ("mean", "sum"):
            assert pair_distance(a, a.clone(), distance, reduction).abs() < 1e-12, distance
            assert pair_distance(a, b, distance, reduction) > 0, distance
    for distance in ("l2sq", "l2", "l1", "cosine", "kl_sym"):
        assert torch.allclose(pair_distance(a, b, distance), pair_distance(b, a, distance)), distance
    assert not torch.allclose(pair_distance(a, b, "kl"), pair_distance(b, a, "kl"))
    assert torch.allclose(pair_distance(a, b, "kl_rev"), pair_distance(b, a, "kl"))
    assert torch.allclose(pair_distance(a, b, "kl_sym"), (pair_distance(a, b, "kl") + pair_distance(b, a, "kl")) / 2)
    reference = F.kl_div(F.log_softmax(b, 1), F.softmax(a, 1), reduction="batchmean")
    assert torch.allclose(pair_distance(a, b, "kl"), reference)
    assert torch.allclose(pair_distance(a, b, "kl", "sum"), 5 * reference)
    assert torch.allclose(pair_distance(a, b + 3.0, "kl"), pair_distance(a, b, "kl")), "shift invariant"


def test_alp_with_kl_distance():
    x, y = batch(8)
    model = Recorder().eval()
    torch.manual_seed(0)
    loss, m = METHODS.get("alp")(model, x, y, cfg_for("alp", distance="kl"), BatchContext())
    assert m["pair"] > 0 and torch.allclose(loss, m["ce"] + CFG.lam * m["pair"])


# ---------------------------------------------------------------- FGSM-RS


def test_fgsm_rs_start_and_step():
    x = torch.full((6, 1, 4, 4), 0.5)
    threat = Linf(0.1)
    start = fgsm_rs_start(x, threat, seeded())
    assert threat.contains(x, start).all() and (start - x).abs().max() > 0.05
    model = Linear(16, 3)
    y = torch.tensor([0, 1, 2, 0, 1, 2])
    # a radius large enough that nothing is projected: the step is exactly alpha = 1.25 eps per pixel
    x_adv = fgsm_rs(model, x, y, threat=Linf(1.0), alpha=1.25 * 0.1, init=start)
    assert torch.allclose((x_adv - start).abs(), torch.full_like(x, 0.125), atol=1e-6)
    # with the real radius, the step is projected back into the ball
    x_adv = fgsm_rs(model, x, y, threat=threat, alpha=0.125, init=start)
    assert threat.contains(x, x_adv).all()
    moved = (x_adv - start).abs()
    assert (moved <= 0.125 + 1e-6).all() and ((x_adv - x).abs() > 0.1 - 1e-6).float().mean() > 0.3


def test_fgsm_rs_method_is_mpgd_with_fgsm_rs_and_full_fraction():
    x, y = batch(8)
    model = Recorder().eval()
    a, m = METHODS.get("fgsm-rs")(model, x, y, cfg_for("fgsm-rs"), seeded(5))
    b, _ = METHODS.get("mpgd")(model, x, y, cfg_for("mpgd", attack="fgsm-rs", adv_fraction=1.0), seeded(5))
    x_adv = craft(model, x, y, cfg_for("mpgd", attack="fgsm-rs"), seeded(5))
    assert torch.equal(a, b) and torch.allclose(a, F.cross_entropy(model(x_adv), y))
    assert Linf(CFG.eps).contains(x, x_adv).all() and "acc_adv" in m


def test_alp_with_fgsm_rs_crafts_one_step():
    model = Recorder().train()
    x, y = batch(8)
    METHODS.get("alp")(model, x, y, cfg_for("alp", attack="fgsm-rs"), seeded())
    assert model.calls == [(False, 8), (True, 16)]


# ---------------------------------------------------------------- adversarial fraction


@pytest.mark.parametrize("name", ["mpgd", "alp"])
@pytest.mark.parametrize("reduction", ["mean", "sum"])
def test_adv_fraction_half_is_the_default_exactly(name, reduction):
    x, y = batch(8)
    model = Recorder().eval()
    base = cfg_for(name, ce_reduction=reduction)
    torch.manual_seed(3)
    a, _ = METHODS.get(name)(model, x, y, base, BatchContext())
    torch.manual_seed(3)
    b, _ = METHODS.get(name)(model, x, y, cfg_for(name, ce_reduction=reduction, adv_fraction=0.5), BatchContext())
    assert torch.equal(a, b)
    assert METHODS.settings(name)().adv_fraction == 0.5


def test_adv_fraction_one_is_pure_adversarial_ce():
    x, y = batch(8)
    model = Recorder().eval()
    torch.manual_seed(3)
    loss, m = METHODS.get("mpgd")(model, x, y, cfg_for("mpgd", adv_fraction=1.0), BatchContext())
    torch.manual_seed(3)
    xa = pgd(model, x, y, threat=CFG.threat, steps=CFG.attack_steps, step_size=CFG.attack_step_size, keep_best=False)
    adv_ce = F.cross_entropy(model(xa), y)
    assert torch.allclose(loss, adv_ce, atol=1e-6) and "acc" not in m
    torch.manual_seed(3)
    loss, m = METHODS.get("alp")(model, x, y, cfg_for("alp", adv_fraction=1.0), BatchContext())
    pair = ((model(x) - model(xa)) ** 2).mean()
    assert torch.allclose(m["ce"], adv_ce, atol=1e-6) and torch.allclose(loss, adv_ce + CFG.lam * pair, atol=1e-6)
    torch.manual_seed(3)
    loss, _ = METHODS.get("mpgd")(model, x, y, cfg_for("mpgd", adv_fraction=0.25), BatchContext())
    assert torch.allclose(loss, 0.75 * F.cross_entropy(model(x), y) + 0.25 * adv_ce, atol=1e-6)


def test_mpgd_full_fraction_skips_clean_forward():
    model = Recorder().train()
    x, y = batch(8)
    METHODS.get("mpgd")(model, x, y, cfg_for("mpgd", adv_fraction=1.0), seeded())
    assert [c for c in model.calls if c[0]] == [(True, 8)]


# ---------------------------------------------------------------- feature pairing


def test_feature_pairing_hooks_the_named_layer():
    x, y = batch(8)
    model = Recorder().eval()
    cfg = cfg_for("alp", attack_random_start=False, pair_layer="net.3", pair_target="features")
    _, m = METHODS.get("alp")(model, x, y, cfg, BatchContext())
    x_adv = craft(model, x, y, cfg, BatchContext())  # deterministic: no random start, eval mode
    hidden = model.net[:4]
    expected = ((hidden(x) - hidden(x_adv)) ** 2).mean()
    assert torch.allclose(m["pair"], expected, atol=1e-6) and torch.allclose(m["pair_features"], expected)
    assert not model.net[3]._forward_hooks, "the hook is removed after the forward"
    _, both = METHODS.get("alp")(
        model, x, y, cfg_for("alp", attack_random_start=False, pair_layer="net.3", pair_target="both"), BatchContext()
    )
    logit_pair = ((model(x) - model(x_adv)) ** 2).mean()
    assert torch.allclose(both["pair"], expected + logit_pair, atol=1e-6)
    assert torch.allclose(both["pair_logits"], logit_pair, atol=1e-6)


def test_feature_pairing_zero_for_identical_inputs():
    x, y = batch(8)
    model = Recorder().train()
    cfg = cfg_for("alp", eps=0.0, pair_layer="net.2", pair_target="features")
    loss, m = METHODS.get("alp")(model, x, y, cfg, seeded())
    assert m["pair"].abs() < 1e-6 and torch.allclose(loss, m["ce"] + CFG.lam * m["pair"])


def test_feature_pairing_errors():
    x, y = batch(4)
    with pytest.raises(ValueError, match=r"no module 'net\.9'.*net\.1"):
        METHODS.get("alp")(Recorder(), x, y, cfg_for("alp", pair_layer="net.9", pair_target="both"), seeded())
    for name in ("alp", "clp"):
        with pytest.raises(ConfigError, match="pair_layer"):
            METHODS.settings(name)(pair_target="features")
        with pytest.raises(ConfigError, match="pair_layer"):
            METHODS.settings(name)(pair_layer="net.3")


# ---------------------------------------------------------------- all methods


@pytest.mark.parametrize("name", METHODS.names())
def test_methods_take_randomness_from_context(name):
    x, y = batch(8)
    model = Recorder().eval()
    for ctx in (lambda: seeded(7), lambda: BatchContext(indices=torch.arange(8) + 100, noise_key=5)):
        torch.manual_seed(0)
        a, _ = METHODS.get(name)(model, x, y, cfg_for(name), ctx())
        torch.manual_seed(1)
        b, _ = METHODS.get(name)(model, x, y, cfg_for(name), ctx())
        assert torch.equal(a, b), name


@pytest.mark.parametrize(
    "field, value",
    [
        ("adv_fraction", 0.0),
        ("adv_fraction", 1.5),
        ("attack", "pgdll"),
        ("fgsm_rs_alpha_ratio", 0.0),
        ("pair_target", "weights"),
        ("smoothing", 1.0),
        ("mixup_alpha", 0.0),
        ("alpha", 0.0),
        ("vat_eps", -1.0),
        ("vat_xi", 0.0),
        ("vat_iters", 0),
        ("vat_alpha", -1.0),
        ("beta", -1.0),
        ("adv_weight", -0.1),
        ("ens_attack", "pgd"),
    ],
)
def test_bad_new_fields_rejected(field, value):
    """Each method that takes the setting (or its old name) rejects the value, naming the field."""
    takers = [m for m in METHODS.names() if field in accepted_keys(METHODS.settings(m))]
    assert takers, field
    for method in takers:
        name = alias_map(METHODS.settings(method)).get(field, field)
        with pytest.raises(ConfigError, match=name):
            make_config(overrides={"method": method, "loss": {field: value}})
        with pytest.raises(ConfigError, match=name):
            METHODS.settings(method)(**{name: value})
