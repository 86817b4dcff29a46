"""Threat models as values.

A threat model says which perturbed inputs are allowed: a ball of radius ``eps`` in some norm
around the clean input, intersected with the input ``bounds``. Attacks are typed against the
interface :class:`Threat` and never re-derive clipping themselves: they call
:meth:`Threat.random_init` for random starts, :meth:`Threat.step` for a steepest-ascent step
(followed by the projection) and :meth:`Threat.project` for given starts. :class:`Linf` and
:class:`L2` implement it; another norm is one more subclass with the same five methods.
:func:`make_threat` builds one from a norm's name (``"linf"``, ``"l2"``) and a radius.

Example::

    threat = Linf(0.1)
    x0 = threat.random_init(x, generator=g)          # uniform in the eps-ball, inside bounds
    x1 = threat.step(x, x0, grad, 0.01)               # x0 + 0.01 * sign(grad), back into ball and bounds
    assert threat.contains(x, x1).all()
    threat.to_dict()                                  # {"norm": "Linf", "eps": 0.1, "bounds": [0.0, 1.0]}
    L2(0.5).step(x, x0, grad, 0.1)                    # x0 + 0.1 * grad / ||grad||_2, exact projection
"""

from __future__ import annotations

import math
from abc import ABC, abstractmethod
from dataclasses import dataclass
from fractions import Fraction
from typing import Any

import torch
from torch import Tensor

from logitpair.errors import ConfigError


def parse_fraction(value: str | float, name: str = "value") -> float:
    """Parse ``0.1``, ``"8/255"`` or ``"0.03"`` into a float without ``eval``."""
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return float(value)
    text = str(value).strip()
    try:
        return float(Fraction(text))
    except OverflowError:
        shown = text if len(text) <= 40 else text[:37] + "..."
        raise ConfigError(f"{name}: number too large: {shown!r}") from None
    except (ValueError, ZeroDivisionError) as exc:
        raise ConfigError(f"{name}: expected a number such as 0.1 or 8/255, got {value!r}") from exc


class Threat(ABC):
    """The interface attacks are typed against: a ball of radius ``eps`` in the norm :attr:`norm`
    around the clean input, intersected with the box ``bounds``.

    Inputs ``x`` (clean) and ``x_adv`` (perturbed) are tensors of the same shape ``(N, ...)``;
    ``eps`` is a scalar in the units of the inputs (never per channel). Subclasses are frozen
    dataclasses with the fields ``eps`` and ``bounds = (0.0, 1.0)``; :meth:`__post_init__` here
    validates both. A norm implements :attr:`norm`, :meth:`project`, :meth:`random_init`,
    :meth:`step` and :meth:`contains`; :meth:`to_dict` (the record in reports) comes with it.
    """

    eps: float
    bounds: tuple[float, float]

    def __post_init__(self) -> None:
        eps = float(self.eps)
        if not (math.isfinite(eps) and eps >= 0.0):
            raise ConfigError(f"eps: expected a finite number >= 0, got {self.eps!r}")
        lo, hi = (float(b) for b in self.bounds)
        if not lo < hi:
            raise ConfigError(f"bounds: expected (low, high) with low < high, got {self.bounds!r}")
        object.__setattr__(self, "eps", eps)
        object.__setattr__(self, "bounds", (lo, hi))

    @property
    @abstractmethod
    def norm(self) -> str:
        """The norm's name as reports write it, e.g. ``"Linf"``."""

    @abstractmethod
    def project(self, x: Tensor, x_adv: Tensor) -> Tensor:
        """A point of the ball around ``x`` (inside the bounds) close to ``x_adv``: the closest
        one for :class:`Linf` and :class:`L2`."""

    @abstractmethod
    def random_init(self, x: Tensor, generator: torch.Generator | None = None) -> Tensor:
        """A random start inside the ball around ``x`` and inside the bounds."""

    @abstractmethod
    def step(self, x: Tensor, x_adv: Tensor, grad: Tensor, step_size: float | Tensor) -> Tensor:
        """``x_adv`` moved by ``step_size`` along the steepest ascent direction of ``grad`` for
        this norm (L-infinity: its sign), then projected into the ball and bounds.

        ``step_size``: a number, or a tensor broadcasting against ``x`` (one per example)."""

    @abstractmethod
    def contains(self, x: Tensor, x_adv: Tensor, tol: float = 1e-6) -> Tensor:
        """Per-example boolean ``(N,)``: is ``x_adv`` inside the ball (and bounds) up to ``tol``?"""

    def to_dict(self) -> dict[str, Any]:
        """The threat as JSON: ``{"norm": ..., "eps": ..., "bounds": [low, high]}``."""
        return {"norm": self.norm, "eps": self.eps, "bounds": list(self.bounds)}

    def distance(self, x: Tensor, x_adv: Tensor) -> Tensor:
        """Per-example distance ``(N,)`` of ``x_adv`` from ``x`` in this norm (:func:`lp_norm`)."""
        return lp_norm(x_adv - x, self.norm)


