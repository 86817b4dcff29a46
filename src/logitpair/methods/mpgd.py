"""Mixed-minibatch PGD (M-PGD) and Adversarial Logit Pairing (ALP).

Kannan, Kurakin, Goodfellow 2018, https://arxiv.org/abs/1803.06373, as in the official
``train.py``: PGD examples are crafted for every example of the batch with the model in
eval mode; clean and adversarial inputs are forwarded as one concatenated batch in the
trainer's mode (train mode, so BatchNorm sees the joint batch); the cross-entropy is
averaged over the joint batch (= 1/2 clean + 1/2 adversarial).
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from logitpair.attacks.pgd import pgd
from logitpair.methods.base import METHODS, MethodConfig, accuracy, cross_entropy, random_start
from logitpair.methods.context import BatchContext
from logitpair.pairing import pair_distance


def _joint_forward(
    model: nn.Module, x: Tensor, y: Tensor, cfg: MethodConfig, ctx: BatchContext
) -> tuple[Tensor, Tensor, Tensor]:
    x_adv = pgd(
        ctx.unwrap(model),
        x,
        y,
        threat=cfg.threat,
        steps=cfg.attack_steps,
        step_size=cfg.attack_step_size,
        random_start=cfg.attack_random_start,
        keep_best=False,
        generator=ctx.generator,
        init=random_start(x, cfg, ctx),
    )
    logits = model(torch.cat([x, x_adv]))
    return logits[: len(x)], logits[len(x) :], torch.cat([y, y])


@METHODS.register("mpgd")
def mpgd_loss(model: nn.Module, x: Tensor, y: Tensor, cfg: MethodConfig, ctx: BatchContext) -> tuple[Tensor, dict[str, Tensor]]:
    """``1/2 CE(clean) + 1/2 CE(PGD)``: CE over the joint batch, reduced by ``cfg.ce_reduction``
    (default mean). PGD: ``cfg.attack_steps`` steps of ``cfg.attack_step_size`` in ``Linf(cfg.eps)``."""
    clean, adv, yy = _joint_forward(model, x, y, cfg, ctx)
    loss = cross_entropy(torch.cat([clean, adv]), yy, cfg)
    return loss, {"ce": loss.detach(), "acc": accuracy(clean, y), "acc_adv": accuracy(adv, y)}


@METHODS.register("alp")
def alp_loss(model: nn.Module, x: Tensor, y: Tensor, cfg: MethodConfig, ctx: BatchContext) -> tuple[Tensor, dict[str, Tensor]]:
    """M-PGD loss ``+ cfg.lam * D(f(x), f(x_adv))``.

    ``D`` is ``pair_distance(..., cfg.distance, cfg.pair_reduction)``: by default the squared
    logit difference averaged over batch and classes (the official ``mean_squared_error``).
    Gradients flow through both the clean and the adversarial logits.
    """
    clean, adv, yy = _joint_forward(model, x, y, cfg, ctx)
    ce = cross_entropy(torch.cat([clean, adv]), yy, cfg)
    pair = pair_distance(clean, adv, cfg.distance, cfg.pair_reduction)
    loss = ce + cfg.lam * pair
    return loss, {
        "ce": ce.detach(),
        "pair": pair.detach(),
        "acc": accuracy(clean, y),
        "acc_adv": accuracy(adv, y),
    }
