"""Pieces shared by the attacks: losses, random targets, success tests, a batched forward."""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from logitpair.errors import ConfigError
from logitpair.metrics import topk_correct
from logitpair.modes import eval_mode


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


def attack_objective(y: Tensor, target: Tensor | None) -> Callable[[Tensor], Tensor]:
    """:func:`attack_loss` of ``(y, target)`` as a function of the logits alone (a ``loss_fn``)."""
    return lambda logits: attack_loss(logits, y, target)


def is_success(logits: Tensor, y: Tensor, target: Tensor | None, k: int = 1) -> Tensor:
    """Untargeted: ``y`` is not among the ``k`` largest logits (``k = 1``: the prediction differs
    from ``y``). Targeted: the prediction equals the target (``k`` plays no part)."""
    if target is not None:
        return logits.argmax(1) == target
    if k == 1:
        return logits.argmax(1) != y
    return ~topk_correct(logits, y, k)


def check_k(k: int, num_classes: int | None = None) -> None:
    """The top-``k`` success criterion needs ``1 <= k < num_classes`` (else ``y`` is always in the top k)."""
    if not (isinstance(k, int) and k >= 1):
        raise ConfigError(f"k (top-k success) must be an integer >= 1, got {k!r}")
    if num_classes is not None and k > 1 and k >= num_classes:
        raise ConfigError(f"k = {k}: the label of a {num_classes}-class model is always among the top {k}")


def kth_other(logits: Tensor, y: Tensor, k: int, exclude: Tensor | None = None) -> Tensor:
    """The ``k``-th largest logit among the classes other than ``y`` (and other than ``exclude``)."""
    masked = logits.scatter(1, y[:, None], -float("inf"))
    if exclude is not None:
        masked = masked.scatter(1, exclude[:, None], -float("inf"))
    return masked.topk(k, dim=1).values[:, k - 1]


def ahead_logit(logits: Tensor, y: Tensor, k: int = 1, target: Tensor | None = None) -> Tensor:
    """The logit that ``z_y`` must fall below for ``y`` to leave the top ``k``.

    Untargeted: the ``k``-th largest logit of the other classes (``k = 1``: the largest).
    With a ``target`` class ``t``: ``min(z_t, the (k-1)-th largest logit of the classes other
    than y and t)``, i.e. ``t`` and ``k - 1`` other classes get ahead of ``y`` (``k = 1``: ``z_t``).
    ``z_y - ahead_logit`` is the top-``k`` margin: negative exactly when ``y`` left the top ``k``
    (ties aside).
    """
    if target is None:
        return kth_other(logits, y, k)
    z_t = logits.gather(1, target[:, None]).squeeze(1)
    if k == 1:
        return z_t
    return torch.minimum(z_t, kth_other(logits, y, k - 1, exclude=target))


def loss_grad(model: nn.Module, x: Tensor, loss_fn: Callable[[Tensor], Tensor]) -> tuple[Tensor, Tensor, Tensor]:
    """One forward and backward: (per-example ``loss_fn(logits)``, logits, d sum(loss) / d x)."""
    x = x.detach().requires_grad_(True)
    logits = model(x)
    loss = loss_fn(logits)
    (grad,) = torch.autograd.grad(loss.sum(), x)
    return loss.detach(), logits.detach(), grad


def input_grad(model: nn.Module, x: Tensor, y: Tensor, target: Tensor | None) -> tuple[Tensor, Tensor, Tensor]:
    """:func:`loss_grad` of :func:`attack_loss` (CE ascent, or targeted CE descent)."""
    return loss_grad(model, x, attack_objective(y, target))


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
    """Logits for ``x`` in chunks, without building a graph, in eval mode: a model left in train
    mode is scored with its running statistics (not the batch's) and they are not updated; every
    submodule's mode is restored afterwards."""
    with torch.no_grad(), eval_mode(model):
        return torch.cat([model(x[i : i + batch_size]) for i in range(0, len(x), batch_size)])
