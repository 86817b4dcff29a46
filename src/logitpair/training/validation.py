"""Per-epoch validation: clean accuracy on the held-out split, PGD accuracy on its first points
and, with ``val_suite``, the robust accuracy under an attack suite."""

from __future__ import annotations

import torch
from torch import nn

from logitpair.attacks.common import predict
from logitpair.attacks.pgd import pgd
from logitpair.config import RunConfig
from logitpair.data import Splits, iterate_batches, take
from logitpair.data.base import Dataset
from logitpair.evaluation.protocol import run_protocol
from logitpair.evaluation.suites import get_suite
from logitpair.threat import Linf


def _accuracy(model: nn.Module, data: Dataset, device: torch.device, batch_size: int = 1000) -> float:
    """Clean top-1 accuracy over a whole dataset (evaluation transform)."""
    correct = 0
    for _, x, y in iterate_batches(data, torch.arange(len(data)), batch_size):
        correct += int((predict(model, x.to(device)).argmax(1) == y.to(device)).sum())
    return correct / max(len(data), 1)


def validate(model: nn.Module, splits: Splits, cfg: RunConfig, device: torch.device | None = None) -> dict[str, float]:
    """Clean accuracy on the validation split, PGD accuracy on its first ``val_points``
    (``val_pgd``, which the overfitting guard watches) and, with ``val_suite``, the robust
    accuracy under that suite on the same points (``val_robust``: correct on clean and under
    every attack of the suite, the evaluation protocol's rule)."""
    val = splits.val
    device = device or torch.device("cpu")
    if len(val) == 0:
        return {}
    out: dict[str, float] = {}
    with torch.no_grad():
        out["val_clean"] = _accuracy(model, val, device)
    n = min(cfg.val_points, len(val))
    if n and cfg.loss.eps > 0:
        x, y = take(val, n)
        x, y = x.to(device), y.to(device)
        gen = torch.Generator(device=device).manual_seed(cfg.seed + 17)
        correct = 0
        for i in range(0, n, 500):
            xa = pgd(
                model,
                x[i : i + 500],
                y[i : i + 500],
                threat=Linf(cfg.loss.eps),
                steps=cfg.val_attack_steps,
                generator=gen,
            )
            correct += int((predict(model, xa).argmax(1) == y[i : i + 500]).sum())
        out["val_pgd"] = correct / n
        if cfg.val_suite:
            res = run_protocol(
                model, x, y, get_suite(cfg.val_suite), threat=Linf(cfg.loss.eps), seed=cfg.seed + 17, batch_size=500
            )
            out["val_robust"] = float(res.robust.float().mean())
    return out
