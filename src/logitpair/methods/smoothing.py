"""Label smoothing (Szegedy et al. 2016, "Rethinking the Inception Architecture",
https://arxiv.org/abs/1512.00567, Section 7): a baseline of the paper's Table 9."""

from __future__ import annotations

from dataclasses import dataclass

from torch import Tensor, nn

from logitpair.methods.base import METHODS, REGULAR_STEP, accuracy, cross_entropy
from logitpair.methods.context import BatchContext
from logitpair.methods.settings import LABEL_SMOOTHING, LossSettings
from logitpair.settings import setting


@dataclass(frozen=True, kw_only=True)
class LSSettings(LossSettings):
    """Label smoothing: the cross-entropy's label smoothing, on by default."""

    label_smoothing: float = setting(
        0.1,
        "label smoothing δ of every cross-entropy: targets (1 - δ) one-hot + δ / K (Szegedy et al. 2016)",
        check=LABEL_SMOOTHING,
        aliases=("smoothing",),
    )


@METHODS.register("ls", settings=LSSettings, cost=REGULAR_STEP)
def ls_loss(
    model: nn.Module, x: Tensor, y: Tensor, cfg: LSSettings, ctx: BatchContext
) -> tuple[Tensor, dict[str, Tensor]]:
    """Label smoothing (Szegedy et al. 2016): cross-entropy against smoothed one-hot targets.

    ``CE(f(x), q)`` with smoothed targets ``q = (1 - delta) one_hot(y) + delta / K``, ``delta =
    cfg.label_smoothing`` (default 0.1 here, the value of Szegedy et al.,
    https://arxiv.org/abs/1512.00567; K = number of classes; ``smoothing`` is its old name),
    reduced by ``cfg.ce_reduction``. This is PyTorch's ``label_smoothing`` convention (and
    TensorFlow's): ``ls`` is ``regular`` with another default."""
    logits = model(x)
    loss = cross_entropy(logits, y, cfg)
    return loss, {"ce": loss.detach(), "acc": accuracy(logits, y)}
