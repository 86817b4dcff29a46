"""Batches for training and evaluation, from in-memory or lazily decoded datasets.

:func:`iterate_batches` yields ``(idx, x, y)`` for consecutive slices of an index order.
In-memory datasets are indexed as tensors in the calling process. Folder datasets decode
in ``workers`` processes through a ``torch.utils.data.DataLoader`` over whole batches, in
order; every batch is ``dataset.get_batch(idx, train=train, key=key)``, whose randomness is
keyed per (key, sample index), so the result does not depend on ``workers``. Example::

    order = torch.randperm(len(train), generator=g)
    for idx, x, y in iterate_batches(train, order, 256, start=pos, train=True, key=epoch_key, workers=8):
        ...

:func:`take` gives the first ``n`` examples as tensors (evaluation transform).
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from dataclasses import dataclass

import torch
from torch import Tensor
from torch.utils.data import DataLoader
from torch.utils.data import Dataset as TorchDataset

from logitpair.data.base import Dataset, ImageDataset
from logitpair.errors import ConfigError, DataError


@dataclass(frozen=True)
class _Failed:
    """A DataError raised in a worker, carried back as a value so its one-line message survives."""

    message: str


class _Batches(TorchDataset):
    """Batch ``b`` of ``order`` (counting from ``start``) as ``(idx, x, y)``."""

    def __init__(self, dataset: Dataset, order: Tensor, batch_size: int, start: int, train: bool, key: int) -> None:
        self.dataset, self.order, self.batch_size = dataset, order, batch_size
        self.start, self.train, self.key = start, train, key
        self.count = max(0, math.ceil(len(order) / batch_size) - start)

    def __len__(self) -> int:
        return self.count

    def __getitem__(self, b: int) -> tuple[Tensor, Tensor, Tensor] | _Failed:
        pos = (self.start + b) * self.batch_size
        idx = self.order[pos : pos + self.batch_size]
        try:
            x, y = self.dataset.get_batch(idx, train=self.train, key=self.key)
        except DataError as exc:
            return _Failed(str(exc))
        return idx, x, y


def _check(batch_size: int, start: int, workers: int) -> None:
    if batch_size < 1:
        raise ConfigError(f"batch_size: expected a positive integer, got {batch_size}")
    if start < 0:
        raise ConfigError(f"start: expected a batch number >= 0, got {start}")
    if workers < 0:
        raise ConfigError(f"workers: expected >= 0, got {workers}")


def iterate_batches(
    dataset: Dataset,
    order: Tensor,
    batch_size: int,
    *,
    start: int = 0,
    train: bool = False,
    key: int = 0,
    workers: int = 0,
    pin_memory: bool = False,
) -> Iterator[tuple[Tensor, Tensor, Tensor]]:
    """Yield ``(idx, x, y)`` for ``order[b * batch_size : (b + 1) * batch_size]``, ``b = start, start + 1, ...``.

    ``idx`` is the slice of ``order`` (dataset indices); ``x`` float32 (B, C, H, W) in
    [0, 1]; ``y`` int64 (B,). ``train`` and ``key`` select the keyed training augmentation
    of folder datasets (in-memory datasets have none). ``workers`` decoding processes are
    used for datasets that are not in memory; ``pin_memory`` pins the batches when CUDA is
    available. The last batch may be short. Raises :class:`DataError` for an unreadable image.
    """
    _check(batch_size, start, workers)
    order = torch.as_tensor(order, dtype=torch.int64).cpu()
    pin = pin_memory and torch.cuda.is_available()
    batches = _Batches(dataset, order, batch_size, start, train, key)
    if isinstance(dataset, ImageDataset) or workers == 0:
        for b in range(len(batches)):
            item = batches[b]
            if isinstance(item, _Failed):
                raise DataError(item.message)
            yield tuple(t.pin_memory() for t in item) if pin else item  # type: ignore[misc]
        return
    loader = DataLoader(batches, batch_size=None, shuffle=False, num_workers=workers, pin_memory=pin)
    for item in loader:
        if isinstance(item, _Failed):
            raise DataError(item.message)
        yield tuple(item)  # type: ignore[misc]


def take(dataset: Dataset, n: int, *, workers: int = 0, batch_size: int = 256) -> tuple[Tensor, Tensor]:
    """The first ``min(n, len(dataset))`` examples as ``(x, y)`` tensors, with the evaluation transform."""
    n = max(0, min(n, len(dataset)))
    if isinstance(dataset, ImageDataset):
        return dataset.x[:n], dataset.y[:n]
    parts = list(iterate_batches(dataset, torch.arange(n), batch_size, workers=workers))
    if not parts:
        return torch.empty(0, *dataset.image_shape), dataset.y[:0]
    return torch.cat([p[1] for p in parts]), torch.cat([p[2] for p in parts])
