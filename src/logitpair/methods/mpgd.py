"""Mixed-minibatch PGD (M-PGD) and Adversarial Logit Pairing (ALP).

Kannan, Kurakin, Goodfellow 2018, https://arxiv.org/abs/1803.06373, as in the official
``train.py``: PGD examples are crafted for every example of the batch with the model in
eval mode; clean and adversarial inputs are forwarded as one concatenated batch in the
trainer's mode (train mode, so BatchNorm sees the joint batch); the cross-entropy is
averaged over the joint batch (= 1/2 clean + 1/2 adversarial).

Settings (:class:`MPGDSettings`, :class:`ALPSettings`):

- ``adv_fraction`` f: the CE is ``(1 - f) CE(clean) + f CE(adv)`` (each a mean over its half;
  with ``ce_reduction="sum"`` twice the weighted sums, so that f = 0.5 is the sum over the
  joint batch). f = 0.5 (default) computes exactly the joint-batch CE above; f = 1 is Madry et
  al.'s pure adversarial training: ``mpgd`` then forwards the adversarial batch alone, ``alp``
  still forwards the joint batch for its pairing (Mosbach et al.'s "100% AT + ALP").
- ``attack``: the training attack, ``"pgd"`` or ``"fgsm-rs"`` (:mod:`logitpair.methods.crafting`).
- ``distance`` / ``pair_reduction`` / ``pair_layer`` / ``pair_target``: ALP's pairing term
  (:mod:`logitpair.pairing`, :mod:`logitpair.methods.features`); ``distance="kl"`` is ALP with
  the KL divergence of the softmax outputs as the pairing distance.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from logitpair.methods.base import METHODS, accuracy, cross_entropy, joint_step_cost
from logitpair.methods.context import BatchContext
from logitpair.methods.crafting import craft
from logitpair.methods.features import capture, captured, pair_term
from logitpair.methods.settings import TRAINING_PGD_STEPS, PairingSettings, TrainingAttackSettings
from logitpair.settings import between, setting

COST = joint_step_cost(f"PGD-{TRAINING_PGD_STEPS}", TRAINING_PGD_STEPS)


@dataclass(frozen=True, kw_only=True)
class MPGDSettings(TrainingAttackSettings):
    """Mixed minibatch: the adversarial examples' share of the cross-entropy."""

    adv_fraction: float = setting(
        0.5,
        "weight f of the adversarial CE: (1 - f) CE(clean) + f CE(adv); 0.5 = joint-batch mean, 1 = Madry et al.",
        check=between(0, 1, open_low=True),
    )


@dataclass(frozen=True, kw_only=True)
class ALPSettings(PairingSettings, MPGDSettings):
    """Adversarial Logit Pairing: M-PGD plus λ times the pairing distance of clean and adversarial logits."""


def mixed_ce(clean: Tensor | None, adv: Tensor, y: Tensor, cfg: MPGDSettings) -> Tensor:
    """``(1 - f) CE(clean) + f CE(adv)`` with ``f = cfg.adv_fraction`` (``clean`` may be None when f = 1).

    f = 0.5 is computed as the CE of the concatenated joint batch, bit for bit the M-PGD loss of
    the official code. ``ce_reduction="sum"``: ``2 ((1 - f) sum CE(clean) + f sum CE(adv))``.
    """
    f = cfg.adv_fraction
    if f == 0.5 and clean is not None:
        return cross_entropy(torch.cat([clean, adv]), torch.cat([y, y]), cfg)
    scale = 1.0 if cfg.ce_reduction == "mean" else 2.0

    def part(logits: Tensor) -> Tensor:
        ce = F.cross_entropy(logits, y, reduction=cfg.ce_reduction, label_smoothing=cfg.label_smoothing)
        return scale * ce

    if f == 1.0 or clean is None:
        return f * part(adv)
    return (1.0 - f) * part(clean) + f * part(adv)


@METHODS.register("mpgd", settings=MPGDSettings, cost=COST)
def mpgd_loss(
    model: nn.Module, x: Tensor, y: Tensor, cfg: MPGDSettings, ctx: BatchContext
) -> tuple[Tensor, dict[str, Tensor]]:
    """Mixed-minibatch PGD adversarial training (M-PGD): half clean, half PGD cross-entropy.

    ``1/2 CE(clean) + 1/2 CE(PGD)``: CE over the joint batch, reduced by ``cfg.ce_reduction``
    (default mean). PGD: ``cfg.attack_steps`` steps of ``cfg.attack_step_size`` in ``Linf(cfg.eps)``.
    With ``cfg.adv_fraction`` f: ``(1 - f) CE(clean) + f CE(adv)``; f = 1 trains on the adversarial
    batch alone (Madry et al. 2018, https://arxiv.org/abs/1706.06083; no clean forward)."""
    x_adv = craft(model, x, y, cfg, ctx)
    if cfg.adv_fraction == 1.0:
        adv = model(x_adv)
        loss = mixed_ce(None, adv, y, cfg)
        return loss, {"ce": loss.detach(), "acc_adv": accuracy(adv, y)}
    logits = model(torch.cat([x, x_adv]))
    clean, adv = logits[: len(x)], logits[len(x) :]
    loss = mixed_ce(clean, adv, y, cfg)
    return loss, {"ce": loss.detach(), "acc": accuracy(clean, y), "acc_adv": accuracy(adv, y)}


@METHODS.register("alp", settings=ALPSettings, cost=COST)
def alp_loss(
    model: nn.Module, x: Tensor, y: Tensor, cfg: ALPSettings, ctx: BatchContext
) -> tuple[Tensor, dict[str, Tensor]]:
    """Adversarial Logit Pairing (Kannan et al. 2018): M-PGD plus λ · a clean-adversarial logit distance.

    M-PGD loss ``+ cfg.lam * D(f(x), f(x_adv))``.

    ``D`` is ``pair_distance(..., cfg.distance, cfg.pair_reduction)``: by default the squared
    logit difference averaged over batch and classes (the official ``mean_squared_error``).
    Gradients flow through both the clean and the adversarial logits. With ``cfg.pair_target``
    ``"features"`` / ``"both"`` the flattened output of ``cfg.pair_layer`` is paired instead of /
    as well as the logits (:mod:`logitpair.methods.features`). The M-PGD part follows
    ``cfg.adv_fraction`` (the clean half is always forwarded, for the pairing).
    """
    x_adv = craft(model, x, y, cfg, ctx)
    with capture(ctx.unwrap(model), cfg) as outputs:
        logits = model(torch.cat([x, x_adv]))
    n = len(x)
    clean, adv = logits[:n], logits[n:]
    feats = captured(outputs, cfg)
    ce = mixed_ce(clean, adv, y, cfg)
    pair, parts = pair_term(clean, adv, None if feats is None else feats[:n], None if feats is None else feats[n:], cfg)
    loss = ce + cfg.lam * pair
    return loss, {
        "ce": ce.detach(),
        "pair": pair.detach(),
        **parts,
        "acc": accuracy(clean, y),
        "acc_adv": accuracy(adv, y),
    }
