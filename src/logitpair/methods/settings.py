"""The settings the training methods share; each method composes its own dataclass from these.

A method's settings dataclass sits next to its loss and inherits the concerns it needs::

    LossSettings            eps, ce_reduction, label_smoothing         every method (regular, ls, mixup, vat ...)
    ├ StepSettings          attack_steps, attack_step_size             iterative training attacks (trades)
    ├ StartSettings         attack_random_start
    │ └ FGSMRSSettings      fgsm_rs_alpha_ratio                        fgsm-rs
    ├ TrainingAttackSettings(FGSMRSSettings, StepSettings): attack      the adversarial batch of mpgd / alp
    ├ NoiseSettings         noise_std                                  clp, lsq
    └ LambdaSettings        lam                                        lsq
      └ PairingSettings     distance, pair_reduction, pair_layer, pair_target   alp, clp

Fields carry their paper's symbol as name (``lam`` λ, ``beta`` β ...), a default, one line of
help and a check (:func:`logitpair.settings.setting`); old names stay accepted as aliases
(``smoothing`` for ``label_smoothing``, ``train_attack`` for ``attack``). Defaults are the
Fashion-MNIST ones: ε 0.1, training PGD 7 steps of 0.025.
"""

from __future__ import annotations

from dataclasses import dataclass

from logitpair.attacks.official import parse_official
from logitpair.errors import ConfigError
from logitpair.pairing import DISTANCES, REDUCTIONS
from logitpair.settings import Check, above, at_least, between, check_fields, one_of, setting
from logitpair.threat import Linf

TRAINING_ATTACKS = ("pgd", "fgsm-rs")  # TrainingAttackSettings.attack, dispatched by methods.crafting.craft
PAIR_TARGETS = ("logits", "features", "both")
TRAINING_PGD_STEPS = 7  # the default training attack: PGD-7 (its cost appears in the method registry)
LABEL_SMOOTHING = between(0, 1, open_high=True)
TRAINING_ATTACK = Check(
    lambda v: v in TRAINING_ATTACKS or parse_official(v) is not None,
    f"one of {', '.join(TRAINING_ATTACKS)} or the official notation pgd|pgdll|pgdrnd_EPS_STEP_NITER (e.g. pgdll_16_2_10)",
    TRAINING_ATTACKS,
)


@dataclass(frozen=True, kw_only=True)
class LossSettings:
    """The threat's radius and the cross-entropy."""

    eps: float = setting(
        0.1,
        "L∞ radius ε of the training attacks and of the run's validation and evaluation (e.g. 0.1 or 8/255)",
        check=between(0, 1, symbol="eps"),
    )
    ce_reduction: str = setting("mean", "reduction of the cross-entropy over the batch", check=one_of("mean", "sum"))
    label_smoothing: float = setting(
        0.0,
        "label smoothing δ of every cross-entropy: targets (1 - δ) one-hot + δ / K (Szegedy et al. 2016)",
        check=LABEL_SMOOTHING,
        aliases=("smoothing",),
    )

    def __post_init__(self) -> None:
        check_fields(self)

    @property
    def threat(self) -> Linf:
        return Linf(self.eps)

    @property
    def uses_fgsm_rs(self) -> bool:
        """True when the method trains on FGSM-RS examples (the training layer then guards
        against catastrophic overfitting by default, as Wong et al. 2020)."""
        return False


@dataclass(frozen=True, kw_only=True)
class StepSettings(LossSettings):
    """Iterative training attack: steps and step size."""

    attack_steps: int = setting(TRAINING_PGD_STEPS, "steps of the training attack", check=at_least(1))
    attack_step_size: float = setting(0.025, "step size of the training attack ([0, 1] pixels)", check=above(0))


@dataclass(frozen=True, kw_only=True)
class StartSettings(LossSettings):
    """Random start of the training attack."""

    attack_random_start: bool = setting(True, "start the training attack at a uniform random point of the ε-ball")


@dataclass(frozen=True, kw_only=True)
class FGSMRSSettings(StartSettings):
    """FGSM with a random start (Wong et al. 2020)."""

    fgsm_rs_alpha_ratio: float = setting(
        1.25, "FGSM-RS step α = this ratio × ε (Wong et al. 2020: 1.25)", check=above(0)
    )

    @property
    def uses_fgsm_rs(self) -> bool:
        return True


@dataclass(frozen=True, kw_only=True)
class TrainingAttackSettings(FGSMRSSettings, StepSettings):
    """Training attack of the adversarial batch."""

    attack: str = setting(
        "pgd",
        "pgd, fgsm-rs, or the official notation pgd|pgdll|pgdrnd_EPS_STEP_NITER (e.g. pgdll_16_2_10; "
        "its ε and step replace eps and attack_step_size)",
        check=TRAINING_ATTACK,
        aliases=("train_attack",),
    )

    @property
    def uses_fgsm_rs(self) -> bool:
        return self.attack == "fgsm-rs"


@dataclass(frozen=True, kw_only=True)
class NoiseSettings(LossSettings):
    """Gaussian input noise."""

    noise_std: float = setting(
        0.5, "σ of the Gaussian noise added to the inputs (then clipped to [0, 1])", check=at_least(0)
    )


@dataclass(frozen=True, kw_only=True)
class LambdaSettings(LossSettings):
    """Weight of the logit term (Kannan et al. 2018)."""

    lam: float = setting(0.5, "weight λ of the pairing / squeezing term", check=at_least(0))


@dataclass(frozen=True, kw_only=True)
class PairingSettings(LambdaSettings):
    """Logit pairing: the distance and what it compares."""

    distance: str = setting("l2sq", "pairing distance (logitpair.pairing)", check=one_of(*DISTANCES))
    pair_reduction: str = setting(
        "mean", "reduction of the distance over batch and classes (mean: the official code)", check=one_of(*REDUCTIONS)
    )
    pair_layer: str = setting("", "dotted module name whose flattened output is paired (feature pairing), e.g. net.3")
    pair_target: str = setting(
        "logits", "what is paired: logits, features (of pair_layer) or both", check=one_of(*PAIR_TARGETS)
    )

    def __post_init__(self) -> None:
        super().__post_init__()
        if (self.pair_target == "logits") != (self.pair_layer == ""):
            raise ConfigError(
                f"pair_layer: must be set exactly when pair_target is 'features' or 'both' "
                f"(pair_layer={self.pair_layer!r}, pair_target={self.pair_target!r})"
            )
