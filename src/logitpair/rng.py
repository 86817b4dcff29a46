"""Counter-based random numbers keyed per sample: the same sample gets the same noise
whichever process, batch or position it lands in.

``keyed_uniform(keys, shape, seed, stream)`` hashes (seed, stream, key, element position)
with a 32-bit integer mixer (the "lowbias32" finaliser) in plain torch integer ops, so it
runs on any device without host synchronisation and without a ``torch.Generator``. It is
what makes random starts and noise augmentation independent of the number of data-parallel
processes: a sample's random start depends on (seed, epoch, its dataset index) only.
Quality: 24-bit uniforms, ample for random starts and augmentation (not for cryptography).
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

_MASK = 0xFFFFFFFF


def _mix32(h: Tensor) -> Tensor:
    """lowbias32 finaliser on int64 tensors holding values in [0, 2**32)."""
    h = h ^ (h >> 16)
    h = (h * 0x7FEB352D) & _MASK  # int64 products wrap; the low 32 bits stay exact
    h = h ^ (h >> 15)
    h = (h * 0x846CA68B) & _MASK
    return h ^ (h >> 16)


def _scalar_mix(*values: int) -> int:
    h = 0x9E3779B9
    for v in values:
        h = int(_mix32(torch.tensor((h ^ (v & _MASK)) & _MASK, dtype=torch.int64)))
    return h


def keyed_bits(keys: Tensor, shape: tuple[int, ...], seed: int, stream: int = 0) -> Tensor:
    """int64 tensor of shape ``(len(keys), *shape)`` with 32 random bits per element."""
    base = _scalar_mix(seed, stream, seed >> 32)
    per_key = _mix32((keys.to(torch.int64) & _MASK) ^ base).view(-1, *([1] * len(shape)))
    numel = math.prod(shape)
    pos = torch.arange(numel, device=keys.device, dtype=torch.int64).view(1, *shape)
    return _mix32(_mix32(per_key ^ pos) ^ ((per_key * 0x27D4EB2F) & _MASK))


def keyed_uniform(
    keys: Tensor, shape: tuple[int, ...], seed: int, stream: int = 0, dtype: torch.dtype = torch.float32
) -> Tensor:
    """Uniform in (0, 1), one value per (key, element)."""
    bits = keyed_bits(keys, shape, seed, stream) >> 8
    return (bits.to(torch.float64) + 0.5).mul_(2.0**-24).to(dtype)


def keyed_normal(
    keys: Tensor, shape: tuple[int, ...], seed: int, stream: int = 0, dtype: torch.dtype = torch.float32
) -> Tensor:
    """Standard normal by Box-Muller from two keyed uniform streams."""
    u1 = keyed_uniform(keys, shape, seed, 2 * stream + 1_000_003, torch.float64)
    u2 = keyed_uniform(keys, shape, seed, 2 * stream + 1_000_004, torch.float64)
    return (torch.sqrt(-2.0 * torch.log(u1)) * torch.cos(2.0 * math.pi * u2)).to(dtype)
