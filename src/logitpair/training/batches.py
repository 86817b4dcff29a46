"""Which samples each optimisation step sees: a pure function of (seed, epoch, processes).

The epoch's order is a seeded permutation; the global batch ``order[s*B:(s+1)*B]`` is cut into
W * A equal micro-batches (W processes, A accumulation steps) and process r takes chunks
r*A .. r*A + A - 1. The keys of the per-sample randomness (augmentation, the losses' noise)
depend on the seed and the epoch only.
"""

from __future__ import annotations

import math
from collections.abc import Iterator

import torch
from torch import Tensor

from logitpair.config import RunConfig
from logitpair.data import iterate_batches
from logitpair.data.base import Dataset
from logitpair.errors import ConfigError
from logitpair.training import distributed as D


def epoch_order(n: int, seed: int, epoch: int) -> Tensor:
    return torch.randperm(n, generator=torch.Generator().manual_seed(seed * 100_003 + epoch))


def micro_batches(cfg: RunConfig, world: D.Dist) -> int:
    """W * A, the micro-batches of one optimisation step; an error if the batch does not divide."""
    accum, batch = cfg.optim.accum_steps, cfg.optim.batch_size
    parts = world.world_size * accum
    if batch % parts:
        raise ConfigError(
            f"`batch_size` {batch}: the global batch must divide into {world.world_size} process(es) x "
            f"{accum} accumulation step(s) = {parts} equal micro-batches"
        )
    return parts


def steps_per_epoch(n_train: int, batch: int, parts: int) -> int:
    """Optimisation steps per epoch; with several micro-batches the last incomplete batch is dropped."""
    steps = math.ceil(n_train / batch) if parts == 1 else n_train // batch
    if steps < 1:
        raise ConfigError(f"`batch_size` {batch}: larger than the {n_train} training images")
    return steps


def rank_order(order: Tensor, steps: int, batch: int, world: D.Dist, accum: int) -> Tensor:
    """This process's samples, micro-batch after micro-batch: chunks r*A .. r*A+A-1 of each global batch."""
    parts = world.world_size * accum
    if parts == 1:
        return order
    chunks = order[: steps * batch].view(steps, parts, batch // parts)
    return chunks[:, world.rank * accum : (world.rank + 1) * accum].reshape(-1)


def noise_key(seed: int, epoch: int) -> int:
    return (seed * 1_000_003 + epoch) * 2 + 1


def aug_key(seed: int, epoch: int) -> int:
    return seed * 1_000_003 + epoch


def epoch_batches(
    cfg: RunConfig, data: Dataset, world: D.Dist, device: torch.device, epoch: int, steps: int, pos: int
) -> Iterator[tuple[Tensor, Tensor, Tensor]]:
    """This process's micro-batches ``(idx, x, y)`` of ``epoch``, from optimisation step ``pos`` on."""
    accum, batch = cfg.optim.accum_steps, cfg.optim.batch_size
    order = rank_order(epoch_order(len(data), cfg.seed, epoch), steps, batch, world, accum)
    return iterate_batches(
        data,
        order,
        batch // (world.world_size * accum),
        start=pos * accum,
        train=True,
        key=aug_key(cfg.seed, epoch),
        workers=cfg.data.workers,
        pin_memory=device.type == "cuda",
    )
