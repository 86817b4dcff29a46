"""Attacks: plain functions ``(model, x, y, *, threat, ...) -> x_adv`` in a registry.

Every attack sees [0, 1] pixels only, leaves the model's mode and parameter flags as it
found them, and returns a tensor inside the threat model's ball and bounds.
"""

from logitpair.attacks.apgd import apgd, apgd_ce, apgd_dlr, apgd_t
from logitpair.attacks.common import predict, random_target
from logitpair.attacks.fab import fab, fab_t
from logitpair.attacks.fgsm import fgsm
from logitpair.attacks.mifgsm import mi_fgsm
from logitpair.attacks.noise import random_noise
from logitpair.attacks.official import OfficialSpec, official, official_attack, official_threat, parse_official
from logitpair.attacks.pgd import pgd
from logitpair.attacks.square import square
from logitpair.models.ensemble import EnsembleLogits  # re-exported: its home is logitpair.models
from logitpair.registry import Registry

ATTACKS: Registry = Registry("attack")
ATTACKS.register("fgsm")(fgsm)
ATTACKS.register("pgd")(pgd)
ATTACKS.register("apgd-ce")(apgd_ce)
ATTACKS.register("apgd-dlr")(apgd_dlr)
ATTACKS.register("apgd-t")(apgd_t)
ATTACKS.register("square")(square)
ATTACKS.register("noise")(random_noise)
ATTACKS.register("fab-t")(fab_t)
ATTACKS.register("fab")(fab)
ATTACKS.register("mi-fgsm")(mi_fgsm)
ATTACKS.register("official")(official)  # the official notation pgd|pgdll|pgdrnd_EPS_STEP_NITER by name

__all__ = [
    "ATTACKS",
    "EnsembleLogits",
    "OfficialSpec",
    "apgd",
    "apgd_ce",
    "apgd_dlr",
    "apgd_t",
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
