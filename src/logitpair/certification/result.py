"""The per-point record of ``certify`` (:class:`CertifyResult`) and the statuses it reports.

Bound methods (``ibp``, ``crown-ibp``, ``crown``, ``alpha-crown``): each point is ``certified``,
``not_certified`` or ``wrong_clean`` (:data:`STATUSES`). Exact verification (``milp``,
:mod:`.exact`) decides every point: ``wrong_clean``, ``verified``, ``counterexample`` or
``timeout`` (:data:`MILP_STATUSES`), each decided by the cheapest of :data:`DECIDERS` that could:
the clean prediction, an attack, α-CROWN or the MILP solver; ``certified`` is ``verified``.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn

from logitpair.evaluation.cache import Fingerprint, weights_digest
from logitpair.metrics import summarize
from logitpair.threat import Linf

STATUSES = ("not_certified", "certified", "wrong_clean")
MILP_STATUSES = ("wrong_clean", "verified", "counterexample", "timeout")
DECIDERS = ("clean", "attack", "alpha-crown", "milp")


@dataclass
class CertifyResult:
    """Per-point outcome of :func:`~logitpair.certification.certify` (CPU tensors of length N).

    ``margin``: the lowest certified margin bound ``min_j (f_y - f_j)`` over the ball (NaN where no
    bound was computed: a point wrong clean, or broken by an attack under ``milp``); ``seconds``:
    each point's time (its share of its batch's clean prediction and bounds; under ``milp`` plus
    its own MILP). Under ``milp`` only: ``outcome`` (index into :data:`MILP_STATUSES`),
    ``decided_by`` (index into :data:`DECIDERS`), ``milp_seconds`` (the solver's points, bounds
    and encoding included; NaN elsewhere) and ``adversarial`` (each counterexample, the clean
    point elsewhere).
    """

    clean_correct: Tensor  # bool
    certified: Tensor  # bool: correct clean and every margin bound > 0 (milp: verified)
    margin: Tensor  # float64
    seconds: Tensor  # float64
    threat: Linf
    method: str
    options: dict[str, Any] = field(default_factory=dict)
    outcome: Tensor | None = None  # int8, milp
    decided_by: Tensor | None = None  # int8, milp
    milp_seconds: Tensor | None = None  # float64, milp
    adversarial: Tensor | None = None  # like x, milp

    @property
    def n(self) -> int:
        return len(self.certified)

    @property
    def status(self) -> list[str]:
        """Per point: ``certified`` / ``not_certified`` / ``wrong_clean``; under ``milp`` one of
        :data:`MILP_STATUSES`."""
        if self.outcome is not None:
            return [MILP_STATUSES[int(c)] for c in self.outcome]
        codes = torch.where(
            self.clean_correct, self.certified.long(), torch.full_like(self.certified, 2, dtype=torch.long)
        )
        return [STATUSES[int(c)] for c in codes]

    def summary(self) -> dict[str, Any]:
        status = self.status
        out = {
            "n": self.n,
            "threat": self.threat.to_dict(),
            "method": self.method,
            "options": dict(self.options),
            "clean": summarize(self.clean_correct),
            "certified": summarize(self.certified),
            "counts": {s: status.count(s) for s in (MILP_STATUSES if self.outcome is not None else STATUSES)},
            "seconds_per_point": float(self.seconds.sum()) / self.n if self.n else float("nan"),
        }
        if self.outcome is not None:
            out.update(self._milp_summary())
        return out

    def _milp_summary(self) -> dict[str, Any]:
        """Who decided how many points, the solver's seconds, and the not-broken fraction (an
        upper bound on the accuracy under any attack, as ``certified`` is a lower one)."""
        assert self.outcome is not None and self.decided_by is not None and self.milp_seconds is not None
        solved = self.milp_seconds[~self.milp_seconds.isnan()]
        broken = (self.outcome == MILP_STATUSES.index("wrong_clean")) | (
            self.outcome == MILP_STATUSES.index("counterexample")
        )
        return {
            "decided_by": {d: int((self.decided_by == i).sum()) for i, d in enumerate(DECIDERS)},
            "milp_seconds": {
                "n": len(solved),
                "median": float(solved.median()) if len(solved) else None,
                "max": float(solved.max()) if len(solved) else None,
            },
            "not_broken": summarize(~broken),
        }


def certify_fingerprint(
    model: nn.Module, x: Tensor, y: Tensor, threat: Linf, method: str, settings: Mapping[str, Any]
) -> str:
    """The digest of everything that determines a certification's outcome (the cache's key)."""
    fp = Fingerprint("certify").text(weights_digest(model))
    fp.json({"eps": threat.eps, "bounds": threat.bounds, "method": method, "ibp_floor": True, **settings})
    return fp.tensors(x, y).hexdigest()


def nan_to_none(values: Tensor) -> list[float | None]:
    """A float tensor as a JSON list, NaN as None."""
    return [None if math.isnan(v) else v for v in values.tolist()]
