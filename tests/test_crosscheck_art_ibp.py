"""Cross-check of our IBP against the Adversarial Robustness Toolbox's (ART) interval classifier.

Optional: skipped unless ``adversarial-robustness-toolbox`` is installed
(``pip install adversarial-robustness-toolbox``); run with ``pytest -m crosscheck``.
ART's ``PyTorchIBPClassifier`` (``art.estimators.certification.interval``) propagates intervals
through Conv2d (as its equivalent dense matrix), Linear and ReLU children of the model, in centre
and radius form, in float32, with no round-off margin; it has no Flatten layer (any other child
is refused) and infers the reshape when a Linear follows a Conv2d (or a Conv2d and a ReLU), so it
gets our model without its ``nn.Flatten`` (:class:`_ArtView`), and the MLP, which has no
convolution, gets flattened inputs. Its input box is ``clip(x ± eps, limits)``, which with
``limits=[0, 1]`` is exactly our ``input_box`` under ``Linf(eps)``.

On the same models and 32 random points in [0, 1] at eps 0.01 and 0.1: our plain interval
arithmetic (``rtol=0``) equals ART's intervals to float32 round-off; with the default round-off
margin ours contain ART's and are wider by a fraction of a percent of the interval's width; our
margin bounds (the specification folded into the last layer) are at least ART's ``l_y - u_j``,
strictly above it, below the margins of points of the ball, and equal the folded bound computed
in float64 from ART's penultimate interval. Models: Gowal et al.'s ``cnn-small`` (random weights,
and the same with every parameter scaled by 3, intervals 80 times wider), the conftest's trained
CNN (a padded convolution), and an MLP.
"""

from __future__ import annotations

import contextlib
import copy
import io
import warnings

import numpy as np
import pytest
import torch
from torch import Tensor, nn

from logitpair.bounds import interval_bounds, margin_bounds
from logitpair.bounds.margins import ROUNDOFF_RTOL, input_box
from logitpair.models import create_model
from logitpair.threat import Linf

art = pytest.importorskip("art", reason="the Adversarial Robustness Toolbox is not installed")
from art.estimators.certification.interval import PyTorchIBPClassifier
from art.estimators.certification.interval.interval import PyTorchIntervalReLU

pytestmark = pytest.mark.crosscheck

N = 32
EPSILONS = (0.01, 0.1)
FLOAT_RTOL = 1e-5  # float32 agreement, relative to the entry and to the largest bound (atol)


def _widen(eps: float) -> float:
    """How much wider than ART's our default-rtol intervals may be, as a fraction of ART's width:
    each affine step widens the radius by rtol times its terms' magnitude, at the input |x| <= 1
    against a radius eps, so about rtol (1 + 1/eps) of the width (measured: at most 2 times that)."""
    return 5 * ROUNDOFF_RTOL * (1 + 1 / eps)


class _ArtView(nn.Module):
    """A copy of a ``nn.Sequential`` model as ART reads it: its Conv2d, Linear and ReLU as direct
    children (ART hooks ``model.children()`` and refuses any other module), the Flatten done
    functionally before the first Linear. A copy: ART leaves forward hooks on the modules."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.layers = [m for m in copy.deepcopy(model) if not isinstance(m, nn.Flatten)]
        for i, layer in enumerate(self.layers):
            self.add_module(str(i), layer)

    def forward(self, x: Tensor) -> Tensor:
        for layer in self.layers:
            x = x.flatten(1) if isinstance(layer, nn.Linear) else x
            x = layer(x)
        return x


def _scaled(model: nn.Module, factor: float) -> nn.Module:
    model = copy.deepcopy(model)
    with torch.no_grad():
        for p in model.parameters():
            p.mul_(factor)
    return model


def _model(name: str, request: pytest.FixtureRequest) -> nn.Module:
    torch.manual_seed(0)
    if name == "cnn-small":
        return create_model("cnn-small", num_classes=10, in_channels=1, image_size=28).eval()
    if name == "cnn-small-x3":
        return _scaled(_model("cnn-small", request), 3.0)
    if name == "trained-cnn":
        return request.getfixturevalue("trained_model")
    return nn.Sequential(nn.Flatten(), nn.Linear(784, 100), nn.ReLU(), nn.Linear(100, 10)).eval()


@pytest.fixture(scope="module", params=["cnn-small", "cnn-small-x3", "trained-cnn", "mlp"])
def setting(request):
    """The model, ART's classifier on it, whether ART gets flattened inputs, points and labels."""
    model = _model(request.param, request)
    flat = request.param == "mlp"
    with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()):
        warnings.simplefilter("ignore")  # ART warns that it infers the reshape, and prints where
        clf = PyTorchIBPClassifier(
            model=_ArtView(model),
            loss=nn.CrossEntropyLoss(),
            input_shape=(784,) if flat else (1, 28, 28),
            nb_classes=10,
            device_type="cpu",
        )
    # Every layer converted: children that are never called (a ModuleList) would leave ART no ops,
    # and its intervals would silently be the input box.
    assert len(clf.model.ops) == sum(not isinstance(m, nn.Flatten) for m in model)
    gen = torch.Generator().manual_seed(1)
    x = torch.rand(N, 1, 28, 28, generator=gen)
    y = torch.randint(0, 10, (N,), generator=gen)
    return model, clf, flat, x, y


