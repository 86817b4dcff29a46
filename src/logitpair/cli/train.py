"""``logitpair train``: train one model into a run directory.

Its config flags are generated from the config dataclasses (:mod:`logitpair.cli.flags`): one
flag per field of the run, its data and optimiser sections and every method's settings."""

from __future__ import annotations

import argparse
import json
from typing import Any

from logitpair.cli.common import logger, quiet
from logitpair.cli.flags import add_config_flags, config_overrides
from logitpair.config import make_config
from logitpair.progress import make_progress

OWN_OPTIONS = ("-h", "--help", "--config", "--out", "--resume", "--overwrite", "--quiet")


def run(args: argparse.Namespace) -> int:
    from logitpair.distributed import env_world
    from logitpair.training import train

    cfg = make_config(args.config, config_overrides(args))
    result = train(
        cfg,
        args.out,
        resume=args.resume,
        overwrite=args.overwrite,
        progress=make_progress(quiet(args)),
        log=logger(args),
    )
    if not env_world().is_main:
        return 0
    last = result.history[-1] if result.history else {}
    print(json.dumps({"run_dir": str(result.run_dir), "train_seconds": round(result.train_seconds, 2), **last}))
    return 0


def add_parser(subparsers: Any) -> argparse.ArgumentParser:
    p = subparsers.add_parser(
        "train",
        help="train one model into a run directory",
        description="Train one model into a run directory. Every config field is a flag; flags override --config.",
    )
    p.add_argument("--config", help="YAML, TOML or JSON config file (CLI flags override it)")
    p.add_argument("--out", required=True, help="run directory")
    p.add_argument(
        "--resume",
        action="store_true",
        help="continue the run in --out from its latest checkpoint if there is one, else start it (torchrun restarts)",
    )
    p.add_argument("--overwrite", action="store_true", help="replace an existing run in --out")
    p.add_argument("--quiet", action="store_true", help="no progress bars or logs")
    add_config_flags(p, reserved=OWN_OPTIONS)
    p.set_defaults(func=run)
    return p
