"""Regular (undefended) training: mean cross-entropy on clean inputs, optionally with Gaussian
noise augmentation (``noise_std``: the base classifiers of randomized smoothing, Cohen et al. 2019)."""

from __future__ import annotations

from dataclasses import dataclass

from torch import Tensor, nn

from logitpair.methods.base import METHODS, REGULAR_STEP, accuracy, add_noise, cross_entropy
from logitpair.methods.context import BatchContext
from logitpair.methods.settings import LossSettings
from logitpair.settings import at_least, setting


@dataclass(frozen=True, kw_only=True)
class RegularSettings(LossSettings):
    """Gaussian augmentation of regular training (Cohen et al. 2019)."""

    noise_std: float = setting(
        0.0,
        "σ of the Gaussian noise added to the inputs, NOT clipped (Cohen et al. 2019's training for randomized "
        "smoothing: certify with --method smoothing --sigma at this σ); 0 = clean inputs",
        check=at_least(0),
    )


@METHODS.register("regular", settings=RegularSettings, cost=REGULAR_STEP)
def regular_loss(
    model: nn.Module, x: Tensor, y: Tensor, cfg: LossSettings, ctx: BatchContext
) -> tuple[Tensor, dict[str, Tensor]]:
    """Regular (undefended) training: cross-entropy on clean inputs, or on noisy ones.

    ``CE(f(x + N(0, noise_std^2 I)), y)``, reduced by ``cfg.ce_reduction`` (default: mean over the
    batch). The noise (default σ 0: none, the clean inputs themselves) is drawn per sample like
    CLP's (keyed by seed, epoch and dataset index) and, as Cohen et al. 2019
    (https://arxiv.org/abs/1902.02918), not clipped to [0, 1]: randomized smoothing certifies the
    classifier under exactly that noise."""
    logits = model(add_noise(x, getattr(cfg, "noise_std", 0.0), ctx, clip=False))  # any LossSettings: clean
    loss = cross_entropy(logits, y, cfg)
    return loss, {"ce": loss.detach(), "acc": accuracy(logits, y)}
