"""Threat models as values.

A threat model says which perturbed inputs are allowed: a ball of radius ``eps`` in some norm
around the clean input, intersected with the input ``bounds``. Attacks are typed against the
interface :class:`Threat` and never re-derive clipping themselves: they call
:meth:`Threat.random_init` for random starts, :meth:`Threat.step` for a steepest-ascent step
(followed by the projection) and :meth:`Threat.project` for given starts. :class:`Linf`
implements it today; another norm (e.g. L2) is one more subclass with the same five methods.

Example::

    threat = Linf(0.1)
    x0 = threat.random_init(x, generator=g)          # uniform in the eps-ball, inside bounds
    x1 = threat.step(x, x0, grad, 0.01)               # x0 + 0.01 * sign(grad), back into ball and bounds
    assert threat.contains(x, x1).all()
    threat.to_dict()                                  # {"norm": "Linf", "eps": 0.1, "bounds": [0.0, 1.0]}
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
        one for the L-infinity ball."""

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


def require_linf(threat: Threat, attack: str) -> Linf:
    """``threat`` itself if it is an L-infinity ball, else a ConfigError: ``attack`` (its name
    in the message) supports no other norm."""
    if not isinstance(threat, Linf):
        raise ConfigError(f"{attack} supports the Linf threat model only, got {threat!r}")
    return threat
