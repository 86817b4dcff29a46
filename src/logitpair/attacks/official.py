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

The registered attack ``official`` (:func:`official`) runs a spec given by name, so the
notation works wherever an attack is named (``logitpair evaluate --attacks pgdll_16_2_10``
resolves to ``AttackSpec("official", {"spec": "pgdll_16_2_10"})``); in a targeted evaluation
``pgdrnd`` takes the protocol's target classes in place of its own draw.

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

from logitpair.attacks.common import attack_objective
from logitpair.attacks.iterative import perturb_iterative, start_point
from logitpair.errors import ConfigError
from logitpair.modes import attack_context
from logitpair.threat import Linf, Threat, require_linf

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
    target: Tensor | None = None,
) -> Tensor:
    """Run an official-notation attack; returns its last iterate (inside ``official_threat(spec)``).

    ``y`` is not used (the official attacks take their classes from the clean logits); it
    is accepted for the common attack signature. ``generator`` draws the random start and
    the ``pgdrnd`` classes (in that order: classes first). ``init``: a starting point
    (projected into the ball) in place of the random start; training losses pass starts
    keyed per sample this way. ``target`` (``pgdrnd`` only): the classes to descend, in
    place of the uniform draw (a targeted evaluation's shared targets). The model runs in
    eval mode with frozen parameters; both are restored afterwards.
    """
    if target is not None and spec.kind != "pgdrnd":
        raise ConfigError(
            f"official attack {spec.name}: only pgdrnd takes given target classes "
            f"(pgd ascends the predicted class, pgdll descends the least likely one)"
        )
    threat = official_threat(spec)
    x = x.detach()
    with attack_context(model):
        if target is not None:
            label = target.to(x.device)
        else:
            with torch.no_grad():
                label = official_targets(model(x), spec.kind, generator)
        target = None if spec.kind == "pgd" else label  # pgd ascends CE(label); the others descend CE(target)
        start = start_point(x, threat, init=init, generator=generator)
        loss_fn = attack_objective(label, target)
        x_adv = perturb_iterative(
            model, x, start, threat=threat, steps=spec.steps, step_size=spec.step, loss_fn=loss_fn
        )
    return x_adv.detach()


def official(
    model: nn.Module,
    x: Tensor,
    y: Tensor,
    *,
    threat: Threat,
    spec: str,
    generator: torch.Generator | None = None,
    targeted: bool = False,
    target: Tensor | None = None,
) -> Tensor:
    """The official ALP code's attacks by name, ``pgd|pgdll|pgdrnd_EPS_STEP_NITER`` (``spec="pgdll_16_2_10"``).

    As a registered attack: ``AttackSpec("official", {"spec": "pgdll_16_2_10"})``. Runs :func:`official_attack` with the spec's own eps and step (0-255 units / 255); ``threat``
    (the evaluation's L-inf ball, [0, 1] inputs, shape (N, C, H, W)) must be at least as large
    as the spec's eps. ``targeted``/``target``: the targeted protocol's classes (one per
    example, shape (N,)), accepted by ``pgdrnd`` only (it then descends them instead of
    drawing its own; ``targeted`` without ``target`` keeps the official uniform draw).

    Example::

        x_adv = official(model, x, y, threat=Linf(16 / 255), spec="pgdrnd_16_2_10", targeted=True, target=t)
    """
    require_linf(threat, "the official notation (pgd|pgdll|pgdrnd_EPS_STEP_NITER)")
    parsed = parse_official(spec)
    if parsed is None:
        raise ConfigError(f"attack official: spec {spec!r} is not in the notation {_FORM}, e.g. pgdll_16_2_10")
    if parsed.eps > threat.eps + 1e-9:
        raise ConfigError(
            f"attack {parsed.name}: its eps {parsed.eps:.6g} (= {round(parsed.eps * 255)}/255) is larger than "
            f"the evaluation's eps {threat.eps:.6g}"
        )
    if (targeted or target is not None) and parsed.kind != "pgdrnd":
        raise ConfigError(
            f"attack {parsed.name}: a targeted evaluation gives every point a target class, which only "
            f"pgdrnd takes (pgd ascends the predicted class, pgdll descends the least likely one)"
        )
    return official_attack(model, x, y, spec=parsed, generator=generator, target=target)
