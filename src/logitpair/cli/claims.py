"""``logitpair claims``: the page of the paper's claims, tested, from ``reproduce`` outputs.

``logitpair claims RUNS... [--out docs/CLAIMS.md]`` reads every ``results.json`` under RUNS (an
output folder of ``logitpair reproduce``, or a folder of them), tests each claim of
:mod:`logitpair.experiments.claims` and writes the page (stdout without ``--out``). See
:mod:`logitpair.experiments.claims_page`.
"""

from __future__ import annotations

import argparse
import sys
from typing import Any


def run(args: argparse.Namespace) -> int:
    from logitpair.environment import source_commit
    from logitpair.experiments.claims import gather_all, load_results
    from logitpair.experiments.claims_page import claims_markdown
    from logitpair.io import write_text

    evidence = gather_all(load_results(args.runs))
    command = " ".join(["logitpair", "claims", *args.runs, *(["--out", args.out] if args.out else [])])
    text = claims_markdown(evidence, command=command, commit=source_commit())
    if not args.out:
        print(text, end="")
        return 0
    write_text(args.out, text)
    for e in evidence:
        print(f"{e.claim.key}: {e.verdict.outcome}", file=sys.stderr)
    print(f"wrote {args.out}", file=sys.stderr)
    return 0


def add_parser(subparsers: Any) -> argparse.ArgumentParser:
    p = subparsers.add_parser(
        "claims",
        help="test the paper's claims on reproduce outputs and write the claims page (docs/CLAIMS.md)",
        description="Read the results.json of `logitpair reproduce` runs, test each of the paper's claims "
        "(McNemar's exact test per seed, the t-interval over seeds, the pooled exact test; holds / does not hold / "
        "not separable) and write one page of verdicts. Every figure comes from the results or the presets.",
    )
    p.add_argument("runs", nargs="+", metavar="RUNS",
                   help="reproduce output folders (each with results.json), or folders of them")  # fmt: skip
    p.add_argument("--out", help="write the page here (e.g. docs/CLAIMS.md; default: print it)")
    p.set_defaults(func=run)
    return p
