"""Feature pairing: pair a hidden layer's activations as well as, or instead of, the logits.

Kannan et al. 2018 (https://arxiv.org/abs/1803.06373) name pairing of other layers as future
work. ``cfg.pair_layer`` is a dotted module name of the model (``dict(model.named_modules())``,
e.g. ``"net.3"`` or ``"features.3"``); ``cfg.pair_target`` is ``"logits"`` (default),
``"features"`` or ``"both"`` (sum of the two distances). The layer's output is captured by a
forward hook during the one training forward (never during the attack) and removed after it;
it is flattened to (N, D) and compared with ``pair_distance(cfg.distance, cfg.pair_reduction)``.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

from torch import Tensor, nn

from logitpair.methods.settings import PairingSettings
from logitpair.pairing import pair_distance


def find_layer(model: nn.Module, name: str) -> nn.Module:
    """The submodule called ``name``; ValueError listing some valid names when there is none."""
    modules = dict(model.named_modules())
    if name and name in modules:
        return modules[name]
    names = [n for n in modules if n]
    shown = ", ".join(names[:12]) + (f", ... ({len(names)} in all)" if len(names) > 12 else "")
    raise ValueError(f"pair_layer: the model has no module {name!r}; valid names: {shown or '(none)'}")


@contextmanager
def capture(model: nn.Module, cfg: PairingSettings) -> Iterator[list[Tensor]]:
    """Record the output of ``cfg.pair_layer`` for the forwards inside the block (nothing when
    ``cfg.pair_target == "logits"``). ``model``: the unwrapped module (``ctx.unwrap(model)``)."""
    outputs: list[Tensor] = []
    if cfg.pair_target == "logits":
        yield outputs
        return
    layer = find_layer(model, cfg.pair_layer)

    def hook(_module: nn.Module, _inputs: object, output: object) -> None:
        if not isinstance(output, Tensor):
            raise TypeError(f"pair_layer: {cfg.pair_layer!r} returns {type(output).__name__}, not a tensor")
        outputs.append(output)

    handle = layer.register_forward_hook(hook)
    try:
        yield outputs
    finally:
        handle.remove()


def captured(outputs: list[Tensor], cfg: PairingSettings) -> Tensor | None:
    """The one captured output, flattened to (N, D); None when nothing was to be captured."""
    if cfg.pair_target == "logits":
        return None
    if len(outputs) != 1:
        raise ValueError(f"pair_layer: {cfg.pair_layer!r} ran {len(outputs)} times in one forward, expected once")
    return outputs[0].flatten(1)


def pair_term(
    logits_a: Tensor, logits_b: Tensor, feats_a: Tensor | None, feats_b: Tensor | None, cfg: PairingSettings
) -> tuple[Tensor, dict[str, Tensor]]:
    """The pairing term ``D(a, b)`` of ``cfg.pair_target`` and its parts as detached metrics."""
    if cfg.pair_target == "logits":
        return pair_distance(logits_a, logits_b, cfg.distance, cfg.pair_reduction), {}
    assert feats_a is not None and feats_b is not None
    feat = pair_distance(feats_a, feats_b, cfg.distance, cfg.pair_reduction)
    if cfg.pair_target == "features":
        return feat, {"pair_features": feat.detach()}
    logit = pair_distance(logits_a, logits_b, cfg.distance, cfg.pair_reduction)
    return logit + feat, {"pair_logits": logit.detach(), "pair_features": feat.detach()}
