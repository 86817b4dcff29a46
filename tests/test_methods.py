"""Training losses: exact definitions, pairing, mode hygiene, validation."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from logitpair.config import loss_for
from logitpair.errors import ConfigError
from logitpair.methods import METHODS, BatchContext
from logitpair.methods.certified import CertifiedSettings
from logitpair.pairing import pair_distance
from logitpair.settings import accepted_keys

SETTINGS = {"eps": 0.1, "attack_steps": 2, "attack_step_size": 0.05, "lam": 0.7, "warmup_steps": 0, "ramp_steps": 0}
CTX = BatchContext()


def cfg_for(name: str, **values: object):
    """Method ``name``'s settings: ``SETTINGS`` where it has them, then ``values``."""
    return METHODS.settings(name)(**{**loss_for(name, SETTINGS), **values})


def settings_with(field: str) -> type:
    """The settings class of the first method that has ``field``."""
    return next(METHODS.settings(m) for m in METHODS.names() if field in accepted_keys(METHODS.settings(m)))


CFG = cfg_for("alp")


class Recorder(nn.Module):
    """A small net that records the ``training`` flag and batch size of every forward."""

    def __init__(self) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.Flatten(), nn.Linear(784, 32), nn.BatchNorm1d(32), nn.ReLU(), nn.Linear(32, 10))
        self.calls: list[tuple[bool, int]] = []

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.calls.append((self.training, len(x)))
        return self.net(x)


def test_pair_distance_zero_for_identical_logits():
    a = torch.randn(8, 10)
    for distance in ("l2sq", "l2", "l1", "cosine"):
        assert pair_distance(a, a.clone(), distance).abs() < 1e-6


def test_pair_distance_gradient_closed_form():
    a = torch.randn(6, 10, dtype=torch.float64, requires_grad=True)
    b = torch.randn(6, 10, dtype=torch.float64, requires_grad=True)
    ga, gb = torch.autograd.grad(pair_distance(a, b, "l2sq", "mean"), (a, b))
    expected = 2 * (a - b).detach() / a.numel()
    assert torch.allclose(ga, expected) and torch.allclose(gb, -expected)
    (ga,) = torch.autograd.grad(pair_distance(a, b, "l2sq", "sum_classes"), (a,))
    assert torch.allclose(ga, 2 * (a - b).detach() / len(a))
    (ga,) = torch.autograd.grad(pair_distance(a, b, "l2", "mean"), (a,))
    d = (a - b).detach()
    assert torch.allclose(ga, d / d.norm(dim=1, keepdim=True) / len(a))


@pytest.mark.parametrize("name", METHODS.names())
def test_methods_finite_grads_and_mode(name, tiny_data):
    torch.manual_seed(0)
    model = Recorder().train()
    if issubclass(METHODS.settings(name), CertifiedSettings):  # bound propagation: a traceable chain without BN
        model = nn.Sequential(nn.Flatten(), nn.Linear(784, 32), nn.ReLU(), nn.Linear(32, 10)).train()
    x, y = tiny_data[0][:16], tiny_data[1][:16]
    loss, metrics = METHODS.get(name)(model, x, y, cfg_for(name), CTX)
    assert loss.dim() == 0 and torch.isfinite(loss)
    assert all(not v.requires_grad for v in metrics.values())
    loss.backward()
    for n, p in model.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all(), n
    assert model.training and all(m.training for m in model.modules())


@pytest.mark.parametrize("name", ["mpgd", "alp"])
def test_adversarial_methods_attack_in_eval_and_train_on_joint_batch(name, tiny_data):
    torch.manual_seed(0)
    model = Recorder().train()
    x, y = tiny_data[0][:16], tiny_data[1][:16]
    METHODS.get(name)(model, x, y, cfg_for(name), CTX)
    attack_calls = [c for c in model.calls if c[0] is False]
    train_calls = [c for c in model.calls if c[0] is True]
    assert len(attack_calls) >= CFG.attack_steps and all(n == 16 for _, n in attack_calls)
    assert train_calls == [(True, 32)], "clean and adversarial must be one concatenated train-mode batch"


