"""The ``logitpair audit`` subcommand: gradient-masking checks on a run directory.

``logitpair audit RUN [--source OTHER_RUN] [--quick] [--n N] [--eps EPS] [--suite NAME]
[--steps K] [--restarts R] [--step-size A] [--seed S] [--data-dir D] [--json] [--quiet]`` writes ``audit.json``, ``audit.md`` and plots into RUN and prints the Markdown report (or
the JSON with ``--json``). See :mod:`logitpair.audit.checks` for the checks.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
from typing import Any

from logitpair.cli.common import fraction
from logitpair.cli.external import add_external_flags, external_from_args
from logitpair.distributed import env_world
from logitpair.errors import ConfigError
from logitpair.progress import make_progress


def run(args: argparse.Namespace) -> int:
    from logitpair.audit import AuditSettings, audit_run
    from logitpair.audit.report import audit_markdown
    from logitpair.evaluation import get_suite, pgd_spec

    if env_world().active:  # N processes would each run (and write) the whole audit
        raise ConfigError("audit under torchrun: its checks share attack runs, so it runs in one process; "
                          "run `logitpair audit` without torchrun")  # fmt: skip
    if args.n is not None and args.n < 1:
        raise ConfigError(f"--n: expected >= 1, got {args.n}")
    for flag, value in (("--steps", args.steps), ("--restarts", args.restarts)):
        if value < 1:
            raise ConfigError(f"{flag}: expected >= 1, got {value}")
    settings = AuditSettings.preset(args.quick)
    if args.suite is not None:
        get_suite(args.suite)  # an unknown name fails here, naming the known ones
        settings = dataclasses.replace(settings, suite=args.suite)
    settings = dataclasses.replace(settings, baseline=pgd_spec(args.steps, args.restarts, args.step_size))
    external = external_from_args(args)
    quiet = bool(args.quiet or os.environ.get("CI"))
    doc = audit_run(
        args.run,
        source=args.source,
        quick=args.quick,
        n=args.n,
        seed=args.seed,
        data_dir=args.data_dir,
        progress=make_progress(quiet),
        eps=args.eps,
        settings=settings,
        device=args.device,
        external=external,
        write=True,
    )
    print(json.dumps(doc, indent=2) if args.json else audit_markdown(doc))
    return 0


def add_parser(subparsers: Any) -> argparse.ArgumentParser:
    """Add ``audit`` to the ``logitpair`` command's subparsers."""
    p = subparsers.add_parser(
        "audit",
        help="gradient-masking audit of a run (Carlini et al. 2019 checks); writes audit.json / audit.md",
        description="Run the named gradient-masking checks of logitpair.audit on a trained run: eps "
        "monotonicity, large-eps success, steps / restarts / FGSM / noise / transfer / Square "
        "consistency, the PGD-40 vs strong-suite gap, determinism and gradient health.",
    )
    p.add_argument("run", help="run directory or checkpoint (a model from elsewhere: the folder for its results)")
    p.add_argument("--source", help="independently trained run used as the transfer (black-box) source")
    p.add_argument("--quick", action="store_true", help="quick suite and shorter series (default N 200 instead of 500)")
    p.add_argument("--n", type=int, default=None, help="first N test points (default 500, or 200 with --quick)")
    p.add_argument("--eps", type=fraction, default=None, help="L-inf radius (default: the training eps)")
    p.add_argument(
        "--suite",
        default=None,
        help="strong suite of baseline_gap and square_not_stronger: quick, standard or thorough "
        "(default: standard, quick with --quick)",
    )
    p.add_argument("--steps", type=int, default=40, help="baseline PGD steps (default 40)")
    p.add_argument("--restarts", type=int, default=2, help="baseline PGD random restarts (default 2)")
    p.add_argument("--step-size", type=fraction, default=None, help="baseline PGD step (default 2.5*eps/steps)")
    p.add_argument("--seed", type=int, default=0, help="seed of every random start (default 0)")
    p.add_argument("--data-dir", help="override the dataset folder")
    p.add_argument("--device", default="cpu", help="cpu (default), cuda or cuda:N; the audit runs in float32")
    p.add_argument("--json", action="store_true", help="print the JSON report instead of Markdown")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    add_external_flags(p)
    p.set_defaults(func=run)
    return p
