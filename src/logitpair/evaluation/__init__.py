"""Evaluation: the protocol (ordered attacks, survivors only, per-example record, resumable),
the named suites, evaluating a run directory, transfer studies (source x target matrices), the
one black-box evaluation (``black_box``) and the one evaluation cache (``cache.py``).

``evaluate(model, x, y, threat=..., suite="standard")`` is the public entry point
(also ``logitpair.evaluate``); ``evaluate_run(run_dir, opts)`` backs ``logitpair evaluate``.
"""

from logitpair.evaluation.blackbox import BlackBoxResult, black_box, craft
from logitpair.evaluation.protocol import ProtocolResult, accuracy_vs_eps, evaluate, run_protocol
from logitpair.evaluation.run import EvalOptions, evaluate_run, evaluation_markdown, load_source, test_points
from logitpair.evaluation.spec import AttackSpec, pgd_spec
from logitpair.evaluation.suites import SUITES, get_suite, parse_attacks, suite_norms
from logitpair.evaluation.transfer import (
    TransferOptions,
    TransferResult,
    transfer_markdown,
    transfer_matrix,
    transfer_runs,
)

__all__ = [
    "SUITES",
    "AttackSpec",
    "BlackBoxResult",
    "EvalOptions",
    "ProtocolResult",
    "TransferOptions",
    "TransferResult",
    "accuracy_vs_eps",
    "black_box",
    "craft",
    "evaluate",
    "evaluate_run",
    "evaluation_markdown",
    "get_suite",
    "load_source",
    "parse_attacks",
    "pgd_spec",
    "run_protocol",
    "suite_norms",
    "test_points",
    "transfer_markdown",
    "transfer_matrix",
    "transfer_runs",
]
