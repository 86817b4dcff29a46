"""One attack of an evaluation: :class:`AttackSpec` (registry name, arguments, label) and the
PGD baseline :func:`pgd_spec` (ours). Shared by the protocol and the suites."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from logitpair.attacks import ATTACKS


@dataclass(frozen=True)
class AttackSpec:
    """One attack of a protocol: registry name, keyword arguments, display label."""

    name: str
    params: dict[str, Any] = field(default_factory=dict)
    label: str = ""
    transfer: bool = False  # craft on the source model, evaluate on the target

    def __post_init__(self) -> None:
        ATTACKS.get(self.name)
        if not self.label:
            object.__setattr__(self, "label", self.name)

    def to_dict(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "label": self.label,
            "params": dict(self.params),
            "transfer": self.transfer,
        }


def pgd_spec(steps: int = 40, restarts: int = 2, step_size: float | None = None, transfer: bool = False) -> AttackSpec:
    """Our PGD baseline: PGD-``steps`` with ``restarts`` random starts, step ``2.5 eps / steps`` unless
    ``step_size``, each point's best iterate (per-example worst case). Not the paper's MNIST attack, which
    is 40 steps of 0.01 at eps 0.3 from one random start, last iterate."""
    params: dict[str, Any] = {"steps": steps, "restarts": restarts}
    if step_size is not None:
        params["step_size"] = step_size
    label = f"PGD-{steps}" + (f"x{restarts}" if restarts > 1 else "") + (" (transfer)" if transfer else "")
    return AttackSpec("pgd", params, label, transfer)
