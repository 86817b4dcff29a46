"""Models: a registry of classifiers mapping [0, 1] images to logits.

Forward contract: deterministic, differentiable with respect to the input, no noise,
no ``no_grad``/``detach`` inside; normalisation, if any, is a layer of the model.
"""

from logitpair.models import ibp_small, inception, lenet, preact_resnet, resnet, revnet  # noqa: F401  (register the models)
from logitpair.models.ensemble import EnsembleLogits
from logitpair.models.registry import MODELS, create_model, list_models

__all__ = ["MODELS", "EnsembleLogits", "create_model", "list_models"]
