"""Attacks: plain functions ``(model, x, y, *, threat, ...) -> x_adv`` in a registry.

Every attack sees [0, 1] pixels only, leaves the model's mode and parameter flags as it
found them, and returns a tensor inside the threat model's ball and bounds.
"""

from dataclasses import dataclass
from typing import Any

from logitpair.attacks.apgd import NORMS as APGD_NORMS
from logitpair.attacks.apgd import apgd, apgd_ce, apgd_dlr, apgd_t
from logitpair.attacks.common import predict, random_target
from logitpair.attacks.fab import NORMS as FAB_NORMS
from logitpair.attacks.fab import fab, fab_t
from logitpair.attacks.fgsm import fgsm
from logitpair.attacks.mifgsm import mi_fgsm
from logitpair.attacks.noise import random_noise
from logitpair.attacks.official import OfficialSpec, official, official_attack, official_threat, parse_official
from logitpair.attacks.pgd import pgd
from logitpair.attacks.square import NORMS as SQUARE_NORMS
from logitpair.attacks.square import square
from logitpair.models.ensemble import EnsembleLogits  # re-exported: its home is logitpair.models
from logitpair.registry import Registry

ATTACKS: Registry = Registry("attack")


@dataclass(frozen=True)
class AttackInfo:
    """What a registered attack can do, declared at registration (never read off its signature).

    ``options``: the keyword options a user may set (``steps``, ``queries``, ...); ``targeted``: it
    takes ``targeted=`` and ``target=`` (the targeted protocol); ``gradient_free``: it never
    differentiates the model (its successes are a gradient-masking signal); ``topk``: it takes the
    top-``k`` success criterion ``k=``; ``warm``: the warm-start inputs it takes (``init`` = start
    point, ``rank_by`` = the points whose logits rank its target classes); ``norms``: the threat
    models it supports, as :attr:`Threat.norm <logitpair.threat.Threat.norm>` names them (the
    protocol refuses any other with a ConfigError before running anything).
    """

    options: tuple[str, ...] = ()
    targeted: bool = False
    gradient_free: bool = False
    topk: bool = False
    warm: tuple[str, ...] = ()
    norms: tuple[str, ...] = ("Linf",)


ATTACK_INFO: dict[str, AttackInfo] = {}


def register(name: str, fn: Any, info: AttackInfo) -> None:
    """Register attack ``fn`` under ``name`` with its capabilities."""
    ATTACKS.register(name)(fn)
    ATTACK_INFO[name] = info


def attack_info(name: str) -> AttackInfo:
    """The capabilities of attack ``name`` (none declared: an attack that only takes its options)."""
    ATTACKS.get(name)  # unknown names: one error listing the valid ones
    return ATTACK_INFO.get(name, AttackInfo())


def attacks_for(norm: str) -> list[str]:
    """The registered attacks that support the threat model ``norm`` (``"Linf"``, ``"L2"``), sorted."""
    return [n for n in ATTACKS.names() if norm in attack_info(n).norms]


_APGD = ("steps", "restarts", "rho", "momentum", "trace")
_ANY = ("Linf", "L2")  # the iterative core: any threat's step and projection
register("fgsm", fgsm, AttackInfo(targeted=True, norms=_ANY))
register("pgd", pgd, AttackInfo(("steps", "step_size", "random_start", "restarts", "keep_best"), targeted=True,
                                topk=True, warm=("init",), norms=_ANY))  # fmt: skip
register("apgd-ce", apgd_ce, AttackInfo(_APGD, topk=True, norms=APGD_NORMS))
register("apgd-dlr", apgd_dlr, AttackInfo(_APGD, topk=True, norms=APGD_NORMS))
register("apgd-t", apgd_t, AttackInfo((*_APGD, "n_target_classes"), topk=True, warm=("init", "rank_by"),
                                      norms=APGD_NORMS))  # fmt: skip
register("square", square, AttackInfo(("queries", "p_init", "restarts"), targeted=True, gradient_free=True, topk=True,
                                      norms=SQUARE_NORMS))  # fmt: skip
register("noise", random_noise, AttackInfo(("samples",), gradient_free=True, topk=True))
register("fab-t", fab_t, AttackInfo(("steps", "n_target_classes", "restarts", "alpha_max", "eta", "beta"), topk=True,
                                    norms=FAB_NORMS))  # fmt: skip
register("fab", fab, AttackInfo(("steps", "restarts", "alpha_max", "eta", "beta"), topk=True, norms=FAB_NORMS))
register("mi-fgsm", mi_fgsm, AttackInfo(("steps", "decay", "step_size"), targeted=True, norms=_ANY))
# the official notation pgd|pgdll|pgdrnd_EPS_STEP_NITER by name; its settings are in the name
register("official", official, AttackInfo(("spec",), targeted=True))

__all__ = [
    "ATTACKS",
    "ATTACK_INFO",
    "AttackInfo",
    "EnsembleLogits",
    "OfficialSpec",
    "apgd",
    "apgd_ce",
    "apgd_dlr",
    "apgd_t",
    "attack_info",
    "attacks_for",
    "fab",
    "fab_t",
    "fgsm",
    "mi_fgsm",
    "official",
    "official_attack",
    "official_threat",
    "parse_official",
    "pgd",
    "predict",
    "random_noise",
    "random_target",
    "square",
]
