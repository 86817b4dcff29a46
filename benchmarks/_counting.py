"""A module wrapper that counts the images passed through a model (benchmarks only).

A *pass* is one image through the model. :class:`CountingModel` counts forward images in
two kinds: ``grad`` when the forward built an autograd graph (its output requires grad:
gradients enabled and the input or a parameter requiring grad) and ``no_grad`` otherwise;
``backward`` counts the images whose logits a backward pass (``backward`` or
``torch.autograd.grad``) went through. Counting is switched on and off with ``active``;
switched off, the wrapper only calls the model. Everything else (``meta``, parameters,
train/eval mode) is the wrapped model's, so attacks and AutoAttack's checks see the same
network.
"""

from __future__ import annotations

from typing import Any

from torch import Tensor, nn


class CountingModel(nn.Module):
    """``model`` plus the counters ``grad``, ``no_grad`` and ``backward`` (images)."""

    def __init__(self, model: nn.Module, active: bool = True) -> None:
        super().__init__()
        self.model = model
        self.active = active
        self.train(model.training)
        self.reset()

    def reset(self) -> None:
        self.counts = {"grad": 0, "no_grad": 0, "backward": 0}

    def snapshot(self) -> dict[str, int]:
        return dict(self.counts)

    def __getattr__(self, name: str) -> Any:
        try:
            return super().__getattr__(name)
        except AttributeError:
            return getattr(super().__getattr__("model"), name)

    def forward(self, x: Tensor) -> Tensor:
        out = self.model(x)
        if not self.active:
            return out
        n = int(x.shape[0])
        if out.requires_grad:
            self.counts["grad"] += n
            out.register_hook(self._on_backward(n))
        else:
            self.counts["no_grad"] += n
        return out

    def _on_backward(self, n: int):
        def hook(grad: Tensor) -> None:
            self.counts["backward"] += n

        return hook
