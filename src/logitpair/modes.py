"""Mode and gradient hygiene as context managers.

Attacks and training losses must leave a model exactly as they found it: same
``.training`` flag on every submodule, same ``requires_grad`` on every parameter.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import AbstractContextManager, contextmanager
from contextvars import ContextVar

from torch import nn


@contextmanager
def _mode(model: nn.Module, training: bool) -> Iterator[nn.Module]:
    flags = [(m, m.training) for m in model.modules()]
    model.train(training)
    try:
        yield model
    finally:
        for m, flag in flags:
            m.training = flag


def eval_mode(model: nn.Module) -> AbstractContextManager[nn.Module]:
    """Put every submodule in eval mode; restore each one's own flag on exit."""
    return _mode(model, False)


def train_mode(model: nn.Module) -> AbstractContextManager[nn.Module]:
    """Put every submodule in train mode; restore each one's own flag on exit."""
    return _mode(model, True)


@contextmanager
def frozen_params(model: nn.Module) -> Iterator[nn.Module]:
    """Turn off ``requires_grad`` on all parameters (attacks need input gradients only)."""
    params = [(p, p.requires_grad) for p in model.parameters()]
    for p, _ in params:
        p.requires_grad_(False)
    try:
        yield model
    finally:
        for p, flag in params:
            p.requires_grad_(flag)


# Attacks run in float32 even inside a bf16 autocast region (mixed-precision training) unless
# this is set (``RunConfig.amp_attacks``): low-precision input gradients weaken attacks.
# Set it with :func:`attack_autocast`, never with ``ATTACK_AUTOCAST.set`` left in place.
ATTACK_AUTOCAST: ContextVar[bool] = ContextVar("attack_autocast", default=False)


@contextmanager
def attack_autocast(enabled: bool) -> Iterator[None]:
    """Within the block, attacks keep an enclosing autocast if ``enabled`` (:data:`ATTACK_AUTOCAST`);
    the previous value is restored on exit, also when the block raises."""
    token = ATTACK_AUTOCAST.set(enabled)
    try:
        yield
    finally:
        ATTACK_AUTOCAST.reset(token)


@contextmanager
def attack_context(model: nn.Module) -> Iterator[nn.Module]:
    """Eval mode + frozen parameters + autograd enabled + float32: the state every attack runs in.

    BatchNorm therefore uses running statistics while adversarial examples are crafted,
    as in the official ALP code (``train.py`` builds the attack graph in eval mode). An
    enclosing autocast is switched off unless :data:`ATTACK_AUTOCAST` is set.
    """
    import torch

    keep = ATTACK_AUTOCAST.get()
    with (
        torch.enable_grad(),
        eval_mode(model),
        frozen_params(model),
        torch.autocast("cpu", enabled=keep and torch.is_autocast_enabled("cpu")),
        torch.autocast("cuda", enabled=keep and torch.is_autocast_enabled("cuda")),
    ):
        yield model
