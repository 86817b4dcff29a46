"""logitpair: train and honestly evaluate adversarially robust image classifiers.

Implements Adversarial Logit Pairing (Kannan, Kurakin, Goodfellow 2018) and the methods,
attacks and checks around it.
"""

__version__ = "0.1.0"

from logitpair.threat import Linf

__all__ = ["Linf", "__version__", "evaluate", "load_model"]


def load_model(path, *, device="cpu"):
    """Load a trained model from a run directory or checkpoint (see :mod:`logitpair.checkpoint`)."""
    from logitpair.checkpoint import load_model as _load_model

    return _load_model(path, device=device)


def evaluate(model, x, y, **kwargs):
    """Run an attack suite on any model; see :func:`logitpair.protocol.evaluate`."""
    from logitpair.protocol import evaluate as _evaluate

    return _evaluate(model, x, y, **kwargs)
