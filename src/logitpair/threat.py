"""Threat models as values.

A threat model says which perturbed inputs are allowed. Attacks receive one and never
re-derive clipping themselves: they call :meth:`Linf.project` after each step and
:meth:`Linf.random_init` for random starts.

Example::

    threat = Linf(0.1)
    x0 = threat.random_init(x, generator=g)          # uniform in the eps-ball, inside bounds
    x1 = threat.project(x, x0 + 0.01 * grad.sign())   # back into ball and bounds
    assert threat.contains(x, x1).all()
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from fractions import Fraction

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


@dataclass(frozen=True)
class Linf:
    """L-infinity ball of radius ``eps`` around the clean input, clipped to ``bounds``.

    Inputs are images in ``bounds`` (default ``[0, 1]``), any shape; ``eps`` is a scalar in
    the same units (never per channel).
    """

    eps: float
    bounds: tuple[float, float] = (0.0, 1.0)

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
