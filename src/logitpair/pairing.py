"""Distances between two batches of logits (or features), with explicit reductions.

``pair_distance(a, b, distance="l2sq", reduction="mean")`` with ``a``, ``b`` of shape (N, K):

- ``l2sq``: squared difference per element, ``(a - b)**2`` — the official ALP code's
  ``mean_squared_error``. Reductions: ``mean`` (over batch and classes, the official
  default), ``sum_classes`` (sum over classes, mean over the batch), ``sum`` (everything).
- ``l2``: per-example Euclidean norm ``||a - b||``; reductions ``mean`` or ``sum`` over the batch.
- ``l1``: absolute difference per element, same reductions as ``l2sq``.
- ``cosine``: per-example ``1 - cos(a, b)``; reductions ``mean`` or ``sum`` over the batch.
"""

from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor

DISTANCES = ("l2sq", "l2", "l1", "cosine")
REDUCTIONS = ("mean", "sum_classes", "sum")


def pair_distance(a: Tensor, b: Tensor, distance: str = "l2sq", reduction: str = "mean") -> Tensor:
    if a.shape != b.shape:
        raise ValueError(f"shapes differ: {tuple(a.shape)} vs {tuple(b.shape)}")
    if distance in ("l2sq", "l1"):
        elem = (a - b).pow(2) if distance == "l2sq" else (a - b).abs()
        if reduction == "mean":
            return elem.mean()
        if reduction == "sum_classes":
            return elem.sum(1).mean()
        if reduction == "sum":
            return elem.sum()
    elif distance in ("l2", "cosine"):
        per = (a - b).norm(dim=1) if distance == "l2" else 1.0 - F.cosine_similarity(a, b, dim=1)
        if reduction in ("mean", "sum_classes"):
            return per.mean()
        if reduction == "sum":
            return per.sum()
    else:
        raise ValueError(f"unknown distance {distance!r}; valid: {', '.join(DISTANCES)}")
    raise ValueError(f"unknown reduction {reduction!r}; valid: {', '.join(REDUCTIONS)}")
