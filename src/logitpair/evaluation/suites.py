"""Named attack suites (presets) and the attack-list syntax of the command line.

- ``quick``: APGD-CE (100 iterations), APGD-T (3 target classes x 100), Square (1,000 queries).
- ``standard``: AutoAttack's standard version (Croce & Hein 2020): APGD-CE, APGD-T (9 targets),
  FAB-T (9 targets), Square (5,000 queries), in that order.
- ``thorough``: APGD-CE with 5 restarts, APGD-DLR with 5 restarts, APGD-T (9 targets),
  Square (5,000 queries, 2 restarts), then PGD-100 with 10 restarts.
- ``pgd40``: the paper-style baseline alone, PGD-40 with 2 restarts (step 2.5 eps / 40).
- ``targeted``: for targeted evaluation (random target class, the paper's ImageNet protocol):
  targeted PGD-200 with 2 restarts (many more steps than the paper, after Engstrom et al. 2018)
  and targeted Square (5,000 queries). Chosen automatically by ``evaluate --targeted``.
- ``fast``: a small fraction of ``standard``'s cost on healthy models, escalating where the
  attacks so far say it matters (gates of :mod:`logitpair.evaluation.gates`; each attack still
  runs only on the points still robust):

  1. APGD-CE, 10 steps, on every point (breaks most of what APGD-CE-100 breaks);
  2. APGD-T on the top target, 50 steps, *warm*: started at the lowest-margin point found so far,
     its target the class leading there (the class the point drifted towards, not the clean
     runner-up), on the points whose *remaining margin* (the fraction of a point's clean margin
     left by the best attack so far) is < 0.6, **or >= 0.9**: a point the gradients barely moved
     is suspect (vanishing or misleading gradients), not safe;
  3. APGD-T on the top 3 targets, 50 steps, warm, where the remaining margin is < 0.3;
  4. APGD-CE, 50 steps (a fresh start), where it is < 0.1;
  5. APGD-T on 9 targets, 50 steps, warm, on every point left, only on a batch where steps 2-4
     still broke at least 15% of the points they ran on (the short attacks had not converged);
  6. Square, 100 queries, on every point left (a gradient-free probe for masking);
  7. Square, 5,000 queries, only on a batch where a masking signal fired (Square broke more
     than 0.2% of the points; Square got further than every gradient attack on 5% of the points
     it ran on; the gradient attacks did not lower the margin of 5% of the points; or a logit
     was not finite).

  No FAB-T and no long Square on a healthy model: on the models measured in
  docs/PERFORMANCE.md neither broke a point the others missed.

Under the L2 threat model (:class:`~logitpair.threat.L2`) every suite whose attacks all support
L2 runs unchanged (:func:`suite_norms`): ``standard`` is then AutoAttack's standard version for
L2 (APGD-CE, APGD-T, FAB-T, Square with their L2 steps, projections and sampling), and ``quick``,
``thorough``, ``pgd40`` and ``targeted`` run with their attacks' L2 versions. ``fast`` is L-infinity
only: its gates' thresholds (remaining margins, yields, masking rates) were measured on
L-infinity evaluations (docs/PERFORMANCE.md) and say nothing yet about L2.

An explicit list reads ``name[:key=value[;key=value]]`` items separated by commas, e.g.
``apgd-ce:steps=50,square:queries=2000;p_init=0.8``.
"""

from __future__ import annotations

from typing import Any

from logitpair.attacks import ATTACKS, attack_info, parse_official
from logitpair.errors import ConfigError
from logitpair.evaluation.gates import Gate
from logitpair.evaluation.spec import AttackSpec, pgd_spec
from logitpair.threat import parse_fraction