def lp_norm(delta: Tensor, norm: str) -> Tensor:
    """Per-example norm ``(N,)`` of ``delta`` (N, ...) over all non-batch dimensions; ``norm`` is
    ``"Linf"`` or ``"L2"`` (a :attr:`Threat.norm`)."""
    flat = delta.flatten(1)
    if norm == "Linf":
        return flat.abs().amax(1)
    if norm == "L2":
        return flat.norm(dim=1)
    raise ConfigError(f"unknown norm {norm!r}; known: Linf, L2")


@dataclass(frozen=True)
class Linf(Threat):
    """L-infinity ball of radius ``eps`` around the clean input, clipped to ``bounds``.

    Inputs are images in ``bounds`` (default ``[0, 1]``), any shape; ``eps`` is a scalar in
    the same units (never per channel).
    """

    eps: float
    bounds: tuple[float, float] = (0.0, 1.0)

    @property
    def norm(self) -> str:
        return "Linf"

    def project(self, x: Tensor, x_adv: Tensor) -> Tensor:
        """Closest point to ``x_adv`` inside the eps-ball around ``x`` and inside the bounds."""
        lo, hi = self.bounds
        delta = (x_adv - x).clamp(-self.eps, self.eps)
        return (x + delta).clamp(lo, hi)

    def random_init(self, x: Tensor, generator: torch.Generator | None = None) -> Tensor:
        """Uniform sample from the eps-ball around ``x``, then clipped to the bounds."""
        noise = torch.rand(x.shape, generator=generator, device=x.device, dtype=x.dtype)
        return self.project(x, x + (2.0 * noise - 1.0) * self.eps)

    def random_corner(self, x: Tensor, generator: torch.Generator | None = None) -> Tensor:
        """``x`` plus a random sign vector times eps (a vertex of the ball), clipped."""
        signs = torch.randint(0, 2, x.shape, generator=generator, device=x.device).to(x.dtype)
        return self.project(x, x + (2.0 * signs - 1.0) * self.eps)

    def step(self, x: Tensor, x_adv: Tensor, grad: Tensor, step_size: float | Tensor) -> Tensor:
        """Steepest-ascent step for the L-infinity norm (signed gradient), then projection."""
        return self.project(x, x_adv + step_size * grad.sign())

    def contains(self, x: Tensor, x_adv: Tensor, tol: float = 1e-6) -> Tensor:
        """Per-example boolean: is ``x_adv`` inside the ball (and bounds) up to ``tol``?"""
        lo, hi = self.bounds
        inside_ball = ((x_adv - x).abs() <= self.eps + tol).flatten(1).all(1)
        inside_box = ((x_adv >= lo - tol) & (x_adv <= hi + tol)).flatten(1).all(1)
        return inside_ball & inside_box


