"""Certified training: the worst-case logits of a bound propagation as a training target.

- ``ibp``: Gowal, Dvijotham, Stanforth, Bunel, Qin, Uesato, Arandjelovic, Mann, Kohli 2018,
  "On the Effectiveness of Interval Bound Propagation for Training Verifiably Robust Models",
  https://arxiv.org/abs/1810.12715. Loss ``κ CE(f(x), y) + (1 - κ) CE(z_worst, y)``, where
  ``z_worst`` are the worst-case logits of the IBP bounds over the ε-ball (∩ [0, 1]): with
  ``lb_j`` the certified lower bound of the margin ``f_y - f_j``, ``z_worst_y - z_worst_j = lb_j``
  (every margin at its lowest bound), i.e. ``z_worst = -lb`` with 0 at ``y``: ``CE(-lb, y)`` as
  in the reference code (the specification folded into the last layer, their "elision"). Schedule (their MNIST one, Section 4 / Appendix): ε = 0 and κ = 1 for the first
  2,000 steps (warm-up), then ε 0 → ε and κ 1 → 0.5 linearly over 10,000 steps, constant after.
- ``crown-ibp``: Zhang, Chen, Xiao, Gowal, Stanforth, Li, Boning, Hsieh 2020, "Towards Stable and
  Efficient Training of Verifiably Robust Neural Networks", https://arxiv.org/abs/1906.06316
  (reference code ``huanzhang12/CROWN-IBP``, ``train.py``). The margin bound is
  ``β lb_CROWN-IBP + (1 - β) lb_IBP`` with β 1 → 0 (their ``final-beta`` 0) and κ 1 → 0 (the
  paper's κ_start 1, κ_end 0), both linear in ε over the ramp as in the reference code
  (``β = 1 - (ε_t / ε)(1 - β_final)``, likewise κ); warm-up and ramp as ``ibp``.

Every schedule value is a pure function of ``ctx.step`` (the global optimisation step, restored on
resume): ``r = clamp((step - warmup_steps) / ramp_steps, 0, 1)``, ``ε_t = r ε``,
``κ_t = 1 - r (1 - kappa_final)``, ``β_t = 1 - r (1 - beta_final)``. The paper's schedules are in
steps of batch 100 on MNIST (600 steps an epoch); with another batch or dataset set
``warmup_steps`` / ``ramp_steps`` (e.g. to a few epochs' steps). While ε_t = 0 no bound is
computed: the bounds are then the exact margins and the worst-case CE equals the clean CE.

Bounds come from :func:`logitpair.bounds.margin_bounds` on ``ctx.unwrap(model)`` in the trainer's
mode (differentiable in the parameters). A model with BatchNorm in train mode is refused (the
bounds would use the running statistics, the forward pass the batch's): train ``cnn-small`` or
``lenet5`` (no BatchNorm), the models of these papers.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from logitpair.bounds import margin_bounds
from logitpair.errors import ConfigError
from logitpair.methods.base import METHODS, StepCost, accuracy, cross_entropy
from logitpair.methods.context import BatchContext
from logitpair.methods.settings import LossSettings
from logitpair.settings import at_least, between, setting
from logitpair.threat import Linf

IBP_COST = StepCost("IBP bounds + clean: step on 3B (clean, lower, upper)", train_rows=3)
CROWN_IBP_COST = StepCost("CROWN-IBP bounds + clean: step on ~13B (IBP 2B, CROWN K = 10 spec rows)", train_rows=13)


@dataclass(frozen=True, kw_only=True)
class CertifiedSettings(LossSettings):
    """Certified training (Gowal et al. 2018): κ and ε schedules over the training steps."""

    kappa_final: float = setting(
        0.5, "weight κ of the clean CE at the end of the ramp (κ: 1 → this; Gowal et al.: 0.5)", check=between(0, 1)
    )
    warmup_steps: int = setting(
        2000, "steps of clean training (ε = 0, κ = 1) before the ramp (Gowal et al. MNIST: 2,000)", check=at_least(0)
    )
    ramp_steps: int = setting(
        10000, "steps over which ε rises 0 → eps and κ falls (Gowal et al. MNIST: 10,000)", check=at_least(0)
    )

    def ramp(self, step: int) -> float:
        """The ramp's progress r in [0, 1] at global step ``step``."""
        if step < self.warmup_steps:
            return 0.0
        if self.ramp_steps == 0:
            return 1.0
        return min(1.0, (step - self.warmup_steps) / self.ramp_steps)

    def eps_at(self, step: int) -> float:
        return self.ramp(step) * self.eps

    def kappa_at(self, step: int) -> float:
        return 1.0 - self.ramp(step) * (1.0 - self.kappa_final)


