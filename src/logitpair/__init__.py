"""logitpair: train and honestly evaluate adversarially robust image classifiers.

Implements Adversarial Logit Pairing (Kannan, Kurakin, Goodfellow 2018) and the methods,
attacks and checks around it. Public entry points: :func:`load_model`, :func:`create_model`,
:func:`evaluate`, :class:`Linf`, ``logitpair.attacks.*`` and ``logitpair.audit.audit``.
"""

from logitpair._version import __version__
from logitpair.threat import Linf

__all__ = ["Linf", "__version__", "create_model", "evaluate", "load_model"]


def load_model(path, *, device="cpu"):
    """Load a trained model from a run directory or checkpoint (see :mod:`logitpair.checkpoint`)."""
    from logitpair.checkpoint import load_model as _load_model

    return _load_model(path, device=device)


def create_model(name, num_classes=10, **kwargs):
    """Build a registered model (``logitpair list`` names them); see :mod:`logitpair.models`."""
    from logitpair.models import create_model as _create_model

    return _create_model(name, num_classes=num_classes, **kwargs)


def evaluate(model, x, y, **kwargs):
    """Run an attack suite on any model; see :func:`logitpair.evaluation.evaluate`."""
    from logitpair.evaluation import evaluate as _evaluate

    return _evaluate(model, x, y, **kwargs)
