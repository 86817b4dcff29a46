"""Bound propagation: certified lower bounds on a classifier's margins over an L-infinity ball.

``margin_bounds(model, x, y, *, threat, method="crown", **opts)`` (N, K): lower bounds on
``f_y(x') - f_j(x')`` for every ``x'`` of the ball, column ``y`` = +inf; ``certified(...)`` (N,)
booleans; ``interval_bounds(model, lower, upper)``: IBP logit intervals (differentiable).
Methods: ``ibp``, ``crown-ibp``, ``crown``, ``alpha-crown``. The model is read as a DAG of
layers (``graph.py``: traced with ``torch.fx``, checked against its output; ``dag.py``: the nodes
in topological order, each with the nodes it reads), each a small op (``ops.py``): a chain, or
with residual additions ``a + b`` (``preact-resnet18``), an ``Add`` node whose backward pull-back
gives its coefficients to both terms. The computations are in ``propagate.py``.

Exact verification by mixed-integer programming (MIPVerify, Tjeng et al. 2019,
https://arxiv.org/abs/1711.07356): ``milp.py`` encodes the network over the ball with big-M
constants from these bounds, ``exact.py`` decides a point with HiGHS (``verify_point``; SciPy, the
optional dependency ``logitpair[certify]``, imported when used). This package imports only the
foundations (``threat``, ``errors``), torch and, for the MILP, SciPy.

Example::

    >>> from logitpair.bounds import certified, margin_bounds
    >>> lb = margin_bounds(model, x, y, threat=Linf(0.1), method="crown-ibp")
    >>> certified(model, x, y, threat=Linf(0.1), method="alpha-crown", iterations=20)
"""

from logitpair.bounds.graph import SUPPORTED
from logitpair.bounds.margins import METHODS, ROUNDOFF_RTOL, certified, interval_bounds, margin_bounds

__all__ = ["METHODS", "ROUNDOFF_RTOL", "SUPPORTED", "certified", "interval_bounds", "margin_bounds"]
