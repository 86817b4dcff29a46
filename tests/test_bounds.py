"""Bound propagation (``logitpair.bounds``): sound against sampling and attacks, ordered against an
exact LP reference, alpha-CROWN tighter than CROWN, differentiable, round-off safe, clear errors."""

from __future__ import annotations

import copy
import itertools
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from conftest import make_images
from scipy.optimize import linprog
from torch import nn

from logitpair.bounds import METHODS, certified, interval_bounds, margin_bounds
from logitpair.bounds.ops import MaxPool, ReLU
from logitpair.errors import ConfigError
from logitpair.models import create_model
from logitpair.models.layers import Normalize
from logitpair.threat import Linf


def _randomize_bn(model: nn.Module, gen: torch.Generator) -> nn.Module:
    """Non-trivial running statistics and affine parameters, so BatchNorm is not the identity."""
    for m in model.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            c = m.num_features
            m.running_mean.copy_(torch.randn(c, generator=gen) * 0.3)
            m.running_var.copy_(torch.rand(c, generator=gen) + 0.5)
            m.weight.data.copy_(torch.randn(c, generator=gen))
            m.bias.data.copy_(torch.randn(c, generator=gen) * 0.3)
    return model.eval()


class TwoStage(nn.Module):
    """A module whose forward calls its children (and functional ops) in order, like LeNet."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(1, 4, 3, padding=1)
        self.pool = nn.MaxPool2d(2)
        self.fc = nn.Linear(4 * 4 * 4, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(torch.flatten(self.pool(F.relu(self.conv(x))), 1))


def _networks() -> dict[str, tuple[nn.Module, tuple[int, ...]]]:
    gen = torch.Generator().manual_seed(0)
    torch.manual_seed(0)
    mlp = nn.Sequential(
        nn.Flatten(), nn.Linear(6, 10), nn.BatchNorm1d(10), nn.ReLU(), nn.Dropout(0.5),
        nn.Sequential(nn.Linear(10, 8), nn.ReLU(), nn.Identity()), nn.Linear(8, 4),
    )  # fmt: skip
    cnn = nn.Sequential(
        Normalize((0.4, 0.6), (0.3, 0.2)), nn.Conv2d(2, 4, 3, stride=2, padding=1), nn.BatchNorm2d(4), nn.ReLU(),
        nn.Conv2d(4, 6, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2), nn.Conv2d(6, 6, 1), nn.ReLU(),
        nn.AvgPool2d(2), nn.Conv2d(6, 5, 1), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.ReLU(), nn.Linear(5, 3),
    )  # fmt: skip
    return {
        "mlp": (_randomize_bn(mlp, gen), (1, 2, 3)),
        "cnn": (_randomize_bn(cnn, gen), (2, 8, 8)),
        "two-stage": (TwoStage().eval(), (1, 8, 8)),
        "pool-first": (
            nn.Sequential(nn.Conv2d(1, 3, 1), nn.MaxPool2d(2), nn.Flatten(), nn.Linear(48, 4)).eval(),
            (1, 8, 8),
        ),
        "lenet5": (create_model("lenet5", num_classes=5, image_size=12).eval(), (1, 12, 12)),
        "cnn-small": (create_model("cnn-small", num_classes=4, image_size=10).eval(), (1, 10, 10)),
    }


NETWORKS = _networks()


def _margins(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    logits = model(x)
    return logits.gather(1, y[:, None]) - logits


def _sampled_min(model: nn.Module, x: torch.Tensor, y: torch.Tensor, threat: Linf, n: int = 10_000) -> torch.Tensor:
    """Per point and class, the smallest margin over ``n`` points of the ball: half vertices, half inside."""
    gen = torch.Generator().manual_seed(1)
    out = []
    for xi, yi in zip(x, y):
        xs = xi.expand(n, *xi.shape)
        corners = threat.project(xs, xs + threat.eps * (2 * torch.randint(0, 2, xs.shape, generator=gen) - 1))
        inside = threat.project(xs, xs + threat.eps * (2 * torch.rand(xs.shape, generator=gen) - 1))
        pts = torch.where(torch.arange(n).view(-1, *[1] * xi.dim()) < n // 2, corners, inside)
        out.append(_margins(model, pts, yi.expand(n)).min(0).values)
    return torch.stack(out)


def _pgd_min(model: nn.Module, x: torch.Tensor, y: torch.Tensor, threat: Linf, steps: int = 60) -> torch.Tensor:
    """Per point and class, the margin at the end of a sign-gradient descent on that margin."""
    k = model(x[:1]).shape[1]
    xs, ys = x.repeat_interleave(k, 0), y.repeat_interleave(k, 0)
    js = torch.arange(k).repeat(len(x))
    adv = threat.random_init(xs, generator=torch.Generator().manual_seed(2))
    best = _margins(model, adv, ys).gather(1, js[:, None]).squeeze(1).detach()
    for _ in range(steps):
        adv.requires_grad_(True)
        margin = _margins(model, adv, ys).gather(1, js[:, None]).squeeze(1)
        (grad,) = torch.autograd.grad(margin.sum(), adv)
        best = torch.minimum(best, margin.detach())
        adv = threat.step(xs, adv.detach(), -grad, threat.eps / 8)
    return best.view(len(x), k)


def check_bounds_below_attained(model: nn.Module, x: torch.Tensor, y: torch.Tensor, threat: Linf) -> dict:
    """Every method's bounds (returned) are +inf at ``y``, below the lowest margin found by 10,000
    samples and PGD, and CROWN is below alpha-CROWN."""
    found = torch.minimum(_sampled_min(model, x, y, threat).detach(), _pgd_min(model, x, y, threat))
    found = found.masked_fill(F.one_hot(y, found.shape[1]).bool(), float("inf"))
    bounds = {m: margin_bounds(model, x, y, threat=threat, method=m).detach() for m in METHODS}
    for method, bound in bounds.items():
        assert torch.isinf(bound.gather(1, y[:, None])).all()
        assert (bound <= found + 1e-6).all(), f"{method} above an attained margin: {(bound - found).max()}"
    assert (bounds["crown"] <= bounds["alpha-crown"] + 1e-6).all()
    return bounds


@pytest.mark.parametrize("name", list(NETWORKS))
def test_bounds_below_sampled_and_attacked_margins(name):
    model, shape = NETWORKS[name]
    gen = torch.Generator().manual_seed(3)
    x = torch.rand(3, *shape, generator=gen)
    with torch.no_grad():
        y = model(x).argmax(1)
    threat = Linf(float(torch.empty(1).uniform_(0.02, 0.12, generator=gen)))
    check_bounds_below_attained(model, x, y, threat)


def _tiny(seed: int) -> nn.Sequential:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(2, 4), nn.ReLU(), nn.Linear(4, 4), nn.ReLU(), nn.Linear(4, 3)).eval()


def _affine_layers(model: nn.Sequential) -> list[tuple[np.ndarray, np.ndarray]]:
    return [
        (m.weight.detach().double().numpy(), m.bias.detach().double().numpy())
        for m in model
        if isinstance(m, nn.Linear)
    ]


def _pattern_lps(layers, lo, hi, y):
    """For each activation pattern of the hidden layers: the margins' minima over its region ∩ box."""
    (w1, b1), (w2, b2), (w3, b3) = layers
    best = np.full(w3.shape[0], np.inf)
    for bits in itertools.product((0.0, 1.0), repeat=w1.shape[0] + w2.shape[0]):
        d1, d2 = np.array(bits[: w1.shape[0]]), np.array(bits[w1.shape[0] :])
        m1, c1 = w1, b1
        m2, c2 = w2 @ (d1[:, None] * m1), w2 @ (d1 * c1) + b2
        m3, c3 = w3 @ (d2[:, None] * m2), w3 @ (d2 * c2) + b3
        # active: pre-activation >= 0  <=>  -M x <= c; inactive: M x <= -c
        sign1, sign2 = 1 - 2 * d1, 1 - 2 * d2
        a_ub = np.vstack([sign1[:, None] * m1, sign2[:, None] * m2])
        b_ub = np.concatenate([-sign1 * c1, -sign2 * c2])
        for j in range(len(best)):
            if j == y:
                continue
            res = linprog(m3[y] - m3[j], A_ub=a_ub, b_ub=b_ub, bounds=list(zip(lo, hi)), method="highs")
            if res.status == 0:
                best[j] = min(best[j], res.fun + c3[y] - c3[j])
    return best


