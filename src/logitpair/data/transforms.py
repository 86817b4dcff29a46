"""Image transforms as pure torch functions on one CHW image (uint8 or float).

No ``torchvision``: the ImageNet conventions are written out here.

* :func:`random_resized_crop` -- the Inception / ResNet training crop (area fraction in
  ``scale``, aspect ratio log-uniform in ``ratio``, up to 10 tries, then a centre crop),
  with every random choice taken from uniforms the caller passes in, so the caller decides
  where randomness comes from (here: :func:`logitpair.rng.keyed_uniform`, per sample).
* :func:`resize_center_crop` -- the evaluation transform: resize the shorter side to
  ``size / crop_fraction`` (256 for 224 at the usual 0.875), then take the centre ``size``
  square.
* :func:`train_augment` -- random-resized crop then horizontal flip, from
  ``TRAIN_UNIFORMS`` uniforms.

Outputs are float32 in [0, 1]. Resizing is bilinear with antialiasing (as PIL and
torchvision >= 0.17 do). Example::

    img = decode_image(path)                      # uint8 (3, H, W)
    u = keyed_uniform(idx, (TRAIN_UNIFORMS,), seed=key)[0]
    x = train_augment(img, 224, u)                # float32 (3, 224, 224)
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor

ATTEMPTS = 10
RRC_UNIFORMS = 2 * ATTEMPTS + 2  # (area, log-ratio) per attempt, then (top, left)
TRAIN_UNIFORMS = RRC_UNIFORMS + 1  # ... then the flip


def to_float(img: Tensor) -> Tensor:
    """uint8 in [0, 255] -> float32 in [0, 1]; a float tensor is returned as float32 unchanged."""
    if img.dtype == torch.uint8:
        return img.to(torch.float32).div_(255.0)
    return img.to(torch.float32)


def crop(img: Tensor, top: int, left: int, height: int, width: int) -> Tensor:
    """The ``height`` x ``width`` window of a CHW image starting at (top, left) (a view)."""
    return img[..., top : top + height, left : left + width]


def hflip(img: Tensor) -> Tensor:
    """Mirror a CHW image left-right."""
    return img.flip(-1)


def resize(img: Tensor, size: tuple[int, int]) -> Tensor:
    """Bilinear, antialiased resize of a CHW image to ``size = (height, width)``; float32 in [0, 1] out."""
    x = to_float(img)
    if tuple(x.shape[-2:]) == tuple(size):
        return x
    out = F.interpolate(x.unsqueeze(0), size=size, mode="bilinear", align_corners=False, antialias=True)
    return out.squeeze(0).clamp_(0.0, 1.0)


def center_crop(img: Tensor, size: int) -> Tensor:
    """The centre ``size`` x ``size`` square of a CHW image at least that large (torchvision rounding)."""
    h, w = img.shape[-2:]
    if h < size or w < size:
        raise ValueError(f"center_crop: image {h}x{w} is smaller than {size}x{size}")
    return crop(img, round((h - size) / 2.0), round((w - size) / 2.0), size, size)


def resize_center_crop(img: Tensor, size: int, crop_fraction: float = 0.875) -> Tensor:
    """Evaluation transform: shorter side -> ``round(size / crop_fraction)``, then the centre ``size`` square."""
    h, w = img.shape[-2:]
    short = max(size, round(size / crop_fraction))
    if h <= w:
        new = (short, max(short, round(w * short / h)))
    else:
        new = (max(short, round(h * short / w)), short)
    return center_crop(resize(img, new), size)


def random_resized_crop_box(
    height: int,
    width: int,
    u: Tensor,
    scale: tuple[float, float] = (0.08, 1.0),
    ratio: tuple[float, float] = (3 / 4, 4 / 3),
) -> tuple[int, int, int, int]:
    """``(top, left, h, w)`` of a random-resized crop of a ``height`` x ``width`` image.

    ``u`` holds at least ``RRC_UNIFORMS`` uniforms in (0, 1): attempt ``k`` uses ``u[2k]``
    for the area fraction (uniform in ``scale``) and ``u[2k+1]`` for the log aspect ratio
    (uniform in ``log(ratio)``); the first box that fits is placed with ``u[2 * ATTEMPTS]``
    (row) and ``u[2 * ATTEMPTS + 1]`` (column). If none of the ``ATTEMPTS`` fits,
    the whole image is centre-cropped to the nearest allowed aspect ratio (torchvision's fallback).
    """
    vals = [float(v) for v in u[:RRC_UNIFORMS].tolist()]
    if len(vals) < RRC_UNIFORMS:
        raise ValueError(f"random_resized_crop_box: need {RRC_UNIFORMS} uniforms, got {len(vals)}")
    area = height * width
    lo, hi = math.log(ratio[0]), math.log(ratio[1])
    for k in range(ATTEMPTS):
        target = area * (scale[0] + (scale[1] - scale[0]) * vals[2 * k])
        aspect = math.exp(lo + (hi - lo) * vals[2 * k + 1])
        w = round(math.sqrt(target * aspect))
        h = round(math.sqrt(target / aspect))
        if 0 < w <= width and 0 < h <= height:
            top = min(int(vals[2 * ATTEMPTS] * (height - h + 1)), height - h)
            left = min(int(vals[2 * ATTEMPTS + 1] * (width - w + 1)), width - w)
            return top, left, h, w
    in_ratio = width / height
    if in_ratio < ratio[0]:
        w, h = width, round(width / ratio[0])
    elif in_ratio > ratio[1]:
        w, h = round(height * ratio[1]), height
    else:
        w, h = width, height
    return (height - h) // 2, (width - w) // 2, h, w


def random_resized_crop(
    img: Tensor,
    size: int,
    u: Tensor,
    scale: tuple[float, float] = (0.08, 1.0),
    ratio: tuple[float, float] = (3 / 4, 4 / 3),
) -> Tensor:
    """Crop the box of :func:`random_resized_crop_box` and resize it to ``size`` x ``size`` (float32)."""
    top, left, h, w = random_resized_crop_box(img.shape[-2], img.shape[-1], u, scale, ratio)
    return resize(crop(img, top, left, h, w), (size, size))


def train_augment(img: Tensor, size: int, u: Tensor) -> Tensor:
    """ImageNet training augmentation: random-resized crop, then a horizontal flip when ``u[RRC_UNIFORMS] < 0.5``.

    ``u`` holds ``TRAIN_UNIFORMS`` uniforms in (0, 1).
    """
    out = random_resized_crop(img, size, u)
    return hflip(out) if float(u[RRC_UNIFORMS]) < 0.5 else out
