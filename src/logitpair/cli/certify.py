"""``logitpair certify``: certified accuracy of a run (bound propagation, or exact verification with
``--method milp``), its curve against ε and the sandwich."""

from __future__ import annotations

import argparse
from typing import Any

from logitpair.certification.certify import METHODS
from logitpair.cli.common import fraction, quiet
from logitpair.cli.external import add_external_flags, external_from_args
from logitpair.distributed import env_world
from logitpair.progress import make_progress


def run(args: argparse.Namespace) -> int:
    from logitpair.certification import CertifyOptions, certify_markdown, certify_run

    if args.method == "smoothing":  # randomized smoothing: sampling, not bound propagation
        return run_smoothing(args)
    opts = CertifyOptions(
        method=args.method, eps=args.eps, n=args.n, batch_size=args.batch_size,
        eps_curve=tuple(args.eps_curve) if args.eps_curve else None, device=args.device, data_dir=args.data_dir,
        resume=not args.no_resume, seed=args.seed, time_limit=args.time_limit,
    )  # fmt: skip
    main = env_world().is_main  # under torchrun every rank takes its shard; rank 0 reports and writes
    doc = certify_run(
        args.run, opts, external=external_from_args(args), progress=make_progress(quiet(args) or not main), write=True
    )
    if not args.quiet and main:
        print(certify_markdown(doc))
    return 0


def add_parser(subparsers: Any) -> argparse.ArgumentParser:
    p = subparsers.add_parser("certify", help="certified accuracy of a run (bound propagation) against attacks")
    p.add_argument("run", help="run directory or checkpoint (a model from elsewhere: the folder for its results)")
    p.add_argument(
        "--method", default="crown",
        help=f"{', '.join(METHODS)} (default crown): a bound method; milp: exact verification per point; "
        "smoothing: randomized smoothing (an L2 radius, --sigma)",
    )  # fmt: skip
    p.add_argument("--eps", type=fraction, default=None, help="L-inf radius (default: the training eps)")
    p.add_argument("--n", type=int, default=None, help="first N test points (default: all)")
    p.add_argument("--batch-size", type=int, default=100, help="points per batch (default 100)")
    p.add_argument(
        "--eps-curve", type=fraction, nargs="+", metavar="E",
        help="radii of the certified-vs-attacked curve (fast suite); default 0, eps/2, eps (eps always added)",
    )  # fmt: skip
    p.add_argument(
        "--time-limit", type=float, default=60.0, metavar="S",
        help="milp: seconds per point the solver decides (bounds and encoding included; default 60)",
    )  # fmt: skip
    p.add_argument("--seed", type=int, default=0, help="seed of the curve's attacks")
    p.add_argument("--data-dir", help="override the dataset folder")
    p.add_argument("--device", default="cpu", help="cpu (default), cuda or cuda:N")
    p.add_argument("--no-resume", action="store_true", help="ignore saved partial results of an earlier run")
    p.add_argument("--quiet", action="store_true")
    add_smoothing_flags(p)
    add_external_flags(p)
    p.set_defaults(func=run)
    return p


# ---- randomized smoothing (--method smoothing; logitpair.certification.smoothing)


def run_smoothing(args: argparse.Namespace) -> int:
    from logitpair.certification.smoothing import SmoothingOptions, smoothing_markdown, smoothing_run
    from logitpair.errors import ConfigError

    if args.sigma is None:
        raise ConfigError("required with --method smoothing", option="sigma")
    radii = {"radii": tuple(args.radii)} if args.radii else {}
    opts = SmoothingOptions(
        sigma=args.sigma, n0=args.n0, n_samples=args.n_samples, alpha=args.alpha, n=args.n,
        noise_batch=args.noise_batch, device=args.device, data_dir=args.data_dir, resume=not args.no_resume,
        seed=args.seed, **radii,
    )  # fmt: skip
    doc = smoothing_run(args.run, opts, external=external_from_args(args), progress=make_progress(quiet(args)),
                        write=True)  # fmt: skip
    if not args.quiet:
        print(smoothing_markdown(doc))
    return 0


def add_smoothing_flags(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group(
        "randomized smoothing (--method smoothing: Cohen et al. 2019, certified L2 radius by sampling; "
        "--n is the number of test points, --seed the noise's seed; --eps, --eps-curve, --batch-size unused)"
    )
    g.add_argument("--sigma", type=float, default=None, help="σ of the Gaussian noise (required with smoothing)")
    g.add_argument("--n0", type=int, default=100, help="selection samples per point (default 100)")
    g.add_argument(
        "--n-samples", type=int, default=100_000, metavar="N",
        help="estimation samples per point (default 100000; not --n, which counts test points)",
    )  # fmt: skip
    g.add_argument(
        "--alpha", type=float, default=0.001, help="failure probability α of each certificate (default 0.001)"
    )
    g.add_argument(
        "--radii", type=float, nargs="+", metavar="R",
        help="L2 radii of the certified-accuracy table (default 0 0.25 0.5 0.75 1; 0 always added)",
    )  # fmt: skip
    g.add_argument("--noise-batch", type=int, default=1000, help="noisy samples per forward pass (default 1000)")
