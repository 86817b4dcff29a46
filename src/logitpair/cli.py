"""The ``logitpair`` command. Parses arguments, builds configs, calls the library."""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path
from typing import Any

from logitpair.errors import LogitpairError
from logitpair.threat import parse_fraction


def _fraction(text: str) -> float:
    try:
        return parse_fraction(text)
    except LogitpairError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


# (flag, config path, type, help)
TRAIN_FLAGS: list[tuple[str, str, Any, str]] = [
    ("--dataset", "data.dataset", str, "dataset name (see `logitpair list`)"),
    ("--data-dir", "data.data_dir", str, "folder with the dataset's files (default: its standard location)"),
    ("--val-size", "data.val_size", int, "validation images held out of the training set (default 5000)"),
    ("--model", "model", str, "model name (see `logitpair list`)"),
    ("--method", "method", str, "training method (see `logitpair list`)"),
    ("--epochs", "optim.epochs", int, "training epochs"),
    ("--batch-size", "optim.batch_size", int, "minibatch size"),
    ("--optimizer", "optim.optimizer", str, "sgd, adam or rmsprop"),
    ("--lr", "optim.lr", _fraction, "learning rate"),
    ("--schedule", "optim.schedule", str, "constant, cosine or step"),
    ("--weight-decay", "optim.weight_decay", _fraction, "L2 weight decay"),
    ("--eps", "loss.eps", _fraction, "L-inf radius for training attacks (e.g. 0.1 or 8/255)"),
    ("--lam", "loss.lam", _fraction, "weight of the pairing / squeezing term"),
    ("--attack-steps", "loss.attack_steps", int, "PGD steps while training"),
    ("--attack-step-size", "loss.attack_step_size", _fraction, "PGD step size while training"),
    ("--noise-std", "loss.noise_std", _fraction, "Gaussian input noise for clp / lsq"),
    ("--distance", "loss.distance", str, "logit distance for alp / clp: l2sq, l2, l1, cosine"),
    ("--label-smoothing", "loss.label_smoothing", _fraction, "label smoothing"),
    ("--seed", "seed", int, "random seed"),
    ("--checkpoint-every", "checkpoint_every", int, "also checkpoint every N steps"),
    ("--select", "select", str, "exported weights: last, best-robust or best-clean"),
    ("--on-nonfinite", "on_nonfinite", str, "stop or skip on a NaN/inf loss"),
    ("--ema-decay", "ema_decay", _fraction, "EMA of the weights for validation and export (0 = off)"),
]


def _overrides(args: argparse.Namespace) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for flag, path, _, _ in TRAIN_FLAGS:
        value = getattr(args, flag[2:].replace("-", "_"))
        if value is None:
            continue
        node = out
        *parents, leaf = path.split(".")
        for p in parents:
            node = node.setdefault(p, {})
        node[leaf] = value
    return out


def _quiet(args: argparse.Namespace) -> bool:
    return bool(getattr(args, "quiet", False) or os.environ.get("CI"))


def _log(args: argparse.Namespace):
    quiet = bool(getattr(args, "quiet", False))
    return (lambda msg: None) if quiet else (lambda msg: print(msg, file=sys.stderr, flush=True))


def cmd_train(args: argparse.Namespace) -> int:
    from logitpair.config import make_config
    from logitpair.progress import make_progress
    from logitpair.train import train

    cfg = make_config(args.config, _overrides(args))
    result = train(
        cfg,
        args.out,
        resume=args.resume,
        overwrite=args.overwrite,
        progress=make_progress(_quiet(args)),
        log=_log(args),
    )
    last = result.history[-1] if result.history else {}
    print(json.dumps({"run_dir": str(result.run_dir), "train_seconds": round(result.train_seconds, 2), **last}))
    return 0


def cmd_evaluate(args: argparse.Namespace) -> int:
    from logitpair.evalrun import EvalOptions, evaluate_run
    from logitpair.progress import make_progress
    from logitpair.suites import get_suite, parse_attacks

    if args.suite != "none":
        get_suite(args.suite)  # validate before any work
    opts = EvalOptions(
        n=args.n, eps=args.eps, steps=args.steps, restarts=args.restarts, step_size=args.step_size,
        targeted=args.targeted, top5=args.top5, seed=args.seed, data_dir=args.data_dir, batch_size=args.batch_size,
        suite=None if args.suite == "none" else args.suite,
        attacks=tuple(parse_attacks(args.attacks)) if args.attacks else (),
        save_adversarial=args.save_adversarial, resume=not args.no_resume,
    )  # fmt: skip
    ev = evaluate_run(args.run, opts, source=args.source, progress=make_progress(_quiet(args)))
    if args.json:
        print(json.dumps(ev, indent=2))
    else:
        from logitpair.evalrun import evaluation_markdown

        print(evaluation_markdown(ev))
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    from logitpair.demo import DemoOptions, run_demo
    from logitpair.progress import make_progress

    opts = DemoOptions(out=Path(args.out), n=args.n, data_dir=args.data_dir, scale=args.scale)
    results = run_demo(opts, progress=make_progress(_quiet(args)), log=_log(args))
    print((Path(args.out) / "report.md").read_text() if not args.quiet else json.dumps(results["rows"]))
    return 0


