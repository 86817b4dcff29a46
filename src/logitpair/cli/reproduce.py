"""``logitpair reproduce``: train and evaluate what one of the paper's tables needs, report ours next to the paper's.

``logitpair reproduce TABLE [--dataset NAME] [--data-dir DIR] [--device cuda] [--scale smoke|small|full]
[--seeds K] [--n N] [--out DIR] [--runs DIR] [--quiet]`` and ``logitpair reproduce --list``. See
:mod:`logitpair.experiments.reproduce` (scales, outputs, torchrun) and
:mod:`logitpair.experiments.presets` (the tables).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

from logitpair.cli.common import logger, quiet
from logitpair.distributed import env_world
from logitpair.errors import ConfigError
from logitpair.progress import make_progress


def run(args: argparse.Namespace) -> int:
    from logitpair.experiments.reproduce import ReproduceOptions, describe_presets, reproduce

    if args.list:
        print(describe_presets(), end="")
        return 0
    if not args.table:
        raise ConfigError("reproduce: name a table preset (see `logitpair reproduce --list`)")
    opts = ReproduceOptions(
        preset=args.table, scale=args.scale, dataset=args.dataset, data_dir=args.data_dir, device=args.device,
        seeds=args.seeds, out=Path(args.out) if args.out else None, n=args.n, batch_size=args.batch_size,
        seed=args.seed, runs=Path(args.runs) if args.runs else None,
    )  # fmt: skip
    main = env_world().is_main  # under torchrun rank 0 logs, shows progress, audits and writes
    results = reproduce(opts, progress=make_progress(quiet(args) or not main),
                        log=logger(args) if main else lambda msg: None)  # fmt: skip
    if results is None:  # a torchrun rank other than 0: it trained and took its shards of the evaluation
        return 0
    if args.quiet:
        print(json.dumps({"out": str(opts.out_dir), "seconds": results["seconds"],
                          "rows": {r["name"]: {k: v["value"] for k, v in r["ours"].items()} for r in results["rows"]}}))  # fmt: skip
    else:
        print((opts.out_dir / "report.md").read_text())
    return 0


def add_parser(subparsers: Any) -> argparse.ArgumentParser:
    p = subparsers.add_parser(
        "reproduce",
        help="train and evaluate what one of the paper's tables needs; the paper's numbers and ours side by side",
        description="Train every model of a paper table, evaluate it honestly (the paper's attack, a strong suite, "
        "black-box transfer, the targeted ImageNet protocol, a gradient-masking audit) and write report.md and "
        "results.json with the paper's numbers next to ours (N, 95%% Wilson intervals, McNemar tests). "
        "Under torchrun every process trains and takes its shard of every evaluation; rank 0 audits and writes.",
    )
    p.add_argument("table", nargs="?", help="preset: table1 ... table9, engstrom, transfer-vs-ensemble (see --list)")
    p.add_argument("--list", action="store_true", help="list the presets and the data each needs")
    p.add_argument(
        "--scale", default="small", choices=("smoke", "small", "full"),
        help="smoke: generated data, one step of everything; small (default): the demo's CPU budget on "
        "Fashion-MNIST; full: the paper's settings",
    )  # fmt: skip
    p.add_argument("--dataset", help="dataset (default: fashion-mnist at small, the paper's otherwise)")
    p.add_argument("--data-dir", help="the dataset's folder (smoke without it: generated data)")
    p.add_argument("--device", default="cpu", help="cpu (default), cuda or cuda:N (training and model forwards)")
    p.add_argument("--seeds", type=int, default=1, help="train and evaluate K independent seeds (default 1)")
    p.add_argument("--n", type=int, default=None, help="test points (default: 4 smoke, 1000 small, the preset's full)")
    p.add_argument("--out", help="output folder (default runs/reproduce/TABLE-SCALE; replaced atomically)")
    p.add_argument(
        "--runs", metavar="DIR",
        help="a store of run directories shared between tables: a model trained with the same config (e.g. the ALP "
        "InceptionV3 of Tables 3-6) is trained once and its evaluations reused (default: runs inside --out)",
    )  # fmt: skip
    p.add_argument("--batch-size", type=int, default=500, help="evaluation batch size (default 500)")
    p.add_argument("--seed", type=int, default=0, help="evaluation seed: random starts and targets (default 0)")
    p.add_argument("--quiet", action="store_true", help="no progress or logs; print a JSON summary")
    p.set_defaults(func=run)
    return p
