"""The training-method interface: ``loss(model, x, y, cfg, ctx) -> (loss, metrics)``, and its registry.

``cfg`` is the method's own settings dataclass (a :class:`~logitpair.methods.settings.LossSettings`
subclass, declared next to the loss and registered with it); ``ctx`` the per-batch
:class:`~logitpair.methods.context.BatchContext` (sample indices, seeded randomness, epoch
and step, static source models, the module without its DDP wrapper). A method never touches
the optimizer and leaves the model's mode as it found it. It may call attacks (which run in
eval mode with frozen parameters, on ``ctx.unwrap(model)``) and then forwards ``model`` in
whatever mode the trainer set (train mode during training, as in the official ALP code).
``metrics`` maps names to detached scalar tensors (no host sync inside the loss).

A method registers its loss with its settings class and, for the benchmarks, the cost class
of one training step::

    @METHODS.register("trades", settings=TRADESSettings, cost=joint_step_cost("PGD-7", 7))
    def trades_loss(model, x, y, cfg: TRADESSettings, ctx): ...
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from logitpair.methods.context import NOISE, START, BatchContext
from logitpair.methods.settings import LossSettings, StartSettings
from logitpair.registry import Registry, summary

LossFn = Callable[[nn.Module, Tensor, Tensor, Any, BatchContext], tuple[Tensor, dict[str, Tensor]]]


@dataclass(frozen=True)
class StepCost:
    """The cost class of one training step, as the benchmarks' floor measures it: ``attack_steps``
    input-gradient steps on ``attack_rows`` x B rows, then one forward + backward + SGD step on
    ``train_rows`` x B rows (B = the batch). ``floor`` names it in the benchmark's JSON."""

    floor: str
    attack_steps: int = 0
    attack_rows: float = 0.0
    train_rows: int = 1


REGULAR_STEP = StepCost("regular step")


def joint_step_cost(attack: str, steps: int) -> StepCost:
    """``attack`` (``steps`` input-gradient steps on the batch), then one step on clean + adversarial (2B)."""
    return StepCost(f"{attack} + joint step (2B)", steps, 1.0, 2)


@dataclass(frozen=True)
class Method:
    """A registry entry: the loss, the settings dataclass it reads, its step's cost class
    (None: no method-specific floor) and its one-line description ("": the loss's docstring's first line)."""

    name: str
    loss: LossFn
    settings: type[LossSettings]
    cost: StepCost | None = None
    description: str = ""

    def describe(self) -> str:
        return self.description or summary(self.loss)


class MethodRegistry:
    """The training methods: ``register(name, settings=..., cost=...)`` as a decorator of the loss;
    ``get(name)`` the loss, ``entry(name)`` the :class:`Method`, ``settings(name)`` its class,
    ``describe(name)`` one line saying what it is."""

    def __init__(self) -> None:
        self._entries: Registry[Method] = Registry("method")

    def register(
        self, name: str, *, settings: type[LossSettings], cost: StepCost | None = None, description: str = ""
    ) -> Callable[[LossFn], LossFn]:
        if not (isinstance(settings, type) and issubclass(settings, LossSettings)):
            raise TypeError(f"method {name!r}: settings must be a LossSettings subclass, got {settings!r}")

        def decorator(fn: LossFn) -> LossFn:
            self._entries.register(name)(Method(name, fn, settings, cost, description))
            return fn

        return decorator

    def unregister(self, name: str) -> None:
        self._entries.unregister(name)

    def entry(self, name: str) -> Method:
        return self._entries.get(name)

    def get(self, name: str) -> LossFn:
        return self.entry(name).loss

    def settings(self, name: str) -> type[LossSettings]:
        return self.entry(name).settings

    def describe(self, name: str) -> str:
        return self.entry(name).describe()

    def names(self) -> list[str]:
        return self._entries.names()

    def __contains__(self, name: object) -> bool:
        return name in self._entries

    def __iter__(self) -> Iterator[str]:
        return iter(self.names())


METHODS = MethodRegistry()


def cross_entropy(logits: Tensor, y: Tensor, cfg: LossSettings) -> Tensor:
    return torch.nn.functional.cross_entropy(logits, y, reduction=cfg.ce_reduction, label_smoothing=cfg.label_smoothing)


def add_noise(x: Tensor, std: float, ctx: BatchContext, *, clip: bool = True) -> Tensor:
    """Gaussian-noise augmentation ``clip(x + std * N(0, I))`` (unclipped with ``clip=False``)
    with the context's randomness."""
    if std == 0:
        return x
    noisy = x + std * ctx.normal(x, NOISE)
    return noisy.clamp(0.0, 1.0) if clip else noisy


def random_start(x: Tensor, cfg: StartSettings, ctx: BatchContext) -> Tensor | None:
    """The training attack's random start: keyed per sample when ``ctx.keyed``, else None
    (the attack then draws it from ``ctx.generator`` / the global RNG itself)."""
    if not (cfg.attack_random_start and ctx.keyed):
        return None
    return cfg.threat.project(x, x + (2.0 * ctx.uniform(x, START) - 1.0) * cfg.eps)


def accuracy(logits: Tensor, y: Tensor) -> Tensor:
    return (logits.detach().argmax(1) == y).float().mean()
