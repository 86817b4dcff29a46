"""What runs at the end of each epoch, after validation: small policy objects with one method,
``end_epoch(end)``, built from the config by :func:`epoch_policies`.

A policy reads the epoch's record (``end.record``, not yet in the history) and the weights that
were validated (``end.model``); it may add a note to the record, keep weights in ``end.snaps``,
update ``end.state`` or end training after this epoch (``end.stop``). They run in the order
:func:`epoch_policies` returns: the overfitting guard first, so that a collapsed epoch is never
selected as the best.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Protocol

from torch import nn

from logitpair.config import RunConfig
from logitpair.progress import Logger
from logitpair.training.state import LoopState, Snapshots, clone_weights


@dataclass
class EpochEnd:
    """The end of epoch ``epoch`` (0-based) as the policies see it."""

    epoch: int
    record: dict[str, Any]  # the epoch's metrics (validation included)
    model: nn.Module  # the weights validated (a copy holding the EMA with export_weights: ema)
    state: LoopState  # its history holds the earlier epochs
    snaps: Snapshots
    log: Logger
    stop: bool = False  # set by a policy: training ends after this epoch


class EpochPolicy(Protocol):
    def end_epoch(self, end: EpochEnd) -> None: ...


@dataclass(frozen=True)
class OverfitGuard:
    """Catastrophic-overfitting guard (Wong et al. 2020): when the PGD accuracy on the held-out
    points (``val_pgd``) falls more than ``points`` accuracy points since the previous epoch,
    training stops and the previous epoch's weights are kept (``state.stopped``); otherwise this
    epoch's weights become the previous ones (``snaps.prev``)."""

    points: float

    def end_epoch(self, end: EpochEnd) -> None:
        drop = self.drop(end)
        if drop is None or drop <= self.points or end.snaps.prev is None:
            end.snaps.prev = clone_weights(end.model)
            return
        end.stop = True
        end.state.stopped = end.epoch  # 1-based number of the previous epoch
        end.record["overfit_guard"] = (
            f"val_pgd fell {drop:.1f} points (> {self.points:g}): stopped, epoch {end.epoch} kept"
        )
        end.log(
            f"catastrophic overfitting guard: PGD accuracy on the held-out batch fell {drop:.1f} points "
            f"in epoch {end.epoch + 1} (> {self.points:g}); training stops and the weights of epoch {end.epoch} are kept"
        )

    @staticmethod
    def drop(end: EpochEnd) -> float | None:
        """The fall of ``val_pgd`` since the previous epoch, in points (None: not measured)."""
        history, record = end.state.history, end.record
        if not history or "val_pgd" not in record or "val_pgd" not in history[-1]:
            return None
        return 100.0 * (history[-1]["val_pgd"] - record["val_pgd"])


@dataclass(frozen=True)
class BestWeights:
    """Keeps the weights of the epoch with the highest ``key`` in its record (``select``:
    best-robust, best-clean) in ``snaps.best`` and ``state.best``; they are the ones exported."""

    key: str

    def end_epoch(self, end: EpochEnd) -> None:
        value = end.record.get(self.key)
        if end.stop or value is None:
            return
        if end.state.best is None or value > end.state.best[1]:
            end.state.best = (end.epoch + 1, value)
            end.snaps.best = clone_weights(end.model)


def selection_key(cfg: RunConfig) -> str | None:
    """The record entry ``select`` maximises (None: ``last``)."""
    return {"best-robust": "val_robust" if cfg.val_suite else "val_pgd", "best-clean": "val_clean"}.get(cfg.select)


def epoch_policies(cfg: RunConfig) -> list[EpochPolicy]:
    policies: list[EpochPolicy] = []
    if (points := cfg.guard_points()) > 0:
        policies.append(OverfitGuard(points))
    if (key := selection_key(cfg)) is not None:
        policies.append(BestWeights(key))
    return policies