@dataclass(frozen=True)
class L2(Threat):
    """L2 ball of radius ``eps`` around the clean input, intersected with ``bounds``.

    Norms are per example over all non-batch dimensions (an image's channels and pixels
    together); ``eps`` is a scalar in the units of the inputs. Example::

        threat = L2(0.5)
        x1 = threat.step(x, x0, grad, 0.1)     # x0 + 0.1 * grad / ||grad||_2, then project
        threat.distance(x, x1)                 # (N,) L2 norms of x1 - x, all <= 0.5
    """

    eps: float
    bounds: tuple[float, float] = (0.0, 1.0)

    @property
    def norm(self) -> str:
        return "L2"

    def project(self, x: Tensor, x_adv: Tensor) -> Tensor:
        """The closest point to ``x_adv`` inside the L2 ball around ``x`` *and* the bounds (exact,
        up to float round-off), for ``x`` inside the bounds.

        With ``d = x_adv - x`` and the box ``[l, u] = [lo - x, hi - x]`` (which holds 0), the
        projection onto {||d'|| <= eps, l <= d' <= u} minimises ``||d' - d||^2 + mu ||d'||^2`` over
        the box for the right multiplier ``mu >= 0``; coordinate-wise that is
        ``d' = clip(s * d, l, u)`` with ``s = 1 / (1 + mu)`` in (0, 1]. ``||clip(s * d, l, u)||`` grows
        with ``s``, so ``s = 1`` when the clipped point already lies in the ball, else the ``s`` at
        which its norm is ``eps``, found exactly by sorting the coordinates' clipping points
        (:func:`_ball_box_scale`). The result is inside the box by the final clip and inside the
        ball because ``||clip(s * d)|| <= eps`` for that ``s`` (float32 round-off aside: ~1e-7
        relative, which :meth:`contains` allows). AutoAttack's rescale-then-clip is
        ``clip(eps / ||d|| * d)``, the same family with a smaller ``s``: inside both sets too, but
        short of the ball's surface whenever a coordinate is clipped. Costs one sort of the
        coordinates per example.
        """
        lo, hi = self.bounds
        delta = x_adv - x
        s = _ball_box_scale(delta.flatten(1), (lo - x).flatten(1), (hi - x).flatten(1), self.eps)
        delta = delta * s.view((-1,) + (1,) * (x.dim() - 1))
        return (x + delta).clamp(lo, hi)

    def random_init(self, x: Tensor, generator: torch.Generator | None = None) -> Tensor:
        """A uniform sample from the L2 ball around ``x`` (a Gaussian direction, normalised, times
        the radius ``eps * U^(1/d)``), then clipped to the bounds: for ``x`` inside the bounds,
        clipping moves every coordinate towards ``x``, so the point stays in the ball (clipping is
        :meth:`project` here)."""
        n, d = len(x), x[0].numel()
        g = torch.randn(x.shape, generator=generator, device=x.device, dtype=x.dtype)
        u = torch.rand((n,), generator=generator, device=x.device, dtype=x.dtype)
        radius = self.eps * u.pow(1.0 / max(d, 1))
        return (x + _unit(g) * radius.view((-1,) + (1,) * (x.dim() - 1))).clamp(*self.bounds)

    def step(self, x: Tensor, x_adv: Tensor, grad: Tensor, step_size: float | Tensor) -> Tensor:
        """Steepest-ascent step for the L2 norm, ``x_adv + step_size * grad / ||grad||_2`` per
        example (no move where the gradient is zero), then :meth:`project`."""
        return self.project(x, x_adv + step_size * _unit(grad))

    def contains(self, x: Tensor, x_adv: Tensor, tol: float = 1e-6) -> Tensor:
        """Per-example boolean: ``||x_adv - x||_2 <= eps`` (up to ``tol * (1 + eps)``; the norm is
        summed in float64) and ``x_adv`` inside the bounds (up to ``tol``)."""
        lo, hi = self.bounds
        dist = (x_adv.double() - x.double()).flatten(1).norm(dim=1)
        inside_ball = dist <= self.eps + tol * (1.0 + self.eps)
        inside_box = ((x_adv >= lo - tol) & (x_adv <= hi + tol)).flatten(1).all(1)
        return inside_ball & inside_box


