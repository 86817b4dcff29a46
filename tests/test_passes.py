"""Model passes counted by hooks (logitpair.training.passes): the counts follow the method's
step (attack steps, joint batch), not the machine."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from logitpair.config import make_config
from logitpair.methods import METHODS
from logitpair.training.passes import counting, step_passes


def _net() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(1, 4, 3), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 6 * 6, 10))


def _cfg(method: str, **loss):
    return make_config(overrides={"method": method, "model": "lenet5", "optim": {"batch_size": 8}, "loss": loss})


def test_counting_forward_backward_and_no_grad():
    m = _net()
    x = torch.rand(5, 1, 8, 8)
    with counting([m]) as c:
        m(x).sum().backward()  # forward + backward of 5 images
        xr = x.clone().requires_grad_(True)
        torch.autograd.grad(m(xr).sum(), xr)  # an input gradient: another 5 + 5
        with torch.no_grad():
            m(x[:2])  # forward only
    assert (c.forward, c.backward) == (12, 10)
    m(x)  # outside the block: not counted, hooks removed
    assert (c.forward, c.backward) == (12, 10)
    assert not m._forward_hooks and not m._backward_hooks


@pytest.mark.parametrize("steps", [1, 3, 7])
@pytest.mark.parametrize("method", ["mpgd", "alp"])
def test_pgd_training_passes_follow_attack_steps(method, steps):
    """k input-gradient steps on the batch, then one joint step on clean + adversarial (2B)."""
    cfg = _cfg(method, attack_steps=steps)
    p = step_passes(cfg, _net(), [], (1, 8, 8), 10)
    assert p["forward"] == p["backward"] == steps + 2
    cost = METHODS.entry(method).cost  # the declared class, for the default 7 steps
    if steps == 7:
        assert p["forward"] == cost.attack_steps * cost.attack_rows + cost.train_rows


@pytest.mark.parametrize("method", ["regular", "lsq", "clp", "ls", "mixup"])
def test_clean_methods_one_pass(method):
    p = step_passes(_cfg(method), _net(), [], (1, 8, 8), 10)
    assert (p["forward"], p["backward"]) == (1.0, 1.0)
    assert (p["static_forward"], p["static_backward"]) == (0.0, 0.0)


def test_static_models_counted_separately():
    """Ensemble adversarial training crafts on the static models: their passes count apart."""
    statics = [_net().eval().requires_grad_(False) for _ in range(2)]
    totals = [step_passes(_cfg("ens-adv"), _net(), statics, (1, 8, 8), 10, step=s) for s in range(6)]
    assert any(t["static_forward"] > 0 for t in totals)  # some step crafts on a static model
    assert all(t["backward"] >= 1.0 for t in totals)  # the training step itself
