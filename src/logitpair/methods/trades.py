"""TRADES: Zhang, Yu, Jiao, Xing, El Ghaoui, Jordan 2019, "Theoretically Principled Trade-off
between Robustness and Accuracy", https://arxiv.org/abs/1901.08573 (reference code
``yaodongyu/TRADES``, ``trades.py``).

Loss ``CE(f(x), y) + beta KL(softmax f(x) || softmax f(x~))``: the KL summed over classes and
averaged over the batch (the reference's ``KLDivLoss(sum) / batch_size``), gradients through
both the clean and the adversarial logits. ``x~`` maximises that KL (with ``f(x)`` fixed) by
PGD: ``cfg.attack_steps`` sign steps of ``cfg.attack_step_size`` in ``Linf(cfg.eps)``, each
followed by projection onto the ball and [0, 1], from ``x + 0.001 N(0, I)`` (``ctx.normal``;
``cfg.attack_random_start`` is not used: at ``x`` itself the KL's gradient is zero).

``beta`` (``cfg.beta``): 6.0 in the reference's CIFAR-10 script (the default here), 1.0 in its
MNIST script (eps 0.3, 40 steps of 0.01). Differences to the reference code, by convention of
this project: the attack runs on ``ctx.unwrap(model)`` in eval mode with frozen parameters (as
the reference, which calls ``model.eval()``), but the training forward is **one** concatenated
batch of clean and adversarial inputs in the trainer's mode (the reference makes separate
train-mode passes over ``x`` and ``x~``, so its BatchNorm statistics differ), and the loss
never calls ``model.train()`` or the optimizer.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor, nn

from logitpair.attacks.iterative import perturb_iterative
from logitpair.methods.base import METHODS, accuracy, cross_entropy, joint_step_cost
from logitpair.methods.context import NOISE, BatchContext
from logitpair.methods.settings import TRAINING_PGD_STEPS, StepSettings
from logitpair.modes import attack_context
from logitpair.pairing import pair_distance
from logitpair.settings import at_least, setting

START_STD = 0.001  # the reference's start: x + 0.001 * N(0, I)


@dataclass(frozen=True, kw_only=True)
class TRADESSettings(StepSettings):
    """TRADES (Zhang et al. 2019)."""

    beta: float = setting(6.0, "weight β of the KL term (Zhang et al.: 6 CIFAR-10, 1 MNIST)", check=at_least(0))


def trades_adversary(model: nn.Module, x: Tensor, cfg: StepSettings, ctx: BatchContext) -> Tensor:
    """PGD on ``KL(p(x) || p(x~))`` (label-free), L-infinity ``cfg.eps``, inputs in [0, 1], (N, C, H, W).

    ``model``: the module to attack (``ctx.unwrap(model)``), run in eval mode with frozen
    parameters; mode and ``requires_grad`` flags restored. Returns detached inputs.
    """
    threat = cfg.threat
    x = x.detach()
    x_adv = x + START_STD * ctx.normal(x, NOISE)
    with attack_context(model):
        with torch.no_grad():
            target = model(x)
        x_adv = perturb_iterative(
            model,
            x,
            x_adv,
            threat=threat,
            steps=cfg.attack_steps,
            step_size=cfg.attack_step_size,
            loss_fn=lambda logits: pair_distance(target, logits, "kl", "sum"),
        )
    return x_adv.detach()


@METHODS.register(
    "trades", settings=TRADESSettings, cost=joint_step_cost(f"PGD-{TRAINING_PGD_STEPS}", TRAINING_PGD_STEPS)
)
def trades_loss(
    model: nn.Module, x: Tensor, y: Tensor, cfg: TRADESSettings, ctx: BatchContext
) -> tuple[Tensor, dict[str, Tensor]]:
    """TRADES (Zhang et al. 2019): CE plus β · the KL between clean and adversarial predictions.

    ``CE(f(x), y) + cfg.beta * KL(p(x) || p(x~))``; CE reduced by ``cfg.ce_reduction`` (default
    mean, as the reference), KL batch-mean of the per-example sum over classes (Zhang et al. 2019,
    https://arxiv.org/abs/1901.08573)."""
    x_adv = trades_adversary(ctx.unwrap(model), x, cfg, ctx)
    logits = model(torch.cat([x, x_adv]))
    clean, adv = logits[: len(x)], logits[len(x) :]
    ce = cross_entropy(clean, y, cfg)
    kl = pair_distance(clean, adv, "kl", "mean")
    loss = ce + cfg.beta * kl
    return loss, {"ce": ce.detach(), "kl": kl.detach(), "acc": accuracy(clean, y), "acc_adv": accuracy(adv, y)}
