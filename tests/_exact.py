"""An exact reference for tiny networks: the minimum of each margin over a box, by enumerating the
linear regions (ReLU activation patterns, max-pool winners) with one LP each.

Independent of ``logitpair.bounds``: each layer of an ``nn.Sequential`` (Linear, Conv2d, ReLU,
MaxPool2d with kernel = stride, Flatten) is read from torch in float64. A depth-first search fixes
one unit at a time (a ReLU active or inactive, a window's winner) and prunes a branch as soon as
its linear constraints are infeasible over the box (``scipy.optimize.linprog``), so only the
regions the box meets are solved.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, field

import numpy as np
import torch
from scipy.optimize import linprog
from torch import nn


@dataclass
class _Region:
    """The current layer as ``A x + b`` on a region ``G x ≤ h`` of the box."""

    A: np.ndarray
    b: np.ndarray
    G: list[np.ndarray] = field(default_factory=list)
    h: list[float] = field(default_factory=list)

    def constrain(self, g: np.ndarray, h: float) -> _Region:
        return _Region(self.A, self.b, [*self.G, g], [*self.h, h])


def _affine(layer: nn.Module, shape: tuple[int, ...]) -> tuple[np.ndarray, np.ndarray, tuple[int, ...]]:
    """``(L, c, out_shape)`` with ``layer(z) = L z + c`` on flattened inputs of ``shape`` (float64)."""
    n = int(np.prod(shape))
    layer = copy.deepcopy(layer).double()
    with torch.no_grad():
        zero = layer(torch.zeros(1, *shape, dtype=torch.float64))
        cols = layer(torch.eye(n, dtype=torch.float64).view(n, *shape)) - zero
    return cols.reshape(n, -1).T.numpy(), zero.flatten().numpy(), tuple(zero.shape[1:])


def _feasible(r: _Region, box: list[tuple[float, float]]) -> bool:
    if not r.G:
        return True
    res = linprog(np.zeros(len(box)), A_ub=np.array(r.G), b_ub=np.array(r.h), bounds=box, method="highs")
    return res.status == 0


def _relu_branches(r: _Region, i: int) -> list[tuple[_Region, int]]:
    """Unit ``i`` active (``a x + b ≥ 0``, output kept) or inactive (``≤ 0``, output 0)."""
    a, b = r.A[i], r.b[i]
    dead = _Region(r.A.copy(), r.b.copy(), r.G, r.h)
    dead.A[i], dead.b[i] = 0.0, 0.0
    return [(r.constrain(-a, b), i), (dead.constrain(a, -b), i)]


def _pool_windows(shape: tuple[int, ...], k: int) -> list[list[int]]:
    c, h, w = shape
    return [
        [ch * h * w + (i * k + a) * w + (j * k + b) for a in range(k) for b in range(k)]
        for ch in range(c) for i in range(h // k) for j in range(w // k)
    ]  # fmt: skip


def _winner_branches(r: _Region, window: list[int]) -> list[tuple[_Region, int]]:
    """Each element of the window the max (≥ every other element)."""
    branches = []
    for win in window:
        s = r
        for other in window:
            if other != win:
                s = s.constrain(r.A[other] - r.A[win], r.b[win] - r.b[other])
        branches.append((s, win))
    return branches


def _fix(r: _Region, units: list, branch, box, then, chosen: tuple[int, ...] = ()) -> None:
    """Fix ``units`` one by one (``branch(region, unit)`` gives the regions and choices), pruning
    the infeasible ones; ``then(region, choices)`` once all are fixed."""
    if not units:
        then(r, chosen)
        return
    for s, choice in branch(r, units[0]):
        if _feasible(s, box):
            _fix(s, units[1:], branch, box, then, (*chosen, choice))


def _search(layers: list[nn.Module], k: int, shape: tuple[int, ...], r: _Region, box, finish) -> None:
    """Depth-first over the units of layer ``k`` onward; ``finish(region)`` at the logits."""
    if k == len(layers):
        finish(r)
        return
    layer = layers[k]
    if isinstance(layer, nn.ReLU):
        _fix(r, list(range(len(r.b))), _relu_branches, box, lambda s, _: _search(layers, k + 1, shape, s, box, finish))
    elif isinstance(layer, nn.MaxPool2d):
        kk = layer.kernel_size if isinstance(layer.kernel_size, int) else layer.kernel_size[0]
        out_shape = (shape[0], shape[1] // kk, shape[2] // kk)

        def pooled(s: _Region, winners: tuple[int, ...]) -> None:
            rows = list(winners)
            _search(layers, k + 1, out_shape, _Region(s.A[rows], s.b[rows], s.G, s.h), box, finish)

        _fix(r, _pool_windows(shape, kk), _winner_branches, box, pooled)
    else:
        L, c, out_shape = _affine(layer, shape)
        _search(layers, k + 1, out_shape, _Region(L @ r.A, L @ r.b + c, r.G, r.h), box, finish)


def exact_min_margins(model: nn.Sequential, x: torch.Tensor, y: int, eps: float) -> np.ndarray:
    """(K,): the minimum of ``f_y − f_j`` over the ball ``|x' − x|∞ ≤ eps`` ∩ [0, 1] for every ``j``
    (+inf at ``y``), exact up to the LP solver's tolerance. ``x``: one point, without batch dimension."""
    x64 = x.detach().double().flatten().numpy()
    box = list(zip(np.clip(x64 - eps, 0, 1), np.clip(x64 + eps, 0, 1)))
    best: dict[int, float] = {}

    def finish(r: _Region) -> None:
        g, h = (np.array(r.G), np.array(r.h)) if r.G else (None, None)
        for j in range(len(r.b)):
            if j != y:
                res = linprog(r.A[y] - r.A[j], A_ub=g, b_ub=h, bounds=box, method="highs")
                if res.status == 0:
                    best[j] = min(best.get(j, np.inf), res.fun + r.b[y] - r.b[j])

    n = len(x64)
    _search(list(model), 0, tuple(x.shape), _Region(np.eye(n), np.zeros(n)), box, finish)
    k = int(model(x[None]).shape[1])
    return np.array([best.get(j, np.inf) for j in range(k)])
