"""SVHN cropped digits (format 2) from the distributed MATLAB files.

``train_32x32.mat``, ``test_32x32.mat`` and optionally ``extra_32x32.mat`` (MATLAB v5,
read with ``scipy.io.loadmat``, the ``svhn`` extra): ``X`` is 32x32x3xN uint8 (rows,
columns, RGB, image) and ``y`` is Nx1 with labels 1..10, where 10 means the digit 0. In
memory as float32 NCHW in [0, 1] with label = digit. ``extra=True`` appends the 531,131
extra images to the training set (about 6.5 GB as float32).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from logitpair.data.base import DATASETS, ImageDataset
from logitpair.errors import ConfigError, DataError

DIGITS = tuple(str(i) for i in range(10))
HINT = "Pass --data-dir with train_32x32.mat and test_32x32.mat (and extra_32x32.mat for extra=True)."


def _loadmat():
    try:
        from scipy.io import loadmat
    except ImportError:
        raise DataError("reading SVHN .mat files needs scipy: `pip install 'logitpair[svhn]'`") from None
    return loadmat


def read_svhn_mat(path: Path) -> tuple[np.ndarray, np.ndarray]:
    """``(images uint8 (N, 3, 32, 32), labels int64 (N,) in 0..9)`` from one SVHN ``*_32x32.mat`` file."""
    loadmat = _loadmat()
    if not path.is_file():
        raise DataError(f"{path}: not found. {HINT}")
    try:
        mat = loadmat(path, variable_names=["X", "y"])
    except NotImplementedError as exc:  # v7.3 (HDF5) files
        raise DataError(f"{path}: not a MATLAB v5 file as distributed ({exc})") from None
    except Exception as exc:  # noqa: BLE001 - scipy raises ValueError, TypeError, MatReadError... for corrupt files
        raise DataError(f"{path}: cannot read as a MATLAB v5 file ({type(exc).__name__}: {exc})") from None
    missing = [k for k in ("X", "y") if k not in mat]
    if missing:
        raise DataError(
            f"{path}: expected variables X (32x32x3xN uint8) and y (Nx1 labels 1..10); missing {', '.join(missing)}"
        )
    x, y = mat["X"], mat["y"]
    if not isinstance(x, np.ndarray) or x.dtype != np.uint8 or x.ndim != 4 or x.shape[:3] != (32, 32, 3):
        got = f"{x.dtype} {x.shape}" if isinstance(x, np.ndarray) else type(x).__name__
        raise DataError(f"{path}: expected X of shape 32x32x3xN and dtype uint8, got {got}")
    n = x.shape[3]
    if not isinstance(y, np.ndarray) or y.dtype.kind not in "uif" or y.shape not in ((n, 1), (n,)):
        got = f"{y.dtype} {y.shape}" if isinstance(y, np.ndarray) else type(y).__name__
        raise DataError(f"{path}: expected y of shape {n}x1 (one integer label per image of X), got {got}")
    labels = y.reshape(n)
    bad = (labels < 1) | (labels > 10) | (labels != np.round(labels))
    if bad.any():
        raise DataError(f"{path}: expected labels 1..10 in y (10 meaning digit 0), found {labels[bad][0]!r}")
    labels = labels.astype(np.int64) % 10
    return np.ascontiguousarray(x.transpose(3, 2, 0, 1)), labels


@DATASETS.register("svhn")
def load_svhn(data_dir: Path | None, *, extra: bool = False) -> tuple[ImageDataset, ImageDataset, str]:
    """SVHN cropped digits (32x32 RGB) from the distributed `*_32x32.mat` files; `extra=True` adds the extra set."""
    if not isinstance(extra, bool):
        raise ConfigError(f"extra: expected true or false, got {extra!r}")
    _loadmat()
    if data_dir is None:
        raise DataError(f"no data directory given. {HINT}")
    if not data_dir.is_dir():
        raise DataError(f"{data_dir}: data directory not found. {HINT}")
    names = ["train_32x32.mat"] + (["extra_32x32.mat"] if extra else [])
    parts = [read_svhn_mat(data_dir / name) for name in names]
    test_x, test_y = read_svhn_mat(data_dir / "test_32x32.mat")

    def dataset(x: np.ndarray, y: np.ndarray) -> ImageDataset:
        return ImageDataset(torch.from_numpy(x).float().div_(255.0), torch.from_numpy(y), 10, DIGITS)

    train_x = np.concatenate([p[0] for p in parts]) if len(parts) > 1 else parts[0][0]
    train_y = np.concatenate([p[1] for p in parts]) if len(parts) > 1 else parts[0][1]
    source = f"{data_dir} (svhn: {' + '.join(names)}, test_32x32.mat)"
    return dataset(train_x, train_y), dataset(test_x, test_y), source