@pytest.mark.parametrize("seed", [0, 1])
def test_order_against_exact_lp_reference(seed):
    model = _tiny(seed)
    gen = torch.Generator().manual_seed(seed)
    x = torch.rand(4, 2, generator=gen)
    with torch.no_grad():
        y = model(x).argmax(1)
    threat = Linf(0.2)
    lo, hi = (x - 0.2).clamp(0, 1), (x + 0.2).clamp(0, 1)
    exact = torch.tensor(np.stack([_pattern_lps(_affine_layers(model), lo[i].double().numpy(), hi[i].double().numpy(), int(y[i])) for i in range(4)]), dtype=torch.float32)  # fmt: skip
    exact = exact.masked_fill(F.one_hot(y, 3).bool(), float("inf"))
    b = {m: margin_bounds(model, x, y, threat=threat, method=m, **({"iterations": 50} if m == "alpha-crown" else {})).detach() for m in METHODS}  # fmt: skip
    attack = _pgd_min(model, x, y, threat).masked_fill(F.one_hot(y, 3).bool(), float("inf"))
    tol = 1e-5
    assert (b["ibp"] <= exact + tol).all() and (b["crown-ibp"] <= exact + tol).all()
    assert (b["crown"] <= b["alpha-crown"] + tol).all()
    assert (b["alpha-crown"] <= exact + tol).all()
    assert (exact <= attack + tol).all()
    finite = torch.isfinite(exact)
    assert (b["ibp"] <= b["crown-ibp"] + tol)[finite].float().mean() >= 0.5
    assert (exact - b["alpha-crown"])[finite].max() < (exact - b["ibp"])[finite].max() + tol


