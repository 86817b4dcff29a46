"""Bound propagation through residual additions (a DAG of ops): sound against sampling and attacks,
exact where it must be (eps = 0, a linear residual net, a zeroed branch = the chain without it),
ordered, differentiable, on ``preact-resnet18`` itself, and clear errors for what is still refused."""

from __future__ import annotations

import copy
import itertools

import pytest
import torch
import torch.nn.functional as F
from test_bounds import (
    _margins,
    _randomize_bn,
    check_bound_gradients,
    check_bounds_below_attained,
)
from torch import nn

from logitpair.bounds import METHODS, margin_bounds
from logitpair.bounds.dag import INPUT, Dag
from logitpair.bounds.graph import trace_dag
from logitpair.bounds.margins import input_box
from logitpair.bounds.ops import Add, Conv
from logitpair.errors import ConfigError
from logitpair.models import create_model
from logitpair.models.preact_resnet import PreActResNet
from logitpair.threat import Linf


class PostAct(nn.Module):
    """ResNet v1 style: conv-BN-ReLU-max-pool (fused pull-back), a block ``relu(torch.add(bn(conv(...)), h))``,
    functional adaptive average pool, flatten, linear."""

    def __init__(self) -> None:
        super().__init__()
        self.conv0, self.bn0, self.pool = nn.Conv2d(2, 4, 3, padding=1), nn.BatchNorm2d(4), nn.MaxPool2d(2)
        self.conv1, self.bn1 = nn.Conv2d(4, 4, 3, padding=1), nn.BatchNorm2d(4)
        self.conv2, self.bn2 = nn.Conv2d(4, 4, 3, padding=1), nn.BatchNorm2d(4)
        self.fc = nn.Linear(4, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.pool(F.relu(self.bn0(self.conv0(x))))
        out = F.relu(self.bn1(self.conv1(h)))
        out = F.relu(torch.add(self.bn2(self.conv2(out)), h))
        return self.fc(torch.flatten(F.adaptive_avg_pool2d(out, 1), 1))


class Branches(nn.Module):
    """Two linear maps of the input added before the first ReLU; a ReLU read by a max-pool and a
    conv (no fused pull-back); ``Tensor.add``; ``relu(z) + z`` (both terms from one node)."""

    def __init__(self) -> None:
        super().__init__()
        self.conv, self.proj = nn.Conv2d(1, 3, 3, padding=1), nn.Conv2d(1, 3, 1)
        self.pool, self.side, self.avg = nn.MaxPool2d(2), nn.Conv2d(3, 3, 1), nn.AvgPool2d(2)
        self.fc = nn.Linear(3 * 4 * 4, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = F.relu(self.conv(x) + self.proj(x))
        z = self.pool(h).add(self.avg(self.side(h)))
        return self.fc(torch.flatten(F.relu(z) + z, 1))


def _tiny_preact(seed: int, normalize: str | None = "cifar10") -> nn.Module:
    """The models' PreActResNet, tiny: an identity-shortcut block, a 1x1 strided-conv-shortcut block."""
    torch.manual_seed(seed)
    model = PreActResNet(4, (4, 6), (1, 1), (1, 2), num_classes=3, in_channels=1, image_size=8, normalize=normalize)
    return _randomize_bn(model, torch.Generator().manual_seed(seed))


def _networks() -> dict[str, tuple[nn.Module, tuple[int, ...]]]:
    gen = torch.Generator().manual_seed(10)
    torch.manual_seed(10)
    return {
        "preact": (_tiny_preact(11), (1, 8, 8)),
        "post-act": (_randomize_bn(PostAct(), gen), (2, 8, 8)),
        "branches": (Branches().eval(), (1, 8, 8)),
    }


NETWORKS = _networks()


def _points(shape: tuple[int, ...], n: int, seed: int) -> torch.Tensor:
    return torch.rand(n, *shape, generator=torch.Generator().manual_seed(seed))


def _labels(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(x).argmax(1)


def test_residual_networks_are_dags():
    """The additions are Add nodes reading two earlier nodes; a Sequential is the chain."""
    dag = trace_dag(NETWORKS["preact"][0])
    adds = [k for k, op in enumerate(dag.ops) if isinstance(op, Add)]
    assert len(adds) == 2 and all(len(dag.inputs[k]) == 2 for k in adds)
    assert sum(isinstance(op, Conv) and op.weight.shape[-1] == 1 for op in dag.ops) == 1  # the 1x1 shortcut
    assert any(len(users) == 2 for k, users in dag.consumers.items() if k != INPUT)
    branches = trace_dag(NETWORKS["branches"][0])
    assert len(branches.consumers[INPUT]) == 2
    relu_plus = [ins for op, ins in zip(branches.ops, branches.inputs) if isinstance(op, Add)][-1]
    assert branches.inputs[relu_plus[0]] == (relu_plus[1],)  # relu(z) + z
    seq = nn.Sequential(nn.Flatten(), nn.Linear(4, 3), nn.ReLU(), nn.Identity(), nn.Linear(3, 2))
    assert trace_dag(seq).inputs == Dag.chain(trace_dag(seq).ops).inputs == [(-1,), (0,), (1,), (2,)]


@pytest.mark.parametrize("name", list(NETWORKS))
def test_residual_bounds_below_sampled_and_attacked_margins(name):
    model, shape = NETWORKS[name]
    x = _points(shape, 3, 12)
    y = _labels(model, x)
    threat = Linf(0.05)
    bounds = check_bounds_below_attained(model, x, y, threat)
    assert (bounds["ibp"] <= bounds["crown"] + 1e-6).float().mean() >= 0.5


@pytest.mark.parametrize("name", list(NETWORKS))
def test_bounds_at_eps_zero_are_the_clean_margins(name):
    """Below the clean margins with the round-off margin, equal to them (float32) without it."""
    model, shape = NETWORKS[name]
    x = _points(shape, 4, 13)
    y = _labels(model, x)
    with torch.no_grad():
        clean = _margins(model, x, y).masked_fill(F.one_hot(y, 3).bool(), float("inf"))
    finite = torch.isfinite(clean)
    for method in METHODS:
        bound = margin_bounds(model, x, y, threat=Linf(0.0), method=method).detach()
        assert (bound <= clean)[finite].all(), method
        assert (bound > clean - 0.01)[finite].all(), method  # IBP: the round-off margin compounds over layers
        exact = margin_bounds(model, x, y, threat=Linf(0.0), method=method, rtol=0.0).detach()
        torch.testing.assert_close(exact[finite], clean[finite], rtol=0, atol=1e-6, msg=method)


class LinearResidual(nn.Module):
    """No ReLU: conv-BN, then a 3x3 strided conv plus a 1x1 strided shortcut, linear. The margins
    are linear in the input, so CROWN's bound is their exact minimum over the box."""

    def __init__(self) -> None:
        super().__init__()
        self.conv0, self.bn = nn.Conv2d(1, 3, 3, padding=1), nn.BatchNorm2d(3)
        self.conv1, self.short = nn.Conv2d(3, 3, 3, stride=2, padding=1), nn.Conv2d(3, 3, 1, stride=2)
        self.fc = nn.Linear(3 * 4 * 4, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.bn(self.conv0(x))
        return self.fc(torch.flatten(self.conv1(h) + self.short(h), 1))


def test_crown_is_exact_on_a_linear_residual_net():
    """The minimum of a linear margin ``g`` over a box is ``g(mid) - |J|·rad``; the Add's pull-back
    (both terms get ``A``) must give exactly that (float64, without the round-off margin), IBP
    only a lower bound."""
    torch.manual_seed(14)
    model = _randomize_bn(LinearResidual(), torch.Generator().manual_seed(14)).double()
    x = _points((1, 8, 8), 3, 15).double()
    y = torch.tensor([0, 1, 3])
    threat = Linf(0.1)
    lo, hi = input_box(x, threat)
    mid, rad = (lo + hi) / 2, (hi - lo) / 2
    jac = torch.autograd.functional.jacobian(lambda z: _margins(model, z, y), mid).detach()  # (N, K, N, ...)
    jac = torch.stack([jac[i, :, i] for i in range(len(x))]).flatten(2)  # (N, K, D)
    with torch.no_grad():
        exact = _margins(model, mid, y) - (jac.abs() * rad.flatten(1)[:, None]).sum(-1)
    exact = exact.masked_fill(F.one_hot(y, 4).bool(), float("inf"))
    finite = torch.isfinite(exact)
    for method in ("crown-ibp", "crown", "alpha-crown"):
        bound = margin_bounds(model, x, y, threat=threat, method=method).detach()
        assert (bound <= exact)[finite].all() and (bound > exact - 1e-3)[finite].all(), method
        bound = margin_bounds(model, x, y, threat=threat, method=method, rtol=0.0).detach()
        torch.testing.assert_close(bound[finite], exact[finite], rtol=0, atol=1e-9, msg=method)
    ibp = margin_bounds(model, x, y, threat=threat, method="ibp").detach()
    assert (ibp <= exact)[finite].all() and ((exact - ibp)[finite] > 1e-3).any()


class ZeroBranch(nn.Module):
    """``conv0-ReLU`` then ``conv2(relu(conv1(h))) + h`` with ``conv2`` zero (so the output is
    ``h``), ReLU, max-pool, linear; ``chain()`` is the same network without the branch."""

    def __init__(self) -> None:
        super().__init__()
        self.conv0, self.conv1, self.conv2 = nn.Conv2d(1, 4, 3, padding=1), nn.Conv2d(4, 4, 3, padding=1), nn.Conv2d(4, 4, 3, padding=1)  # fmt: skip
        self.pool, self.fc = nn.MaxPool2d(2), nn.Linear(4 * 4 * 4, 3)
        with torch.no_grad():
            self.conv2.weight.zero_()
            self.conv2.bias.zero_()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = F.relu(self.conv0(x))
        out = self.conv2(F.relu(self.conv1(h))) + h
        return self.fc(torch.flatten(self.pool(F.relu(out)), 1))

    def chain(self) -> nn.Sequential:
        return nn.Sequential(self.conv0, nn.ReLU(), nn.ReLU(), self.pool, nn.Flatten(), self.fc).eval()


def test_zeroed_residual_branch_gives_the_chains_bounds():
    """The zero branch pulls back zero coefficients; the identity term passes ``A`` on whole."""
    torch.manual_seed(16)
    model = ZeroBranch().eval()
    x = _points((1, 8, 8), 4, 17)
    y = _labels(model, x)
    for eps, method, rtol in itertools.product((0.02, 0.1), METHODS, (0.0, 1e-5)):
        dag = margin_bounds(model, x, y, threat=Linf(eps), method=method, rtol=rtol).detach()
        chain = margin_bounds(model.chain(), x, y, threat=Linf(eps), method=method, rtol=rtol).detach()
        finite = torch.isfinite(chain)
        tol = 1e-6 if rtol == 0 else 1e-4  # the addition's round-off margin widens IBP's interval a little
        torch.testing.assert_close(dag[finite], chain[finite], rtol=0, atol=tol, msg=f"{method} {eps} {rtol}")


def test_order_on_a_residual_net():
    model, shape = NETWORKS["preact"]
    x = _points(shape, 6, 18)
    y = _labels(model, x)
    bounds = {m: margin_bounds(model, x, y, threat=Linf(0.03), method=m).detach() for m in METHODS}
    finite = torch.isfinite(bounds["ibp"])
    assert (bounds["ibp"] <= bounds["crown-ibp"] + 1e-6)[finite].float().mean() >= 0.5
    assert (bounds["crown"] <= bounds["alpha-crown"] + 1e-6).all()
    assert ((bounds["alpha-crown"] - bounds["crown"])[finite] > 1e-4).any()
    assert (bounds["crown-ibp"] <= bounds["crown"] + 1e-4)[finite].float().mean() >= 0.5


def test_preact_resnet18_bounds_run_and_lie_below_the_clean_margins():
    """The registry's model at the smallest size it takes (5: every stride-2 stage still gets 2x2
    or more, odd sizes included). Freshly initialised, its IBP bounds are huge but finite."""
    torch.manual_seed(19)
    model = create_model("preact-resnet18", num_classes=10, in_channels=3, image_size=5).eval()
    dag = trace_dag(model)
    assert sum(isinstance(op, Add) for op in dag.ops) == 8
    x = _points((3, 5, 5), 2, 20)
    y = _labels(model, x)
    with torch.no_grad():
        clean = _margins(model, x, y).masked_fill(F.one_hot(y, 10).bool(), float("inf"))
        for method, n in (("ibp", 2), ("crown-ibp", 2), ("crown", 1)):  # crown: ~4 s a point on one core
            bound = margin_bounds(model, x[:n], y[:n], threat=Linf(1e-3), method=method)
            assert torch.isfinite(bound).sum() == 9 * n and (bound <= clean[:n]).all(), method
    finite = torch.isfinite(bound)
    assert (bound > clean[:1] - 0.01)[finite].all()  # crown: near the clean margins at this eps


class Cancelling(nn.Module):
    """Large, cancelling terms: every hidden unit active, two heads added, each head's two rows
    nearly equal (as ``test_round_off_margin_keeps_cancelling_bounds_sound``, with an addition)."""

    def __init__(self) -> None:
        super().__init__()
        self.l1, self.l2, self.l3 = nn.Linear(64, 64), nn.Linear(64, 2), nn.Linear(64, 2)
        with torch.no_grad():
            self.l1.weight.mul_(300)
            self.l1.bias.fill_(100.0)
            for head in (self.l2, self.l3):
                head.weight[1] = head.weight[0] + 1e-3 * torch.randn(64)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = F.relu(self.l1(x))
        return self.l2(h) + self.l3(h)


@pytest.mark.parametrize("method", METHODS)
def test_round_off_margin_keeps_cancelling_residual_bounds_sound(method):
    torch.manual_seed(6)
    model = Cancelling().eval()
    x, y = torch.rand(200, 64, generator=torch.Generator().manual_seed(24)), torch.zeros(200, dtype=torch.long)
    exact = _margins(copy.deepcopy(model).double(), x.double(), y)[:, 1].detach()
    bound = margin_bounds(model, x, y, threat=Linf(0.0), method=method).detach()[:, 1].double()
    assert (bound <= exact).all()
    loose = margin_bounds(model, x, y, threat=Linf(0.0), method=method, rtol=0.0).detach()[:, 1].double()
    assert (loose > exact).any()


class GradNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv0, self.bn = nn.Conv2d(1, 2, 3, padding=1), nn.BatchNorm2d(2)
        self.conv_a, self.conv_b = nn.Conv2d(2, 2, 3, stride=2, padding=1), nn.Conv2d(2, 2, 3, padding=1)
        self.short, self.fc = nn.Conv2d(2, 2, 1, stride=2), nn.Linear(2, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = F.relu(self.bn(self.conv0(x)))
        out = self.conv_b(F.relu(self.conv_a(h))) + self.short(h)
        return self.fc(F.relu(out + out).mean((2, 3)))


@pytest.mark.parametrize("method", ["ibp", "crown-ibp"])
def test_residual_bound_gradients_match_finite_differences(method):
    torch.manual_seed(21)
    model = _randomize_bn(GradNet(), torch.Generator().manual_seed(21)).double()
    x = _points((1, 4, 4), 2, 22).double()
    y = torch.tensor([0, 2])
    check_bound_gradients(model, x, y, 0.05, method, intervals=method == "ibp")


class AddConstant(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + 1.0


class Broadcast(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(3, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(x) + x


class Scaled(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(3, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.add(self.fc(x), x, alpha=2)


class Unused(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc, self.other = nn.Linear(3, 3), nn.Linear(3, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.other(x)
        return self.fc(x)


class TwoOutputs(Unused):
    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:  # type: ignore[override]
        return self.fc(x), self.other(x)


@pytest.mark.parametrize(
    ("model", "match"),
    [
        (AddConstant(), "the addition add"),
        (Broadcast(), r"shapes \[\(1,\), \(3,\)\]"),
        (Scaled(), "the addition add"),
        (Unused(), "computes other and does not use it"),
        (TwoOutputs(), "returns one tensor"),
    ],
)
def test_refused_graphs_are_named(model, match):
    with pytest.raises(ConfigError, match=match):
        margin_bounds(model.eval(), torch.rand(2, 3), torch.zeros(2, dtype=torch.long), threat=Linf(0.1), method="ibp")
