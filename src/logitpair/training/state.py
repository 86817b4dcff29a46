"""The training loop's state, typed.

:class:`LoopState` is where the loop stands, as a checkpoint's ``state.json`` records it under
``loop`` (plain JSON: counters, history, best epoch, the epoch's partial metric sums).
:class:`Snapshots` are the weight sets kept beside the model (the checkpoint files ``ema``,
``best`` and ``prev``); :class:`EpochSums` are the current epoch's metric sums, kept on the
device and summed over processes when read. torch's global RNG state, the optimiser's and the
model's tensors are saved beside them (``persist.py``).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn

from logitpair.errors import CheckpointError
from logitpair.training import distributed as D

Weights = dict[str, Tensor]


@dataclass
class LoopState:
    """Where the loop stands. :meth:`to_dict` / :meth:`from_dict` are a checkpoint's ``loop``
    entry, in the format checkpoints have always had (``stopped`` and ``init`` only when set)."""

    epoch: int = 0  # the current epoch, 0-based; = optim.epochs once training is over
    pos: int = 0  # optimisation steps done in the current epoch
    step: int = 0  # optimisation steps done in all
    history: list[dict[str, Any]] = field(default_factory=list)  # one record per finished epoch
    train_seconds: float = 0.0
    skipped: int = 0  # steps skipped for a non-finite loss or gradient (on_nonfinite: skip)
    acc: dict[str, float] = field(default_factory=dict)  # the epoch's metric sums at the checkpoint, "n": steps
    best: tuple[int, float] | None = None  # (epoch, value) of the best epoch under `select`
    stopped: int | None = None  # the overfitting guard stopped training: the epoch whose weights are kept
    init: dict[str, Any] | None = None  # the weights the run started from (init_weights): file, SHA-256, head

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {
            "epoch": self.epoch,
            "pos": self.pos,
            "step": self.step,
            "history": self.history,
            "train_seconds": self.train_seconds,
            "skipped": self.skipped,
            "acc": dict(self.acc),
            "best": None if self.best is None else list(self.best),
        }
        if self.stopped is not None:
            out["stopped"] = self.stopped
        if self.init is not None:
            out["init"] = self.init
        return out

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> LoopState:
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(k for k in data if k not in names)
        if unknown:
            raise CheckpointError(f"checkpoint loop state: unknown entry {unknown[0]!r}")
        best = data.get("best")
        return cls(
            **{k: v for k, v in data.items() if k not in ("history", "acc", "best")},
            history=list(data.get("history", [])),
            acc=dict(data.get("acc", {})),
            best=None if best is None else (int(best[0]), best[1]),
        )


def clone_weights(model: nn.Module) -> Weights:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


@dataclass
class Snapshots:
    """Weight sets kept beside the model: the EMA (``ema_decay`` > 0), the best epoch's under
    ``select``, the previous epoch's (for the overfitting guard). None: not kept."""

    ema: Weights | None = None
    best: Weights | None = None
    prev: Weights | None = None

    def files(self) -> dict[str, Weights]:
        """The checkpoint files they are saved as, named after the fields (only those kept)."""
        held = (("best", self.best), ("prev", self.prev), ("ema", self.ema))
        return {name: weights for name, weights in held if weights is not None}


class EpochSums:
    """The current epoch's metric sums on the device (adding needs no host sync) and the
    number of steps summed, ``n``; built from a checkpoint's ``acc`` when resuming."""

    def __init__(self, device: torch.device, saved: Mapping[str, float] | None = None) -> None:
        saved = saved or {}
        self.n = int(saved.get("n", 0))
        self.sums = {k: torch.tensor(v, dtype=torch.float64, device=device) for k, v in saved.items() if k != "n"}

    def add(self, loss: Tensor, metrics: Mapping[str, Tensor]) -> None:
        self.n += 1
        for k, v in {"loss": loss.double(), **metrics}.items():
            self.sums[k] = self.sums[k] + v if k in self.sums else v

    def reduced(self, world: D.Dist) -> dict[str, float]:
        """The sums over all processes (a host sync; a collective under torchrun)."""
        keys = sorted(self.sums)
        if not keys:
            return {}
        vec = torch.stack([self.sums[k] for k in keys])
        D.all_reduce_sum(vec, world)
        return {k: float(v) for k, v in zip(keys, vec.tolist(), strict=True)}

    def saved(self, world: D.Dist) -> dict[str, float]:
        """What a checkpoint records as ``acc``."""
        return {**self.reduced(world), "n": self.n}