def test_alpha_crown_beats_crown_on_a_trained_net():
    images, labels = make_images(512, seed=5, size=28)
    x_all = torch.from_numpy(images).float().div(255).view(-1, 1, 28, 28)
    x_all = F.avg_pool2d(x_all, 4)  # 7x7: a tiny, quick model
    y_all = torch.from_numpy(labels).long()
    torch.manual_seed(0)
    model = nn.Sequential(nn.Flatten(), nn.Linear(49, 32), nn.ReLU(), nn.Linear(32, 32), nn.ReLU(), nn.Linear(32, 10))
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    for step in range(300):
        idx = torch.arange(64) + 64 * (step % 8)
        loss = F.cross_entropy(model(x_all[idx]), y_all[idx])
        opt.zero_grad()
        loss.backward()
        opt.step()
    model.eval()
    x, y = x_all[:20], y_all[:20]
    crown = margin_bounds(model, x, y, threat=Linf(0.02), method="crown")
    alpha = margin_bounds(model, x, y, threat=Linf(0.02), method="alpha-crown", iterations=30)
    finite = torch.isfinite(crown)
    assert (alpha >= crown - 1e-6)[finite].all()
    assert ((alpha - crown)[finite] > 1e-3).any(), (alpha - crown)[finite].max()


def _inject(model: nn.Module, params: tuple[torch.Tensor, ...]) -> None:
    """Make the gradcheck inputs the model's parameters (plain tensors in ``_parameters``)."""
    for (module, name), p in zip(_param_slots(model), params):
        module._parameters[name] = p


