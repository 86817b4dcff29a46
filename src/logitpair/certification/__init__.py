"""Certification: verified robustness from bound propagation (:mod:`logitpair.bounds`) or exact
verification by MILP (``method="milp"``, :mod:`.exact`), above evaluation. ``certify(model, x, y,
threat=..., method="crown")`` certifies points (also ``logitpair.certify``); ``certify_run(run_dir, opts, write=...)`` backs ``logitpair certify``: a
run's first N test points, a certified and attacked accuracy curve against ε and the sandwich
certified ≤ attacked ≤ clean, checked point by point (:class:`Contradiction` if a certified point
is broken).
"""

from logitpair.certification.certify import METHODS, certify, check_method
from logitpair.certification.exact import MILP_DEFAULTS
from logitpair.certification.result import DECIDERS, MILP_STATUSES, STATUSES, CertifyResult
from logitpair.certification.run import CertifyOptions, certify_markdown, certify_run, sandwich_markdown
from logitpair.certification.sandwich import Contradiction, sandwich

__all__ = [
    "DECIDERS",
    "METHODS",
    "MILP_DEFAULTS",
    "MILP_STATUSES",
    "STATUSES",
    "CertifyOptions",
    "CertifyResult",
    "Contradiction",
    "certify",
    "certify_markdown",
    "certify_run",
    "check_method",
    "sandwich",
    "sandwich_markdown",
]
