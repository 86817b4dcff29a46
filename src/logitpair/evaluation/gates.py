"""Gates: protocol-level conditions that let a suite spend its budget where it matters.

An :class:`~logitpair.evaluation.spec.AttackSpec` of a suite may carry, in its ``params``,
the keys of :data:`GATE_KEYS`; the protocol takes them out before calling the attack and
runs the attack only on the still-robust points the gate selects (possibly none):

- ``gate="near"``, ``max_margin=m``: the points whose *remaining margin* is below ``m``.
  The remaining margin of a point is ``min over the attacks so far of margin(x_adv) /
  margin(x)`` with ``margin = z_y - max_{i != y} z_i``: the fraction of its clean margin
  that the best attack so far left. It is invariant to the scale of the logits (logit
  squeezing shrinks both), 1 for a point no attack moved towards the boundary, near 0 for
  one an attack almost broke. Points far from the boundary after the cheap attacks are the
  ones the expensive attacks do not break (measured, see docs/PERFORMANCE.md), so their
  budget stops there.
- ``gate="masking"``: all points, but only if a gradient-masking signal fired on this batch,
  else none. The signals (:meth:`BatchSignals.masking`):

  1. the gradient-free attacks (Square, noise), run after the gradient attacks, broke more
     than ``square_rate`` (default 0.002) of the batch's points: the gradients mislead. This is
     AutoAttack's own warning (``checks.check_square_sr``: Square lowering the robust accuracy
     by more than 0.2 points). One lucky Square success in a batch of 500 does not fire it;
     in a batch of fewer than 500 points one does;
  2. on at least ``min_flat`` (default 0.05) of the points the gradient attacks did not
     lower the margin at all (remaining margin >= 1): the gradients do not lead anywhere
     (zero, saturated or shattered gradients);
  3. a non-finite logit appeared at a clean or adversarial point.

Signals are computed per protocol batch from the logits the protocol computes anyway (no
extra passes). Suites without gate keys never build them, so their results do not change.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from logitpair.errors import ConfigError

GATE_KEYS = ("gate", "max_margin", "min_flat", "square_rate")
GATES = ("near", "masking")
GRADIENT_FREE = frozenset({"square", "noise"})
MIN_FLAT = 0.05
SQUARE_RATE = 0.002


def split_params(params: dict[str, Any]) -> tuple[dict[str, Any], dict[str, Any]]:
    """``params`` -> (keyword arguments of the attack, the gate's settings; empty if none)."""
    kwargs = {k: v for k, v in params.items() if k not in GATE_KEYS}
    gate = {k: v for k, v in params.items() if k in GATE_KEYS}
    if gate:
        check_gate(gate)
    return kwargs, gate


def check_gate(gate: dict[str, Any]) -> None:
    kind = gate.get("gate")
    if kind not in GATES:
        raise ConfigError(f"gate: expected one of {', '.join(GATES)}, got {kind!r} (settings {gate})")
    if kind == "near" and not (isinstance(gate.get("max_margin"), (int, float)) and gate["max_margin"] > 0):
        raise ConfigError(f"gate=near needs max_margin > 0, got {gate.get('max_margin')!r}")
    if kind == "masking" and not 0 < gate.get("min_flat", MIN_FLAT) <= 1:
        raise ConfigError(f"gate=masking: min_flat must be in (0, 1], got {gate.get('min_flat')!r}")
    if kind == "masking" and not 0 <= gate.get("square_rate", SQUARE_RATE) < 1:
        raise ConfigError(f"gate=masking: square_rate must be in [0, 1), got {gate.get('square_rate')!r}")


def has_gates(attacks: list[Any]) -> bool:
    return any(k in a.params for a in attacks for k in GATE_KEYS)


def margin(logits: Tensor, y: Tensor) -> Tensor:
    """``z_y - max_{i != y} z_i`` per example (negative: misclassified)."""
    z_y = logits.gather(1, y[:, None]).squeeze(1)
    others = logits.scatter(1, y[:, None], -float("inf"))
    return z_y - others.max(1).values


@dataclass
class BatchSignals:
    """What the attacks so far revealed about one protocol batch (for the gates)."""

    clean_margin: Tensor  # (b,)
    best_margin: Tensor  # (b,) lowest margin seen at any attack's output (the clean one before)
    gradient_moved: Tensor  # (b,) bool: a gradient attack lowered the margin below the clean one
    gradient_attacked: Tensor  # (b,) bool: a gradient attack ran on the point
    gradient_free_broke: int = 0  # points broken by gradient-free attacks
    nonfinite: bool = False

    @classmethod
    def start(cls, logits: Tensor, y: Tensor) -> BatchSignals:
        m = margin(logits, y)
        zeros = torch.zeros(len(y), dtype=torch.bool, device=m.device)
        return cls(m, m.clone(), zeros, zeros.clone(), nonfinite=not bool(torch.isfinite(logits).all()))

    def remaining(self) -> Tensor:
        """Fraction of the clean margin left after the best attack so far (see the module doc)."""
        return self.best_margin / self.clean_margin.clamp_min(torch.finfo(self.clean_margin.dtype).tiny)

    def masking(self, min_flat: float = MIN_FLAT, square_rate: float = SQUARE_RATE) -> dict[str, bool]:
        """The three signals of the module docstring."""
        attacked = int(self.gradient_attacked.sum())
        flat = int((self.gradient_attacked & ~self.gradient_moved).sum())
        return {
            "gradient_free_broke": self.gradient_free_broke > square_rate * len(self.clean_margin),
            "flat_gradients": attacked > 0 and flat >= min_flat * attacked,
            "nonfinite": self.nonfinite,
        }

    def select(self, gate: dict[str, Any], idx: Tensor) -> Tensor:
        """The subset of the still-robust points ``idx`` the gate lets the attack run on."""
        if not gate:
            return idx
        if gate["gate"] == "near":
            return idx[~(self.remaining()[idx] >= gate["max_margin"])]  # a NaN margin is never skipped
        fired = any(self.masking(gate.get("min_flat", MIN_FLAT), gate.get("square_rate", SQUARE_RATE)).values())
        return idx if fired else idx[:0]

    def update(self, name: str, idx: Tensor, adv_logits: Tensor, y: Tensor, newly_broken: Tensor) -> None:
        """Record attack ``name``'s outcome on the points ``idx`` (``adv_logits`` at its output)."""
        m = margin(adv_logits, y)
        self.nonfinite |= not bool(torch.isfinite(adv_logits).all())
        if name in GRADIENT_FREE:
            self.gradient_free_broke += int(newly_broken.sum())
        else:
            self.gradient_attacked[idx] = True
            self.gradient_moved[idx] |= m < self.clean_margin[idx]
        self.best_margin[idx] = torch.minimum(self.best_margin[idx], m)
