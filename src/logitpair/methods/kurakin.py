"""Single-step adversarial training on a batch mix: Kurakin et al. and ensemble adversarial training.

- ``kurakin``: Kurakin, Goodfellow, Bengio 2017, "Adversarial Machine Learning at Scale",
  https://arxiv.org/abs/1611.01236 (Algorithm 1, Section 4.1): in each batch of ``m`` examples
  the first ``k = m // 2`` are replaced by step-l.l. examples ``x - eps_i sign(grad_x CE(f(x),
  y_ll))``, ``y_ll = argmin f(x)`` (the least-likely class), and the loss is
  ``(sum_clean CE + lambda sum_adv CE) / (m - k + lambda k)`` with ``lambda = 0.3``
  (``cfg.adv_weight``). Each adversarial example has its own ``eps_i`` from a normal
  ``N(0, sigma)`` truncated to ``[0, eps]`` with ``sigma = eps / 2`` (ImageNet: ``[0, 16/255]``,
  ``sigma = 8/255``): :func:`truncated_normal_eps`. ``cfg.random_eps=False`` uses ``eps`` for all.
- ``ens-adv``: Tramèr, Kurakin, Papernot, Goodfellow, Boneh, McDaniel 2018, "Ensemble Adversarial
  Training: Attacks and Defenses", https://arxiv.org/abs/1705.07204: the same batch mix and loss,
  but the adversarial half is crafted on a source that rotates per batch over the current model
  and the static pre-trained models ``ctx.static_models``: source ``ctx.step % (1 + S)``, 0 = the
  current model. Attack ``cfg.ens_attack``: ``"step-ll"`` (default; ``y_ll`` from the source's
  logits) or ``"fgsm"`` (``x + eps_i sign(grad_x CE(f(x), y))``, true labels). Static models are
  only run in eval mode with frozen parameters: they are never updated and get no gradients.
  Without static models (``S = 0``) ``ens-adv`` with ``step-ll`` is exactly ``kurakin``.

All single-step attacks run in eval mode with frozen parameters (``attack_context``); the mixed
batch ``[x_adv[:k], x[k:]]`` (``m`` examples) is forwarded once in the trainer's mode. With
``cfg.ce_reduction="sum"`` the loss is the weighted sum without the division. ``cfg.label_smoothing``
applies to every CE term.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from logitpair.attacks.common import input_grad
from logitpair.methods.base import METHODS, StepCost
from logitpair.methods.context import START, BatchContext
from logitpair.methods.settings import LossSettings
from logitpair.modes import attack_context
from logitpair.settings import at_least, one_of, setting
from logitpair.threat import Linf

SIGMA_RATIO = 0.5  # Kurakin et al.: sigma = 8/255 for eps in [0, 16/255]
ENS_ATTACKS = ("step-ll", "fgsm")
COST = StepCost("1 gradient step on B/2 + step on B", 1, 0.5, 1)


@dataclass(frozen=True, kw_only=True)
class KurakinSettings(LossSettings):
    """Single-step batch mix (Kurakin et al. 2017)."""

    adv_weight: float = setting(
        0.3, "weight λ of each adversarial example's CE (Kurakin et al.: 0.3)", check=at_least(0)
    )
    random_eps: bool = setting(
        True, "per-example ε ~ normal on [0, eps] truncated, σ = eps/2 (Kurakin et al.); off: eps for every example"
    )


@dataclass(frozen=True, kw_only=True)
class EnsAdvSettings(KurakinSettings):
    """Ensemble adversarial training (Tramèr et al. 2018)."""

    ens_attack: str = setting(
        "step-ll", "single-step attack crafted on the rotating source: step-ll or fgsm", check=one_of(*ENS_ATTACKS)
    )


def truncated_normal_eps(u: Tensor, eps: float, sigma_ratio: float = SIGMA_RATIO) -> Tensor:
    """Map uniforms ``u`` in (0, 1) to ``N(0, sigma)`` truncated to ``[0, eps]``, ``sigma = sigma_ratio eps``.

    Inverse CDF: on ``[0, eps]`` the CDF is ``erf(t / (sigma sqrt 2)) / erf(eps / (sigma sqrt 2))``,
    so ``t = sigma sqrt(2) erfinv(u erf(eps / (sigma sqrt 2)))``. Mean for ``sigma = eps / 2``:
    ``sigma sqrt(2/pi) (1 - e^-2) / erf(sqrt 2) ~= 0.361 eps``.
    """
    if eps == 0:
        return torch.zeros_like(u)
    sigma = sigma_ratio * eps
    scale = math.erf(eps / (sigma * math.sqrt(2.0)))
    return (sigma * math.sqrt(2.0) * torch.erfinv(u * scale)).clamp(0.0, eps)


def example_eps(x: Tensor, cfg: KurakinSettings, ctx: BatchContext) -> Tensor:
    """One ``eps_i`` per example of the batch, shape (N,) (``ctx.uniform``, stream START)."""
    if not cfg.random_eps:
        return torch.full((len(x),), cfg.eps, device=x.device, dtype=x.dtype)
    u = ctx.uniform(torch.empty(len(x), 1, device=x.device, dtype=x.dtype), START)[:, 0]
    return truncated_normal_eps(u, cfg.eps)


def single_step(source: nn.Module, x: Tensor, y: Tensor, eps: Tensor, attack: str, threat: Linf) -> Tensor:
    """``step-ll``: ``x - eps_i sign(grad CE(f(x), y_ll))``; ``fgsm``: ``x + eps_i sign(grad CE(f(x), y))``;
    per-example ``eps`` (N,), clipped to [0, 1]. Runs ``source`` in eval mode with frozen parameters."""
    x = x.detach()
    with attack_context(source):
        if attack == "step-ll":
            with torch.no_grad():
                target = source(x).argmin(1)
            _, _, grad = input_grad(source, x, y, target)  # gradient of -CE(y_ll): ascent = l.l. descent
        else:
            _, _, grad = input_grad(source, x, y, None)
    return threat.step(x, x, grad, eps.view(-1, *[1] * (x.dim() - 1))).detach()


def source_model(model: nn.Module, ctx: BatchContext) -> tuple[int, nn.Module]:
    """The batch's attack source: index ``ctx.step % (1 + len(ctx.static_models))`` and the module
    (0: ``ctx.unwrap(model)``, i >= 1: ``ctx.static_models[i - 1]``)."""
    index = ctx.step % (1 + len(ctx.static_models))
    return index, ctx.unwrap(model) if index == 0 else ctx.static_models[index - 1]


def _mixed_batch_loss(
    model: nn.Module, source: nn.Module, x: Tensor, y: Tensor, cfg: KurakinSettings, ctx: BatchContext, attack: str
) -> tuple[Tensor, dict[str, Tensor]]:
    m, k = len(x), len(x) // 2
    eps = example_eps(x, cfg, ctx)[:k]
    x_adv = single_step(source, x[:k], y[:k], eps, attack, cfg.threat) if k else x[:0]
    logits = model(torch.cat([x_adv, x[k:]]))
    ce = F.cross_entropy(logits, y, reduction="none", label_smoothing=cfg.label_smoothing)
    total = ce[k:].sum() + cfg.adv_weight * ce[:k].sum()
    loss = total / (m - k + cfg.adv_weight * k) if cfg.ce_reduction == "mean" else total
    hits = (logits.detach().argmax(1) == y).float()
    metrics = {"ce": loss.detach(), "acc": hits[k:].mean()}
    if k:
        metrics["acc_adv"] = hits[:k].mean()
        metrics["eps_mean"] = eps.detach().mean()
    return loss, metrics


@METHODS.register("kurakin", settings=KurakinSettings, cost=COST)
def kurakin_loss(
    model: nn.Module, x: Tensor, y: Tensor, cfg: KurakinSettings, ctx: BatchContext
) -> tuple[Tensor, dict[str, Tensor]]:
    """Single-step adversarial training (Kurakin et al. 2017): step-l.l. examples in a weighted batch mix.

    Kurakin et al. 2017 (https://arxiv.org/abs/1611.01236): first half of the batch step-l.l.
    examples (per-example random ``eps_i`` in ``[0, cfg.eps]``), loss
    ``(sum CE_clean + 0.3 sum CE_adv) / (m - k + 0.3 k)``."""
    return _mixed_batch_loss(model, ctx.unwrap(model), x, y, cfg, ctx, "step-ll")


@METHODS.register("ens-adv", settings=EnsAdvSettings, cost=COST)
def ens_adv_loss(
    model: nn.Module, x: Tensor, y: Tensor, cfg: EnsAdvSettings, ctx: BatchContext
) -> tuple[Tensor, dict[str, Tensor]]:
    """Ensemble adversarial training (Tramèr et al. 2018): Kurakin's mix, crafted on static models in turn.

    Ensemble adversarial training (Tramèr et al. 2018, https://arxiv.org/abs/1705.07204): Kurakin's
    batch mix and loss, the adversarial half crafted with ``cfg.ens_attack`` on the source
    ``ctx.step % (1 + len(ctx.static_models))`` (0 = current model). Without static models:
    ``kurakin`` (with ``fgsm`` in place of step-l.l. if asked)."""
    _, source = source_model(model, ctx)
    return _mixed_batch_loss(model, source, x, y, cfg, ctx, cfg.ens_attack)
