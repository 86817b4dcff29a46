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

from dataclasses import dataclass, fields
from typing import Any

import torch
from torch import Tensor

from logitpair.attacks import attack_info
from logitpair.errors import ConfigError

GATE_KEYS = ("gate", "max_margin", "stalled", "warm", "min_flat", "square_rate", "min_ahead", "min_yield", "min_broken")
GATES = ("near", "masking", "escalate", "all")
MIN_FLAT = 0.05
SQUARE_RATE = 0.002
MIN_AHEAD = 0.05
MIN_YIELD = 0.15
MIN_BROKEN = 5


def _number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


@dataclass(frozen=True)
class Gate:
    """Where an attack of a suite runs: the gate's ``kind`` and settings (see the module doc).

    ``kind``: ``near`` (``max_margin``, optional ``stalled``), ``escalate`` (``min_yield``,
    ``min_broken``), ``masking`` (``min_flat``, ``square_rate``, ``min_ahead``) or ``all``;
    ``warm``: start at the lowest-margin point so far (any kind).
    """

    kind: str = "all"
    max_margin: float | None = None
    stalled: float | None = None
    warm: bool = False
    min_flat: float = MIN_FLAT
    square_rate: float = SQUARE_RATE
    min_ahead: float = MIN_AHEAD
    min_yield: float = MIN_YIELD
    min_broken: int = MIN_BROKEN

    def __post_init__(self) -> None:
        if self.kind not in GATES:
            raise ConfigError(f"gate: expected one of {', '.join(GATES)}, got {self.kind!r}")
        if self.kind == "near" and not (_number(self.max_margin) and self.max_margin > 0):  # type: ignore[operator]
            raise ConfigError(f"gate=near needs max_margin > 0, got {self.max_margin!r}")
        if self.stalled is not None and not (_number(self.stalled) and self.stalled > 0):
            raise ConfigError(f"gate: stalled must be > 0, got {self.stalled!r}")
        if not isinstance(self.warm, bool):
            raise ConfigError(f"gate: warm must be true or false, got {self.warm!r}")
        for key, low_open in (("min_flat", True), ("square_rate", False), ("min_ahead", True), ("min_yield", True)):
            value = getattr(self, key)
            if not (_number(value) and (0 < value <= 1 if low_open else 0 <= value < 1)):
                raise ConfigError(f"gate: {key} must be in {'(0, 1]' if low_open else '[0, 1)'}, got {value!r}")
        if not (isinstance(self.min_broken, int) and not isinstance(self.min_broken, bool) and self.min_broken >= 1):
            raise ConfigError(f"gate: min_broken must be an integer >= 1, got {self.min_broken!r}")

    def to_dict(self) -> dict[str, Any]:
        """The kind and the settings that differ from their defaults."""
        default = Gate()
        out: dict[str, Any] = {"kind": self.kind}
        out.update(
            {
                f.name: getattr(self, f.name)
                for f in fields(self)[1:]
                if getattr(self, f.name) != getattr(default, f.name)
            }
        )
        return out


def split_params(params: dict[str, Any]) -> tuple[dict[str, Any], Gate | None]:
    """``params`` written with gate keys (the ``--attacks`` syntax ``gate=near;max_margin=0.3``) ->
    (keyword arguments of the attack, its :class:`Gate`; None without gate keys)."""
    kwargs = {k: v for k, v in params.items() if k not in GATE_KEYS}
    settings = {k: v for k, v in params.items() if k in GATE_KEYS}
    if not settings:
        return kwargs, None
    kind = settings.pop("gate", "all")
    return kwargs, Gate(kind, **settings)


def has_gates(attacks: list[Any]) -> bool:
    return any(a.gate is not None for a in attacks)


def wants_warm(attacks: list[Any]) -> bool:
    return any(a.gate is not None and a.gate.warm for a in attacks)


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

    def select(self, gate: Gate | None, idx: Tensor) -> Tensor:
        """The subset of the still-robust points ``idx`` the gate lets the attack run on."""
        if gate is None or gate.kind == "all":
            return idx
        if gate.kind == "near":
            rem = self.remaining()[idx]
            keep = ~(rem >= gate.max_margin)  # a NaN margin is never skipped
            if gate.stalled is not None:
                keep |= rem >= gate.stalled
            return idx[keep]
        if gate.kind == "escalate":
            return idx if self.escalating(gate.min_yield, gate.min_broken) else idx[:0]
        fired = self.masking(gate.min_flat, gate.square_rate, gate.min_ahead)
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
        gradient_free = attack_info(name).gradient_free
        if gate == "near" and not gradient_free:
            self.near_attacked += len(idx)
            self.near_broken += int(newly_broken.sum())
        self.nonfinite |= not bool(torch.isfinite(adv_logits).all())
        if gradient_free:
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
