"""In-memory image datasets and the dataset registry."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor

from logitpair.errors import ConfigError
from logitpair.registry import Registry


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


@dataclass(frozen=True)
class Splits:
    """Train / validation / test. Validation is held out of the training set."""

    train: ImageDataset
    val: ImageDataset
    test: ImageDataset
    name: str
    source: str


Loader = Callable[[Path | None], tuple[ImageDataset, ImageDataset, str]]
DATASETS: Registry = Registry("dataset")


def split_validation(train: ImageDataset, val_size: int, seed: int) -> tuple[ImageDataset, ImageDataset]:
    """Hold out ``val_size`` seeded-random training images as a validation set."""
    if not 0 <= val_size < len(train):
        raise ConfigError(f"val_size: expected 0 <= val_size < {len(train)} (training set size), got {val_size}")
    perm = torch.randperm(len(train), generator=torch.Generator().manual_seed(seed))
    return train.subset(perm[val_size:].sort().values), train.subset(perm[:val_size].sort().values)


def load_dataset(name: str, data_dir: str | Path | None = None, val_size: int = 5000, seed: int = 0) -> Splits:
    """Load a registered dataset from ``data_dir`` (or its default location) and split it."""
    loader = DATASETS.get(name)
    train, test, source = loader(Path(data_dir) if data_dir else None)
    train, val = split_validation(train, val_size, seed)
    return Splits(train=train, val=val, test=test, name=name, source=source)
