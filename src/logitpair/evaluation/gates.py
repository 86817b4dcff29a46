"""Gates: protocol-level conditions that let a suite spend its budget where it matters.

An :class:`~logitpair.evaluation.spec.AttackSpec` of a suite may carry, in its ``params``,
the keys of :data:`GATE_KEYS`; the protocol takes them out before calling the attack and
runs the attack only on the still-robust points the gate selects (possibly none):

- ``gate="near"``, ``max_margin=m`` (and optionally ``stalled=s``): the points whose *remaining
  margin* is below ``m`` (or at least ``s``). The remaining margin of a point is ``min over the
  attacks so far of margin(x_adv) / margin(x)`` with ``margin = z_y - max_{i != y} z_i``: the
  fraction of its clean margin that the best attack so far left. It is invariant to the scale of
  the logits (logit squeezing shrinks both), 1 for a point no attack moved towards the boundary,
  near 0 for one an attack almost broke. On healthy models, points far from the boundary after
  the cheap attacks are the ones the expensive attacks do not break (measured, see
  docs/PERFORMANCE.md), so their budget stops there. A point the gradient attacks *barely moved*
  (remaining >= ``s``, 0.9 in ``fast``) is the opposite case: on a healthy model no point stays
  there after APGD-CE (measured: at most 0.88), while vanishing gradients (saturated softmax:
  the cross-entropy is exactly flat) or shattered ones leave most points there. ``stalled``
  sends those points on instead of stopping them.
- ``gate="escalate"``: all points, but only if the *yield signal* fired on this batch
  (:meth:`BatchSignals.escalating`): the gradient attacks behind ``near`` gates broke at least
  ``min_yield`` (default 0.15) of the points they ran on, and at least ``min_broken`` (5) points.
  On the five demo models they broke 5-8% of what they attacked; on a model whose loss surface
  misleads short attacks (CLP trained with heavy noise) 28%, on one with vanishing CE gradients
  24%: the short attacks had not converged, and the batch gets the long ones.
- ``gate="masking"``: all points, but only if a gradient-masking signal fired on this batch,
  else none. The signals (:meth:`BatchSignals.masking`):

  1. the gradient-free attacks (Square, noise) broke more than ``square_rate`` (default 0.002)
     of the batch's points: the gradients mislead. This is AutoAttack's own warning
     (``checks.check_square_sr``: Square lowering the robust accuracy by more than 0.2 points).
     One lucky Square success in a batch of 500 does not fire it;
  2. on at least ``min_ahead`` (default 0.05) of the points a gradient-free attack ran on, it left
     a lower margin than every gradient attack did: a 100-query random search should never get
     further than gradient descent (measured: 0-0.5% of the points on healthy models, 99% with
     vanishing or zero gradients). This compares the distributions of margin changes, so it
     also fires when the gradients move the margin a little, in the wrong direction;
  3. on at least ``min_flat`` (default 0.05) of the points the gradient attacks did not lower the
     margin at all (remaining margin >= 1): zero, saturated or shattered gradients;
  4. a non-finite logit appeared at a clean or adversarial point.

- ``warm=True`` (with any gate): the attack starts at the lowest-margin input found so far for
  each point (``init=``) and, for the targeted APGD, ranks its target classes by the logits
  there (``rank_by=``): the classes the point drifted towards. On a CLP model that masks
  gradients the clean runner-up is a poor target (APGD-T broke 25 of 260 points with it, 79 with
  the class leading at the APGD-CE point; on M-PGD 20 and 25).

Signals are computed per protocol batch from the logits the protocol computes anyway (no
extra passes). Suites without gate keys never build them, so their results do not change.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from logitpair.errors import ConfigError

GATE_KEYS = ("gate", "max_margin", "stalled", "warm", "min_flat", "square_rate", "min_ahead", "min_yield", "min_broken")
GATES = ("near", "masking", "escalate", "all")
GRADIENT_FREE = frozenset({"square", "noise"})
MIN_FLAT = 0.05
SQUARE_RATE = 0.002
MIN_AHEAD = 0.05
MIN_YIELD = 0.15
MIN_BROKEN = 5


def split_params(params: dict[str, Any]) -> tuple[dict[str, Any], dict[str, Any]]:
    """``params`` -> (keyword arguments of the attack, the gate's settings; empty if none)."""
    kwargs = {k: v for k, v in params.items() if k not in GATE_KEYS}
    gate = {k: v for k, v in params.items() if k in GATE_KEYS}
    if gate:
        check_gate(gate)
    return kwargs, gate


def _fraction(gate: dict[str, Any], key: str, default: float, low_open: bool = True) -> None:
    value = gate.get(key, default)
    ok = isinstance(value, (int, float)) and (0 < value <= 1 if low_open else 0 <= value < 1)
    if not ok:
        raise ConfigError(
            f"gate={gate.get('gate')}: {key} must be in {'(0, 1]' if low_open else '[0, 1)'}, got {value!r}"
        )


def check_gate(gate: dict[str, Any]) -> None:
    kind = gate.get("gate", "all")
    if kind not in GATES:
        raise ConfigError(f"gate: expected one of {', '.join(GATES)}, got {kind!r} (settings {gate})")
    if kind == "near" and not (isinstance(gate.get("max_margin"), (int, float)) and gate["max_margin"] > 0):
        raise ConfigError(f"gate=near needs max_margin > 0, got {gate.get('max_margin')!r}")
    if "stalled" in gate and not (isinstance(gate["stalled"], (int, float)) and gate["stalled"] > 0):
        raise ConfigError(f"gate: stalled must be > 0, got {gate['stalled']!r}")
    if "warm" in gate and not isinstance(gate["warm"], bool):
        raise ConfigError(f"gate: warm must be true or false, got {gate['warm']!r}")
    if kind == "escalate":
        _fraction(gate, "min_yield", MIN_YIELD)
        if not (isinstance(gate.get("min_broken", MIN_BROKEN), int) and gate.get("min_broken", MIN_BROKEN) >= 1):
            raise ConfigError(f"gate=escalate: min_broken must be an integer >= 1, got {gate.get('min_broken')!r}")
    if kind == "masking":
        _fraction(gate, "min_flat", MIN_FLAT)
        _fraction(gate, "square_rate", SQUARE_RATE, low_open=False)
        _fraction(gate, "min_ahead", MIN_AHEAD)


def has_gates(attacks: list[Any]) -> bool:
    return any(k in a.params for a in attacks for k in GATE_KEYS)


def wants_warm(attacks: list[Any]) -> bool:
    return any(a.params.get("warm") for a in attacks)


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
    gradient_margin: Tensor  # (b,) lowest margin seen at a gradient attack's output (+inf before)
    free_margin: Tensor  # (b,) lowest margin seen at a gradient-free attack's output (+inf before)
    gradient_moved: Tensor  # (b,) bool: a gradient attack lowered the margin below the clean one
    gradient_attacked: Tensor  # (b,) bool: a gradient attack ran on the point
    gradient_free_broke: int = 0  # points broken by gradient-free attacks
    near_attacked: int = 0  # points the gradient attacks behind a "near" gate ran on (summed over attacks)
    near_broken: int = 0  # ... and broke
    nonfinite: bool = False
    best_x: Tensor | None = None  # (b, ...) the input of the lowest margin so far (for warm starts)

    @classmethod
    def start(cls, logits: Tensor, y: Tensor, x: Tensor | None = None) -> BatchSignals:
        m = margin(logits, y)
        zeros = torch.zeros(len(y), dtype=torch.bool, device=m.device)
        inf = torch.full_like(m, float("inf"))
        return cls(
            m, m.clone(), inf, inf.clone(), zeros, zeros.clone(),
            nonfinite=not bool(torch.isfinite(logits).all()), best_x=None if x is None else x.clone(),
        )  # fmt: skip

    def remaining(self) -> Tensor:
        """Fraction of the clean margin left after the best attack so far (see the module doc)."""
        return self.best_margin / self.clean_margin.clamp_min(torch.finfo(self.clean_margin.dtype).tiny)

    def masking(
        self, min_flat: float = MIN_FLAT, square_rate: float = SQUARE_RATE, min_ahead: float = MIN_AHEAD
    ) -> dict[str, bool]:
        """The four signals of the module docstring."""
        attacked = int(self.gradient_attacked.sum())
        flat = int((self.gradient_attacked & ~self.gradient_moved).sum())
        both = self.gradient_attacked & torch.isfinite(self.free_margin)
        ahead = int((both & (self.free_margin < self.gradient_margin)).sum())
        return {
            "gradient_free_broke": self.gradient_free_broke > square_rate * len(self.clean_margin),
            "gradient_free_ahead": int(both.sum()) > 0 and ahead >= min_ahead * int(both.sum()),
            "flat_gradients": attacked > 0 and flat >= min_flat * attacked,
            "nonfinite": self.nonfinite,
        }

    def select(self, gate: dict[str, Any], idx: Tensor) -> Tensor:
        """The subset of the still-robust points ``idx`` the gate lets the attack run on."""
        kind = gate.get("gate", "all")
        if kind == "all":
            return idx
        if kind == "near":
            rem = self.remaining()[idx]
            keep = ~(rem >= gate["max_margin"])  # a NaN margin is never skipped
            if "stalled" in gate:
                keep |= rem >= gate["stalled"]
            return idx[keep]
        if kind == "escalate":
            return (
                idx
                if self.escalating(gate.get("min_yield", MIN_YIELD), gate.get("min_broken", MIN_BROKEN))
                else idx[:0]
            )
        fired = self.masking(
            gate.get("min_flat", MIN_FLAT), gate.get("square_rate", SQUARE_RATE), gate.get("min_ahead", MIN_AHEAD)
        )
        return idx if any(fired.values()) else idx[:0]

    def escalating(self, min_yield: float = MIN_YIELD, min_broken: int = MIN_BROKEN) -> bool:
        """The yield signal: the gradient attacks behind "near" gates still broke at least ``min_yield``
        of the points they ran on (and ``min_broken`` points): the cheap attacks had not converged."""
        return self.near_broken >= max(min_broken, min_yield * self.near_attacked)

    def update(
        self,
        name: str,
        idx: Tensor,
        adv_logits: Tensor,
        y: Tensor,
        newly_broken: Tensor,
        xa: Tensor | None = None,
        gate: str = "all",
    ) -> None:
        """Record attack ``name``'s outcome on the points ``idx`` (``adv_logits`` at its output ``xa``;
        ``gate``: the kind of gate it ran behind)."""
        m = margin(adv_logits, y)
        if gate == "near" and name not in GRADIENT_FREE:
            self.near_attacked += len(idx)
            self.near_broken += int(newly_broken.sum())
        self.nonfinite |= not bool(torch.isfinite(adv_logits).all())
        if name in GRADIENT_FREE:
            self.gradient_free_broke += int(newly_broken.sum())
            self.free_margin[idx] = torch.minimum(self.free_margin[idx], m)
        else:
            self.gradient_attacked[idx] = True
            self.gradient_moved[idx] |= m < self.clean_margin[idx]
            self.gradient_margin[idx] = torch.minimum(self.gradient_margin[idx], m)
        if self.best_x is not None and xa is not None:
            lower = m < self.best_margin[idx]
            view = (-1,) + (1,) * (xa.dim() - 1)
            self.best_x[idx] = torch.where(lower.view(view), xa.to(self.best_x.dtype), self.best_x[idx])
        self.best_margin[idx] = torch.minimum(self.best_margin[idx], m)

    def warm_start(self, idx: Tensor) -> Tensor:
        """The inputs of the lowest margin so far for the points ``idx`` (the clean ones if none was lower)."""
        if self.best_x is None:
            raise RuntimeError("warm starts need BatchSignals.start(..., x=...)")
        return self.best_x[idx]
