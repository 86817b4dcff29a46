"""The per-batch context a training loss receives: ``loss(model, x, y, cfg, ctx)``.

The training layer builds one :class:`BatchContext` per optimisation step. A loss takes all
its randomness from it (``ctx.uniform``, ``ctx.normal``, ``ctx.integers``, ``ctx.generator``),
crafts attacks on ``ctx.unwrap(model)`` (never through a DistributedDataParallel wrapper),
and reads static source models (ensemble adversarial training) from ``ctx.static_models``.

Randomness, two modes:

- ``noise_key is None`` (default, single process): draws come from ``generator``; ``None``
  means torch's global RNG, which the trainer seeds and checkpoints.
- ``noise_key`` set and ``indices`` given: every draw is a pure function of
  (noise_key, stream, dataset index of the sample, element), see :mod:`logitpair.rng`. The
  trainer sets ``noise_key`` from (seed, epoch), so a sample's random start and noise do not
  depend on the batch it lands in or on the number of processes.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor, nn

from logitpair.rng import keyed_normal, keyed_uniform

# streams: independent random sequences for the different uses inside one loss
START, NOISE, TARGET, MIX, PERM = 0, 1, 2, 3, 4


@dataclass(frozen=True)
class BatchContext:
    """What a loss may know about its batch besides ``(x, y)``.

    Attributes:
        indices: dataset indices of the batch's samples, int64 ``(N,)``, or None.
        generator: seeded ``torch.Generator`` for draws that are not keyed; None = global RNG.
        noise_key: when set (and ``indices`` given), draws are keyed per sample, see above.
        step: zero-based global optimisation step.
        static_models: pre-trained models in eval mode, never updated (ensemble adversarial
            training crafts on them); loaded by the training layer.
        module: the model without its DistributedDataParallel wrapper; None = the model itself.
    """

    indices: Tensor | None = None
    generator: torch.Generator | None = None
    noise_key: int | None = None
    step: int = 0
    static_models: tuple[nn.Module, ...] = ()
    module: nn.Module | None = None

    @property
    def keyed(self) -> bool:
        return self.noise_key is not None and self.indices is not None

    def unwrap(self, model: nn.Module) -> nn.Module:
        """The module attacks must run on: ``ctx.module`` if set, else ``model``."""
        return self.module if self.module is not None else model

    def uniform(self, like: Tensor, stream: int = START) -> Tensor:
        """U(0, 1) noise shaped like ``like`` (first dimension = batch)."""
        if self.keyed:
            assert self.indices is not None and self.noise_key is not None
            out = keyed_uniform(self.indices.to(like.device), tuple(like.shape[1:]), self.noise_key, stream)
            return out.to(like.dtype)
        return torch.rand(like.shape, generator=self.generator, device=like.device, dtype=like.dtype)

    def normal(self, like: Tensor, stream: int = NOISE) -> Tensor:
        """N(0, 1) noise shaped like ``like``."""
        if self.keyed:
            assert self.indices is not None and self.noise_key is not None
            out = keyed_normal(self.indices.to(like.device), tuple(like.shape[1:]), self.noise_key, stream)
            return out.to(like.dtype)
        return torch.randn(like.shape, generator=self.generator, device=like.device, dtype=like.dtype)

    def integers(self, n: int, high: int, device: torch.device | str = "cpu", stream: int = TARGET) -> Tensor:
        """``n`` integers uniform in ``[0, high)`` (one per sample when keyed)."""
        if self.keyed:
            u = self.uniform(torch.empty(n, 1, device=device), stream)[:, 0]
            return (u * high).long().clamp_(max=high - 1)
        return torch.randint(0, high, (n,), generator=self.generator, device=device)
