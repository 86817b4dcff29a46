"""The audit's attack results, keyed by everything that determines them.

A check never reads what another check happened to run before it: it asks a
:class:`RunStore` for the protocol run it needs, and the store runs it on the first request
and hands the same result to every later request with the same :class:`RunKey` (attack
specs in order, eps, seed, the points). A key's result does not depend on which check asked
first, so any order of the checks leaves the same results under the same keys. A run that
raised is a result too: it is stored as :class:`AttackCrashed` and raised again on every
request for its key.

Example::

    runs = RunStore(model, x, y, threat=Linf(0.1))
    fgsm = runs.get([AttackSpec("fgsm", {}, "FGSM")], eps=0.1, seed=0, desc="audit: FGSM")
    assert runs.get([AttackSpec("fgsm", {}, "FGSM")], eps=0.1, seed=0, desc="again") is fgsm
"""

from __future__ import annotations

import hashlib
import json
import time
from collections.abc import Sequence
from dataclasses import dataclass, replace

from torch import Tensor, nn

from logitpair.evaluation.protocol import ProtocolResult, run_protocol
from logitpair.evaluation.spec import AttackSpec
from logitpair.progress import ProgressFactory, null_progress
from logitpair.threat import Linf


class AttackCrashed(RuntimeError):
    """An attack raised on this model (e.g. NaN gradients pushed it out of the threat model)."""


@dataclass(frozen=True)
class RunKey:
    """Everything that determines one protocol run of a store's model (and source model).

    ``attacks``: the attack specs in protocol order, as canonical JSON; ``eps``: the L-inf
    radius the attacks run at (exactly, not rounded); ``seed``: the protocol seed (its
    generators are seeded per attack and batch from it); ``points``: a digest of the images
    and labels."""

    attacks: str
    eps: float
    seed: int
    points: str


def points_digest(x: Tensor, y: Tensor) -> str:
    """SHA-256 of the images and labels (their values, dtypes and shapes)."""
    h = hashlib.sha256()
    for t in (x, y):
        t = t.detach().cpu().contiguous()
        h.update(f"{t.dtype}{tuple(t.shape)}".encode())
        h.update(t.view(-1).view(t.dtype).numpy().tobytes())
    return h.hexdigest()


class RunStore:
    """Protocol runs of one model (and optional transfer source) on fixed points, each computed
    on its first request and kept under its :class:`RunKey`.

    ``threat``: the threat model every run uses, at the eps of its key (same norm and bounds);
    ``batch_size`` and ``progress`` are passed to
    :func:`~logitpair.evaluation.protocol.run_protocol` (neither changes a result).
    :attr:`timings` holds the seconds each run took, by its description."""

    def __init__(
        self,
        model: nn.Module,
        x: Tensor,
        y: Tensor,
        *,
        threat: Linf,
        source: nn.Module | None = None,
        batch_size: int = 500,
        progress: ProgressFactory = null_progress,
    ) -> None:
        self.model, self.x, self.y, self.source = model, x, y, source
        self.threat, self.batch_size, self.progress = threat, batch_size, progress
        self.points = points_digest(x, y)
        self.timings: dict[str, float] = {}
        self._results: dict[RunKey, ProtocolResult | AttackCrashed] = {}

    def key(self, attacks: Sequence[AttackSpec], eps: float, seed: int) -> RunKey:
        """The key of running ``attacks`` at ``eps`` with ``seed`` on this store's points."""
        specs = json.dumps([a.to_dict() for a in attacks], sort_keys=True, default=str)
        return RunKey(specs, float(eps), int(seed), self.points)

    def keys(self) -> list[RunKey]:
        """The keys computed so far (crashed runs included), in no particular order."""
        return list(self._results)

    def get(self, attacks: Sequence[AttackSpec], eps: float, seed: int, desc: str) -> ProtocolResult:
        """The result of running ``attacks`` at ``eps`` with ``seed``: computed on the first
        request (shown as ``desc``), reused afterwards. Raises :class:`AttackCrashed` when the
        run raised."""
        key = self.key(attacks, eps, seed)
        if key not in self._results:
            self._results[key] = self._run(list(attacks), eps, seed, desc)
        result = self._results[key]
        if isinstance(result, AttackCrashed):
            raise result
        return result

    def _run(self, attacks: list[AttackSpec], eps: float, seed: int, desc: str) -> ProtocolResult | AttackCrashed:
        t0 = time.perf_counter()
        try:
            return run_protocol(
                self.model,
                self.x,
                self.y,
                attacks,
                threat=replace(self.threat, eps=eps),
                source=self.source,
                seed=seed,
                batch_size=self.batch_size,
                progress=self.progress,
                desc=desc,
            )
        except (RuntimeError, FloatingPointError) as exc:  # e.g. NaN gradients left the eps-ball
            return AttackCrashed(f"{desc}: {exc}")
        finally:
            self.timings[desc] = self.timings.get(desc, 0.0) + time.perf_counter() - t0
