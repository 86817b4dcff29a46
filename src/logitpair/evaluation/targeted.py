"""The paper's targeted (ImageNet) protocol: attack groups towards one random target class per
point, top-1 / top-5 accuracy and the targeted success rate (Kannan et al. 2018, Tables 3, 5, 9)."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from logitpair.distributed import Dist
from logitpair.errors import ConfigError
from logitpair.evaluation.protocol import ProtocolResult, run_protocol
from logitpair.evaluation.spec import AttackSpec
from logitpair.metrics import summarize
from logitpair.progress import ProgressFactory, null_progress
from logitpair.threat import Linf


@dataclass
class TargetedResult:
    """Per-example outcome of :func:`targeted_protocol` (CPU tensors of length N).

    ``groups`` maps a name (e.g. ``paper``, ``long``, ``suite``) to its protocol result; every
    group attacked the same points towards the same ``target`` classes. ``untargeted`` is the
    optional untargeted run (an extra figure, not the paper's protocol)."""

    clean_top1: Tensor
    clean_top5: Tensor
    target: Tensor
    groups: dict[str, ProtocolResult]
    untargeted: ProtocolResult | None = None

    @property
    def n(self) -> int:
        return len(self.target)

    def robust(self, group: str | None = None, k: int = 1) -> Tensor:
        """Top-``k`` (1 or 5) robust flags under ``group``; None: the worst case over every group."""
        names = list(self.groups) if group is None else [group]
        out = self.clean_top1.clone() if k == 1 else self.clean_top5.clone()
        for name in names:
            res = self.groups[name]
            out &= res.robust if k == 1 else res.robust_top5  # type: ignore[operator]
        return out

    def success(self, group: str | None = None) -> Tensor:
        """Targeted success flags (the prediction became the target) under ``group`` (None: any group)."""
        names = list(self.groups) if group is None else [group]
        out = torch.zeros(self.n, dtype=torch.bool)
        for name in names:
            out |= self.groups[name].target_hit  # type: ignore[operator]
        return out

    def summary(self) -> dict[str, Any]:
        out: dict[str, Any] = {
            "n": self.n,
            "clean_top1": summarize(self.clean_top1),
            "clean_top5": summarize(self.clean_top5),
            "groups": {},
        }
        for name, res in self.groups.items():
            out["groups"][name] = {
                "attacks": [a.to_dict() for a in res.attacks],
                "top1": summarize(self.robust(name, 1)),
                "top5": summarize(self.robust(name, 5)),
                "target_success": summarize(self.success(name)),
            }
        out["worst"] = {
            "top1": summarize(self.robust(None, 1)),
            "top5": summarize(self.robust(None, 5)),
            "target_success": summarize(self.success(None)),
        }
        if self.untargeted is not None:
            out["untargeted"] = {
                "attacks": [a.to_dict() for a in self.untargeted.attacks],
                "top1": summarize(self.untargeted.robust),
                "top5": summarize(self.untargeted.robust_top5),  # type: ignore[arg-type]
            }
        return out


def targeted_protocol(
    model: nn.Module,
    x: Tensor,
    y: Tensor,
    groups: dict[str, Sequence[AttackSpec]],
    *,
    threat: Linf,
    seed: int = 0,
    batch_size: int = 500,
    untargeted: Sequence[AttackSpec] = (),
    state_dir: str | Path | None = None,
    progress: ProgressFactory = null_progress,
    world: Dist | None = None,
) -> TargetedResult:
    """The paper's ImageNet protocol (Kannan et al. 2018, https://arxiv.org/abs/1803.06373,
    Tables 3, 5, 9): targeted attacks towards a random class, top-1 and top-5 accuracy and the
    targeted success rate.

    Each group of attacks (e.g. the paper's attack, a much longer targeted PGD after Engstrom et
    al. 2018, https://arxiv.org/abs/1807.10272, and the ``targeted`` suite) is run by
    :func:`run_protocol` with ``targeted=True, top5=True`` on all N points, with the same
    ``seed`` and ``batch_size``: every group therefore attacks the same points towards the
    **same** target classes (a uniformly random class other than the label, drawn per batch
    from the seed; checked here). The worst case per example is the AND of the groups' robust
    flags. ``untargeted`` attacks, if any, run once more without targets (an extra column, not
    the paper's protocol). L-inf ``threat``, ``x`` (N, C, H, W) in [0, 1], ``y`` (N,). ``world``
    (torchrun): every group sharded by whole batches (:func:`run_protocol`), the same result.

    Example::

        res = targeted_protocol(model, x, y, {"paper": [AttackSpec("official", {"spec": "pgdrnd_16_2_10"})]},
                                threat=Linf(16 / 255))
        res.summary()["groups"]["paper"]["top5"]      # {"value": ..., "n": ..., "ci95": [...]}
    """
    if not groups:
        raise ConfigError("targeted protocol: no attack group given")
    state = Path(state_dir) if state_dir is not None else None
    if state is not None:
        state.mkdir(parents=True, exist_ok=True)
    results: dict[str, ProtocolResult] = {}
    for name, attacks in groups.items():
        results[name] = run_protocol(
            model, x, y, list(attacks), threat=threat, seed=seed, batch_size=batch_size, targeted=True, top5=True,
            state_path=state / f"targeted-{name}.safetensors" if state else None, progress=progress,
            desc=f"targeted: {name}", world=world,
        )  # fmt: skip
    first = next(iter(results.values()))
    for name, res in results.items():
        if not torch.equal(res.target, first.target) or not torch.equal(res.clean_correct, first.clean_correct):
            raise RuntimeError(f"targeted protocol: group {name!r} drew other targets than the first group")
    extra = None
    if untargeted:
        extra = run_protocol(
            model, x, y, list(untargeted), threat=threat, seed=seed, batch_size=batch_size, top5=True,
            state_path=state / "untargeted.safetensors" if state else None, progress=progress, desc="untargeted",
            world=world,
        )  # fmt: skip
    return TargetedResult(
        clean_top1=first.clean_correct,
        clean_top5=first.clean_top5,
        target=first.target,
        groups=results,  # type: ignore[arg-type]
        untargeted=extra,
    )
