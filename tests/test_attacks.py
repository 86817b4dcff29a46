"""Invariants of the attacks, parametrised over the attack registry where they apply."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from logitpair.attacks import ATTACKS, fgsm, pgd, predict
from logitpair.threat import Linf

THREAT = Linf(0.1)
FAST = {"pgd": {"steps": 5}, "fgsm": {}}


def _acc(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> float:
    return float((predict(model, x).argmax(1) == y).float().mean())


@pytest.mark.parametrize("name", ["fgsm", "pgd"])
@pytest.mark.parametrize("targeted", [False, True])
def test_inside_ball_and_bounds(name, targeted, trained_model, tiny_data):
    x, y = tiny_data[0][:64], tiny_data[1][:64]
    xa = ATTACKS.get(name)(trained_model, x, y, threat=THREAT, targeted=targeted, **FAST[name])
    assert xa.shape == x.shape and xa.dtype == x.dtype
    assert THREAT.contains(x, xa).all()
    assert (xa - x).abs().max() <= THREAT.eps + 1e-6
    assert xa.min() >= 0 and xa.max() <= 1
    assert not torch.equal(xa, x)


def test_threat_projection_is_exact():
    x = torch.rand(4, 1, 5, 5)
    far = x + 5 * torch.randn_like(x)
    p = THREAT.project(x, far)
    assert THREAT.contains(x, p).all()
    assert not THREAT.contains(x, far).all()
    inside = THREAT.random_init(x, torch.Generator().manual_seed(0))
    assert torch.equal(THREAT.project(x, inside), inside)


def test_negative_eps_rejected():
    with pytest.raises(ValueError, match="eps"):
        Linf(-0.1)


@pytest.mark.parametrize("name", ["fgsm", "pgd"])
def test_model_state_untouched(name, tiny_data):
    model = nn.Sequential(nn.Flatten(), nn.Linear(784, 16), nn.BatchNorm1d(16), nn.ReLU(), nn.Linear(16, 10))
    model.train()
    model[4].weight.requires_grad_(False)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    flags = [p.requires_grad for p in model.parameters()]
    x, y = tiny_data[0][:32], tiny_data[1][:32]
    ATTACKS.get(name)(model, x, y, threat=THREAT, **FAST[name])
    assert model.training and all(m.training for m in model.modules())
    assert [p.requires_grad for p in model.parameters()] == flags
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k]), f"{k} changed (BatchNorm statistics must not move)"
    assert all(p.grad is None for p in model.parameters())


def test_pgd_stronger_than_fgsm_stronger_than_clean(trained_model, tiny_data):
    x, y = tiny_data[0][:256], tiny_data[1][:256]
    threat = Linf(0.05)
    clean = _acc(trained_model, x, y)
    one = _acc(trained_model, fgsm(trained_model, x, y, threat=threat), y)
    many = _acc(
        trained_model,
        pgd(trained_model, x, y, threat=threat, steps=20, generator=torch.Generator().manual_seed(0)),
        y,
    )
    assert many <= one <= clean
    assert many < clean - 0.3, (clean, one, many)


def test_targeted_pgd_reaches_targets(trained_model, tiny_data):
    x, y = tiny_data[0][:128], tiny_data[1][:128]
    target = (y + 3) % 10
    xa = pgd(trained_model, x, y, threat=Linf(0.2), steps=30, targeted=True, target=target)
    hit = (predict(trained_model, xa).argmax(1) == target).float().mean()
    assert hit > 0.9


def test_random_targets_differ_from_labels(trained_model, tiny_data):
    from logitpair.attacks import random_target

    y = tiny_data[1]
    t = random_target(y, 10, torch.Generator().manual_seed(0))
    assert (t != y).all() and t.min() >= 0 and t.max() < 10
    assert len(torch.unique(t)) == 10


def test_batch_equals_items_float64(trained_model, tiny_data):
    model = trained_model.double()
    try:
        x, y = tiny_data[0][:6].double(), tiny_data[1][:6]
        batch = pgd(model, x, y, threat=THREAT, steps=7, random_start=False)
        items = torch.cat(
            [pgd(model, x[i : i + 1], y[i : i + 1], threat=THREAT, steps=7, random_start=False) for i in range(6)]
        )
        assert torch.equal(batch, items)
    finally:
        trained_model.float()


def test_seeded_pgd_is_deterministic(trained_model, tiny_data):
    x, y = tiny_data[0][:32], tiny_data[1][:32]
    a = pgd(trained_model, x, y, threat=THREAT, steps=3, generator=torch.Generator().manual_seed(5))
    b = pgd(trained_model, x, y, threat=THREAT, steps=3, generator=torch.Generator().manual_seed(5))
    c = pgd(trained_model, x, y, threat=THREAT, steps=3, generator=torch.Generator().manual_seed(6))
    assert torch.equal(a, b) and not torch.equal(a, c)


def test_restarts_keep_per_example_worst_case(trained_model, tiny_data):
    x, y = tiny_data[0][:256], tiny_data[1][:256]
    threat = Linf(0.03)
    one = pgd(trained_model, x, y, threat=threat, steps=3, restarts=1, generator=torch.Generator().manual_seed(1))
    three = pgd(trained_model, x, y, threat=threat, steps=3, restarts=3, generator=torch.Generator().manual_seed(1))
    ok1 = predict(trained_model, one).argmax(1) == y
    ok3 = predict(trained_model, three).argmax(1) == y
    assert not (ok3 & ~ok1).any(), "a restart lost a success that the first run had found"


def test_pgd_default_step_size_and_validation(trained_model, tiny_data):
    x, y = tiny_data[0][:4], tiny_data[1][:4]
    with pytest.raises(ValueError, match="steps"):
        pgd(trained_model, x, y, threat=THREAT, steps=0)
    # one step without random start of the default size 2.5*eps/steps = eps stays on the sphere
    xa = pgd(trained_model, x, y, threat=Linf(0.01), steps=1, random_start=False, keep_best=False)
    interior = (x > 0.02) & (x < 0.98)
    assert torch.allclose((xa - x).abs()[interior], torch.tensor(0.01), atol=1e-6)


@pytest.mark.parametrize("name", ATTACKS.names())
def test_registered_capabilities_match_the_function(name):
    """The registry declares what each attack takes (the protocol never reads a signature); this
    keeps the declarations true."""
    import inspect

    from logitpair.attacks import attack_info

    info = attack_info(name)
    params = inspect.signature(ATTACKS.get(name)).parameters
    keyword = {k for k, p in params.items() if p.kind is inspect.Parameter.KEYWORD_ONLY}
    capability = {"threat", "generator", "targeted", "target", "k", "init", "rank_by"}
    assert set(info.options) == keyword - capability
    assert info.targeted == ({"targeted", "target"} <= keyword)
    assert info.topk == ("k" in keyword)
    assert set(info.warm) == keyword & {"init", "rank_by"}
    assert info.gradient_free == (name in ("square", "noise"))
