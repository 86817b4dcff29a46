"""Tiny generated datasets in their real on-disk formats, for ``logitpair reproduce --scale smoke``.

A smoke run exercises every stage of a paper table (the real loader, architecture, method,
attacks, audit, report) in seconds, without the real data. :func:`write_smoke_data` writes a
few random images per class in the format the dataset's loader reads:

- ``mnist`` / ``fashion-mnist``: the four IDX files (``train-images-idx3-ubyte`` ...);
- ``svhn``: ``train_32x32.mat`` / ``test_32x32.mat`` (MATLAB v5, X 32x32x3xN uint8, y in 1..10,
  10 meaning the digit 0; needs scipy, the ``svhn`` extra);
- ``cifar10``: ``cifar-10-batches-bin/`` (``data_batch_{1..5}.bin``, ``test_batch.bin``);
- ``imagenet``: ``train/<wnid>/*.JPEG`` and ``val/<wnid>/*.JPEG``; ``tiny-imagenet``:
  ``wnids.txt``, ``train/<wnid>/images/``, ``val/images/`` + ``val_annotations.txt`` (JPEG
  through Pillow, the ``images`` extra).

The images are noise (nothing is learnable); only the pipeline is under test. Example::

    write_smoke_data("svhn", tmp / "svhn")
    splits = load_dataset("svhn", tmp / "svhn", val_size=2)
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import numpy as np

from logitpair.data import write_idx
from logitpair.errors import ConfigError, DataError

IMAGE_CLASSES = 6  # folder datasets: enough classes for a top-5 figure that is not trivially 100%
# wnids of the first ImageNet classes (any folder names work; these look like the real ones)
WNIDS = ("n01440764", "n01443537", "n01484850", "n01491361", "n01494475", "n01496331")


def _idx(root: Path, rng: np.random.Generator, per_class: int, test_per_class: int) -> Path:
    for split, k in (("train", per_class), ("t10k", test_per_class)):
        y = np.repeat(np.arange(10, dtype=np.uint8), k)
        write_idx(root / f"{split}-images-idx3-ubyte", rng.integers(0, 256, (len(y), 28, 28), dtype=np.uint8))
        write_idx(root / f"{split}-labels-idx1-ubyte", y)
    return root


def _svhn(root: Path, rng: np.random.Generator, per_class: int, test_per_class: int) -> Path:
    try:
        from scipy.io import savemat
    except ImportError:
        raise DataError("writing SVHN .mat files needs scipy: `pip install 'logitpair[svhn]'`") from None
    for split, k in (("train", per_class), ("test", test_per_class)):
        y = np.repeat(np.arange(1, 11, dtype=np.uint8), k)[:, None]  # 10 = the digit 0
        x = rng.integers(0, 256, (32, 32, 3, len(y)), dtype=np.uint8)
        savemat(root / f"{split}_32x32.mat", {"X": x, "y": y}, format="5")
    return root


def _cifar10(root: Path, rng: np.random.Generator, per_class: int, test_per_class: int) -> Path:
    folder = root / "cifar-10-batches-bin"
    folder.mkdir(exist_ok=True)
    names = [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]
    for name in names:
        y = np.arange(10, dtype=np.uint8).repeat(test_per_class if name == "test_batch" else max(1, per_class // 2))
        records = np.concatenate([y[:, None], rng.integers(0, 256, (len(y), 3072), dtype=np.uint8)], axis=1)
        (folder / f"{name}.bin").write_bytes(records.tobytes())
    return root


def _imagenet(root: Path, rng: np.random.Generator, per_class: int, test_per_class: int) -> Path:
    for wnid in WNIDS[:IMAGE_CLASSES]:
        for i in range(per_class):
            _jpeg(root / "train" / wnid / f"{wnid}_{i}.JPEG", rng, (48 + 8 * i, 40))
        for i in range(test_per_class):
            _jpeg(root / "val" / wnid / f"ILSVRC2012_val_{wnid}_{i}.JPEG", rng, (44, 52))
    return root


def _tiny_imagenet(root: Path, rng: np.random.Generator, per_class: int, test_per_class: int) -> Path:
    root = root / "tiny-imagenet-200"
    wnids = WNIDS[:IMAGE_CLASSES]
    (root / "val" / "images").mkdir(parents=True, exist_ok=True)
    (root / "wnids.txt").write_text("\n".join(wnids) + "\n")
    lines = []
    for c, wnid in enumerate(wnids):
        boxes = []
        for i in range(per_class):
            _jpeg(root / "train" / wnid / "images" / f"{wnid}_{i}.JPEG", rng, (64, 64))
            boxes.append(f"{wnid}_{i}.JPEG\t0\t0\t63\t63")
        (root / "train" / wnid / f"{wnid}_boxes.txt").write_text("\n".join(boxes) + "\n")
        for i in range(test_per_class):
            name = f"val_{c * test_per_class + i}.JPEG"
            _jpeg(root / "val" / "images" / name, rng, (64, 64))
            lines.append(f"{name}\t{wnid}\t0\t0\t63\t63")
    (root / "val" / "val_annotations.txt").write_text("\n".join(lines) + "\n")
    return root


WRITERS: dict[str, Callable[[Path, np.random.Generator, int, int], Path]] = {
    "mnist": _idx, "fashion-mnist": _idx, "svhn": _svhn, "cifar10": _cifar10, "imagenet": _imagenet,
    "tiny-imagenet": _tiny_imagenet,
}  # fmt: skip


def write_smoke_data(dataset: str, root: Path, per_class: int = 2, test_per_class: int = 1, seed: int = 0) -> Path:
    """Write ``per_class`` training and ``test_per_class`` test images per class of ``dataset``
    into ``root`` in its real format; returns the folder to pass as ``data_dir``."""
    writer = WRITERS.get(dataset)
    if writer is None:
        raise ConfigError(
            f"`scale` smoke: no generated data for dataset {dataset!r} ({', '.join(WRITERS)}); pass `data_dir`"
        )
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    return writer(root, np.random.default_rng(seed), per_class, test_per_class)


def _jpeg(path: Path, rng: np.random.Generator, size: tuple[int, int]) -> None:
    try:
        from PIL import Image
    except ImportError:
        raise DataError("writing JPEG images needs Pillow: `pip install 'logitpair[images]'`") from None
    w, h = size
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8), "RGB").save(path, format="JPEG", quality=90)
