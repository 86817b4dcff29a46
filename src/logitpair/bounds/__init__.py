"""Bound propagation: certified lower bounds on a classifier's margins over an L-infinity ball.

``margin_bounds(model, x, y, *, threat, method="crown", **opts)`` (N, K): lower bounds on
``f_y(x') - f_j(x')`` for every ``x'`` of the ball, column ``y`` = +inf; ``certified(...)`` (N,)
booleans; ``interval_bounds(model, lower, upper)``: IBP logit intervals (differentiable).
Methods: ``ibp``, ``crown-ibp``, ``crown``, ``alpha-crown``. The model is read as a chain of
layers (``graph.py``: traced with ``torch.fx``, checked against its output), each a small op
(``ops.py``); the computations are in ``propagate.py``. This package imports only the
foundations (``threat``, ``errors``) and torch.

Example::

    >>> from logitpair.bounds import certified, margin_bounds
    >>> lb = margin_bounds(model, x, y, threat=Linf(0.1), method="crown-ibp")
    >>> certified(model, x, y, threat=Linf(0.1), method="alpha-crown", iterations=20)
"""

from logitpair.bounds.graph import SUPPORTED
from logitpair.bounds.margins import METHODS, ROUNDOFF_RTOL, certified, interval_bounds, margin_bounds

__all__ = ["METHODS", "ROUNDOFF_RTOL", "SUPPORTED", "certified", "interval_bounds", "margin_bounds"]