def _unit(v: Tensor) -> Tensor:
    """``v / ||v||_2`` per example (zero where ``v`` is zero)."""
    norms = v.flatten(1).norm(dim=1)
    scale = torch.where(norms > 0, 1.0 / norms.clamp_min(torch.finfo(v.dtype).tiny), torch.zeros_like(norms))
    return v * scale.view((-1,) + (1,) * (v.dim() - 1))


def _ball_box_scale(d: Tensor, low: Tensor, high: Tensor, eps: float) -> Tensor:
    """Per row, the largest ``s`` in [0, 1] with ``||clip(s * d, low, high)||_2 <= eps`` (rows of
    shape (n, D), ``low <= 0 <= high``).

    Coordinate ``i`` is clipped once ``s >= t_i = room_i / |d_i|`` (``room_i``: the distance to the
    box in the direction of ``d_i``), so ``f(s) = ||clip(s d)||^2 = sum_{t_i <= s} room_i^2 + s^2
    sum_{t_i > s} d_i^2``, continuous and non-decreasing. Sorting the ``t_i`` gives ``f`` at every
    breakpoint; on the segment where ``f`` crosses ``eps^2`` it is ``R + s^2 A``, so
    ``s = sqrt((eps^2 - R) / A)``. Coordinates with ``d_i = 0`` (or no room) get ``t_i = 0``.
    """
    room = torch.where(d > 0, high, -low).clamp_min(0.0)
    mag = d.abs()
    moving = (mag > 0) & (room > 0)
    t = torch.where(moving, room / torch.where(moving, mag, torch.ones_like(mag)), torch.zeros_like(mag))
    t, order = t.sort(1)
    room2 = torch.where(moving, room, torch.zeros_like(room)).square().gather(1, order)
    d2 = torch.where(moving, mag, torch.zeros_like(mag)).square().gather(1, order)
    zero = d.new_zeros(len(d), 1)
    saturated = torch.cat((zero, room2.cumsum(1)), 1)  # R_k: the k smallest t_i clipped
    free = d2.sum(1, keepdim=True) - torch.cat((zero, d2.cumsum(1)), 1)  # A_k: the rest, d_i^2
    at_break = saturated[:, 1:] + t.square() * free[:, 1:]  # f(t_(k))
    k = (at_break <= eps * eps).sum(1, keepdim=True)  # f crosses eps^2 after the k-th breakpoint
    r, a = saturated.gather(1, k).squeeze(1), free.gather(1, k).squeeze(1)
    s = ((eps * eps - r).clamp_min(0.0) / a.clamp_min(torch.finfo(d.dtype).tiny)).sqrt()
    return torch.where(a > 0, s.clamp(max=1.0), torch.ones_like(s))


def make_threat(norm: str, eps: float, bounds: tuple[float, float] = (0.0, 1.0)) -> Threat:
    """The threat model of a norm named on the command line or in a file: ``"linf"`` (also
    ``"Linf"``, ``"inf"``) or ``"l2"`` (``"L2"``), radius ``eps``."""
    kind = THREATS.get(str(norm).lower())
    if kind is None:
        raise ConfigError(f"unknown norm {norm!r}; known: {', '.join(NORM_NAMES)}", option="norm")
    return kind(eps, bounds)


THREATS: dict[str, type[Linf | L2]] = {"linf": Linf, "inf": Linf, "l2": L2}
NORM_NAMES = ("linf", "l2")
"""The norms' names as options take them (:func:`make_threat`)."""


def require_norm(threat: Threat, norms: tuple[str, ...], attack: str) -> Threat:
    """``threat`` itself if its norm is one of ``norms`` (e.g. ``("Linf", "L2")``), else a
    ConfigError naming ``attack`` and the norms it supports."""
    if threat.norm not in norms:
        supported = " and ".join(norms)
        raise ConfigError(f"{attack} supports the {supported} threat models only, got {threat!r}")
    return threat


def require_linf(threat: Threat, attack: str) -> Linf:
    """``threat`` itself if it is an L-infinity ball, else a ConfigError: ``attack`` (its name
    in the message) supports no other norm."""
    if not isinstance(threat, Linf):
        raise ConfigError(f"{attack} supports the Linf threat model only, got {threat!r}")
    return threat
