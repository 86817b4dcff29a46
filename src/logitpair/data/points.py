"""The user's own test points (``--points FILE``): images in [0, 1] and their labels.

A ``.safetensors`` file or a NumPy ``.npz`` archive (read with ``allow_pickle=False``: object
arrays are refused, nothing is unpickled) holding ``x``, floating-point pixels in [0, 1] of
shape (N, C, H, W), and ``y``, N integer labels >= 0. Other entries are ignored. Anything else
is one :class:`ConfigError` naming the file (option ``points``). Whether the labels fit a
model's classes is checked where the model is known (:mod:`logitpair.external`). Example::

    np.savez("points.npz", x=images.astype(np.float32) / 255, y=labels)   # images: N x C x H x W uint8
    x, y = load_points("points.npz")
"""

from __future__ import annotations

import zipfile
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors import SafetensorError
from safetensors.torch import load_file
from torch import Tensor

from logitpair.errors import ConfigError

SUFFIXES = (".safetensors", ".npz")


def load_points(path: str | Path) -> tuple[Tensor, Tensor]:
    """``(x, y)`` from ``path``: x float32 (N, C, H, W) in [0, 1], y int64 (N,) >= 0; checked."""
    path = Path(path)
    arrays = _read(path)
    missing = [k for k in ("x", "y") if k not in arrays]
    if missing:
        found = ", ".join(sorted(arrays)) or "nothing"
        raise _bad(path, f"has no {' and no '.join(missing)} (it holds {found}); expected x (N, C, H, W) and y (N,)")
    return _checked_x(path, arrays["x"]), _checked_y(path, arrays["y"], len(arrays["x"]))


def _read(path: Path) -> dict[str, Tensor]:
    if not path.is_file():
        raise _bad(path, "no such file")
    if path.suffix.lower() not in SUFFIXES:
        raise _bad(path, f"expected {' or '.join(SUFFIXES)}, got {path.suffix or 'no suffix'!r}")
    if path.suffix.lower() == ".safetensors":
        try:
            return load_file(str(path), device="cpu")
        except (SafetensorError, OSError, ValueError) as exc:
            raise _bad(path, f"not a valid safetensors file ({_line(exc)})") from None
    try:
        loaded = np.load(path, allow_pickle=False)
        if not isinstance(loaded, np.lib.npyio.NpzFile):
            raise _bad(path, "holds a single .npy array, not an .npz archive of named arrays (np.savez)")
        with loaded as npz:
            return {k: _tensor(npz[k]) for k in npz.files}
    except (ValueError, OSError, zipfile.BadZipFile, EOFError) as exc:
        if isinstance(exc, ConfigError):
            raise
        raise _bad(path, f"not a readable .npz of arrays ({_line(exc)})") from None


def _tensor(a: np.ndarray) -> Any:
    if a.dtype.kind not in "biuf":  # strings, datetimes, ...: not pixels or labels
        raise ValueError(f"an array of dtype {a.dtype}")
    return torch.from_numpy(np.ascontiguousarray(a))


def _checked_x(path: Path, x: Tensor) -> Tensor:
    if x.dim() != 4 or len(x) == 0:
        raise _bad(path, f"x has shape {tuple(x.shape)}; expected N x C x H x W with N >= 1 (channels first)")
    if not x.is_floating_point():
        raise _bad(path, f"x is {x.dtype}; expected floating-point pixels in [0, 1] (divide 8-bit images by 255)")
    x = x.float()
    if not bool(torch.isfinite(x).all()):
        raise _bad(path, "x holds NaN or infinite values; expected pixels in [0, 1]")
    lo, hi = float(x.min()), float(x.max())
    if lo < 0 or hi > 1:
        raise _bad(path, f"x has values outside [0, 1] (min {lo:g}, max {hi:g}); attacks work in [0, 1] pixel space")
    return x.contiguous()


def _checked_y(path: Path, y: Tensor, n: int) -> Tensor:
    if y.dim() != 1 or len(y) != n:
        raise _bad(path, f"y has shape {tuple(y.shape)}; expected ({n},): one label per image of x")
    if y.is_floating_point() or y.dtype == torch.bool:
        raise _bad(path, f"y is {y.dtype}; expected integer class labels")
    y = y.long()
    if int(y.min()) < 0:
        raise _bad(path, f"y has negative labels (min {int(y.min())}); expected classes 0, 1, ...")
    return y.contiguous()


def check_labels(path: str | Path, y: Tensor, num_classes: int) -> None:
    """One error naming ``path`` if a label is not a class of a model with ``num_classes`` outputs."""
    if len(y) and int(y.max()) >= num_classes:
        raise _bad(
            Path(path), f"y has label {int(y.max())}, but the model has {num_classes} classes (0..{num_classes - 1})"
        )


def _bad(path: Path, message: str) -> ConfigError:
    return ConfigError(f"{path}: {message}", option="points")


def _line(exc: BaseException) -> str:
    return (str(exc).strip().splitlines() or [type(exc).__name__])[0][:200]
