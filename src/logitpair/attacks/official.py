"""The attack notation of the official ALP code (tensorflow/models, ``research/adversarial_logit_pairing``).

``KIND_EPS_STEP_NITER`` with ``KIND`` one of ``pgd``, ``pgdll``, ``pgdrnd``; ``EPS`` and
``STEP`` are integers in 0-255 pixel units (rescaled here to [0, 1] images by / 255) and
``NITER`` is the number of steps. The ALP models were trained with ``pgdll_16_2_10``.
As in the official ``adversarial_attack.py``:

- one uniform random start in the eps-ball, then ``NITER`` steps of
  ``x <- clip(Pi_eps(x +/- step * sign(grad sum CE)))``; the **last iterate** is returned,
  without restarts;
- ``pgd`` ascends the cross-entropy of the model's **predicted** class (argmax of the clean
  logits, not the label), ``pgdll`` descends that of the least-likely class (argmin of the
  clean logits), ``pgdrnd`` descends that of a class drawn uniformly from **all** classes
  (it may equal the label).

Example::

    spec = parse_official("pgdll_16_2_10")    # OfficialSpec("pgdll", 16/255, 2/255, 10)
    x_adv = official_attack(model, x, y, spec=spec, generator=g)
    assert official_threat(spec).contains(x, x_adv).all()
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Literal, cast

import torch
from torch import Tensor, nn

from logitpair.attacks.common import input_grad
from logitpair.errors import ConfigError
from logitpair.modes import attack_context
from logitpair.threat import Linf

OfficialKind = Literal["pgd", "pgdll", "pgdrnd"]
KINDS: tuple[str, ...] = ("pgd", "pgdll", "pgdrnd")
_FORM = "KIND_EPS_STEP_NITER with KIND in pgd|pgdll|pgdrnd, EPS and STEP integers in 1..255, NITER >= 1"
_NUMBERS = re.compile(r"([0-9]+)_([0-9]+)_([0-9]+)", re.ASCII)


@dataclass(frozen=True)
class OfficialSpec:
    """A parsed official attack: ``kind``, ``eps`` and ``step`` in [0, 1] image units, ``steps``."""

    kind: OfficialKind
    eps: float
    step: float
    steps: int

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise ConfigError(f"unknown official attack kind {self.kind!r}; valid kinds: {', '.join(KINDS)}")
        if not (0.0 < self.eps <= 1.0 and 0.0 < self.step <= 1.0 and self.steps >= 1):
            raise ConfigError(f"official attack {self!r}: expected 0 < eps, step <= 1 and steps >= 1")

    @property
    def name(self) -> str:
        """The spec in the official notation, e.g. ``pgdll_16_2_10``."""
        return f"{self.kind}_{round(self.eps * 255)}_{round(self.step * 255)}_{self.steps}"


def parse_official(name: str) -> OfficialSpec | None:
    """Parse ``pgd|pgdll|pgdrnd_EPS_STEP_NITER``; None if ``name`` is not in that notation.

    A name that starts with one of the kinds and an underscore is in the notation; if the
    rest is not three integers (EPS and STEP in 1..255, NITER >= 1) it raises ConfigError.
    """
    kind, sep, rest = name.partition("_")
    if not sep or kind not in KINDS:
        return None
    match = _NUMBERS.fullmatch(rest)
    if match is None:
        raise ConfigError(f"attack {name!r}: expected {_FORM}, e.g. pgdll_16_2_10")
    eps, step, steps = (int(v) for v in match.groups())
    if not 1 <= eps <= 255:
        raise ConfigError(f"attack {name!r}: EPS must be in 1..255 (pixel units), got {eps}; expected {_FORM}")
    if not 1 <= step <= 255:
        raise ConfigError(f"attack {name!r}: STEP must be in 1..255 (pixel units), got {step}; expected {_FORM}")
    if steps < 1:
        raise ConfigError(f"attack {name!r}: NITER must be >= 1, got {steps}; expected {_FORM}")
    return OfficialSpec(cast(OfficialKind, kind), eps / 255, step / 255, steps)


def official_threat(spec: OfficialSpec) -> Linf:
    """The threat model of a spec: the L-inf ball of radius ``spec.eps`` in [0, 1]."""
    return Linf(spec.eps)


def official_targets(logits: Tensor, kind: str, generator: torch.Generator | None = None) -> Tensor:
    """The class each example's loss is taken on: predicted, least likely or uniformly random."""
    if kind == "pgd":
        return logits.argmax(1)
    if kind == "pgdll":
        return logits.argmin(1)
    if kind == "pgdrnd":
        return torch.randint(0, logits.shape[1], (len(logits),), generator=generator, device=logits.device)
    raise ConfigError(f"unknown official attack kind {kind!r}; valid kinds: {', '.join(KINDS)}")


def official_attack(
    model: nn.Module,
    x: Tensor,
    y: Tensor,
    *,
    spec: OfficialSpec,
    generator: torch.Generator | None = None,
    init: Tensor | None = None,
) -> Tensor:
    """Run an official-notation attack; returns its last iterate (inside ``official_threat(spec)``).

    ``y`` is not used (the official attacks take their classes from the clean logits); it
    is accepted for the common attack signature. ``generator`` draws the random start and
    the ``pgdrnd`` classes (in that order: classes first). ``init``: a starting point
    (projected into the ball) in place of the random start; training losses pass starts
    keyed per sample this way. The model runs in eval mode with frozen parameters; both
    are restored afterwards.
    """
    threat = official_threat(spec)
    x = x.detach()
    with attack_context(model):
        with torch.no_grad():
            label = official_targets(model(x), spec.kind, generator)
        target = None if spec.kind == "pgd" else label  # pgd ascends CE(label); the others descend CE(target)
        x_adv = threat.project(x, init.detach()) if init is not None else threat.random_init(x, generator)
        for _ in range(spec.steps):
            _, _, grad = input_grad(model, x_adv, label, target)
            x_adv = threat.step(x, x_adv, grad, spec.step)
    return x_adv.detach()
