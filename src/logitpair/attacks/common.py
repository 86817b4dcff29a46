"""Pieces shared by the attacks: losses, random targets, success tests, a batched forward."""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import Tensor, nn


def random_target(y: Tensor, num_classes: int, generator: torch.Generator | None = None) -> Tensor:
    """A uniformly random class different from ``y`` for every example.

    Not the official ``pgdrnd``, which draws from all classes (the label included); see
    :mod:`logitpair.attacks.official`.
    """
    shift = torch.randint(1, num_classes, y.shape, generator=generator, device=y.device)
    return (y + shift) % num_classes


def attack_loss(logits: Tensor, y: Tensor, target: Tensor | None) -> Tensor:
    """Per-example loss to *maximise*: CE of the label, or minus CE of the target."""
    if target is None:
        return F.cross_entropy(logits, y, reduction="none")
    return -F.cross_entropy(logits, target, reduction="none")


def is_success(logits: Tensor, y: Tensor, target: Tensor | None) -> Tensor:
    """Untargeted: prediction differs from ``y``. Targeted: prediction equals the target."""
    pred = logits.argmax(1)
    return pred != y if target is None else pred == target


def loss_grad(model: nn.Module, x: Tensor, loss_fn: Callable[[Tensor], Tensor]) -> tuple[Tensor, Tensor, Tensor]:
    """One forward and backward: (per-example ``loss_fn(logits)``, logits, d sum(loss) / d x)."""
    x = x.detach().requires_grad_(True)
    logits = model(x)
    loss = loss_fn(logits)
    (grad,) = torch.autograd.grad(loss.sum(), x)
    return loss.detach(), logits.detach(), grad


def input_grad(model: nn.Module, x: Tensor, y: Tensor, target: Tensor | None) -> tuple[Tensor, Tensor, Tensor]:
    """:func:`loss_grad` of :func:`attack_loss` (CE ascent, or targeted CE descent)."""
    return loss_grad(model, x, lambda logits: attack_loss(logits, y, target))


def prepare_target(
    model: nn.Module,
    x: Tensor,
    y: Tensor,
    targeted: bool,
    target: Tensor | None,
    generator: torch.Generator | None,
) -> Tensor | None:
    """Resolve the target classes: given, random (needs one forward for the class count), or none."""
    if not targeted:
        if target is not None:
            raise ValueError("target given but targeted=False")
        return None
    if target is not None:
        return target.to(y.device)
    with torch.no_grad():
        num_classes = model(x[:1]).shape[1]
    return random_target(y, num_classes, generator)


def model_device(model: nn.Module) -> torch.device:
    """The device of a model's first parameter or buffer (an ensemble's first member's); CPU
    for a model without any (a plain function wrapped in a module)."""
    for t in model.parameters():
        return t.device
    for t in model.buffers():
        return t.device
    return torch.device("cpu")


def predict(model: nn.Module, x: Tensor, batch_size: int = 1000) -> Tensor:
    """Logits for ``x`` in chunks, without building a graph."""
    with torch.no_grad():
        return torch.cat([model(x[i : i + batch_size]) for i in range(0, len(x), batch_size)])