def _param_slots(model: nn.Module) -> list[tuple[nn.Module, str]]:
    return [(m, n) for m in model.modules() for n in list(m._parameters)]


def check_bound_gradients(
    model: nn.Module, x: torch.Tensor, y: torch.Tensor, eps: float, method: str, *, intervals: bool
) -> None:
    """float64 gradcheck of ``margin_bounds(method)`` (and, with ``intervals``, of the IBP logit
    interval) with respect to every parameter of ``model``."""
    params = tuple(getattr(m, n).detach().clone().requires_grad_() for m, n in _param_slots(model))

    def bound(*ps):
        _inject(model, ps)
        b = margin_bounds(model, x, y, threat=Linf(eps), method=method)
        return b[torch.isfinite(b)]

    assert torch.autograd.gradcheck(bound, params, eps=1e-6, atol=1e-5)
    if intervals:

        def logits_interval(*ps):
            _inject(model, ps)
            return torch.cat(interval_bounds(model, x - eps, x + eps))

        assert torch.autograd.gradcheck(logits_interval, params, eps=1e-6, atol=1e-5)


@pytest.mark.parametrize("method", ["ibp", "crown-ibp"])
def test_bound_gradients_match_finite_differences(method):
    model = _tiny(3).double()
    x = torch.rand(3, 2, generator=torch.Generator().manual_seed(4), dtype=torch.float64)
    check_bound_gradients(model, x, torch.tensor([0, 1, 2]), 0.1, method, intervals=True)


@pytest.mark.parametrize("method", METHODS)
def test_round_off_margin_keeps_cancelling_bounds_sound(method):
    """Large, cancelling terms and eps = 0: the float32 bound must stay below the float64 margin;
    without the round-off margin (rtol=0) it does not."""
    torch.manual_seed(6)
    model = nn.Sequential(nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 2)).eval()
    with torch.no_grad():
        model[0].weight.mul_(300)
        model[0].bias.fill_(100.0)  # every hidden unit active on [0, 1]^64
        model[2].weight[1] = model[2].weight[0] + 1e-3 * torch.randn(64)
    x = torch.rand(200, 64)
    y = torch.zeros(200, dtype=torch.long)
    double = copy.deepcopy(model).double()
    exact = _margins(double, x.double(), y)[:, 1]
    threat = Linf(0.0)
    bound = margin_bounds(model, x, y, threat=threat, method=method).detach()[:, 1].double()
    assert (bound <= exact).all()
    loose = margin_bounds(model, x, y, threat=threat, method=method, rtol=0.0).detach()[:, 1].double()
    assert (loose > exact).any()


