"""FGSM with random start ("fast adversarial training"): Wong, Rice, Kolter 2020, "Fast is
better than free: revisiting adversarial training", https://arxiv.org/abs/2001.03994.

Pure adversarial training as in the paper: one FGSM-RS example per clean example and the CE
on the adversarial examples only. Their settings: step ``alpha = 1.25 eps`` (MNIST: eps 0.3,
alpha 0.375), start ``U(-eps, eps)``. Single-step training can overfit catastrophically (robust
accuracy collapses within an epoch); the paper's guard (stop / roll back when PGD accuracy on a
training batch drops) belongs to the training loop, not to this loss.
"""

from __future__ import annotations

from torch import Tensor, nn

from logitpair.methods.base import METHODS, StepCost, accuracy, cross_entropy
from logitpair.methods.context import BatchContext
from logitpair.methods.crafting import craft_fgsm_rs
from logitpair.methods.settings import FGSMRSSettings


@METHODS.register("fgsm-rs", settings=FGSMRSSettings, cost=StepCost("1 gradient step + step on B", 1, 1.0, 1))
def fgsm_rs_loss(
    model: nn.Module, x: Tensor, y: Tensor, cfg: FGSMRSSettings, ctx: BatchContext
) -> tuple[Tensor, dict[str, Tensor]]:
    """Fast adversarial training (Wong et al. 2020): CE on FGSM examples from a random start.

    ``CE(f(x_adv), y)`` with ``x_adv`` = FGSM-RS of step ``cfg.fgsm_rs_alpha_ratio * cfg.eps`` in
    ``Linf(cfg.eps)`` (crafted in eval mode, see :func:`logitpair.methods.crafting.fgsm_rs`), reduced
    by ``cfg.ce_reduction``. Same as ``mpgd`` with ``attack="fgsm-rs"``, ``adv_fraction=1``.
    Wong et al. 2020, https://arxiv.org/abs/2001.03994."""
    x_adv = craft_fgsm_rs(model, x, y, cfg, ctx)
    logits = model(x_adv)
    loss = cross_entropy(logits, y, cfg)
    return loss, {"ce": loss.detach(), "acc_adv": accuracy(logits, y)}