def cmd_list(args: argparse.Namespace) -> int:
    from logitpair.attacks import ATTACKS
    from logitpair.data import DATASETS
    from logitpair.methods import METHODS
    from logitpair.models import list_models

    for title, names in [
        ("models", list_models()),
        ("datasets", DATASETS.names()),
        ("methods", METHODS.names()),
        ("attacks", ATTACKS.names()),
    ]:
        print(f"{title}: {', '.join(names)}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    from logitpair import __version__

    parser = argparse.ArgumentParser(prog="logitpair", description=__doc__)
    parser.add_argument("--version", action="version", version=f"logitpair {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("train", help="train one model into a run directory")
    p.add_argument("--config", help="YAML, TOML or JSON config file (CLI flags override it)")
    for flag, _, typ, help_ in TRAIN_FLAGS:
        p.add_argument(flag, type=typ, default=None, help=help_)
    p.add_argument("--out", required=True, help="run directory")
    p.add_argument("--resume", action="store_true", help="continue the run in --out from its latest checkpoint")
    p.add_argument("--overwrite", action="store_true", help="replace an existing run in --out")
    p.add_argument("--quiet", action="store_true", help="no progress bars or logs")
    p.set_defaults(func=cmd_train)

    p = sub.add_parser("evaluate", help="clean / white-box / black-box accuracy of a run")
    p.add_argument("run", help="run directory or checkpoint")
    p.add_argument("--source", help="run whose adversarial examples are transferred (black-box)")
    p.add_argument("--n", type=int, default=None, help="first N test points (default: all)")
    p.add_argument("--eps", type=_fraction, default=None, help="L-inf radius (default: the training eps)")
    p.add_argument(
        "--suite", default="standard",
        help="strong attack suite after the PGD baseline: quick, standard (default), thorough, targeted, pgd40 or none",
    )  # fmt: skip
    p.add_argument(
        "--attacks",
        help="explicit attack list instead of the suite, e.g. apgd-ce:steps=50,square:queries=1000",
    )
    p.add_argument("--steps", type=int, default=40, help="baseline PGD steps (default 40)")
    p.add_argument("--restarts", type=int, default=2, help="baseline PGD random restarts (default 2)")
    p.add_argument("--step-size", type=_fraction, default=None, help="baseline PGD step (default 2.5*eps/steps)")
    p.add_argument("--save-adversarial", metavar="FILE", help="write the adversarial examples (safetensors)")
    p.add_argument("--no-resume", action="store_true", help="ignore saved partial results of an earlier evaluation")
    p.add_argument("--targeted", action="store_true", help="targeted PGD towards a random other class")
    p.add_argument("--top5", action="store_true", help="also report top-5 accuracy")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--batch-size", type=int, default=500)
    p.add_argument("--data-dir", help="override the dataset folder")
    p.add_argument("--json", action="store_true", help="print JSON instead of Markdown")
    p.add_argument("--quiet", action="store_true")
    p.set_defaults(func=cmd_evaluate)

    p = sub.add_parser("demo", help="train and compare regular / M-PGD / ALP / CLP / LSQ on Fashion-MNIST")
    p.add_argument("--out", default="runs/demo", help="demo directory (replaced atomically)")
    p.add_argument("--n", type=int, default=1000, help="test points evaluated (default 1000)")
    p.add_argument("--data-dir", help="Fashion-MNIST folder (default: the Debian package's)")
    p.add_argument("--scale", type=float, default=1.0, help="fraction of the training budget (for quick runs)")
    p.add_argument("--quiet", action="store_true")
    p.set_defaults(func=cmd_demo)

    from logitpair.cli_audit import add_parser as add_audit

    add_audit(sub)

    p = sub.add_parser("list", help="list registered models, datasets, methods and attacks")
    p.set_defaults(func=cmd_list)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return args.func(args)
    except LogitpairError as exc:
        print(f"logitpair: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("logitpair: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