@pytest.mark.parametrize(("size", "alpha"), [((6, 8), False), ((5, 7), False), ((5, 7), True)])
def test_fused_relu_max_pool_pull_back_is_the_two_steps(size, alpha):
    """``MaxPool.back_after_relu`` gives the coefficients of ``ReLU.back(MaxPool.back(A))`` exactly
    (cropped windows, ties of the ReLU's zero lower bounds, alpha slopes) and the same biases."""
    gen = torch.Generator().manual_seed(8)
    relu, pool = ReLU(), MaxPool(2)
    relu.in_shape = relu.out_shape = pool.in_shape = (3, *size)
    pool.out_shape = (3, size[0] // 2, size[1] // 2)
    lower = torch.randn(4, 3, *size, generator=gen)
    upper = lower + torch.rand(4, 3, *size, generator=gen)
    pooled = relu.ibp(lower, upper, 0.0)
    A = torch.randn(4, 6, *pool.out_shape, generator=gen)
    slopes = torch.rand(4, 6, 3, *size, generator=gen) if alpha else None
    A1, b1, m1 = pool.back(A, *pooled)
    A2, b2, m2 = relu.back(A1, lower, upper, slopes)
    fused, bias, mag = pool.back_after_relu(A, pooled, (lower, upper), slopes)
    assert torch.equal(fused, A2)
    torch.testing.assert_close(bias, b1 + b2)
    torch.testing.assert_close(mag, m1 + m2)


def test_crown_ibp_gradients_through_conv_relu_max_pool():
    model = copy.deepcopy(NETWORKS["two-stage"][0]).double()
    x = torch.rand(2, 1, 8, 8, generator=torch.Generator().manual_seed(9), dtype=torch.float64)
    y = torch.tensor([0, 2])
    params = tuple(getattr(m, n).detach().clone().requires_grad_() for m, n in _param_slots(model))

    def bound(*ps):
        _inject(model, ps)
        b = margin_bounds(model, x, y, threat=Linf(0.05), method="crown-ibp")
        return b[torch.isfinite(b)]

    assert torch.autograd.gradcheck(bound, params, eps=1e-6, atol=1e-5)


def test_certified_matches_the_bounds():
    model, shape = NETWORKS["mlp"]
    x = torch.rand(8, *shape, generator=torch.Generator().manual_seed(7))
    y = model(x).argmax(1)
    for eps in (0.0, 0.001, 0.5):
        flags = certified(model, x, y, threat=Linf(eps), method="crown")
        lb = margin_bounds(model, x, y, threat=Linf(eps), method="crown")
        assert torch.equal(flags, (lb > 0).all(1))
    assert certified(model, x, y, threat=Linf(0.0), method="ibp").all()


class Gated(nn.Module):
    """A product of two tensors: not a layer bound propagation knows."""

    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(3, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(x) * x


@pytest.mark.parametrize(
    ("model", "match"),
    [
        (nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 2)), "layer Tanh; supported: Linear"),
        (nn.Sequential(nn.Conv2d(1, 2, 3, groups=1, dilation=2), nn.Flatten()), "Conv2d with dilation"),
        (nn.Sequential(nn.MaxPool2d(3, stride=2), nn.Flatten()), "MaxPool2d"),
        (Gated(), "the operation 'mul'"),
    ],
)
def test_unsupported_layers_are_named(model, match):
    x = torch.rand(2, 1, 8, 8) if isinstance(model[0] if isinstance(model, nn.Sequential) else model, (nn.Conv2d, nn.MaxPool2d)) else torch.rand(2, 3)  # fmt: skip
    with pytest.raises(ConfigError, match=match):
        margin_bounds(model.eval(), x, torch.zeros(2, dtype=torch.long), threat=Linf(0.1), method="ibp")


def test_bad_method_and_options():
    model, shape = NETWORKS["mlp"]
    x, y = torch.rand(2, *shape), torch.zeros(2, dtype=torch.long)
    with pytest.raises(ConfigError, match="method"):
        margin_bounds(model, x, y, threat=Linf(0.1), method="milp")
    with pytest.raises(ConfigError, match="iterations"):
        margin_bounds(model, x, y, threat=Linf(0.1), method="crown", iterations=3)


def test_speed_benchmark_runs(tmp_path):
    """``benchmarks/bounds_speed.py`` on random inputs, tiny N: every method, one row each."""
    out = tmp_path / "speed.json"
    cmd = [sys.executable, "benchmarks/bounds_speed.py", "--n", "3", "--n-slow", "1", "--batch", "2", "--repeats", "1",
           "--eps", "0.02", "--threads", "1", "--iterations", "2", "--image-size", "12", "--out", str(out)]  # fmt: skip
    root = Path(__file__).resolve().parents[1]
    proc = subprocess.run(cmd, check=False, cwd=root, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = json.loads(out.read_text())["rows"]
    assert [r["method"] for r in rows] == ["ibp", "crown-ibp", "crown-ibp (grad)", "crown", "alpha-crown"]
    assert all(
        r["points_per_second"] > 0 and r["n"] == (1 if r["method"] in ("crown", "alpha-crown") else 3) for r in rows
    )
    assert "| crown-ibp | 0.02 | 1 | 3 |" in proc.stdout
