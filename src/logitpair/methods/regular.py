"""Regular (undefended) training: mean cross-entropy on clean inputs."""

from __future__ import annotations

from torch import Tensor, nn

from logitpair.methods.base import METHODS, REGULAR_STEP, accuracy, cross_entropy
from logitpair.methods.context import BatchContext
from logitpair.methods.settings import LossSettings


@METHODS.register("regular", settings=LossSettings, cost=REGULAR_STEP)
def regular_loss(
    model: nn.Module, x: Tensor, y: Tensor, cfg: LossSettings, ctx: BatchContext
) -> tuple[Tensor, dict[str, Tensor]]:
    """Regular (undefended) training: cross-entropy on clean inputs.

    ``CE(f(x), y)``, reduced by ``cfg.ce_reduction`` (default: mean over the batch)."""
    logits = model(x)
    loss = cross_entropy(logits, y, cfg)
    return loss, {"ce": loss.detach(), "acc": accuracy(logits, y)}
