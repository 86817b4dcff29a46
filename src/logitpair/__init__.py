"""logitpair: train and honestly evaluate adversarially robust image classifiers.

Implements Adversarial Logit Pairing (Kannan, Kurakin, Goodfellow 2018) and the methods,
attacks and checks around it. Public entry points: :func:`load_model`, :func:`load_run`
(model + :class:`~logitpair.checkpoint.RunInfo`), :func:`create_model`, :func:`evaluate`, :func:`certify`,
:class:`Linf`, :class:`L2`, ``logitpair.attacks.*`` and ``logitpair.audit.audit``.
"""

from logitpair._version import __version__
from logitpair.threat import L2, Linf

__all__ = ["L2", "Linf", "__version__", "certify", "create_model", "evaluate", "load_model", "load_run"]


def load_model(path, *, device="cpu"):
    """Load a trained model from a run directory or checkpoint (see :mod:`logitpair.checkpoint`)."""
    from logitpair.checkpoint import load_model as _load_model

    return _load_model(path, device=device)


def load_run(path, *, device="cpu", eps=None):
    """``(model, RunInfo)`` of a run: the model and what its figures depend on (dataset, eps, model,
    method, image size, input normalisation, training config), resolved once; see
    :func:`logitpair.checkpoint.load_run`."""
    from logitpair.checkpoint import load_run as _load_run

    return _load_run(path, device=device, eps=eps)


def create_model(name, num_classes=10, **kwargs):
    """Build a registered model (``logitpair list`` names them); see :mod:`logitpair.models`."""
    from logitpair.models import create_model as _create_model

    return _create_model(name, num_classes=num_classes, **kwargs)


def evaluate(model, x, y, **kwargs):
    """Run an attack suite on any model; see :func:`logitpair.evaluation.evaluate`."""
    from logitpair.evaluation import evaluate as _evaluate

    return _evaluate(model, x, y, **kwargs)


def certify(model, x, y, **kwargs):
    """Certify points with bound propagation (per-point status, certified accuracy); see
    :func:`logitpair.certification.certify`."""
    from logitpair.certification import certify as _certify

    return _certify(model, x, y, **kwargs)
