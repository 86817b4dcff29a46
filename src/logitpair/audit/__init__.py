"""Gradient-masking audit: named checks judged from a model's behaviour, a verdict, a report.

``audit(model, x, y, threat=...)`` runs the checks (:mod:`logitpair.audit.checks`, documented
in :mod:`logitpair.audit.docs`), which share their attack runs through a keyed store
(:mod:`logitpair.audit.store`); ``audit_run(run_dir, write=True)`` does it on a run directory and writes
``audit.json``, ``audit.md`` and plots (:mod:`logitpair.audit.report`).
"""

from logitpair.audit.checks import AuditReport, AuditSettings, Check, audit, paired_rise
from logitpair.audit.docs import CHECK_DOCS, CHECK_NAMES, TOLERANCE_DOC
from logitpair.audit.run import audit_run

__all__ = [
    "CHECK_DOCS",
    "CHECK_NAMES",
    "TOLERANCE_DOC",
    "AuditReport",
    "AuditSettings",
    "Check",
    "audit",
    "audit_run",
    "paired_rise",
]
