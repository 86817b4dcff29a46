"""``logitpair evaluate``: clean, white-box and black-box accuracy of a run; with ``--certify METHOD``
also certified accuracy on the same points and the sandwich (certified ≤ attacked ≤ clean)."""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

from logitpair.certification.certify import METHODS
from logitpair.cli.common import fraction, quiet
from logitpair.cli.external import add_external_flags, external_from_args
from logitpair.distributed import env_world
from logitpair.errors import ConfigError
from logitpair.progress import ProgressFactory, make_progress
from logitpair.threat import NORM_NAMES


def run(args: argparse.Namespace) -> int:
    from logitpair.evaluation import EvalOptions, evaluate_run, evaluation_markdown, get_suite, parse_attacks

    if args.suite != "none":
        get_suite(args.suite, "L2" if args.norm == "l2" else None)  # validate before any work
    if args.certify is not None:
        from logitpair.certification import check_method

        check_method(args.certify, option="certify")
        if args.norm != "linf":
            raise ConfigError("bound propagation certifies the Linf threat model only; drop `certify` or `norm`")
    external = external_from_args(args)
    opts = EvalOptions(
        n=args.n, eps=args.eps, norm=args.norm, steps=args.steps, restarts=args.restarts, step_size=args.step_size,
        targeted=args.targeted, top5=args.top5, seed=args.seed, data_dir=args.data_dir, batch_size=args.batch_size,
        suite=None if args.suite == "none" else args.suite,
        attacks=tuple(parse_attacks(args.attacks)) if args.attacks else (),
        save_adversarial=args.save_adversarial, resume=not args.no_resume, device=args.device,
    )  # fmt: skip
    main = env_world().is_main  # under torchrun every rank takes its shard; rank 0 reports and writes
    progress = make_progress(quiet(args) or not main)
    ev = evaluate_run(args.run, opts, source=args.source, external=external, progress=progress, write=True)
    text = evaluation_markdown(ev)
    if args.certify is not None:
        text += _add_certified(args, ev, progress, external)
    if not main:
        return 0
    if args.json:
        print(json.dumps(ev, indent=2))
    else:
        print(text)
    return 0


def _add_certified(args: argparse.Namespace, ev: dict[str, Any], progress: ProgressFactory, external: Any) -> str:
    """Certify the evaluated points (``--certify``), add the figures and the sandwich to
    ``evaluation.json`` / ``evaluation.md``; the Markdown section added."""
    from logitpair.certification import CertifyOptions, certify_run, sandwich_markdown
    from logitpair.evaluation import evaluation_markdown
    from logitpair.io import write_json, write_text
    from logitpair.report import pct_ci

    opts = CertifyOptions(method=args.certify, eps=args.eps, n=args.n, batch_size=args.batch_size, eps_curve=(),
                          device=args.device, data_dir=args.data_dir, resume=not args.no_resume, seed=args.seed)  # fmt: skip
    doc = certify_run(args.run, opts, evaluation=ev, external=external, progress=progress, write=False)
    ev["certified"] = {**doc["certify"], "sandwich": doc["sandwich"][-1] if doc["sandwich"] else None}
    c = doc["certify"]
    text = f"\n## Certified ({args.certify})\n\nCertified accuracy {pct_ci(c['certified'])} % of {c['n']} points, "
    text += f"{c['seconds_per_point']:.3g} s per point.\n\n" + sandwich_markdown(doc["sandwich"], args.certify)
    run_dir = Path(args.run)
    if run_dir.is_dir() and env_world().is_main:
        write_json(run_dir / "evaluation.json", ev)
        write_text(run_dir / "evaluation.md", evaluation_markdown(ev) + text)
    return text


def add_parser(subparsers: Any) -> argparse.ArgumentParser:
    p = subparsers.add_parser("evaluate", help="clean / white-box / black-box accuracy of a run")
    p.add_argument("run", help="run directory or checkpoint (a model from elsewhere: the folder for its results)")
    p.add_argument(
        "--source", metavar="RUN[,RUN...]",
        help="run whose adversarial examples are transferred (black-box); several runs: crafted on their ensemble",
    )  # fmt: skip
    p.add_argument("--n", type=int, default=None, help="first N test points (default: all)")
    p.add_argument(
        "--norm", choices=NORM_NAMES, default="linf",
        help="threat model: linf (default) or l2 (needs --eps; suites quick, standard, thorough, pgd40, targeted)",
    )  # fmt: skip
    p.add_argument(
        "--eps", type=fraction, default=None,
        help="radius in the --norm (default for linf: the training eps; required for l2)",
    )  # fmt: skip
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
    p.add_argument("--step-size", type=fraction, default=None, help="baseline PGD step in the norm (2.5*eps/steps)")
    p.add_argument("--save-adversarial", metavar="FILE", help="write the adversarial examples (safetensors)")
    p.add_argument("--no-resume", action="store_true", help="ignore saved partial results of an earlier evaluation")
    p.add_argument("--targeted", action="store_true", help="targeted PGD towards a random other class")
    p.add_argument("--top5", action="store_true", help="also report top-5 accuracy")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--batch-size", type=int, default=500)
    p.add_argument("--data-dir", help="override the dataset folder")
    p.add_argument("--device", default="cpu", help="cpu (default), cuda or cuda:N; attacks run in float32")
    p.add_argument(
        "--certify", metavar="METHOD",
        help=f"also certify the same points ({', '.join(METHODS)}) and show the sandwich certified <= attacked <= clean",
    )  # fmt: skip
    p.add_argument("--json", action="store_true", help="print JSON instead of Markdown")
    p.add_argument("--quiet", action="store_true")
    add_external_flags(p)
    p.set_defaults(func=run)
    return p
