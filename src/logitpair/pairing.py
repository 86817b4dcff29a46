"""Distances between two batches of logits (or features), with explicit reductions.

``pair_distance(a, b, distance="l2sq", reduction="mean")`` with ``a``, ``b`` of shape (N, K):

- ``l2sq``: squared difference per element, ``(a - b)**2`` — the official ALP code's
  ``mean_squared_error``. Reductions: ``mean`` (over batch and classes, the official
  default), ``sum_classes`` (sum over classes, mean over the batch), ``sum`` (everything).
- ``l2``: per-example Euclidean norm ``||a - b||``; reductions ``mean`` or ``sum`` over the batch.
- ``l1``: absolute difference per element, same reductions as ``l2sq``.
- ``cosine``: per-example ``1 - cos(a, b)``; reductions ``mean`` or ``sum`` over the batch.
- ``kl``: per-example ``KL(p_a || p_b) = sum_k p_a,k (log p_a,k - log p_b,k)`` with ``p = softmax``
  over the classes (the TRADES / VAT divergence, ``a`` the clean logits); reductions ``mean``
  or ``sum`` over the batch. Not symmetric; invariant to adding a constant to all logits.
- ``kl_rev``: ``KL(p_b || p_a)``; ``kl_sym``: ``(KL(p_a || p_b) + KL(p_b || p_a)) / 2``.

For the per-example distances (``l2``, ``cosine``, ``kl*``) ``sum_classes`` equals ``mean``.
Gradients flow through both arguments; detach one to get a fixed target (VAT).
"""

from __future__ import annotations

from collections.abc import Callable

import torch.nn.functional as F
from torch import Tensor

DISTANCES = ("l2sq", "l2", "l1", "cosine", "kl", "kl_rev", "kl_sym")
REDUCTIONS = ("mean", "sum_classes", "sum")


def pair_distance(a: Tensor, b: Tensor, distance: str = "l2sq", reduction: str = "mean") -> Tensor:
    if a.shape != b.shape:
        raise ValueError(f"shapes differ: {tuple(a.shape)} vs {tuple(b.shape)}")
    if distance in _ELEMENTWISE:
        per = _ELEMENTWISE[distance](a - b)
        reduce = {"mean": Tensor.mean, "sum_classes": lambda t: t.sum(1).mean(), "sum": Tensor.sum}
    elif distance in _PER_EXAMPLE:
        per = _PER_EXAMPLE[distance](a, b)
        reduce = {"mean": Tensor.mean, "sum_classes": Tensor.mean, "sum": Tensor.sum}
    else:
        raise ValueError(f"unknown distance {distance!r}; valid: {', '.join(DISTANCES)}")
    if reduction not in reduce:
        raise ValueError(f"unknown reduction {reduction!r}; valid: {', '.join(REDUCTIONS)}")
    return reduce[reduction](per)


def _kl_per_example(a: Tensor, b: Tensor, distance: str) -> Tensor:
    """``KL(softmax a || softmax b)`` per row (``kl``), reversed (``kl_rev``) or their mean (``kl_sym``)."""
    log_a, log_b = F.log_softmax(a, dim=1), F.log_softmax(b, dim=1)
    forward = (log_a.exp() * (log_a - log_b)).sum(1)
    if distance == "kl":
        return forward
    backward = (log_b.exp() * (log_b - log_a)).sum(1)
    return backward if distance == "kl_rev" else 0.5 * (forward + backward)


# Distances between two rows of logits: elementwise (then reduced over classes and examples) or
# one value per example (then reduced over examples; ``sum_classes`` is the mean over examples).
_ELEMENTWISE: dict[str, Callable[[Tensor], Tensor]] = {"l2sq": lambda d: d.pow(2), "l1": Tensor.abs}
_PER_EXAMPLE: dict[str, Callable[[Tensor, Tensor], Tensor]] = {
    "l2": lambda a, b: (a - b).norm(dim=1),
    "cosine": lambda a, b: 1.0 - F.cosine_similarity(a, b, dim=1),
    "kl": lambda a, b: _kl_per_example(a, b, "kl"),
    "kl_rev": lambda a, b: _kl_per_example(a, b, "kl_rev"),
    "kl_sym": lambda a, b: _kl_per_example(a, b, "kl_sym"),
}
