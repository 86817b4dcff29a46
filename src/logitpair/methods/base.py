"""The training-method interface: ``loss(model, x, y, cfg, ctx) -> (loss, metrics)``.

``cfg`` is the run's :class:`MethodConfig`; ``ctx`` the per-batch
:class:`~logitpair.methods.context.BatchContext` (sample indices, seeded randomness, epoch
and step, static source models, the module without its DDP wrapper). A method never touches
the optimizer and leaves the model's mode as it found it. It may call attacks (which run in
eval mode with frozen parameters, on ``ctx.unwrap(model)``) and then forwards ``model`` in
whatever mode the trainer set (train mode during training, as in the official ALP code).
``metrics`` maps names to detached scalar tensors (no host sync inside the loss).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from logitpair.attacks.official import parse_official
from logitpair.errors import ConfigError
from logitpair.methods.context import NOISE, START, BatchContext
from logitpair.pairing import DISTANCES, REDUCTIONS
from logitpair.registry import Registry
from logitpair.threat import Linf

TRAINING_ATTACKS = ("pgd", "fgsm-rs")  # MethodConfig.attack, dispatched by logitpair.methods.crafting.craft
PAIR_TARGETS = ("logits", "features", "both")
ENS_ATTACKS = ("step-ll", "fgsm")


@dataclass(frozen=True)
class MethodConfig:
    """Settings read by the training losses (each method uses the fields it needs).

    Defaults are the Fashion-MNIST ones: eps 0.1, training PGD 7 steps of 0.025; the fields of
    the other methods default to their papers' values (see each field's comment and method).
    """

    lam: float = 0.5  # weight of the pairing / squeezing term (ALP, CLP, LSQ)
    eps: float = 0.1
    attack_steps: int = 7
    attack_step_size: float = 0.025
    attack_random_start: bool = True
    noise_std: float = 0.5  # Gaussian input noise for CLP and LSQ (inputs clipped to [0, 1])
    distance: str = "l2sq"  # logit distance for ALP and CLP, see logitpair.pairing
    pair_reduction: str = "mean"  # over batch and classes, as the official ALP code
    ce_reduction: str = "mean"  # "mean" or "sum" over the batch
    label_smoothing: float = 0.0
    # --- adversarial batch (mpgd, alp) ---
    adv_fraction: float = 0.5  # weight f of the adversarial CE: (1 - f) CE(clean) + f CE(adv); 0.5 = joint-batch mean
    attack: str = "pgd"  # training attack of mpgd / alp: "pgd" or "fgsm-rs", see logitpair.methods.crafting
    fgsm_rs_alpha_ratio: float = 1.25  # FGSM-RS step = ratio * eps (Wong et al. 2020: 1.25)
    # --- feature pairing (alp) ---
    pair_layer: str = ""  # dotted module name whose flattened output is paired, e.g. "features.3"
    pair_target: str = "logits"  # what alp pairs: "logits", "features" (of pair_layer) or "both"
    # --- label smoothing, mixup ---
    smoothing: float = 0.1  # delta of the "ls" method: targets (1 - delta) one-hot + delta / K (Szegedy et al.)
    mixup_alpha: float = 1.0  # mixup: lambda ~ Beta(alpha, alpha) (Zhang et al.: 1.0 CIFAR-10, 0.2 ImageNet)
    # --- VAT ---
    vat_eps: float = 2.0  # L2 radius of the virtual adversarial perturbation ([0, 1] pixels, MNIST-like)
    # finite-difference radius of the power iteration: ours, measured in float32 (Miyato et al.'s code: 1e-6,
    # whose direction is mostly float32 rounding noise; see logitpair.methods.vat)
    vat_xi: float = 1e-3
    vat_iters: int = 1  # power iterations
    vat_alpha: float = 1.0  # weight of the KL term (Miyato et al.: 1)
    # --- TRADES ---
    beta: float = 6.0  # weight of the KL term (Zhang et al. 2019: 6.0 CIFAR-10, 1.0 MNIST)
    # --- Kurakin / ensemble adversarial training ---
    adv_weight: float = 0.3  # lambda of Kurakin et al.: weight of each adversarial example's CE
    random_eps: bool = True  # per-example eps ~ truncated normal on [0, eps], sigma eps/2 (Kurakin); False: eps
    ens_attack: str = "step-ll"  # single-step attack of ens-adv: "step-ll" or "fgsm"

    def __post_init__(self) -> None:
        if not self.lam >= 0:
            raise ConfigError(f"lam: expected >= 0, got {self.lam}")
        if not 0 <= self.eps <= 1:
            raise ConfigError(f"eps: expected 0 <= eps <= 1, got {self.eps}")
        if self.attack_steps < 1:
            raise ConfigError(f"attack_steps: expected >= 1, got {self.attack_steps}")
        if not self.attack_step_size > 0:
            raise ConfigError(f"attack_step_size: expected > 0, got {self.attack_step_size}")
        if not self.noise_std >= 0:
            raise ConfigError(f"noise_std: expected >= 0, got {self.noise_std}")
        if self.distance not in DISTANCES:
            raise ConfigError(f"distance: expected one of {', '.join(DISTANCES)}, got {self.distance!r}")
        if self.pair_reduction not in REDUCTIONS:
            raise ConfigError(f"pair_reduction: expected one of {', '.join(REDUCTIONS)}, got {self.pair_reduction!r}")
        if self.ce_reduction not in ("mean", "sum"):
            raise ConfigError(f"ce_reduction: expected mean or sum, got {self.ce_reduction!r}")
        if not 0 <= self.label_smoothing < 1:
            raise ConfigError(f"label_smoothing: expected 0 <= value < 1, got {self.label_smoothing}")
        if not 0 < self.adv_fraction <= 1:
            raise ConfigError(f"adv_fraction: expected 0 < value <= 1, got {self.adv_fraction}")
        if self.attack not in TRAINING_ATTACKS and parse_official(self.attack) is None:
            raise ConfigError(
                f"attack: expected one of {', '.join(TRAINING_ATTACKS)} or the official notation "
                f"pgd|pgdll|pgdrnd_EPS_STEP_NITER (e.g. pgdll_16_2_10), got {self.attack!r}"
            )
        if not self.fgsm_rs_alpha_ratio > 0:
            raise ConfigError(f"fgsm_rs_alpha_ratio: expected > 0, got {self.fgsm_rs_alpha_ratio}")
        if self.pair_target not in PAIR_TARGETS:
            raise ConfigError(f"pair_target: expected one of {', '.join(PAIR_TARGETS)}, got {self.pair_target!r}")
        if (self.pair_target == "logits") != (self.pair_layer == ""):
            raise ConfigError(
                f"pair_layer: must be set exactly when pair_target is 'features' or 'both' "
                f"(pair_layer={self.pair_layer!r}, pair_target={self.pair_target!r})"
            )
        if not 0 <= self.smoothing < 1:
            raise ConfigError(f"smoothing: expected 0 <= value < 1, got {self.smoothing}")
        if not self.mixup_alpha > 0:
            raise ConfigError(f"mixup_alpha: expected > 0, got {self.mixup_alpha}")
        if not self.vat_eps >= 0:
            raise ConfigError(f"vat_eps: expected >= 0, got {self.vat_eps}")
        if not self.vat_xi > 0:
            raise ConfigError(f"vat_xi: expected > 0, got {self.vat_xi}")
        if self.vat_iters < 1:
            raise ConfigError(f"vat_iters: expected >= 1, got {self.vat_iters}")
        if not self.vat_alpha >= 0:
            raise ConfigError(f"vat_alpha: expected >= 0, got {self.vat_alpha}")
        if not self.beta >= 0:
            raise ConfigError(f"beta: expected >= 0, got {self.beta}")
        if not self.adv_weight >= 0:
            raise ConfigError(f"adv_weight: expected >= 0, got {self.adv_weight}")
        if self.ens_attack not in ENS_ATTACKS:
            raise ConfigError(f"ens_attack: expected one of {', '.join(ENS_ATTACKS)}, got {self.ens_attack!r}")

    @property
    def threat(self) -> Linf:
        return Linf(self.eps)


LossFn = Callable[[nn.Module, Tensor, Tensor, MethodConfig, BatchContext], tuple[Tensor, dict[str, Tensor]]]
METHODS: Registry = Registry("method")


def cross_entropy(logits: Tensor, y: Tensor, cfg: MethodConfig) -> Tensor:
    return torch.nn.functional.cross_entropy(logits, y, reduction=cfg.ce_reduction, label_smoothing=cfg.label_smoothing)


def add_noise(x: Tensor, std: float, ctx: BatchContext) -> Tensor:
    """Gaussian-noise augmentation ``clip(x + std * N(0, I))`` with the context's randomness."""
    if std == 0:
        return x
    return (x + std * ctx.normal(x, NOISE)).clamp(0.0, 1.0)


def random_start(x: Tensor, cfg: MethodConfig, ctx: BatchContext) -> Tensor | None:
    """The training attack's random start: keyed per sample when ``ctx.keyed``, else None
    (the attack then draws it from ``ctx.generator`` / the global RNG itself)."""
    if not (cfg.attack_random_start and ctx.keyed):
        return None
    return cfg.threat.project(x, x + (2.0 * ctx.uniform(x, START) - 1.0) * cfg.eps)


def accuracy(logits: Tensor, y: Tensor) -> Tensor:
    return (logits.detach().argmax(1) == y).float().mean()
