"""Layers and checks shared by the models: input normalisation inside the model, argument checks."""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn

from logitpair.errors import ConfigError


class Normalize(nn.Module):
    """Per-channel ``(x - mean) / std`` inside the model, so attacks see [0, 1] pixels."""

    def __init__(self, mean: tuple[float, ...], std: tuple[float, ...]) -> None:
        super().__init__()
        self.register_buffer("mean", torch.tensor(mean).view(1, -1, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(std).view(1, -1, 1, 1), persistent=False)

    def forward(self, x: Tensor) -> Tensor:
        return (x - self.mean) / self.std


NORMALIZATIONS: dict[str, tuple[tuple[float, ...], tuple[float, ...]]] = {
    "imagenet": ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225)),
    "cifar10": ((0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616)),
    "inception": ((0.5, 0.5, 0.5), (0.5, 0.5, 0.5)),  # x -> 2x - 1: TF-slim and the official ALP code
}


def input_normalization(kind: str | None, in_channels: int) -> nn.Module:
    """``Normalize`` with the named statistics (buffers, not parameters), or identity for ``None``.

    One-channel inputs use the mean of the three channel statistics.
    """
    if kind is None:
        return nn.Identity()
    if kind not in NORMALIZATIONS:
        raise ConfigError(f"unknown normalize {kind!r}; valid: {', '.join(sorted(NORMALIZATIONS))} or None")
    mean, std = NORMALIZATIONS[kind]
    if in_channels == 1:
        mean, std = (sum(mean) / len(mean),), (sum(std) / len(std),)
    elif in_channels != len(mean):
        raise ConfigError(f"normalize={kind!r} is for {len(mean)} channels, not in_channels={in_channels}")
    return Normalize(mean, std)


def check_model_args(model: str, num_classes: int, in_channels: int, image_size: int, minimum: int) -> None:
    """Raise ``ConfigError`` (a ``ValueError``) for a non-positive size or an input smaller than ``minimum``."""
    if num_classes < 1 or in_channels < 1:
        raise ConfigError(f"{model}: num_classes and in_channels must be >= 1, got {num_classes}, {in_channels}")
    if image_size < minimum:
        raise ConfigError(
            f"{model}: image_size {image_size} is too small; this network needs inputs of at least {minimum}x{minimum}"
        )


def min_size_for_strides(num_stride2: int) -> int:
    """Smallest input for which each of ``num_stride2`` stride-2 layers (output ``ceil(n / 2)``) gets >= 2x2."""
    return 2 ** (num_stride2 - 1) + 1


Stats = tuple[tuple[float, ...], tuple[float, ...]]


def normalization_stats(spec: str, in_channels: int) -> Stats | None:
    """The ``(mean, std)`` a normalisation spec names for ``in_channels`` channels (None: none).

    ``spec`` is ``none``, a name of :data:`NORMALIZATIONS` (``imagenet``, ``inception`` for
    ``2x - 1``, ``cifar10``), ``MEAN,STD`` (the same for every channel) or ``M1,...,MC,S1,...,SC``
    (per channel). One :class:`ConfigError` (option ``input_normalization``) otherwise."""
    text = spec.strip().lower()
    if text == "none":
        return None
    if text in NORMALIZATIONS:
        layer = input_normalization(text, in_channels)
        return tuple(layer.mean.flatten().tolist()), tuple(layer.std.flatten().tolist())
    try:
        values = [float(v) for v in text.split(",")]
    except ValueError:
        values = []
    if len(values) == 2:
        values = [values[0]] * in_channels + [values[1]] * in_channels
    if len(values) != 2 * in_channels or not all(math.isfinite(v) for v in values):
        raise ConfigError(
            f"expected none, {', '.join(NORMALIZATIONS)}, MEAN,STD or {in_channels} means then {in_channels} stds "
            f"(the inputs have {in_channels} channels), got {spec!r}", option="input_normalization",
        )  # fmt: skip
    mean, std = tuple(values[:in_channels]), tuple(values[in_channels:])
    if min(std) <= 0:
        raise ConfigError(f"every std must be > 0, got {spec!r}", option="input_normalization")
    return mean, std


def set_normalization(model: nn.Module, stats: Stats | None) -> nn.Module:
    """``model`` with its input normalisation replaced by ``stats`` (None: none), never stacked:
    the model's :class:`Normalize` layer (or its ``normalize`` identity, our networks' switched-off
    normalisation) is swapped; a model without either gets the layer in front of it
    (``nn.Sequential(Normalize, model)``). Attacks still see [0, 1] pixels."""
    layer: nn.Module = nn.Identity() if stats is None else Normalize(*stats)
    found = [name for name, m in model.named_modules() if isinstance(m, Normalize) and name]
    if len(found) > 1:
        raise ConfigError(
            f"the model has {len(found)} normalisation layers ({', '.join(found)}); which one to replace is unclear",
            option="input_normalization",
        )
    if found:
        parent, _, attr = found[0].rpartition(".")
        setattr(model.get_submodule(parent), attr, layer)
        return model
    if isinstance(getattr(model, "normalize", None), nn.Identity):
        model.normalize = layer
        return model
    return model if stats is None else nn.Sequential(layer, model)
