"""The training-method interface: ``loss(model, x, y, cfg, ctx) -> (loss, metrics)``.

``cfg`` is the run's :class:`MethodConfig`; ``ctx`` the per-batch
:class:`~logitpair.methods.context.BatchContext` (sample indices, seeded randomness, epoch
and step, static source models, the module without its DDP wrapper). A method never touches
the optimizer and leaves the model's mode as it found it. It may call attacks (which run in
eval mode with frozen parameters, on ``ctx.unwrap(model)``) and then forwards ``model`` in
whatever mode the trainer set (train mode during training, as in the official ALP code).
``metrics`` maps names to detached scalar tensors (no host sync inside the loss).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from logitpair.errors import ConfigError
from logitpair.methods.context import NOISE, START, BatchContext
from logitpair.pairing import DISTANCES, REDUCTIONS
from logitpair.registry import Registry
from logitpair.threat import Linf


@dataclass(frozen=True)
class MethodConfig:
    """Settings read by the training losses (each method uses the fields it needs).

    Defaults are the Fashion-MNIST ones: eps 0.1, training PGD 7 steps of 0.025.
    """

    lam: float = 0.5  # weight of the pairing / squeezing term (ALP, CLP, LSQ)
    eps: float = 0.1
    attack_steps: int = 7
    attack_step_size: float = 0.025
    attack_random_start: bool = True
    noise_std: float = 0.5  # Gaussian input noise for CLP and LSQ (inputs clipped to [0, 1])
    distance: str = "l2sq"  # logit distance for ALP and CLP, see logitpair.pairing
    pair_reduction: str = "mean"  # over batch and classes, as the official ALP code
    ce_reduction: str = "mean"  # "mean" or "sum" over the batch
    label_smoothing: float = 0.0

    def __post_init__(self) -> None:
        if not self.lam >= 0:
            raise ConfigError(f"lam: expected >= 0, got {self.lam}")
        if not 0 <= self.eps <= 1:
            raise ConfigError(f"eps: expected 0 <= eps <= 1, got {self.eps}")
        if self.attack_steps < 1:
            raise ConfigError(f"attack_steps: expected >= 1, got {self.attack_steps}")
        if not self.attack_step_size > 0:
            raise ConfigError(f"attack_step_size: expected > 0, got {self.attack_step_size}")
        if not self.noise_std >= 0:
            raise ConfigError(f"noise_std: expected >= 0, got {self.noise_std}")
        if self.distance not in DISTANCES:
            raise ConfigError(f"distance: expected one of {', '.join(DISTANCES)}, got {self.distance!r}")
        if self.pair_reduction not in REDUCTIONS:
            raise ConfigError(f"pair_reduction: expected one of {', '.join(REDUCTIONS)}, got {self.pair_reduction!r}")
        if self.ce_reduction not in ("mean", "sum"):
            raise ConfigError(f"ce_reduction: expected mean or sum, got {self.ce_reduction!r}")
        if not 0 <= self.label_smoothing < 1:
            raise ConfigError(f"label_smoothing: expected 0 <= value < 1, got {self.label_smoothing}")

    @property
    def threat(self) -> Linf:
        return Linf(self.eps)


LossFn = Callable[[nn.Module, Tensor, Tensor, MethodConfig, BatchContext], tuple[Tensor, dict[str, Tensor]]]
METHODS: Registry = Registry("method")


def cross_entropy(logits: Tensor, y: Tensor, cfg: MethodConfig) -> Tensor:
    return torch.nn.functional.cross_entropy(logits, y, reduction=cfg.ce_reduction, label_smoothing=cfg.label_smoothing)


def add_noise(x: Tensor, std: float, ctx: BatchContext) -> Tensor:
    """Gaussian-noise augmentation ``clip(x + std * N(0, I))`` with the context's randomness."""
    if std == 0:
        return x
    return (x + std * ctx.normal(x, NOISE)).clamp(0.0, 1.0)


def random_start(x: Tensor, cfg: MethodConfig, ctx: BatchContext) -> Tensor | None:
    """The training attack's random start: keyed per sample when ``ctx.keyed``, else None
    (the attack then draws it from ``ctx.generator`` / the global RNG itself)."""
    if not (cfg.attack_random_start and ctx.keyed):
        return None
    return cfg.threat.project(x, x + (2.0 * ctx.uniform(x, START) - 1.0) * cfg.eps)


def accuracy(logits: Tensor, y: Tensor) -> Tensor:
    return (logits.detach().argmax(1) == y).float().mean()