def test_alp_is_mpgd_plus_lambda_pairing(tiny_data):
    model = Recorder().eval()  # eval: BatchNorm statistics stay fixed between the calls
    x, y = tiny_data[0][:16], tiny_data[1][:16]
    torch.manual_seed(3)
    mpgd, _ = METHODS.get("mpgd")(model, x, y, cfg_for("mpgd"), CTX)
    torch.manual_seed(3)
    alp, m = METHODS.get("alp")(model, x, y, CFG, CTX)
    assert m["pair"] > 0
    assert torch.allclose(alp, mpgd + CFG.lam * m["pair"])
    torch.manual_seed(3)
    alp0, _ = METHODS.get("alp")(model, x, y, cfg_for("alp", lam=0.0), CTX)
    assert torch.allclose(alp0, mpgd)


def test_mpgd_is_half_clean_half_adversarial(tiny_data):
    model = Recorder().eval()
    x, y = tiny_data[0][:16], tiny_data[1][:16]
    torch.manual_seed(3)
    loss, _ = METHODS.get("mpgd")(model, x, y, cfg_for("mpgd"), CTX)
    torch.manual_seed(3)
    from logitpair.attacks import pgd

    xa = pgd(
        model,
        x,
        y,
        threat=CFG.threat,
        steps=CFG.attack_steps,
        step_size=CFG.attack_step_size,
        keep_best=False,
    )
    expected = 0.5 * F.cross_entropy(model(x), y) + 0.5 * F.cross_entropy(model(xa), y)
    assert torch.allclose(loss, expected, atol=1e-6)


def test_clp_pairs_first_half_with_second_half():
    class Identity(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.w = nn.Parameter(torch.ones(()))

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.w * x.flatten(1)[:, :10]

    cfg = METHODS.settings("clp")(lam=1.0, noise_std=0.0)
    half = torch.rand(4, 1, 28, 28)
    y = torch.zeros(8, dtype=torch.long)
    _, m = METHODS.get("clp")(Identity(), torch.cat([half, half]), y, cfg, CTX)
    assert m["pair"] == 0, "example i must be paired with example i + m/2"
    distinct = torch.rand(8, 1, 28, 28)
    _, m = METHODS.get("clp")(Identity(), distinct, y, cfg, CTX)
    logits = distinct.flatten(1)[:, :10]
    assert torch.allclose(m["pair"], ((logits[:4] - logits[4:]) ** 2).mean())
    _, m = METHODS.get("clp")(Identity(), distinct[:7], y[:7], cfg, CTX)  # odd batch: last one unpaired
    assert torch.allclose(m["pair"], ((logits[:3] - logits[3:6]) ** 2).mean())


def test_lsq_penalises_unsquared_logit_norm():
    class Fixed(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.z = nn.Parameter(torch.tensor([[3.0, 4.0] + [0.0] * 8, [0.0] * 9 + [2.0]]))

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.z + 0 * x.sum()

    y = torch.tensor([0, 9])
    loss, m = METHODS.get("lsq")(
        Fixed(), torch.rand(2, 1, 28, 28), y, METHODS.settings("lsq")(lam=0.5, noise_std=0.0), CTX
    )
    assert torch.allclose(m["logit_norm"], torch.tensor(3.5))
    ce = F.cross_entropy(Fixed().z, y)
    assert torch.allclose(loss, ce + 0.5 * 3.5)


def test_noise_methods_add_noise(tiny_data):
    model = Recorder().train()
    x, y = tiny_data[0][:8], tiny_data[1][:8]
    torch.manual_seed(0)
    a, _ = METHODS.get("lsq")(model, x, y, METHODS.settings("lsq")(noise_std=0.5), CTX)
    b, _ = METHODS.get("lsq")(model, x, y, METHODS.settings("lsq")(noise_std=0.5), CTX)
    assert not torch.equal(a, b)


@pytest.mark.parametrize(
    "field, value",
    [
        ("lam", -0.1),
        ("eps", -0.01),
        ("eps", 1.5),
        ("attack_steps", 0),
        ("noise_std", -1.0),
        ("distance", "l3"),
    ],
)
def test_bad_method_config_rejected(field, value):
    with pytest.raises(ConfigError, match=field):
        settings_with(field)(**{field: value})
