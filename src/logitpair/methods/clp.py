"""Clean Logit Pairing (CLP) and logit squeezing (LSQ), both with Gaussian-noise inputs.

Kannan et al. 2018, Sections 3.3-3.4. Mosbach et al. 2018 (https://arxiv.org/abs/1810.12042)
showed both mostly mask gradients: evaluate them with the strong suite and ``audit``.
"""

from __future__ import annotations

from dataclasses import dataclass

from torch import Tensor, nn

from logitpair.methods.base import METHODS, REGULAR_STEP, accuracy, add_noise, cross_entropy
from logitpair.methods.context import BatchContext
from logitpair.methods.features import capture, captured, pair_term
from logitpair.methods.settings import LambdaSettings, NoiseSettings, PairingSettings


@dataclass(frozen=True, kw_only=True)
class CLPSettings(PairingSettings, NoiseSettings):
    """Clean logit pairing: pairing of noisy clean examples."""


@dataclass(frozen=True, kw_only=True)
class LSQSettings(NoiseSettings, LambdaSettings):
    """Logit squeezing: λ times the logits' norm, on noisy inputs."""


@METHODS.register("clp", settings=CLPSettings, cost=REGULAR_STEP)
def clp_loss(
    model: nn.Module, x: Tensor, y: Tensor, cfg: CLPSettings, ctx: BatchContext
) -> tuple[Tensor, dict[str, Tensor]]:
    """Clean Logit Pairing (Kannan et al. 2018): CE plus a logit distance between pairs of noisy clean inputs.

    ``CE(f(x~)) + cfg.lam * D(f(x~_i), f(x~_{i+m/2}))`` with ``x~ = clip(x + N(0, noise_std^2))``.

    The batch (already shuffled by the loader) is split in two halves and example ``i`` is
    paired with example ``i + m/2`` (an odd last example is left unpaired). ``D`` as in ALP:
    by default the squared difference averaged over pairs and classes. CE: mean over the batch.
    With ``cfg.pair_layer`` the activations of that layer are paired instead of, or as well as,
    the logits (``cfg.pair_target``), as for ALP.
    """
    xn = add_noise(x, cfg.noise_std, ctx)
    with capture(ctx.unwrap(model), cfg) as outputs:
        logits = model(xn)
    feats = captured(outputs, cfg)
    ce = cross_entropy(logits, y, cfg)
    h = len(x) // 2
    fa, fb = (None, None) if feats is None else (feats[:h], feats[h : 2 * h])
    pair, parts = pair_term(logits[:h], logits[h : 2 * h], fa, fb, cfg)
    loss = ce + cfg.lam * pair
    return loss, {"ce": ce.detach(), "pair": pair.detach(), **parts, "acc": accuracy(logits, y)}


@METHODS.register("lsq", settings=LSQSettings, cost=REGULAR_STEP)
def lsq_loss(
    model: nn.Module, x: Tensor, y: Tensor, cfg: LSQSettings, ctx: BatchContext
) -> tuple[Tensor, dict[str, Tensor]]:
    """Logit squeezing (Kannan et al. 2018): CE plus λ · the logits' norm, on noisy inputs.

    ``CE(f(x~)) + cfg.lam * mean_i ||f(x~_i)||_2`` (unsquared L2 norm of each example's logits,
    averaged over the batch) with ``x~ = clip(x + N(0, noise_std^2))``. CE: mean over the batch."""
    xn = add_noise(x, cfg.noise_std, ctx)
    logits = model(xn)
    ce = cross_entropy(logits, y, cfg)
    norm = logits.norm(dim=1).mean()
    loss = ce + cfg.lam * norm
    return loss, {"ce": ce.detach(), "logit_norm": norm.detach(), "acc": accuracy(logits, y)}
