"""Random-noise baseline: random corners of the L-infinity ball.

Not an attack worth the name, but a reference point: a defense whose accuracy under
random corners is close to its accuracy under PGD is either very robust or masking
gradients. Inputs are images in the threat's bounds, shape (N, ...). Example::

    x_noisy = random_noise(model, x, y, threat=Linf(0.3), samples=10)
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from logitpair.attacks.common import check_k, is_success
from logitpair.errors import ConfigError
from logitpair.modes import eval_mode
from logitpair.threat import Threat, require_linf


def random_noise(
    model: nn.Module,
    x: Tensor,
    y: Tensor,
    *,
    threat: Threat,
    samples: int = 10,
    generator: torch.Generator | None = None,
    k: int = 1,
) -> Tensor:
    """Try ``samples`` random corners ``clip(x +- eps)`` (:meth:`Linf.random_corner`; L-infinity only).

    Returns per example a successful sample if there is one (misclassified; with ``k > 1``:
    ``y`` not among the ``k`` largest logits; the highest-CE one), else the highest-CE sample. Forward passes only, in eval mode (restored afterwards).
    """
    linf = require_linf(threat, "noise (random corners of the ball)")
    check_k(k)
    if samples < 1:
        raise ConfigError(f"samples must be >= 1, got {samples}")
    x = x.detach()
    view = (-1,) + (1,) * (x.dim() - 1)
    with eval_mode(model), torch.no_grad():
        best_x = x.clone()
        best_loss = torch.full((len(x),), -float("inf"), device=x.device)
        best_succ = torch.zeros(len(x), dtype=torch.bool, device=x.device)
        for _ in range(samples):
            candidate = linf.random_corner(x, generator)
            logits = model(candidate)
            loss = F.cross_entropy(logits, y, reduction="none").to(best_loss.dtype)
            succ = is_success(logits, y, None, k)
            better = (succ & ~best_succ) | ((succ == best_succ) & (loss > best_loss))
            best_x = torch.where(better.view(view), candidate, best_x)
            best_loss = torch.where(better, loss, best_loss)
            best_succ = best_succ | succ
    return best_x
