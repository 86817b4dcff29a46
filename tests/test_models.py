"""Forward contract of every registered model."""

from __future__ import annotations

import pytest
import torch

from logitpair.errors import ConfigError
from logitpair.models import create_model, list_models

# Paper-scale networks are tested the same way at their own smallest inputs in tests/test_models_paper.py.
PAPER_SCALE = {"inceptionv3", "preact-resnet18", "resnet-v2-50", "resnet101", "resnet50", "revnet9", "wrn-28-10"}


@pytest.mark.parametrize("name", [n for n in list_models() if n not in PAPER_SCALE])
@pytest.mark.parametrize("shape", [(1, 28), (3, 32)])
def test_forward_contract(name, shape):
    channels, size = shape
    torch.manual_seed(0)
    model = create_model(name, num_classes=7, in_channels=channels, image_size=size).eval()
    x = torch.rand(4, channels, size, size, requires_grad=True)
    out = model(x)
    assert out.shape == (4, 7) and out.dtype == torch.float32
    assert torch.equal(out, model(x)), "forward must be deterministic"
    (g,) = torch.autograd.grad(out[:, 0].sum(), x)
    assert g.abs().sum() > 0, "forward must be differentiable with respect to the input"
    model.train()
    model(x).logsumexp(1).sum().backward()
    for n, p in model.named_parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0, f"{n} gets no gradient"


def test_unknown_model_lists_valid_names():
    with pytest.raises(ConfigError, match=r"valid names: (.+, )?lenet, lenet5"):
        create_model("resnet-1")
