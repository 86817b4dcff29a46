"""Models that mask gradients on purpose, for measuring evaluations against AutoAttack (benchmarks only).

A model is named ``RUN`` (a run directory) or ``RUN+WRAPPER`` (that run's model behind a wrapper
of :data:`WRAPPERS`); each wrapper masks gradients in a way the training methods do not:

- ``saturate``: the logits times 1,000 (what defensive distillation does at test time). The
  prediction is unchanged, but for a confidently classified point the softmax is exactly one-hot
  in float32, so the cross-entropy and its gradient vanish: CE-based attacks (PGD, APGD-CE) do
  not move, while the scale-invariant DLR losses (APGD-T, APGD-DLR) and Square are unaffected
  (Carlini & Wagner 2016, https://arxiv.org/abs/1607.04311).
- ``quantize``: the input rounded to 9 grey levels (multiples of 1/8) before the network: the
  gradient of the rounding is zero almost everywhere, so every gradient attack gets no direction
  at all (shattered gradients, Athalye et al. 2018, https://arxiv.org/abs/1802.00420), while
  gradient-free attacks see the true decision function.

Both keep the run's metadata (``meta``: dataset, eps), so the evaluation code treats them as runs.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import torch
from torch import Tensor, nn


class SaturatedLogits(nn.Module):
    """``model``'s logits times ``scale``."""

    def __init__(self, model: nn.Module, scale: float = 1000.0) -> None:
        super().__init__()
        self.model, self.scale = model, scale
        self.meta = dict(getattr(model, "meta", {}) or {})

    def forward(self, x: Tensor) -> Tensor:
        return self.scale * self.model(x)


class _Round(torch.autograd.Function):
    """Rounding whose gradient is the true one: zero."""

    @staticmethod
    def forward(ctx, x: Tensor) -> Tensor:
        return torch.round(x)

    @staticmethod
    def backward(ctx, grad: Tensor) -> Tensor:
        return torch.zeros_like(grad)


class QuantizedInput(nn.Module):
    """``model`` applied to the input rounded to multiples of ``1 / steps``."""

    def __init__(self, model: nn.Module, steps: int = 8) -> None:
        super().__init__()
        self.model, self.steps = model, steps
        self.meta = dict(getattr(model, "meta", {}) or {})

    def forward(self, x: Tensor) -> Tensor:
        return self.model(_Round.apply(x * self.steps) / self.steps)


WRAPPERS: dict[str, Callable[[nn.Module], nn.Module]] = {"saturate": SaturatedLogits, "quantize": QuantizedInput}


def split_name(name: str) -> tuple[str, str | None]:
    """``RUN+WRAPPER`` -> ``(RUN, WRAPPER)``; a plain ``RUN`` -> ``(RUN, None)``."""
    run, sep, wrapper = str(name).rpartition("+")
    if not sep or Path(name).exists():
        return str(name), None
    if wrapper not in WRAPPERS:
        raise ValueError(f"{name}: unknown wrapper {wrapper!r}; known: {', '.join(WRAPPERS)}")
    return run, wrapper


def load(name: str, device: torch.device | str = "cpu") -> nn.Module:
    """The model named ``RUN`` or ``RUN+WRAPPER``, in eval mode."""
    import logitpair

    run, wrapper = split_name(name)
    model = logitpair.load_model(run, device=device)
    return model if wrapper is None else WRAPPERS[wrapper](model).eval()