@dataclass(frozen=True, kw_only=True)
class CROWNIBPSettings(CertifiedSettings):
    """CROWN-IBP (Zhang et al. 2020): β mixes the CROWN-IBP and IBP bounds."""

    kappa_final: float = setting(
        0.0, "weight κ of the clean CE at the end of the ramp (κ: 1 → this; Zhang et al.: 0)", check=between(0, 1)
    )
    beta_final: float = setting(
        0.0,
        "weight β of the CROWN-IBP bound at the end of the ramp (β: 1 → this; Zhang et al.: 0)",
        check=between(0, 1),
    )

    def beta_at(self, step: int) -> float:
        return 1.0 - self.ramp(step) * (1.0 - self.beta_final)


def refuse_training_batchnorm(model: nn.Module) -> None:
    """:class:`ConfigError` if ``model`` has a BatchNorm layer in train mode."""
    for name, m in model.named_modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.training:
            raise ConfigError(
                f"certified training bounds a model without BatchNorm in train mode; {name or 'the model'} is "
                f"{type(m).__name__} (its bounds would use running statistics, its forward the batch's): "
                "use cnn-small or lenet5",
                option="model",
            )


def worst_case_logits(lower: Tensor, y: Tensor) -> Tensor:
    """Logits ``z`` with ``z_y - z_j = lower_j``: ``-lower`` with 0 at ``y`` (``lower``: margin lower bounds, column ``y`` = +inf)."""
    return -lower.masked_fill(F.one_hot(y, lower.shape[1]).bool(), 0.0)


def _certified_loss(
    model: nn.Module, x: Tensor, y: Tensor, cfg: CertifiedSettings, ctx: BatchContext, bounds: str
) -> tuple[Tensor, dict[str, Tensor]]:
    """``κ CE(f(x), y) + (1 - κ) CE(worst-case logits, y)``; ``bounds``: "ibp" or "crown-ibp" (β-mixed with IBP)."""
    module = ctx.unwrap(model)
    refuse_training_batchnorm(module)
    logits = model(x)
    ce = cross_entropy(logits, y, cfg)
    eps, kappa = cfg.eps_at(ctx.step), cfg.kappa_at(ctx.step)
    zero = torch.zeros((), device=x.device)
    if eps == 0:  # exact margins: the worst-case CE is the clean CE
        return ce, {"ce": ce.detach(), "robust_ce": ce.detach(), "acc": accuracy(logits, y), "acc_cert": zero}
    lower = robust_bounds(module, x, y, eps, bounds, cfg, ctx.step)
    robust = cross_entropy(worst_case_logits(lower, y), y, cfg)
    loss = kappa * ce + (1.0 - kappa) * robust
    certified = (lower.detach() > 0).all(1).float().mean()
    return loss, {"ce": ce.detach(), "robust_ce": robust.detach(), "acc": accuracy(logits, y), "acc_cert": certified}


def robust_bounds(
    module: nn.Module, x: Tensor, y: Tensor, eps: float, bounds: str, cfg: CertifiedSettings, step: int
) -> Tensor:
    """The margin lower bounds at radius ``eps``: IBP, or ``β CROWN-IBP + (1 - β) IBP`` (β at ``step``)."""
    threat = Linf(eps)
    ibp = margin_bounds(module, x, y, threat=threat, method="ibp")
    if bounds == "ibp":
        return ibp
    assert isinstance(cfg, CROWNIBPSettings)
    beta = cfg.beta_at(step)
    if beta == 0:
        return ibp
    crown = margin_bounds(module, x, y, threat=threat, method="crown-ibp")
    mixed = beta * crown + (1.0 - beta) * ibp
    return mixed.masked_fill(F.one_hot(y, mixed.shape[1]).bool(), float("inf"))  # inf - inf at y


@METHODS.register("ibp", settings=CertifiedSettings, cost=IBP_COST)
def ibp_loss(
    model: nn.Module, x: Tensor, y: Tensor, cfg: CertifiedSettings, ctx: BatchContext
) -> tuple[Tensor, dict[str, Tensor]]:
    """IBP certified training (Gowal et al. 2018): κ · clean CE + (1 − κ) · CE of the IBP worst-case logits.

    κ 1 → ``kappa_final`` and ε 0 → ``eps`` over ``ramp_steps`` after ``warmup_steps``
    (https://arxiv.org/abs/1810.12715)."""
    return _certified_loss(model, x, y, cfg, ctx, "ibp")


@METHODS.register("crown-ibp", settings=CROWNIBPSettings, cost=CROWN_IBP_COST)
def crown_ibp_loss(
    model: nn.Module, x: Tensor, y: Tensor, cfg: CROWNIBPSettings, ctx: BatchContext
) -> tuple[Tensor, dict[str, Tensor]]:
    """CROWN-IBP certified training (Zhang et al. 2020): worst-case logits of β · CROWN-IBP + (1 − β) · IBP bounds.

    β 1 → ``beta_final``, κ 1 → ``kappa_final``, ε 0 → ``eps`` over the ramp
    (https://arxiv.org/abs/1906.06316)."""
    return _certified_loss(model, x, y, cfg, ctx, "crown-ibp")
