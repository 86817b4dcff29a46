"""Paired comparison and spread for the reproduction reports: McNemar's exact test, mean and sd over seeds.

Two models (or two attacks) evaluated on the same N points give paired per-example flags; only
the *discordant* points (one right, the other wrong) carry information about which is better.
McNemar's exact test asks whether the discordant points split evenly: under the null hypothesis
"equally accurate", the number ``b`` of points only A gets right among the ``b + c`` discordant
ones is Binomial(b + c, 1/2); the two-sided p-value is ``min(1, 2 P(X <= min(b, c)))``
(McNemar 1947; the exact conditional form, no continuity correction, no scipy). Example::

    res = mcnemar(alp_robust, mpgd_robust)    # {"a_only": b, "b_only": c, "p_value": ...}
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor


def binomial_two_sided(k: int, n: int) -> float:
    """Exact two-sided p-value of ``k`` successes in ``n`` fair coin flips: ``min(1, 2 P(X <= min(k, n - k)))``."""
    if not 0 <= k <= n:
        raise ValueError(f"expected 0 <= k <= n, got k={k}, n={n}")
    if n == 0:
        return 1.0
    m = min(k, n - k)
    term = tail = 1  # C(n, 0); exact integers, C(n, i + 1) = C(n, i) (n - i) / (i + 1), one rounding at the end
    for i in range(m):
        term = term * (n - i) // (i + 1)
        tail += term
    return min(1.0, 2 * tail / 2**n)


def mcnemar(a: Tensor | Sequence[bool], b: Tensor | Sequence[bool]) -> dict[str, Any]:
    """McNemar's exact test on paired boolean flags (e.g. robust per point for models A and B).

    Returns ``n`` (pairs), ``a_only`` (A right, B wrong), ``b_only`` (B right, A wrong),
    ``both``, ``neither``, the accuracies ``a`` and ``b``, their difference ``a - b`` and the
    exact two-sided ``p_value``.
    """
    a = torch.as_tensor(a, dtype=torch.bool).flatten().cpu()
    b = torch.as_tensor(b, dtype=torch.bool).flatten().cpu()
    if a.shape != b.shape:
        raise ValueError(f"paired flags need the same points, got {a.numel()} and {b.numel()}")
    n = int(a.numel())
    a_only, b_only = int((a & ~b).sum()), int((~a & b).sum())
    out: dict[str, Any] = {
        "n": n,
        "a_only": a_only,
        "b_only": b_only,
        "both": int((a & b).sum()),
        "neither": int((~a & ~b).sum()),
        "a": float(a.float().mean()) if n else float("nan"),
        "b": float(b.float().mean()) if n else float("nan"),
        "p_value": binomial_two_sided(a_only, a_only + b_only),
    }
    out["difference"] = out["a"] - out["b"]
    return out


def spread(values: Sequence[float]) -> dict[str, Any]:
    """Mean, sample standard deviation (None for one value), min and max of per-seed values."""
    vals = [float(v) for v in values]
    if not vals:
        return {"k": 0, "mean": None, "sd": None, "min": None, "max": None, "values": []}
    mean = sum(vals) / len(vals)
    sd = math.sqrt(sum((v - mean) ** 2 for v in vals) / (len(vals) - 1)) if len(vals) > 1 else None
    return {"k": len(vals), "mean": mean, "sd": sd, "min": min(vals), "max": max(vals), "values": vals}
