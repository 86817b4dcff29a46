"""Paper-scale architectures: exact parameter counts, the forward contract at their smallest inputs, RevNet inverse.

The big networks are built once per module (module-scoped fixtures) and run on batches of two at
small inputs, so the whole file stays within a few tens of seconds on one CPU thread.
"""

from __future__ import annotations

import copy
from collections.abc import Callable

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from logitpair.models import create_model, list_models
from logitpair.models.inception import InceptionV3
from logitpair.models.layers import NORMALIZATIONS
from logitpair.models.preact_resnet import WideResNet
from logitpair.models.resnet import max_pool_tf_same
from logitpair.models.revnet import RevBlock

NEW_MODELS = ["inceptionv3", "preact-resnet18", "resnet-v2-50", "resnet101", "resnet50", "revnet9", "wrn-28-10"]
CLASSES = 5


def n_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def test_new_models_are_registered():
    assert set(NEW_MODELS) <= set(list_models())


@pytest.mark.parametrize(
    "name, num_classes, expected",
    [
        ("resnet50", 1000, 25_557_032),
        ("resnet101", 1000, 44_549_160),
        ("inceptionv3", 1000, 23_834_568),
        ("wrn-28-10", 10, 36_479_194),  # the figure of Zagoruyko & Komodakis' code
        ("preact-resnet18", 10, 11_172_170),  # pytorch-cifar's 11,171,146 plus the final BatchNorm
        ("revnet9", 10, 464_858),
    ],
)
def test_parameter_count_is_exact(name, num_classes, expected):
    with torch.device("meta"):  # no memory, no init: counting only
        model = create_model(name, num_classes=num_classes)
    assert n_params(model) == expected


def test_inception_aux_head_parameter_count():
    with torch.device("meta"):
        model = InceptionV3(num_classes=1000, aux_logits=True)
    assert n_params(model) == 27_161_264  # torchvision's inception_v3 with its aux head


# name -> (builder, channels, input size): each net at its smallest sensible input.
CASES: dict[str, tuple[Callable[[], nn.Module], int, int]] = {
    "revnet9": (lambda: create_model("revnet9", num_classes=CLASSES, in_channels=3, image_size=32), 3, 32),
    "revnet9-mnist": (lambda: create_model("revnet9", num_classes=CLASSES, in_channels=1, image_size=28), 1, 28),
    "preact-resnet18": (lambda: create_model("preact-resnet18", num_classes=CLASSES, image_size=32), 3, 32),
    "wrn-10-1": (lambda: WideResNet(depth=10, widen_factor=1, num_classes=CLASSES, image_size=32), 3, 32),
    "resnet50": (lambda: create_model("resnet50", num_classes=CLASSES, image_size=64), 3, 64),
    "resnet101": (lambda: create_model("resnet101", num_classes=CLASSES, image_size=64), 3, 64),
    "resnet-v2-50": (lambda: create_model("resnet-v2-50", num_classes=CLASSES, image_size=64), 3, 64),
    "inceptionv3": (lambda: create_model("inceptionv3", num_classes=CLASSES, image_size=75), 3, 75),
}


@pytest.fixture(scope="module", params=list(CASES))
def case(request) -> tuple[str, nn.Module, torch.Tensor]:
    build, channels, size = CASES[request.param]
    torch.manual_seed(0)
    model = build()
    x = torch.rand(2, channels, size, size, generator=torch.Generator().manual_seed(1))
    return request.param, model, x


def test_forward_returns_logits_only(case):
    _, model, x = case
    for mode in (False, True):
        model.train(mode)
        with torch.no_grad():
            out = model(x)
        assert isinstance(out, torch.Tensor), "forward must return the logits tensor only"
        assert out.shape == (2, CLASSES) and out.dtype == torch.float32
        assert torch.isfinite(out).all()
    model.eval()


def test_eval_forward_is_deterministic(case):
    _, model, x = case
    model.eval()
    with torch.no_grad():
        assert torch.equal(model(x), model(x))


def test_input_gradient_exists(case):
    _, model, x = case
    model.eval()
    x = x.clone().requires_grad_(True)
    (g,) = torch.autograd.grad(F.cross_entropy(model(x), torch.tensor([0, 1])), x)
    assert torch.isfinite(g).all() and g.abs().sum() > 0, "attacks need a gradient with respect to the input"


def test_backward_reaches_every_parameter(case):
    _, model, x = case
    model.train()
    model.zero_grad(set_to_none=True)
    F.cross_entropy(model(x), torch.tensor([0, 1])).backward()
    for n, p in model.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all() and p.grad.abs().sum() > 0, f"{n} gets no gradient"
    model.zero_grad(set_to_none=True)
    model.eval()


