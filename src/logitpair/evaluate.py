"""The evaluation protocol: ordered attacks, each run only on points still robust.

For every example the protocol records whether it is classified correctly without attack,
and which attack (if any) first broke it. A point counts as robust only if it is correct
clean *and* survives every attack, so robust accuracy is the fraction of all evaluated
points that are correct under the worst case found. Attacks marked ``transfer`` are
crafted on a separate source model and only evaluated on the target (black-box transfer).
"""

from __future__ import annotations

import inspect
import zlib
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn

from logitpair.attacks import ATTACKS
from logitpair.attacks.common import predict, random_target
from logitpair.errors import ConfigError
from logitpair.metrics import summarize, topk_correct
from logitpair.progress import ProgressFactory, null_progress
from logitpair.threat import Linf


@dataclass(frozen=True)
class AttackSpec:
    """One attack of a protocol: registry name, keyword arguments, display label."""

    name: str
    params: dict[str, Any] = field(default_factory=dict)
    label: str = ""
    transfer: bool = False  # craft on the source model, evaluate on the target

    def __post_init__(self) -> None:
        ATTACKS.get(self.name)
        if not self.label:
            object.__setattr__(self, "label", self.name)

    def to_dict(self) -> dict[str, Any]:
        return {"name": self.name, "label": self.label, "params": dict(self.params), "transfer": self.transfer}


@dataclass
class ProtocolResult:
    """Per-example outcome of a protocol run (CPU tensors of length N)."""

    clean_correct: Tensor  # bool
    robust: Tensor  # bool: correct clean and under every attack
    broken_by: Tensor  # int: index of the first attack that broke the point, -1 if none (or clean-wrong)
    attacks: list[AttackSpec]
    threat: Linf
    seed: int
    clean_top5: Tensor | None = None
    robust_top5: Tensor | None = None
    target: Tensor | None = None
    target_hit: Tensor | None = None
    adversarial: Tensor | None = None  # the breaking (else last) adversarial example per point

    @property
    def n(self) -> int:
        return len(self.robust)

    def summary(self) -> dict[str, Any]:
        out: dict[str, Any] = {
            "n": self.n,
            "threat": {"norm": "Linf", "eps": self.threat.eps, "bounds": list(self.threat.bounds)},
            "seed": self.seed,
            "attacks": [a.to_dict() for a in self.attacks],
            "clean": summarize(self.clean_correct),
            "robust": summarize(self.robust),
            "broken_by": {
                a.label: int((self.broken_by == i).sum()) for i, a in enumerate(self.attacks)
            },
        }
        if self.robust_top5 is not None and self.clean_top5 is not None:
            out["clean_top5"] = summarize(self.clean_top5)
            out["robust_top5"] = summarize(self.robust_top5)
        if self.target_hit is not None:
            out["target_success"] = summarize(self.target_hit)
        return out


def _seed_for(seed: int, *parts: int) -> int:
    return zlib.crc32(repr((seed, *parts)).encode()) & 0x7FFF_FFFF


