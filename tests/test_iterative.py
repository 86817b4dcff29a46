"""The threat interface and the iterative core shared by the gradient attacks.

Each attack on the core (PGD, the official notation, MI-FGSM, FGSM, FGSM-RS, TRADES' adversary)
is compared bit for bit with a straightforward loop written here (its own forward, cross-entropy
and gradient; the threat's primitives for start, step and projection). A threat with another
norm (a test-local L2 ball, written against the interface only) plugs into the core; the attacks
whose registry entry does not name its norm refuse it, and every attack refuses an unknown norm.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from logitpair.attacks import (
    ATTACKS,
    apgd_ce,
    attack_info,
    fgsm,
    mi_fgsm,
    official,
    official_attack,
    parse_official,
    pgd,
)
from logitpair.attacks.common import attack_objective
from logitpair.attacks.iterative import BestIterate, perturb_iterative, start_point
from logitpair.errors import ConfigError
from logitpair.methods import METHODS, BatchContext
from logitpair.methods.crafting import fgsm_rs
from logitpair.methods.trades import START_STD, trades_adversary
from logitpair.pairing import pair_distance
from logitpair.threat import Linf, Threat, require_linf, require_norm

SMALL = Linf(0.03)  # small enough that not every point breaks: keep-best and restarts matter


@pytest.fixture(scope="module")
def setup(trained_model, tiny_data):
    x, y = tiny_data[0][:40], tiny_data[1][:40]
    init = (x + 0.02 * torch.randn(x.shape, generator=torch.Generator().manual_seed(5))).clamp(0, 1)
    return trained_model, x, y, init


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _loss(logits: Tensor, y: Tensor, target: Tensor | None) -> Tensor:
    """Per-example loss to ascend: CE of y, or minus CE of the target."""
    if target is None:
        return F.cross_entropy(logits, y, reduction="none")
    return -F.cross_entropy(logits, target, reduction="none")


def _grad(model: nn.Module, x_adv: Tensor, y: Tensor, target: Tensor | None) -> tuple[Tensor, Tensor, Tensor]:
    """(per-example loss, logits, gradient of the loss's sum) at ``x_adv``."""
    x_adv = x_adv.detach().requires_grad_(True)
    logits = model(x_adv)
    loss = _loss(logits, y, target)
    (grad,) = torch.autograd.grad(loss.sum(), x_adv)
    return loss.detach(), logits.detach(), grad


def _success(logits: Tensor, y: Tensor, target: Tensor | None, k: int) -> Tensor:
    if target is not None:
        return logits.argmax(1) == target
    return ~(logits.topk(k, dim=1).indices == y[:, None]).any(1)


def _ref_pgd(model, x, y, threat, *, steps, alpha, restarts=1, keep_best=True, random_start=True, init=None,
             target=None, k=1, generator=None):  # fmt: skip
    """PGD as the textbook loop: per restart a start, ``steps`` signed steps; the worst case kept."""
    best_x, best_loss = x.clone(), torch.full((len(x),), -math.inf, dtype=x.dtype)
    best_succ = torch.zeros(len(x), dtype=torch.bool)
    track = keep_best or restarts > 1
    for r in range(restarts):
        if r == 0 and init is not None:
            x_adv = threat.project(x, init)
        else:
            x_adv = threat.random_init(x, generator) if random_start else x.clone()
        points = []
        for _ in range(steps):
            loss, logits, grad = _grad(model, x_adv, y, target)
            points.append((x_adv, loss, logits))
            x_adv = threat.step(x, x_adv, grad, alpha)
        if not track:
            return x_adv
        with torch.no_grad():
            last_logits = model(x_adv)
        last = (x_adv, _loss(last_logits, y, target), last_logits)
        for cand, loss, logits in (points if keep_best else []) + [last]:
            succ = _success(logits, y, target, k)
            better = (succ & ~best_succ) | ((succ == best_succ) & (loss > best_loss))
            best_x = torch.where(better[:, None, None, None], cand, best_x)
            best_loss, best_succ = torch.where(better, loss, best_loss), best_succ | succ
    return best_x


PGD_CASES = {
    "last": {"keep_best": False},
    "keep-best": {},
    "restarts": {"restarts": 3},
    "restarts-last": {"restarts": 3, "keep_best": False},
    "clean-start": {"random_start": False},
    "init": {"init": True, "restarts": 2},
    "init-last": {"init": True, "keep_best": False},
    "top-2": {"k": 2, "restarts": 2},
    "targeted": {"target": True, "restarts": 2},
}


@pytest.mark.parametrize("case", sorted(PGD_CASES))
def test_pgd_equals_the_textbook_loop(case, setup):
    model, x, y, init = setup
    kw = dict(PGD_CASES[case])
    kw["init"] = init if kw.get("init") else None
    target = (y + 3) % 10 if kw.pop("target", False) else None
    got = pgd(model, x, y, threat=SMALL, steps=6, step_size=0.025, generator=_gen(1), targeted=target is not None,
              target=target, **kw)  # fmt: skip
    want = _ref_pgd(model, x, y, SMALL, steps=6, alpha=0.025, target=target, generator=_gen(1), **kw)
    assert torch.equal(got, want)


def test_keep_best_and_restarts_matter_here(setup):
    """The cases above are not vacuous: on this model the settings give different points."""
    model, x, y, _ = setup
    runs = [pgd(model, x, y, threat=SMALL, steps=6, step_size=0.03, generator=_gen(2), **kw)
            for kw in ({}, {"keep_best": False}, {"restarts": 3})]  # fmt: skip
    assert not torch.equal(runs[0], runs[1]) and not torch.equal(runs[0], runs[2])


@pytest.mark.parametrize("kind", ["pgd", "pgdll", "pgdrnd"])
@pytest.mark.parametrize("with_init", [False, True])
def test_official_equals_the_textbook_loop(kind, with_init, setup):
    model, x, y, init = setup
    spec = parse_official(f"{kind}_8_2_5")
    got = official_attack(model, x, y, spec=spec, generator=_gen(3), init=init if with_init else None)
    g = _gen(3)
    with torch.no_grad():
        logits = model(x)
    if kind == "pgd":
        label, target = logits.argmax(1), None
    else:
        label = logits.argmin(1) if kind == "pgdll" else torch.randint(0, 10, (len(x),), generator=g)
        target = label
    threat = Linf(8 / 255)
    x_adv = threat.project(x, init) if with_init else threat.random_init(x, g)
    for _ in range(5):
        x_adv = threat.step(x, x_adv, _grad(model, x_adv, label, target)[2], 2 / 255)
    assert torch.equal(got, x_adv)


@pytest.mark.parametrize("targeted", [False, True])
def test_mi_fgsm_equals_the_textbook_loop(targeted, setup):
    model, x, y, _ = setup
    target = (y + 1) % 10 if targeted else None
    got = mi_fgsm(model, x, y, threat=SMALL, steps=6, decay=0.8, targeted=targeted, target=target)
    x_adv, g = x.clone(), torch.zeros_like(x)
    for _ in range(6):
        grad = _grad(model, x_adv, y, target)[2]
        l1 = grad.abs().sum(dim=(1, 2, 3)).clamp_min(torch.finfo(grad.dtype).tiny)
        g = 0.8 * g + grad / l1[:, None, None, None]
        x_adv = SMALL.step(x, x_adv, g, SMALL.eps / 6)
    assert torch.equal(got, x_adv)


def test_fgsm_and_fgsm_rs_equal_one_step(setup):
    model, x, y, init = setup
    assert torch.equal(fgsm(model, x, y, threat=SMALL), SMALL.step(x, x, _grad(model, x, y, None)[2], SMALL.eps))
    start = SMALL.project(x, init)
    want = SMALL.step(x, start, _grad(model, start, y, None)[2], 0.04)
    assert torch.equal(fgsm_rs(model, x, y, threat=SMALL, alpha=0.04, init=init), want)


def test_trades_adversary_equals_the_textbook_loop(setup):
    model, x, _, _ = setup
    cfg = METHODS.settings("trades")(eps=0.05, attack_steps=4, attack_step_size=0.02)
    got = trades_adversary(model, x, cfg, BatchContext(generator=_gen(4)))
    x_adv = x + START_STD * torch.randn(x.shape, generator=_gen(4))  # not projected, as the reference
    with torch.no_grad():
        clean = model(x)
    for _ in range(4):
        z = x_adv.detach().requires_grad_(True)
        kl = pair_distance(clean, model(z), "kl", "sum")
        x_adv = cfg.threat.step(x, x_adv, torch.autograd.grad(kl, z)[0], 0.02)
    assert torch.equal(got, x_adv)


def test_best_iterate_prefers_success_then_loss():
    x = torch.zeros(3, 1)
    y = torch.tensor([0, 0, 0])
    best = BestIterate(x, lambda z: -z[:, 0], lambda z: z.argmax(1) != y, every_step=True)
    assert torch.equal(best.x, x) and (best.loss == -math.inf).all()
    ones = torch.ones(3, 1)
    best.consider(ones, torch.tensor([1.0, 1.0, 1.0]), torch.tensor([[2.0, 0.0], [2.0, 0.0], [0.0, 2.0]]))
    twos = 2 * ones
    # example 0: higher loss, not successful -> taken; 1: lower loss -> kept; 2: not successful -> kept
    best.consider(twos, torch.tensor([3.0, 0.5, 9.0]), torch.tensor([[2.0, 0.0], [2.0, 0.0], [2.0, 0.0]]))
    assert best.x[:, 0].tolist() == [2.0, 1.0, 1.0]
    assert best.success.tolist() == [False, False, True]


def test_start_point_draws_once_and_projects(setup):
    _, x, _, init = setup
    assert torch.equal(start_point(x, SMALL, init=init), SMALL.project(x, init))
    assert torch.equal(start_point(x, SMALL, generator=_gen(6)), SMALL.random_init(x, _gen(6)))
    assert torch.equal(start_point(x, SMALL, random_start=False), x)


# --- the threat interface ----------------------------------------------------------------------


@dataclass(frozen=True)
class _L2(Threat):
    """An L2 ball written against the interface only (not a projection onto ball and box jointly:
    scale into the ball, then clip, which stays inside both)."""

    eps: float
    bounds: tuple[float, float] = (0.0, 1.0)

    @property
    def norm(self) -> str:
        return "L2"

    def project(self, x: Tensor, x_adv: Tensor) -> Tensor:
        delta = x_adv - x
        norms = delta.flatten(1).norm(dim=1).clamp_min(1e-12)
        delta = delta * (self.eps / norms).clamp(max=1.0).view(-1, *[1] * (x.dim() - 1))
        return (x + delta).clamp(*self.bounds)

    def random_init(self, x: Tensor, generator: torch.Generator | None = None) -> Tensor:
        return self.project(x, x + self.eps * torch.randn(x.shape, generator=generator) / math.sqrt(x[0].numel()))

    def step(self, x: Tensor, x_adv: Tensor, grad: Tensor, step_size: float | Tensor) -> Tensor:
        unit = grad / grad.flatten(1).norm(dim=1).clamp_min(1e-12).view(-1, *[1] * (x.dim() - 1))
        return self.project(x, x_adv + step_size * unit)

    def contains(self, x: Tensor, x_adv: Tensor, tol: float = 1e-6) -> Tensor:
        lo, hi = self.bounds
        inside_box = ((x_adv >= lo - tol) & (x_adv <= hi + tol)).flatten(1).all(1)
        return ((x_adv - x).flatten(1).norm(dim=1) <= self.eps + tol) & inside_box


def test_threat_is_an_interface():
    with pytest.raises(TypeError):
        Threat()  # abstract
    assert isinstance(Linf(0.1), Threat)
    assert Linf(0.1, (0, 2)).to_dict() == {"norm": "Linf", "eps": 0.1, "bounds": [0.0, 2.0]}
    assert _L2(0.5).to_dict() == {"norm": "L2", "eps": 0.5, "bounds": [0.0, 1.0]}
    with pytest.raises(ConfigError, match="eps"):
        _L2(-1.0)  # the interface validates eps and bounds for every norm
    with pytest.raises(ConfigError, match="bounds"):
        _L2(1.0, (1.0, 0.0))


@pytest.mark.parametrize("attack", ["pgd", "mi_fgsm", "fgsm"])
def test_another_norm_plugs_into_the_core(attack, setup):
    model, x, y, _ = setup
    threat = _L2(1.0)
    run = {"pgd": lambda: pgd(model, x, y, threat=threat, steps=5, generator=_gen(7)),
           "mi_fgsm": lambda: mi_fgsm(model, x, y, threat=threat, steps=5),
           "fgsm": lambda: fgsm(model, x, y, threat=threat)}[attack]  # fmt: skip
    x_adv = run()
    assert threat.contains(x, x_adv).all()
    assert (x_adv - x).flatten(1).norm(dim=1).max() > 0.5  # it moved, in L2 units


@dataclass(frozen=True)
class _L7(_L2):
    """A norm no attack declares."""

    @property
    def norm(self) -> str:
        return "L7"


_LINF_ONLY = [n for n in ATTACKS.names() if "L2" not in attack_info(n).norms]


def test_the_linf_only_attacks_are_the_expected_ones():
    assert _LINF_ONLY == ["noise", "official"]


@pytest.mark.parametrize("name", _LINF_ONLY)
def test_linf_only_attacks_refuse_another_norm(name, setup):
    model, x, y, _ = setup
    extra = {"spec": "pgd_8_2_5"} if name == "official" else {}
    with pytest.raises(ConfigError, match="supports the Linf threat model only"):
        ATTACKS.get(name)(model, x[:4], y[:4], threat=_L2(1.0), **extra)


@pytest.mark.parametrize("name", [n for n in ATTACKS.names() if n not in ("pgd", "fgsm", "mi-fgsm")])
def test_attacks_refuse_a_norm_they_do_not_declare(name, setup):
    model, x, y, _ = setup
    extra = {"spec": "pgd_8_2_5"} if name == "official" else {}
    with pytest.raises(ConfigError, match="supports the .* threat models? only"):
        ATTACKS.get(name)(model, x[:4], y[:4], threat=_L7(1.0), **extra)


def test_require_linf():
    t = Linf(0.1)
    assert require_linf(t, "x") is t
    assert require_norm(t, ("Linf", "L2"), "x") is t
    with pytest.raises(ConfigError, match=r"^APGD supports the Linf and L2 threat models only, got _L7\(eps=1.0"):
        apgd_ce(nn.Identity(), torch.zeros(1, 3), torch.zeros(1, dtype=torch.long), threat=_L7(1.0))
    with pytest.raises(ConfigError, match=r"^the official notation \(pgd\|pgdll\|pgdrnd_EPS_STEP_NITER\) supports"):
        official(nn.Identity(), torch.zeros(1, 3), torch.zeros(1, dtype=torch.long), threat=_L2(1.0), spec="pgd_8_2_5")


def test_perturb_iterative_direction_sees_each_gradient(setup):
    model, x, y, _ = setup
    seen = []

    def direction(grad: Tensor) -> Tensor:
        seen.append(grad)
        return -grad  # descend instead

    out = perturb_iterative(model, x, x.clone(), threat=SMALL, steps=3, step_size=0.01,
                            loss_fn=attack_objective(y, None), direction=direction)  # fmt: skip
    assert len(seen) == 3
    assert torch.equal(SMALL.project(x, out), out)
    with torch.no_grad():
        assert F.cross_entropy(model(out), y) < F.cross_entropy(model(x), y)


def test_ensemble_logits_lives_with_the_models():
    import logitpair.attacks
    import logitpair.models
    from logitpair.models.ensemble import EnsembleLogits

    assert logitpair.attacks.EnsembleLogits is EnsembleLogits is logitpair.models.EnsembleLogits