def _art_intervals(clf, x: Tensor, eps: float, flat: bool) -> tuple[Tensor, Tensor]:
    """ART's logit intervals over the ball of radius eps around x clipped to [0, 1]."""
    xs = (x.flatten(1) if flat else x).numpy()
    out = torch.from_numpy(clf.predict_intervals(xs, bounds=eps, limits=[0.0, 1.0]))
    return out[:, 0], out[:, 1]


def _art_inputs(clf, x: Tensor, eps: float, flat: bool) -> list[Tensor]:
    """The interval (N, 2, ...) at the input of each of ART's ops, its ``abstract_forward`` step by step."""
    converted = clf.model
    z = clf.concrete_to_interval((x.flatten(1) if flat else x).numpy(), bounds=eps, limits=[0.0, 1.0])
    z = torch.from_numpy(z).to(converted.device)
    inputs = []
    for k, op in enumerate(converted.ops):
        z = z.reshape(len(z), 2, -1) if k == converted.reshape_op_num else z
        inputs.append(z.cpu())
        z = op.forward(z)
    return inputs


def _art_penultimate(clf, x: Tensor, eps: float, flat: bool) -> tuple[Tensor, Tensor]:
    """ART's interval of the last layer's input, flattened."""
    z = _art_inputs(clf, x, eps, flat)[-1]
    z = z.reshape(len(z), 2, -1)
    return z[:, 0], z[:, 1]


def _magnitude(lower: Tensor, upper: Tensor) -> float:
    return torch.maximum(lower.abs(), upper.abs()).max().item()


@pytest.mark.parametrize("eps", EPSILONS)
def test_same_box_as_art(setting, eps):
    _, clf, _, x, _ = setting
    box = clf.concrete_to_interval(x.numpy(), bounds=eps, limits=[0.0, 1.0])
    lower, upper = input_box(x, Linf(eps))
    assert np.array_equal(box[:, 0], lower.numpy()) and np.array_equal(box[:, 1], upper.numpy())
    assert (lower == 0).any() and (upper == 1).any()  # the clipping is exercised


def test_every_relu_case_occurs(setting):
    """At eps 0.01 the ReLUs' input intervals are active, dead and unstable (at 0.1 the deeper
    layers' are all unstable), so the comparisons below exercise each case of the ReLU."""
    _, clf, flat, x, _ = setting
    inputs = zip(clf.model.ops, _art_inputs(clf, x, 0.01, flat))
    relu_inputs = [z for op, z in inputs if isinstance(op, PyTorchIntervalReLU)]
    assert relu_inputs
    lower = torch.cat([z[:, 0].flatten() for z in relu_inputs])
    upper = torch.cat([z[:, 1].flatten() for z in relu_inputs])
    for case in (lower > 0, upper < 0, (lower < 0) & (upper > 0)):
        assert case.float().mean() > 0.02


@pytest.mark.parametrize("eps", EPSILONS)
def test_plain_ibp_equals_art(setting, eps):
    model, clf, flat, x, _ = setting
    art_lower, art_upper = _art_intervals(clf, x, eps, flat)
    with torch.no_grad():
        lower, upper = interval_bounds(model, *input_box(x, Linf(eps)), rtol=0)
    atol = FLOAT_RTOL * _magnitude(art_lower, art_upper)
    torch.testing.assert_close(lower, art_lower, rtol=FLOAT_RTOL, atol=atol)
    torch.testing.assert_close(upper, art_upper, rtol=FLOAT_RTOL, atol=atol)
    assert (art_upper - art_lower).min() > 100 * atol  # intervals, not points: the widths are compared too


