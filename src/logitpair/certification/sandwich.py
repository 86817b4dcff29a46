"""The sandwich: certified accuracy <= attacked (worst-case) accuracy <= clean accuracy, per point.

On the same points a certified point can never be broken by an attack: the bound is a proof that
no input of the ball changes the prediction. A point both certified and broken is a bug of ours
(an unsound bound, or an attack that left the ball), so :func:`sandwich` raises
:class:`Contradiction` instead of reporting it. Points robust to every attack but not certified
are *undecided*: neither the attacks nor the bounds settle them.
"""

from __future__ import annotations

from typing import Any

from torch import Tensor

from logitpair.metrics import summarize


class Contradiction(RuntimeError):
    """Points certified and yet broken by an attack (or wrong clean): never a user error."""


def sandwich(certified: Tensor, clean: Tensor, robust: Tensor, *, attack: str) -> dict[str, Any]:
    """Certified, attacked and clean accuracy of the same points, the number undecided (robust to
    ``attack`` but not certified), and the check that no certified point is broken or wrong clean."""
    certified, clean, robust = certified.cpu().bool(), clean.cpu().bool(), robust.cpu().bool()
    if not len(certified) == len(clean) == len(robust):
        raise ValueError(f"sandwich of {len(certified)}, {len(clean)} and {len(robust)} points")
    bad = (certified & ~(clean & robust)).nonzero().flatten().tolist()
    if bad:
        raise Contradiction(
            f"{len(bad)} point(s) certified but broken by {attack} or wrong clean (indices {bad[:10]}): "
            "a bound is unsound or an attack left the threat ball -- a bug, please report it"
        )
    return {
        "attack": attack,
        "n": len(certified),
        "certified": summarize(certified),
        "attacked": summarize(robust),
        "clean": summarize(clean),
        "undecided": int((robust & ~certified).sum()),
    }
