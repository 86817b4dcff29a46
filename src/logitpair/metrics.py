"""Per-example correctness flags and honest summaries (fraction, N, 95% Wilson interval)."""

from __future__ import annotations

import math

import torch
from torch import Tensor


def topk_correct(logits: Tensor, y: Tensor, k: int = 1) -> Tensor:
    """Boolean per example: is ``y`` among the ``k`` largest logits?"""
    k = min(k, logits.shape[1])
    if k == 1:
        return logits.argmax(1) == y
    return (logits.topk(k, dim=1).indices == y[:, None]).any(1)


def wilson_interval(successes: int, n: int, z: float = 1.959963984540054) -> tuple[float, float]:
    """95% Wilson score interval for a binomial proportion (well behaved near 0 and 1)."""
    if n <= 0:
        return (0.0, 1.0)
    p = successes / n
    denom = 1.0 + z * z / n
    centre = (p + z * z / (2 * n)) / denom
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / denom
    low = 0.0 if successes == 0 else max(0.0, centre - half)  # exact ends (round-off left ~1e-18)
    high = 1.0 if successes == n else min(1.0, centre + half)
    return (low, high)


def summarize(flags: Tensor) -> dict[str, float | int | list[float]]:
    """``{"value": fraction, "n": N, "ci95": [low, high]}`` for a boolean vector."""
    flags = flags.detach().to("cpu", torch.bool)
    n = int(flags.numel())
    k = int(flags.sum())
    return {"value": k / n if n else float("nan"), "n": n, "ci95": list(wilson_interval(k, n))}