@pytest.mark.parametrize("eps", EPSILONS)
def test_default_ibp_contains_art(setting, eps):
    model, clf, flat, x, _ = setting
    art_lower, art_upper = _art_intervals(clf, x, eps, flat)
    with torch.no_grad():
        lower, upper = interval_bounds(model, *input_box(x, Linf(eps)))
    assert (lower <= art_lower).all() and (upper >= art_upper).all()
    excess = (art_lower - lower) + (upper - art_upper)
    ratio = excess / (art_upper - art_lower)
    assert (ratio <= _widen(eps)).all(), f"{ratio.max():.2e} > {_widen(eps):.2e}"
    assert (excess > 0).all()  # the round-off margin is applied


def _folded(clf, x: Tensor, y: Tensor, eps: float, flat: bool) -> tuple[Tensor, Tensor]:
    """The margin bounds with e_y - e_j folded into ART's last layer, in float64 over ART's
    penultimate interval, and the magnitude of their terms; (N, K) with +inf at y."""
    lower, upper = (t.double() for t in _art_penultimate(clf, x, eps, flat))
    last = clf.model.ops[-1]
    weight, bias = last.weight.detach().double().cpu(), last.bias.detach().double().cpu()
    rows = weight[y][:, None] - weight[None]  # (N, K, D): e_y - e_j through the last layer
    offsets = bias[y][:, None] - bias[None]
    mid, rad = ((upper + lower) / 2)[:, None], ((upper - lower) / 2)[:, None]
    value = (rows * mid).sum(-1) - (rows.abs() * rad).sum(-1) + offsets
    mag = (rows.abs() * torch.maximum(lower.abs(), upper.abs())[:, None]).sum(-1) + offsets.abs()
    return value.scatter(1, y[:, None], float("inf")), mag


def _margins_in_ball(model: nn.Module, x: Tensor, y: Tensor, eps: float, gen: torch.Generator) -> Tensor:
    """The smallest margin f_y - f_j over x and 16 random vertices of the ball, (N, K)."""
    lower, upper = input_box(x, Linf(eps))
    points = [x] + [torch.where(torch.rand(x.shape, generator=gen) < 0.5, lower, upper) for _ in range(16)]
    with torch.no_grad():
        logits = torch.stack([model(p) for p in points])
    return (logits.gather(2, y[None, :, None].expand(len(points), -1, 1)) - logits).min(0).values


@pytest.mark.parametrize("eps", EPSILONS)
def test_margin_bounds_at_least_art_difference(setting, eps):
    model, clf, flat, x, y = setting
    art_lower, art_upper = _art_intervals(clf, x, eps, flat)
    difference = art_lower.gather(1, y[:, None]) - art_upper  # ART's bound on f_y - f_j
    others = torch.ones_like(difference, dtype=torch.bool).scatter(1, y[:, None], False)
    ours = margin_bounds(model, x, y, threat=Linf(eps), method="ibp").detach()
    scale = _magnitude(art_lower, art_upper)
    assert (ours[others] >= difference[others] - _widen(eps) * scale).all()
    assert (ours[others] > difference[others] + 0.01 * scale).any()  # folding the spec tightens
    actual = _margins_in_ball(model, x, y, eps, torch.Generator().manual_seed(2))
    assert (ours[others] <= actual[others]).all()  # and stays a lower bound
    assert torch.isinf(ours[~others]).all()


@pytest.mark.parametrize("eps", EPSILONS)
def test_plain_margin_bounds_equal_folded_art(setting, eps):
    model, clf, flat, x, y = setting
    ours = margin_bounds(model, x, y, threat=Linf(eps), method="ibp", rtol=0).detach().double()
    reference, mag = _folded(clf, x, y, eps, flat)
    others = torch.isfinite(reference)
    assert (torch.isinf(ours) == ~others).all()
    error = (ours - reference)[others].abs() / mag[others]
    assert error.max() <= FLOAT_RTOL, f"{error.max():.2e}"
