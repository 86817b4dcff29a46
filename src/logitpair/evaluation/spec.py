"""One attack of an evaluation: :class:`AttackSpec` (registry name, arguments, label) and the
PGD baseline :func:`pgd_spec` (ours). Shared by the protocol and the suites."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from logitpair.attacks import ATTACKS
from logitpair.errors import ConfigError
from logitpair.evaluation.gates import Gate, split_params


@dataclass(frozen=True)
class AttackSpec:
    """One attack of a protocol: registry name, keyword arguments, display label, and where it runs.

    ``gate``: the :class:`~logitpair.evaluation.gates.Gate` that selects the points it runs on
    (None: every point still robust). Gate settings written among the ``params`` (the
    ``--attacks`` syntax ``apgd-t:steps=50;gate=near;max_margin=0.3``) are moved into ``gate``,
    so ``params`` only ever holds the attack's own options.
    """

    name: str
    params: dict[str, Any] = field(default_factory=dict)
    label: str = ""
    transfer: bool = False  # craft on the source model, evaluate on the target
    gate: Gate | None = None

    def __post_init__(self) -> None:
        ATTACKS.get(self.name)
        params, gate = split_params(dict(self.params))
        if gate is not None:
            if self.gate is not None:
                raise ConfigError(f"attack {self.name}: gate given twice ({self.gate} and in its params)")
            object.__setattr__(self, "params", params)
            object.__setattr__(self, "gate", gate)
        if not self.label:
            object.__setattr__(self, "label", self.name)

    def to_dict(self) -> dict[str, Any]:
        out = {"name": self.name, "label": self.label, "params": dict(self.params), "transfer": self.transfer}
        if self.gate is not None:
            out["gate"] = self.gate.to_dict()
        return out


def pgd_spec(steps: int = 40, restarts: int = 2, step_size: float | None = None, transfer: bool = False) -> AttackSpec:
    """Our PGD baseline: PGD-``steps`` with ``restarts`` random starts, step ``2.5 eps / steps`` unless
    ``step_size``, each point's best iterate (per-example worst case). Not the paper's MNIST attack, which
    is 40 steps of 0.01 at eps 0.3 from one random start, last iterate."""
    params: dict[str, Any] = {"steps": steps, "restarts": restarts}
    if step_size is not None:
        params["step_size"] = step_size
    label = f"PGD-{steps}" + (f"x{restarts}" if restarts > 1 else "") + (" (transfer)" if transfer else "")
    return AttackSpec("pgd", params, label, transfer)
