"""Model registry: ``create_model(name, num_classes, ...)`` and ``list_models()``."""

from __future__ import annotations

from typing import Any

from torch import nn

from logitpair.registry import Registry

MODELS: Registry = Registry("model")


def create_model(name: str, num_classes: int = 10, **kwargs: Any) -> nn.Module:
    """Build a registered model. Every model maps [0, 1] inputs to logits deterministically."""
    return MODELS.get(name)(num_classes=num_classes, **kwargs)


def list_models() -> list[str]:
    return MODELS.names()
