"""Virtual adversarial training (VAT): Miyato, Maeda, Koyama, Ishii 2018, "Virtual Adversarial
Training: a Regularization Method for Supervised and Semi-Supervised Learning",
https://arxiv.org/abs/1704.03976 (TPAMI). A baseline the ALP paper compares with (Section 5).

Loss ``CE(f(x), y) + alpha KL(p(x) || p(x + r_adv))`` with ``p = softmax f``, ``p(x)`` detached
(a fixed target), the KL summed over classes and averaged over the batch. ``r_adv`` is an
**L2** perturbation of norm ``cfg.vat_eps`` per example, found by power iteration:
``d ~ N(0, I)`` normalised (``ctx.normal``), then ``cfg.vat_iters`` times
``d <- g / ||g||_2`` with ``g = grad_r KL(p(x) || p(x + r))`` at ``r = xi d``;
``r_adv = eps_vat d``. ``g`` is backpropagated from ``q - p`` (:func:`kl_logit_gradient`, the KL's
gradient in the logits of ``x + r``) computed without cancellation.

Settings (:class:`VATSettings`): ``vat_alpha`` 1 (the paper's alpha), ``vat_iters`` 1 (one power
iteration suffices, the paper's default), ``vat_xi`` 1e-3 (ours, measured for float32, see
*Precision* below; Miyato et al.'s code uses 1e-6, still available as ``vat_xi=1e-6`` or
``--vat-xi 1e-6``; ``lyakaap/VAT-pytorch`` uses 10 on unit-norm ``d``), ``vat_eps`` 2.0: the VAT papers' MNIST
experiments use an L2 radius of about 2 on [0, 1] pixels (784 dimensions; their 8.0 for
CIFAR-10 is on ZCA-whitened inputs, another scale). For other datasets tune it.

Choices of this implementation:

- ``x + r_adv`` is clipped to [0, 1], so the model only sees valid images; ``||r_adv||_2 =
  eps_vat`` holds *before* clipping (after it the norm can be smaller). The power iteration's
  ``x + xi d`` is not clipped (a finite difference, not an input).
- The power iteration runs on ``ctx.unwrap(model)`` in eval mode with frozen parameters
  (``attack_context``, as every attack here); the reference code uses train-mode forwards
  without BatchNorm updates. The final forward of ``x`` and ``x + r_adv`` is one concatenated
  batch in the trainer's mode, and ``p(x)`` is taken from its clean half.
- Precision: ``xi`` trades float32 rounding against the finite difference's curvature error.
  With ``d`` of unit L2 norm over 784 pixels, ``xi = 1e-6`` moves a pixel by about 4e-8, below
  float32's spacing of pixels in [0.5, 1] (6e-8), so ``x + xi d`` mostly rounds back to ``x``
  and the direction is mostly rounding noise. Cosine with the exact direction (the same
  iteration in float64 at ``xi`` -> 0, same ``d``), median (minimum) over LeNet-5 untrained on
  uniform and on Fashion-MNIST inputs and after 300 training steps on Fashion-MNIST: ``xi``
  1e-6: 0.15-0.45 (-1.0); 1e-4: 0.994-0.9998 (-0.30); 1e-3: 0.999-1.000 (0.89); 3e-3:
  0.996-0.9999 (0.96); 1e-2: 0.985-0.999 (0.86). Hence the default 1e-3. The per-pixel step is
  ``xi / sqrt(D)``: for much larger inputs scale ``xi`` up. In float64 any small ``xi`` is accurate.
- Confident points: ``q - p`` taken as ``softmax(x + r) - softmax(x)`` loses its top class to
  float32 rounding once ``1 - max p`` is below about 1e-4 (the top class is within 6e-8 of 1 in
  both), and the direction turns to noise or even reverses (cosine down to -0.96 with the exact
  direction on a briefly trained LeNet-5); :func:`kl_logit_gradient` keeps it (1.00 on a linear
  model with ``1 - max p`` down to 1e-10).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from logitpair.methods.base import METHODS, accuracy, cross_entropy, joint_step_cost
from logitpair.methods.context import NOISE, BatchContext
from logitpair.methods.settings import LossSettings
from logitpair.modes import attack_context
from logitpair.pairing import pair_distance
from logitpair.settings import above, at_least, setting


@dataclass(frozen=True, kw_only=True)
class VATSettings(LossSettings):
    """Virtual adversarial training (Miyato et al. 2018): VAT's own ε, ξ, power iterations and α."""

    vat_eps: float = setting(
        2.0, "L2 radius ε of the virtual adversarial perturbation ([0, 1] pixels, MNIST-like)", check=at_least(0)
    )
    vat_xi: float = setting(
        1e-3,
        "finite-difference radius ξ of the power iteration (ours, for float32; Miyato et al.'s code: 1e-6)",
        check=above(0),
    )
    vat_iters: int = setting(1, "power iterations", check=at_least(1))
    vat_alpha: float = setting(1.0, "weight α of the KL term (Miyato et al.: 1)", check=at_least(0))


