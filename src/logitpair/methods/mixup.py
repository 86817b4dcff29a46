"""mixup (Zhang, Cisse, Dauphin, Lopez-Paz 2018, https://arxiv.org/abs/1710.09412): train on
convex combinations of pairs of examples and of their labels; a baseline of the paper's Table 9.

As the reference code (``facebookresearch/mixup-cifar10``): one ``lambda ~ Beta(alpha, alpha)``
per batch, example ``i`` mixed with example ``perm(i)`` of a random permutation of the batch.

Randomness, all from the batch context (deterministic given ``ctx``): the permutation sorts
``ctx.uniform`` draws (stream PERM); lambda comes from two Gamma(alpha) variates drawn by
Marsaglia and Tsang's rejection method (ACM TOMS 2000) from ``ctx.normal`` / ``ctx.uniform``
draws (stream MIX), ``lambda = G1 / (G1 + G2)``. The rejection loop is unrolled: 16 candidates
per Gamma variate, the first accepted one is used (acceptance >= 95% each, so all 16 fail with
probability < 1e-20; then the mode is used). alpha < 1 uses ``Gamma(a) = Gamma(a + 1) U^(1/a)``.
Everything stays on the device (no host synchronisation); computed in float64, in log space.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from logitpair.methods.base import METHODS, REGULAR_STEP, cross_entropy
from logitpair.methods.context import MIX, PERM, BatchContext
from logitpair.methods.settings import LossSettings
from logitpair.settings import above, setting

CANDIDATES = 16  # unrolled rejection-sampling candidates per Gamma variate


@dataclass(frozen=True, kw_only=True)
class MixupSettings(LossSettings):
    """mixup (Zhang et al. 2018)."""

    alpha: float = setting(
        1.0,
        "mixing weights λ ~ Beta(α, α) (Zhang et al.: 1.0 CIFAR-10, 0.2 ImageNet)",
        check=above(0),
        aliases=("mixup_alpha",),
    )


def log_gamma_variates(alpha: float, normals: Tensor, uniforms: Tensor) -> Tensor:
    """``log G``, ``G ~ Gamma(alpha, 1)``, one per row of ``normals`` (..., C) and ``uniforms`` (..., C + 1).

    Marsaglia-Tsang for shape ``a = alpha`` (``alpha + 1`` when alpha < 1), ``d = a - 1/3``,
    ``c = 1 / sqrt(9 d)``: candidate j is ``d v_j`` with ``v_j = (1 + c z_j)^3``, accepted when
    ``v_j > 0`` and ``log u_j < z_j^2 / 2 + d - d v_j + d log v_j``. For alpha < 1 the last
    uniform ``w`` gives ``Gamma(alpha) = Gamma(alpha + 1) w^(1 / alpha)``.
    """
    a = alpha if alpha >= 1 else alpha + 1.0
    d = a - 1.0 / 3.0
    c = 1.0 / math.sqrt(9.0 * d)
    z, u = normals, uniforms[..., :-1]
    v = (1.0 + c * z) ** 3
    log_v = torch.log(v.clamp_min(torch.finfo(v.dtype).tiny))
    accept = (v > 0) & (torch.log(u) < 0.5 * z * z + d - d * v + d * log_v)
    first = accept.to(torch.int8).argmax(-1, keepdim=True)  # index of the first accepted candidate
    log_g = torch.where(accept.any(-1), (math.log(d) + log_v).gather(-1, first).squeeze(-1), math.log(d))
    if alpha < 1:
        log_g = log_g + torch.log(uniforms[..., -1].clamp_min(torch.finfo(uniforms.dtype).tiny)) / alpha
    return log_g


def sample_beta(alpha: float, normals: Tensor, uniforms: Tensor) -> Tensor:
    """``Beta(alpha, alpha)`` per row from ``normals`` (R, 2, C) and ``uniforms`` (R, 2, C + 1):
    ``G1 / (G1 + G2) = sigmoid(log G1 - log G2)``."""
    log_g = log_gamma_variates(alpha, normals, uniforms)
    return torch.sigmoid(log_g[:, 0] - log_g[:, 1])


def mix_lambda(x: Tensor, alpha: float, ctx: BatchContext) -> Tensor:
    """The batch's ``lambda ~ Beta(alpha, alpha)`` as a 0-dim float64 tensor on ``x.device``.

    Draws one set of candidates per example (the shape keyed draws need) and uses the first row.
    """
    like_n = torch.empty(len(x), 2, CANDIDATES, device=x.device, dtype=torch.float64)
    like_u = torch.empty(len(x), 2, CANDIDATES + 1, device=x.device, dtype=torch.float64)
    return sample_beta(alpha, ctx.normal(like_n, MIX)[:1], ctx.uniform(like_u, MIX)[:1])[0]


def mix_permutation(x: Tensor, ctx: BatchContext) -> Tensor:
    """A random permutation of the batch: argsort of ``ctx.uniform`` draws (stream PERM)."""
    u = ctx.uniform(torch.empty(len(x), 1, device=x.device, dtype=torch.float64), PERM)[:, 0]
    return torch.argsort(u, stable=True)


@METHODS.register("mixup", settings=MixupSettings, cost=REGULAR_STEP)
def mixup_loss(
    model: nn.Module, x: Tensor, y: Tensor, cfg: MixupSettings, ctx: BatchContext
) -> tuple[Tensor, dict[str, Tensor]]:
    """mixup (Zhang et al. 2018): cross-entropy on convex combinations of image pairs and of their labels.

    ``lambda CE(f(x~), y) + (1 - lambda) CE(f(x~), y[perm])`` with ``x~ = lambda x + (1 - lambda)
    x[perm]`` and ``lambda ~ Beta(cfg.alpha, cfg.alpha)`` (default alpha 1.0, the
    reference's CIFAR-10 value; 0.2 for ImageNet; Zhang et al. 2018, https://arxiv.org/abs/1710.09412).
    Equals the CE of the mixed one-hot targets.
    CE: ``cfg.ce_reduction`` and ``cfg.label_smoothing`` apply to both terms. Images stay in
    [0, 1] (a convex combination). ``acc``: lambda-weighted accuracy, as the reference reports."""
    lam = mix_lambda(x, cfg.alpha, ctx).to(x.dtype)
    perm = mix_permutation(x, ctx)
    y_b = y[perm]
    logits = model(lam * x + (1.0 - lam) * x[perm])
    loss = lam * cross_entropy(logits, y, cfg) + (1.0 - lam) * cross_entropy(logits, y_b, cfg)
    pred = logits.detach().argmax(1)
    acc = lam * (pred == y).float().mean() + (1.0 - lam) * (pred == y_b).float().mean()
    return loss, {"ce": loss.detach(), "lam": lam.detach(), "acc": acc.detach()}