def test_normalisation_is_a_buffer_layer(case):
    name, model, _ = case
    assert not any(n.startswith("normalize.") for n, _ in model.named_parameters())
    expected = {"resnet50": "imagenet", "resnet101": "imagenet", "inceptionv3": "imagenet", "resnet-v2-50": "inception"}
    if name in expected:  # ImageNet nets normalise inside; the CIFAR/SVHN nets do not by default
        mean, std = NORMALIZATIONS[expected[name]]
        buffers = dict(model.named_buffers())
        assert torch.allclose(buffers["normalize.mean"].flatten(), torch.tensor(mean))
        assert torch.allclose(buffers["normalize.std"].flatten(), torch.tensor(std))
    else:
        assert isinstance(model.normalize, nn.Identity)


@pytest.mark.parametrize(
    "name, size",
    [
        ("revnet9", 2),
        ("preact-resnet18", 4),
        ("wrn-28-10", 2),
        ("resnet50", 16),
        ("resnet101", 16),
        ("resnet-v2-50", 16),
        ("inceptionv3", 74),
    ],
)
def test_too_small_image_size_is_a_value_error(name, size):
    with pytest.raises(ValueError, match=f"image_size {size} is too small"):
        create_model(name, num_classes=10, in_channels=3, image_size=size)


def test_wide_resnet_rejects_a_bad_depth():
    with pytest.raises(ValueError, match="6n"):
        WideResNet(depth=12, widen_factor=1)


def test_inception_aux_logits_only_as_attribute():
    with pytest.raises(ValueError, match="auxiliary head needs image_size >= 299"):
        InceptionV3(num_classes=CLASSES, image_size=298, aux_logits=True)
    torch.manual_seed(0)
    model = InceptionV3(num_classes=CLASSES, image_size=299, aux_logits=True)
    x = torch.rand(2, 3, 299, 299)
    model.eval()
    with torch.no_grad():
        model(x)
    assert model.aux_output is None, "eval-mode forwards do not compute the auxiliary head"
    model.train()
    out = model(x)
    aux = model.aux_output
    assert isinstance(out, torch.Tensor) and out.shape == (2, CLASSES)
    assert aux is not None and aux.shape == (2, CLASSES) and torch.isfinite(aux).all()
    y = torch.tensor([0, 1])
    (F.cross_entropy(out, y) + 0.4 * F.cross_entropy(aux, y)).backward()
    assert all(p.grad is not None for p in model.parameters())
    model.eval()
    with torch.no_grad():
        model(x)
    assert model.aux_output is aux, "eval-mode forwards leave the last training aux logits in place"
    assert copy.deepcopy(model).aux_output is None, "a copy (e.g. for EMA) drops the stored aux logits"


@pytest.mark.parametrize("train", [False, True])
def test_revnet_block_inverse_reconstructs_input(train):
    torch.manual_seed(0)
    block = RevBlock(16, 16).double()
    for m in block.modules():  # non-trivial BatchNorm affine parameters and running statistics
        if isinstance(m, nn.BatchNorm2d):
            nn.init.uniform_(m.weight, 0.5, 1.5)
            nn.init.uniform_(m.bias, -0.5, 0.5)
    block.train()
    block(torch.randn(8, 16, 8, 8, dtype=torch.float64) * 2 + 1)
    block.train(train)
    x = torch.randn(4, 16, 8, 8, dtype=torch.float64)
    with torch.no_grad():
        y = block(x)
        x_rec = block.inverse(y)
    assert (y - x).abs().max() > 0.1, "the block must not be the identity"
    assert (x_rec - x).abs().max() < 1e-5


def test_revnet9_structure():
    model = create_model("revnet9", num_classes=10, in_channels=3, image_size=32)
    blocks = [m for m in model.modules() if isinstance(m, RevBlock)]
    assert len(blocks) == 9 and sum(b.reversible for b in blocks) == 7
    with pytest.raises(ValueError, match="not reversible"):
        next(b for b in blocks if not b.reversible).inverse(torch.zeros(1, 32, 8, 8))


def test_max_pool_tf_same_padding():
    x = torch.arange(16.0).view(1, 1, 4, 4)
    # TensorFlow 'SAME' on an even size pads only bottom/right: windows start at 0, not at -1.
    assert torch.equal(max_pool_tf_same(x), torch.tensor([[[[10.0, 11.0], [14.0, 15.0]]]]))
    odd = torch.randn(1, 2, 5, 7)
    assert torch.equal(max_pool_tf_same(odd), F.max_pool2d(odd, 3, 2, 1))
