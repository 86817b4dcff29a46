"""Evaluation: the protocol (ordered attacks, survivors only, per-example record, resumable),
the named suites, and evaluating a run directory.

``evaluate(model, x, y, threat=..., suite="standard")`` is the public entry point
(also ``logitpair.evaluate``); ``evaluate_run(run_dir, opts)`` backs ``logitpair evaluate``.
"""

from logitpair.evaluation.protocol import ProtocolResult, accuracy_vs_eps, evaluate, run_protocol
from logitpair.evaluation.run import EvalOptions, evaluate_run, evaluation_markdown, test_points
from logitpair.evaluation.spec import AttackSpec, pgd_spec
from logitpair.evaluation.suites import SUITES, get_suite, parse_attacks

__all__ = [
    "SUITES",
    "AttackSpec",
    "EvalOptions",
    "ProtocolResult",
    "accuracy_vs_eps",
    "evaluate",
    "evaluate_run",
    "evaluation_markdown",
    "get_suite",
    "parse_attacks",
    "pgd_spec",
    "run_protocol",
    "test_points",
]
