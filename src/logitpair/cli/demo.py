"""``logitpair demo``: train and compare the methods on Fashion-MNIST."""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

from logitpair.cli.common import logger, quiet
from logitpair.progress import make_progress


def run(args: argparse.Namespace) -> int:
    from logitpair.experiments.demo import DemoOptions, run_demo

    opts = DemoOptions(
        out=Path(args.out), n=args.n, data_dir=args.data_dir, scale=args.scale, methods=args.methods,
        workers=args.workers,
    )  # fmt: skip
    results = run_demo(opts, progress=make_progress(quiet(args)), log=logger(args))
    print((Path(args.out) / "report.md").read_text() if not args.quiet else json.dumps(results["rows"]))
    return 0


def add_parser(subparsers: Any) -> argparse.ArgumentParser:
    p = subparsers.add_parser("demo", help="train and compare regular / M-PGD / ALP / CLP / LSQ on Fashion-MNIST")
    p.add_argument("--out", default="runs/demo", help="demo directory (replaced atomically)")
    p.add_argument("--n", type=int, default=1000, help="test points evaluated (default 1000)")
    p.add_argument("--data-dir", help="Fashion-MNIST folder (default: the Debian package's)")
    p.add_argument("--scale", type=float, default=1.0, help="fraction of the training budget (for quick runs)")
    p.add_argument("--methods", default="default", help="default (the five above) or all (plus the comparison methods)")
    p.add_argument("--workers", type=int, default=2, help="independent runs side by side in N processes (default 2)")
    p.add_argument("--quiet", action="store_true")
    p.set_defaults(func=run)
    return p