def run_protocol(
    model: nn.Module,
    x: Tensor,
    y: Tensor,
    attacks: list[AttackSpec],
    *,
    threat: Linf,
    source: nn.Module | None = None,
    batch_size: int = 500,
    seed: int = 0,
    targeted: bool = False,
    top5: bool = False,
    keep_adversarial: bool = False,
    progress: ProgressFactory = null_progress,
    desc: str = "evaluate",
) -> ProtocolResult:
    """Run ``attacks`` in order on ``model`` (each only on still-robust points).

    ``targeted``: draw one random target class per point (seeded), different from the
    label, and pass it to every attack as ``targeted=True, target=...``; the target
    success rate is reported next to accuracy. ``top5``: also track top-5 robustness
    (attacks then also run on points that are top-5 but not top-1 robust).
    Randomness comes from generators seeded by ``(seed, attack index, batch index)``.
    """
    if any(a.transfer for a in attacks) and source is None:
        raise ValueError("a transfer attack needs a source model")
    if targeted:
        unsupported = [a.label for a in attacks if "targeted" not in inspect.signature(ATTACKS.get(a.name)).parameters]
        if unsupported:
            raise ConfigError(f"targeted evaluation: attacks {', '.join(unsupported)} have no targeted mode")
    n = len(x)
    clean1 = torch.zeros(n, dtype=torch.bool)
    robust1 = torch.zeros(n, dtype=torch.bool)
    clean5 = torch.zeros(n, dtype=torch.bool) if top5 else None
    robust5 = torch.zeros(n, dtype=torch.bool) if top5 else None
    broken_by = torch.full((n,), -1, dtype=torch.long)
    targets = None
    hit = torch.zeros(n, dtype=torch.bool) if targeted else None
    adv_all = x.clone() if keep_adversarial else None
    bar = progress(n * max(len(attacks), 1), desc)
    for b, start in enumerate(range(0, n, batch_size)):
        sl = slice(start, min(start + batch_size, n))
        xb, yb = x[sl], y[sl]
        logits = predict(model, xb)
        c1 = topk_correct(logits, yb, 1)
        r1 = c1.clone()
        clean1[sl] = c1
        if top5:
            c5 = topk_correct(logits, yb, 5)
            clean5[sl], r5 = c5, c5.clone()  # type: ignore[index]
        tb = None
        if targeted:
            tb = random_target(yb, logits.shape[1], torch.Generator().manual_seed(_seed_for(seed, -1, b)))
            targets = tb if targets is None else torch.cat([targets, tb])
        for i, spec in enumerate(attacks):
            alive = r5 if top5 else r1
            idx = alive.nonzero().flatten()
            if len(idx):
                fn = ATTACKS.get(spec.name)
                kwargs = dict(spec.params)
                if targeted:
                    kwargs.update(targeted=True, target=tb[idx])  # type: ignore[index]
                gen = torch.Generator().manual_seed(_seed_for(seed, i, b))
                attacker = source if spec.transfer else model
                xa = fn(attacker, xb[idx], yb[idx], threat=threat, generator=gen, **kwargs)
                if not bool(threat.contains(xb[idx], xa).all()):
                    raise RuntimeError(f"attack {spec.label} left the threat model")
                adv_logits = predict(model, xa)
                ok1 = topk_correct(adv_logits, yb[idx], 1)
                newly = r1[idx] & ~ok1
                broken_by[start + idx[newly]] = i
                if keep_adversarial:
                    take = newly | (r1[idx] & (i == len(attacks) - 1))
                    adv_all[start + idx[take]] = xa[take]  # type: ignore[index]
                r1[idx] &= ok1
                if top5:
                    r5[idx] &= topk_correct(adv_logits, yb[idx], 5)  # type: ignore[index]
                if targeted:
                    hit[start + idx] |= adv_logits.argmax(1) == tb[idx]  # type: ignore[index, operator]
            bar.update(len(yb))
        robust1[sl] = r1
        if top5:
            robust5[sl] = r5  # type: ignore[index]
    bar.close()
    return ProtocolResult(
        clean_correct=clean1, robust=robust1, broken_by=broken_by, attacks=list(attacks), threat=threat,
        seed=seed, clean_top5=clean5, robust_top5=robust5, target=targets, target_hit=hit, adversarial=adv_all,
    )  # fmt: skip


def pgd_spec(steps: int = 40, restarts: int = 2, step_size: float | None = None, transfer: bool = False) -> AttackSpec:
    """The paper-style baseline: PGD-``steps`` with ``restarts`` random starts (per-example worst case)."""
    params: dict[str, Any] = {"steps": steps, "restarts": restarts}
    if step_size is not None:
        params["step_size"] = step_size
    label = f"PGD-{steps}" + (f"x{restarts}" if restarts > 1 else "") + (" (transfer)" if transfer else "")
    return AttackSpec("pgd", params, label, transfer)


def accuracy_vs_eps(
    model: nn.Module,
    x: Tensor,
    y: Tensor,
    eps_values: list[float],
    *,
    steps: int = 20,
    restarts: int = 1,
    seed: int = 0,
    progress: ProgressFactory = null_progress,
) -> list[dict[str, Any]]:
    """Robust accuracy under PGD at each eps (eps = 0 is clean accuracy)."""
    rows = []
    for eps in eps_values:
        attacks = [pgd_spec(steps, restarts)] if eps > 0 else []
        res = run_protocol(model, x, y, attacks, threat=Linf(eps), seed=seed, progress=progress, desc=f"eps={eps:g}")
        rows.append({"eps": eps, **summarize(res.robust)})
    return rows