SUITES: dict[str, tuple[AttackSpec, ...]] = {
    "quick": (
        AttackSpec("apgd-ce", {"steps": 100}, "APGD-CE"),
        AttackSpec("apgd-t", {"steps": 100, "n_target_classes": 3}, "APGD-T (3 targets)"),
        AttackSpec("square", {"queries": 1000}, "Square (1000 queries)"),
    ),
    "standard": (
        AttackSpec("apgd-ce", {"steps": 100}, "APGD-CE"),
        AttackSpec("apgd-t", {"steps": 100, "n_target_classes": 9}, "APGD-T (9 targets)"),
        AttackSpec("fab-t", {"steps": 100, "n_target_classes": 9}, "FAB-T (9 targets)"),
        AttackSpec("square", {"queries": 5000}, "Square (5000 queries)"),
    ),
    "thorough": (
        AttackSpec("apgd-ce", {"steps": 100, "restarts": 5}, "APGD-CE x5"),
        AttackSpec("apgd-dlr", {"steps": 100, "restarts": 5}, "APGD-DLR x5"),
        AttackSpec("apgd-t", {"steps": 100, "n_target_classes": 9}, "APGD-T (9 targets)"),
        AttackSpec("square", {"queries": 5000, "restarts": 2}, "Square (5000 queries) x2"),
        AttackSpec("pgd", {"steps": 100, "restarts": 10}, "PGD-100x10"),
    ),
    "pgd40": (pgd_spec(40, 2),),
    # targeted protocol (the paper's ImageNet setting): attacks that accept a target class
    "targeted": (
        AttackSpec("pgd", {"steps": 200, "restarts": 2}, "targeted PGD-200x2"),
        AttackSpec("square", {"queries": 5000}, "targeted Square (5000 queries)"),
    ),
    # the gates are logitpair.evaluation.gates, the measured reasons docs/PERFORMANCE.md
    "fast": (
        AttackSpec("apgd-ce", {"steps": 10}, "APGD-CE (10 steps)"),
        AttackSpec(
            "apgd-t",
            {"steps": 50, "n_target_classes": 1},
            "APGD-T (top target, 50 steps, warm; remaining margin < 0.6 or >= 0.9)",
            gate=Gate("near", max_margin=0.6, stalled=0.9, warm=True),
        ),
        AttackSpec(
            "apgd-t",
            {"steps": 50, "n_target_classes": 3},
            "APGD-T (3 targets, 50 steps, warm; remaining margin < 0.3)",
            gate=Gate("near", max_margin=0.3, warm=True),
        ),
        AttackSpec(
            "apgd-ce", {"steps": 50}, "APGD-CE (50 steps; remaining margin < 0.1)", gate=Gate("near", max_margin=0.1)
        ),
        AttackSpec(
            "apgd-t",
            {"steps": 50, "n_target_classes": 9},
            "APGD-T (9 targets, 50 steps, warm; on a high yield)",
            gate=Gate("escalate", warm=True),
        ),
        AttackSpec("square", {"queries": 100}, "Square (100 queries)"),
        AttackSpec("square", {"queries": 5000}, "Square (5000 queries; on a masking signal)", gate=Gate("masking")),
    ),
}


GATES_MEASURED_FOR = ("Linf",)
"""The threat models the gates' thresholds were measured on (a gated attack runs under these only)."""


def specs_norms(specs: list[AttackSpec] | tuple[AttackSpec, ...]) -> tuple[str, ...]:
    """The threat models every attack of ``specs`` supports (their registry entries), and only
    :data:`GATES_MEASURED_FOR` when one of them is gated."""
    norms = ("Linf", "L2")
    for spec in specs:
        norms = tuple(n for n in norms if n in attack_info(spec.name).norms)
        if spec.gate is not None:
            norms = tuple(n for n in norms if n in GATES_MEASURED_FOR)
    return norms


def suite_norms(name: str) -> tuple[str, ...]:
    """The threat models suite ``name`` runs under (``"Linf"``, ``"L2"``): :func:`specs_norms`."""
    return specs_norms(get_suite(name))


def get_suite(name: str, norm: str | None = None) -> list[AttackSpec]:
    """The attacks of suite ``name``; with ``norm`` (a threat's :attr:`~logitpair.threat.Threat.norm`,
    e.g. ``"L2"``) a ConfigError unless the suite runs under that threat model, naming those that do."""
    try:
        specs = list(SUITES[name])
    except KeyError:
        raise ConfigError(f"unknown suite {name!r}; valid suites: {', '.join(SUITES)}") from None
    if norm is not None and norm not in specs_norms(specs):
        valid = [n for n in SUITES if norm in specs_norms(SUITES[n])]
        why = " (its gates were measured under Linf only)" if any(a.gate for a in specs) else ""
        raise ConfigError(
            f"{name!r} does not support the {norm} threat model{why}; suites for {norm}: {', '.join(valid)}",
            option="suite",
        )
    return specs


def _value(text: str) -> Any:
    low = text.lower()
    if low in ("true", "false"):
        return low == "true"
    try:
        return int(text)
    except ValueError:
        return parse_fraction(text, "attack option")


def resolve_attack(name: str, params: dict[str, Any] | None = None, label: str = "") -> AttackSpec:
    """The spec of an attack named by the user: a registered attack, or a name in the official
    notation ``pgd|pgdll|pgdrnd_EPS_STEP_NITER`` -> ``AttackSpec("official", {"spec": name})``
    (its settings are in its name, so it takes no options)."""
    official = parse_official(name)
    if official is not None:
        if params:
            raise ConfigError(f"{name} takes no options (eps, step and steps are in its name)", option="attacks")
        return AttackSpec("official", {"spec": official.name}, label or name)
    ATTACKS.get(name)
    params = dict(params or {})
    return AttackSpec(name, params, label or name + (f" {params}" if params else ""))


def parse_attacks(text: str) -> list[AttackSpec]:
    """Parse ``name[:k=v[;k=v]],...`` into attack specs (unknown names list the valid ones);
    names in the official notation (``pgdll_16_2_10``) resolve by :func:`resolve_attack`."""
    specs = []
    for item in filter(None, (part.strip() for part in text.split(","))):
        name, _, opts = item.partition(":")
        if parse_official(name) is None:
            ATTACKS.get(name)
        params: dict[str, Any] = {}
        for kv in filter(None, opts.split(";")):
            key, sep, val = kv.partition("=")
            if not sep or not key.strip():
                raise ConfigError(f"expected key=value in {item!r}, got {kv!r}", option="attacks")
            params[key.strip()] = _value(val.strip())
        specs.append(resolve_attack(name, params))
    if not specs:
        raise ConfigError("no attack given", option="attacks")
    return specs
