"""An ensemble of classifiers as one model: the (weighted) mean of their logits.

Tramèr et al.'s ensemble adversarial training and Dong et al.'s MI-FGSM ("ensemble in logits")
attack several source models at once; so do the transfer matrix and ``logitpair evaluate`` with
several runs. Any attack takes an :class:`EnsembleLogits` as its model. Example::

    model = EnsembleLogits([model_a, model_b], weights=[2, 1])   # logits: (2 z_a + z_b) / 3
"""

from __future__ import annotations

from collections.abc import Sequence

from torch import Tensor, nn

from logitpair.errors import ConfigError


class EnsembleLogits(nn.Module):
    """A model whose logits are the (weighted) mean of several models' logits.

    ``weights`` default to equal; they are normalised to sum to 1. Any attack can take it
    as its model; attack contexts reach every member (eval mode, frozen parameters).
    """

    def __init__(self, models: Sequence[nn.Module], weights: Sequence[float] | None = None) -> None:
        super().__init__()
        if len(models) == 0:
            raise ConfigError("EnsembleLogits needs at least one model")
        if weights is None:
            weights = [1.0] * len(models)
        weights = [float(w) for w in weights]
        if len(weights) != len(models):
            raise ConfigError(f"EnsembleLogits: {len(models)} models but {len(weights)} weights")
        if not all(w > 0 and w < float("inf") for w in weights):
            raise ConfigError(f"EnsembleLogits: weights must be positive and finite, got {weights}")
        total = sum(weights)
        self.members = nn.ModuleList(models)
        self.weights = tuple(w / total for w in weights)

    def forward(self, x: Tensor) -> Tensor:
        out = self.weights[0] * self.members[0](x)
        for w, m in zip(self.weights[1:], self.members[1:], strict=True):
            out = out + w * m(x)
        return out