def l2_unit(v: Tensor) -> Tensor:
    """``v / ||v||_2`` per example (dims 1..); rescaled by its max first so tiny gradients do not
    underflow; an all-zero example stays zero."""
    dims = tuple(range(1, v.dim()))
    tiny = torch.finfo(v.dtype).tiny
    v = v / v.abs().amax(dim=dims, keepdim=True).clamp_min(tiny)
    return v / v.pow(2).sum(dim=dims, keepdim=True).sqrt().clamp_min(tiny)


def kl_logit_gradient(target: Tensor, logits: Tensor) -> Tensor:
    """``q - p`` (``p = softmax target``, ``q = softmax logits``, rows): the gradient of
    ``sum_i KL(p_i || q_i)`` in ``logits``, computed from the logit change ``dz = logits - target``
    without cancellation: ``q_k - p_k = p_k expm1(dz_k - log1p(sum_j p_j expm1(dz_j)))``, and the
    class where ``p`` is largest as minus the sum of the others, so a confident ``p`` (top class
    within float32 rounding of 1) keeps its signal. Rows where this overflows (logit changes of
    about 80 or more) fall back to ``softmax(logits) - p``."""
    p = F.softmax(target, dim=1)
    dz = logits - target
    total = (p * torch.expm1(dz)).sum(dim=1, keepdim=True)  # Z(logits) / Z(target) - 1
    diff = p * torch.expm1(dz - torch.log1p(total))
    top = p.argmax(dim=1, keepdim=True)
    diff = diff.scatter(1, top, 0.0)
    diff = diff.scatter(1, top, -diff.sum(dim=1, keepdim=True))
    finite = torch.isfinite(total) & torch.isfinite(diff).all(dim=1, keepdim=True)
    return torch.where(finite, diff, F.softmax(logits, dim=1) - p)


def vat_perturbation(model: nn.Module, x: Tensor, cfg: VATSettings, ctx: BatchContext) -> Tensor:
    """``r_adv`` (not clipped): per-example L2 norm ``cfg.vat_eps``, shape of ``x``, detached.

    ``model``: the module to run (``ctx.unwrap(model)``), used in eval mode with frozen
    parameters; its mode and ``requires_grad`` flags are restored.
    """
    x = x.detach()
    d = l2_unit(ctx.normal(x, NOISE))
    with attack_context(model):
        with torch.no_grad():
            target = model(x)
        for _ in range(cfg.vat_iters):
            r = (cfg.vat_xi * d).requires_grad_(True)
            logits = model(x + r)
            # the gradient of sum KL(p(x) || p(x + r)) in r, through the stable q - p
            (grad,) = torch.autograd.grad(logits, r, grad_outputs=kl_logit_gradient(target, logits.detach()))
            d = l2_unit(grad)
    return (cfg.vat_eps * d).detach()


@METHODS.register("vat", settings=VATSettings, cost=joint_step_cost("1 gradient step", 1))
def vat_loss(
    model: nn.Module, x: Tensor, y: Tensor, cfg: VATSettings, ctx: BatchContext
) -> tuple[Tensor, dict[str, Tensor]]:
    """Virtual adversarial training (Miyato et al. 2018): CE plus the KL to a virtual adversarial input.

    ``CE(f(x), y) + cfg.vat_alpha * KL(p(x) || p(clip(x + r_adv)))``, ``p(x)`` detached; CE
    reduced by ``cfg.ce_reduction``, KL summed over classes and averaged over the batch (Miyato et al.
    2018, https://arxiv.org/abs/1704.03976)."""
    r_adv = vat_perturbation(ctx.unwrap(model), x, cfg, ctx)
    logits = model(torch.cat([x, (x + r_adv).clamp(0.0, 1.0)]))
    clean, adv = logits[: len(x)], logits[len(x) :]
    ce = cross_entropy(clean, y, cfg)
    kl = pair_distance(clean.detach(), adv, "kl", "mean")
    loss = ce + cfg.vat_alpha * kl
    return loss, {"ce": ce.detach(), "kl": kl.detach(), "acc": accuracy(clean, y), "acc_adv": accuracy(adv, y)}
