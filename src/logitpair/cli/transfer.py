"""``logitpair transfer``: the source x target matrix of transferred adversarial examples.

``logitpair transfer RUN... [--attack SPEC] [--n N] [--norm linf|l2] [--eps EPS] [--seed S]
[--ensemble NAME=RUN+RUN ...] [--out DIR] [--json] [--quiet] [--no-resume]`` crafts the attack
once on every run (and ensemble) and evaluates the examples on every run; writes
``transfer.json``, ``transfer.md``, ``transfer.png`` and the crafted examples (``crafted/``)
into DIR (default ``runs/transfer``). See :mod:`logitpair.evaluation.transfer`.
"""

from __future__ import annotations

import argparse
import json
from typing import Any

from logitpair.cli.common import fraction, quiet
from logitpair.cli.external import add_external_flags, external_from_args
from logitpair.distributed import env_world
from logitpair.errors import ConfigError
from logitpair.progress import make_progress
from logitpair.threat import NORM_NAMES


def parse_ensemble(text: str) -> tuple[str, list[str]]:
    """``NAME=RUN+RUN`` -> (name, runs)."""
    name, sep, rest = text.partition("=")
    members = [m.strip() for m in rest.split("+")]
    if not sep or not name.strip() or not all(members):
        raise ConfigError(f"--ensemble: expected NAME=RUN+RUN, got {text!r}")
    return name.strip(), members


def run(args: argparse.Namespace) -> int:
    from logitpair.evaluation import TransferOptions, parse_attacks, pgd_spec, transfer_markdown, transfer_runs

    attack = pgd_spec(40, 2)
    if args.attack is not None:
        specs = parse_attacks(args.attack)
        if len(specs) != 1:
            raise ConfigError(f"--attack: expected one attack, got {len(specs)} ({args.attack!r})")
        attack = specs[0]
    ensembles: dict[str, list[str]] = {}
    for text in args.ensemble or []:
        name, members = parse_ensemble(text)
        if name in ensembles:
            raise ConfigError(f"--ensemble: name {name!r} given twice")
        ensembles[name] = members
    opts = TransferOptions(n=args.n, eps=args.eps, attack=attack, seed=args.seed, batch_size=args.batch_size,
                           data_dir=args.data_dir, resume=not args.no_resume, norm=args.norm)  # fmt: skip
    main = env_world().is_main  # under torchrun every rank crafts its shard; rank 0 reports and writes
    doc = transfer_runs(args.runs, opts, ensembles=ensembles, external=external_from_args(args), out=args.out,
                        progress=make_progress(quiet(args) or not main), write=True)  # fmt: skip
    if main:
        print(json.dumps(doc, indent=2) if args.json else transfer_markdown(doc))
    return 0


def add_parser(subparsers: Any) -> argparse.ArgumentParser:
    p = subparsers.add_parser(
        "transfer",
        help="source x target matrix of transferred adversarial examples (black-box study)",
        description="Craft adversarial examples once on every run (and ensemble) and evaluate them on every run: "
        "plain accuracy on the transferred examples and robust accuracy (correct clean and transferred), "
        "each with N and a 95% Wilson interval. The diagonal is white-box.",
    )
    p.add_argument(
        "runs", nargs="*", metavar="RUN", help="run directories (all on the same dataset; at least one, or --model)"
    )
    p.add_argument("--attack", help="attack crafted on each source, e.g. mi-fgsm:steps=10 (default: PGD-40x2)")
    p.add_argument("--n", type=int, default=None, help="first N test points (default: all)")
    p.add_argument(
        "--norm", choices=NORM_NAMES, default="linf", help="threat model: linf (default) or l2 (needs --eps)"
    )
    p.add_argument(
        "--eps", type=fraction, default=None,
        help="radius in the --norm (default for linf: the runs' common training eps; required for l2)",
    )  # fmt: skip
    p.add_argument("--seed", type=int, default=0)
    p.add_argument(
        "--ensemble", action="append", metavar="NAME=RUN+RUN",
        help="one more source: the mean logits of these runs (repeatable)",
    )  # fmt: skip
    p.add_argument("--out", default="runs/transfer", help="output folder (default runs/transfer)")
    p.add_argument("--no-resume", action="store_true", help="craft again instead of reusing stored examples")
    p.add_argument("--batch-size", type=int, default=500)
    p.add_argument("--data-dir", help="override the dataset folder")
    p.add_argument("--json", action="store_true", help="print JSON instead of Markdown")
    p.add_argument("--quiet", action="store_true")
    add_external_flags(p, "one more source and target, named after its weights file")
    p.set_defaults(func=run)
    return p
