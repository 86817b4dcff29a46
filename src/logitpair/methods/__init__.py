"""Training methods: losses ``loss(model, x, y, cfg) -> (Tensor, dict)`` in a registry."""

from logitpair.methods import clp, mpgd, regular  # noqa: F401  (registration)
from logitpair.methods.base import METHODS, MethodConfig

__all__ = ["METHODS", "MethodConfig"]
