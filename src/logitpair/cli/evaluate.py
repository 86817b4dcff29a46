"""``logitpair evaluate``: clean, white-box and black-box accuracy of a run."""

from __future__ import annotations

import argparse
import json
from typing import Any

from logitpair.cli.common import fraction, quiet
from logitpair.progress import make_progress


def run(args: argparse.Namespace) -> int:
    from logitpair.evaluation import EvalOptions, evaluate_run, evaluation_markdown, get_suite, parse_attacks

    if args.suite != "none":
        get_suite(args.suite)  # validate before any work
    opts = EvalOptions(
        n=args.n, eps=args.eps, steps=args.steps, restarts=args.restarts, step_size=args.step_size,
        targeted=args.targeted, top5=args.top5, seed=args.seed, data_dir=args.data_dir, batch_size=args.batch_size,
        suite=None if args.suite == "none" else args.suite,
        attacks=tuple(parse_attacks(args.attacks)) if args.attacks else (),
        save_adversarial=args.save_adversarial, resume=not args.no_resume, device=args.device,
    )  # fmt: skip
    ev = evaluate_run(args.run, opts, source=args.source, progress=make_progress(quiet(args)), write=True)
    if args.json:
        print(json.dumps(ev, indent=2))
    else:
        print(evaluation_markdown(ev))
    return 0


def add_parser(subparsers: Any) -> argparse.ArgumentParser:
    p = subparsers.add_parser("evaluate", help="clean / white-box / black-box accuracy of a run")
    p.add_argument("run", help="run directory or checkpoint")
    p.add_argument(
        "--source", metavar="RUN[,RUN...]",
        help="run whose adversarial examples are transferred (black-box); several runs: crafted on their ensemble",
    )  # fmt: skip
    p.add_argument("--n", type=int, default=None, help="first N test points (default: all)")
    p.add_argument("--eps", type=fraction, default=None, help="L-inf radius (default: the training eps)")
    p.add_argument(
        "--suite", default="standard",
        help="strong attack suite after the PGD baseline: quick, standard (default), fast, thorough, targeted, pgd40 or none",
    )  # fmt: skip
    p.add_argument(
        "--attacks",
        help="explicit attack list instead of the suite, e.g. apgd-ce:steps=50,square:queries=1000",
    )
    p.add_argument("--steps", type=int, default=40, help="baseline PGD steps (default 40)")
    p.add_argument("--restarts", type=int, default=2, help="baseline PGD random restarts (default 2)")
    p.add_argument("--step-size", type=fraction, default=None, help="baseline PGD step (default 2.5*eps/steps)")
    p.add_argument("--save-adversarial", metavar="FILE", help="write the adversarial examples (safetensors)")
    p.add_argument("--no-resume", action="store_true", help="ignore saved partial results of an earlier evaluation")
    p.add_argument("--targeted", action="store_true", help="targeted PGD towards a random other class")
    p.add_argument("--top5", action="store_true", help="also report top-5 accuracy")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--batch-size", type=int, default=500)
    p.add_argument("--data-dir", help="override the dataset folder")
    p.add_argument("--device", default="cpu", help="cpu (default), cuda or cuda:N; attacks run in float32")
    p.add_argument("--json", action="store_true", help="print JSON instead of Markdown")
    p.add_argument("--quiet", action="store_true")
    p.set_defaults(func=run)
    return p
