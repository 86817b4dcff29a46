"""Label smoothing (Szegedy et al. 2016, "Rethinking the Inception Architecture",
https://arxiv.org/abs/1512.00567, Section 7): a baseline of the paper's Table 9."""

from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor, nn

from logitpair.methods.base import METHODS, MethodConfig, accuracy
from logitpair.methods.context import BatchContext


@METHODS.register("ls")
def ls_loss(
    model: nn.Module, x: Tensor, y: Tensor, cfg: MethodConfig, ctx: BatchContext
) -> tuple[Tensor, dict[str, Tensor]]:
    """``CE(f(x), q)`` with smoothed targets ``q = (1 - delta) one_hot(y) + delta / K``, ``delta =
    cfg.smoothing`` (default 0.1, the value of Szegedy et al., https://arxiv.org/abs/1512.00567;
    K = number of classes), reduced by ``cfg.ce_reduction``. This is PyTorch's ``label_smoothing``
    convention (and TensorFlow's); ``cfg.label_smoothing`` (the option other methods pass to their
    CE) is not used here."""
    logits = model(x)
    loss = F.cross_entropy(logits, y, reduction=cfg.ce_reduction, label_smoothing=cfg.smoothing)
    return loss, {"ce": loss.detach(), "acc": accuracy(logits, y)}
