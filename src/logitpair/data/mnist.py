"""MNIST-format datasets (IDX files): Fashion-MNIST (the default) and MNIST."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from logitpair.data.base import DATASETS, ImageDataset
from logitpair.data.idx import read_idx
from logitpair.errors import DataError

FASHION_MNIST_DIR = Path("/usr/share/datasets/fashion-mnist")
FASHION_CLASSES = (
    "T-shirt/top", "Trouser", "Pullover", "Dress", "Coat",
    "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot",
)  # fmt: skip
DIGITS = tuple(str(i) for i in range(10))
FILES = {
    "train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
    "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"),
}


def _find(folder: Path, stem: str, hint: str) -> Path:
    for name in (stem, stem + ".gz", stem.replace("-idx", ".idx"), stem.replace("-idx", ".idx") + ".gz"):
        if (folder / name).is_file():
            return folder / name
    raise DataError(f"{folder / stem}[.gz]: not found. {hint}")


def _load_split(folder: Path, split: str, classes: tuple[str, ...], hint: str) -> ImageDataset:
    img_path, lab_path = (_find(folder, stem, hint) for stem in FILES[split])
    images = read_idx(img_path)
    labels = read_idx(lab_path)
    if images.ndim != 3 or images.dtype != np.uint8:
        raise DataError(
            f"{img_path}: expected a 3-D uint8 IDX array (count, rows, cols), got {images.dtype} {images.shape}"
        )
    if labels.ndim != 1 or labels.dtype != np.uint8:
        raise DataError(f"{lab_path}: expected a 1-D uint8 IDX array of labels, got {labels.dtype} {labels.shape}")
    if len(images) != len(labels):
        raise DataError(f"{img_path}: {len(images)} images but {lab_path.name} has {len(labels)} labels")
    if len(labels) and int(labels.max()) >= len(classes):
        raise DataError(f"{lab_path}: label {int(labels.max())} out of range for {len(classes)} classes")
    x = torch.from_numpy(images).unsqueeze(1).float().div_(255.0)
    y = torch.from_numpy(labels.astype(np.int64))
    return ImageDataset(x, y, len(classes), classes)


def _idx_loader(default: Path | None, classes: tuple[str, ...], hint: str):
    def load(data_dir: Path | None) -> tuple[ImageDataset, ImageDataset, str]:
        folder = data_dir or default
        if folder is None:
            raise DataError(f"no data directory given. {hint}")
        if not folder.is_dir():
            raise DataError(f"{folder}: data directory not found. {hint}")
        return (
            _load_split(folder, "train", classes, hint),
            _load_split(folder, "test", classes, hint),
            str(folder),
        )

    return load


DATASETS.register(
    "fashion-mnist",
    description="Fashion-MNIST (10 clothing classes, 28x28 grey), the four IDX files (Debian's by default).",
)(
    _idx_loader(
        FASHION_MNIST_DIR,
        FASHION_CLASSES,
        "Install it with `apt-get install dataset-fashion-mnist` (files go to "
        f"{FASHION_MNIST_DIR}) or pass --data-dir with the four standard IDX files.",
    )
)
DATASETS.register("mnist", description="MNIST handwritten digits (28x28 grey) from the four standard IDX files.")(
    _idx_loader(
        None,
        DIGITS,
        "Pass --data-dir with the four standard MNIST IDX files (train-images-idx3-ubyte[.gz], ...).",
    )
)
