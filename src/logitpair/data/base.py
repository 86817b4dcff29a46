"""In-memory image datasets, the dataset interface and the dataset registry.

A loader is ``loader(data_dir: Path | None, **options) -> (train, test, source)``; the
two datasets follow :class:`Dataset` (an in-memory :class:`ImageDataset` or a lazy
``FolderDataset``). Batches come from ``dataset.get_batch(idx, train=..., key=...)`` or,
for a whole epoch with decoding workers, from ``logitpair.data.iterate_batches``.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import torch
from torch import Tensor

from logitpair.errors import ConfigError
from logitpair.registry import Registry


class Dataset(Protocol):
    """What training and evaluation may rely on, in memory or decoded lazily from disk."""

    y: Tensor  # int64 labels, always in memory
    num_classes: int
    classes: tuple[str, ...]

    def __len__(self) -> int: ...

    def subset(self, index: Tensor | slice) -> Dataset: ...

    @property
    def image_shape(self) -> tuple[int, int, int]: ...

    def get_batch(self, idx: Tensor, *, train: bool = False, key: int = 0) -> tuple[Tensor, Tensor]: ...


@dataclass(frozen=True)
class ImageDataset:
    """Images as float32 NCHW in [0, 1] and int64 labels."""

    x: Tensor
    y: Tensor
    num_classes: int
    classes: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        if len(self.x) != len(self.y):
            raise ValueError(f"{len(self.x)} images but {len(self.y)} labels")

    def __len__(self) -> int:
        return len(self.y)

    def subset(self, index: Tensor | slice) -> ImageDataset:
        return ImageDataset(self.x[index], self.y[index], self.num_classes, self.classes)

    @property
    def image_shape(self) -> tuple[int, int, int]:
        return tuple(self.x.shape[1:])  # type: ignore[return-value]

    def get_batch(self, idx: Tensor, *, train: bool = False, key: int = 0) -> tuple[Tensor, Tensor]:
        """``(x[idx], y[idx])``. In-memory datasets have no augmentation: ``train`` and ``key`` are ignored."""
        return self.x[idx], self.y[idx]


@dataclass(frozen=True)
class Splits:
    """Train / validation / test. Validation is held out of the training set."""

    train: Dataset
    val: Dataset
    test: Dataset
    name: str
    source: str


Loader = Callable[..., tuple[Dataset, Dataset, str]]
DATASETS: Registry = Registry("dataset")


# The validation split held out when none is asked for: 10% of the training images, at most
# 5,000 (every registered dataset has >= 50,000 training images, so 5,000 for all of them).
VAL_SIZE_MAX, VAL_FRACTION = 5000, 0.1


def default_val_size(n_train: int) -> int:
    """The automatic validation split: ``min(5000, floor(n_train / 10))``."""
    return min(VAL_SIZE_MAX, n_train // round(1 / VAL_FRACTION))


def split_validation(train: Dataset, val_size: int | None, seed: int) -> tuple[Dataset, Dataset]:
    """Hold out ``val_size`` seeded-random training images as a validation set (None: :func:`default_val_size`)."""
    if val_size is None:
        val_size = default_val_size(len(train))
    if not 0 <= val_size < len(train):
        raise ConfigError(
            f"expected 0 <= val_size < {len(train)} (the training set's size), got {val_size}", option="val_size"
        )
    perm = torch.randperm(len(train), generator=torch.Generator().manual_seed(seed))
    return train.subset(perm[val_size:].sort().values), train.subset(perm[:val_size].sort().values)


def loader_options(name: str, loader: Loader, options: dict[str, Any]) -> dict[str, Any]:
    """The ``options`` that ``loader`` accepts as keywords; options set to None count as not given.

    Raises :class:`ConfigError` naming the first option the loader does not accept.
    """
    given = {k: v for k, v in options.items() if v is not None}
    params = list(inspect.signature(loader).parameters.values())[1:]  # the first is data_dir
    if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params):
        return given
    accepted = [p.name for p in params if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)]
    for opt in given:
        if opt not in accepted:
            valid = ", ".join(accepted) if accepted else "none"
            raise ConfigError(f"dataset {name!r} does not accept option {opt!r}; its options: {valid}")
    return given


def load_dataset(
    name: str, data_dir: str | Path | None = None, val_size: int | None = None, seed: int = 0, **options: Any
) -> Splits:
    """Load a registered dataset from ``data_dir`` (or its default location) and split it
    (``val_size`` None: :func:`default_val_size`).

    ``options`` (e.g. ``image_size=64, skip_bad=True`` for the folder datasets, ``extra=True``
    for SVHN) go to the loader; an option it does not take is a :class:`ConfigError`.
    """
    loader = DATASETS.get(name)
    kwargs = loader_options(name, loader, options)
    train, test, source = loader(Path(data_dir) if data_dir else None, **kwargs)
    train, val = split_validation(train, val_size, seed)
    return Splits(train=train, val=val, test=test, name=name, source=source)
