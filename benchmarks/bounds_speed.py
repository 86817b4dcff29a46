"""How fast are the certified bounds? (issue 20: CROWN-IBP on LeNet-5 at >= 200 points/s on a CPU)

For each thread count and eps, on the same first N test points of the run's dataset (or random
inputs in [0, 1] and random labels on a freshly initialised ``lenet5`` when no run is given):

- ``ibp`` and ``crown-ibp``: without autograd, batch ``--batch``, best of ``--repeats`` passes
  over the N points (the machine may be shared: the best pass is the least disturbed);
- ``crown-ibp (grad)``: the bounds with the parameters requiring gradients, then the backward
  pass of their sum (what a certified-training step pays);
- ``crown`` and ``alpha-crown`` (``--iterations``, 20): one pass over the first ``--n-slow`` points.

Writes seconds per point and points per second to JSON and prints a Markdown table.

Usage::

    python benchmarks/bounds_speed.py [--run runs17/demo/mpgd] [--n 200] [--n-slow 4] [--eps 0.1 0.02]
        [--threads 1 2] [--out benchmarks/results/bounds_speed.json]
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Callable

import torch
from _results import write_result
from torch import Tensor, nn

from logitpair.bounds import margin_bounds
from logitpair.checkpoint import load_model
from logitpair.evaluation.run import test_points
from logitpair.models import create_model
from logitpair.threat import Linf

FAST = ("ibp", "crown-ibp", "crown-ibp (grad)")
SLOW = ("crown", "alpha-crown")


def _points(args: argparse.Namespace) -> tuple[nn.Module, Tensor, Tensor, str]:
    if args.run:
        model = load_model(args.run).eval()
        x, y, dataset = test_points(model, args.n, args.data_dir)
        return model, x, y, dataset
    gen = torch.Generator().manual_seed(args.seed)
    torch.manual_seed(args.seed)
    model = create_model("lenet5", image_size=args.image_size).eval()
    x = torch.rand(args.n, 1, args.image_size, args.image_size, generator=gen)
    return model, x, torch.randint(0, 10, (args.n,), generator=gen), "random"


def _bounds(model: nn.Module, method: str, eps: float, iterations: int) -> Callable[[Tensor, Tensor], None]:
    grad = method.endswith("(grad)")
    name = method.split()[0]
    opts = {"iterations": iterations} if name == "alpha-crown" else {}

    def run(x: Tensor, y: Tensor) -> None:
        with torch.set_grad_enabled(grad):
            lb = margin_bounds(model, x, y, threat=Linf(eps), method=name, **opts)
            if grad:
                lb[torch.isfinite(lb)].sum().backward()

    return run


def _seconds(fn: Callable[[Tensor, Tensor], None], x: Tensor, y: Tensor, batch: int, repeats: int) -> float:
    """The best of ``repeats`` passes over the points (after one warm-up batch)."""
    fn(x[:batch], y[:batch])
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        for i in range(0, len(y), batch):
            fn(x[i : i + batch], y[i : i + batch])
        best = min(best, time.perf_counter() - t0)
    return best


def _measure(model: nn.Module, x: Tensor, y: Tensor, args: argparse.Namespace, threads: int) -> list[dict]:
    torch.set_num_threads(threads)
    rows = []
    for eps in args.eps:
        for method in (*FAST, *SLOW):
            slow = method in SLOW
            n = min(args.n_slow if slow else args.n, len(y))
            model.requires_grad_(method.endswith("(grad)"))
            fn = _bounds(model, method, eps, args.iterations)
            seconds = _seconds(fn, x[:n], y[:n], args.batch, 1 if slow else args.repeats)
            rows.append({"method": method, "eps": eps, "threads": threads, "n": n,
                         "seconds_per_point": seconds / n, "points_per_second": n / seconds})  # fmt: skip
            model.zero_grad(set_to_none=True)
    model.requires_grad_(True)
    return rows


def _table(rows: list[dict]) -> str:
    lines = ["| method | eps | threads | points | s/point | points/s |", "|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['method']} | {r['eps']:g} | {r['threads']} | {r['n']} | "
                     f"{r['seconds_per_point']:.4g} | {r['points_per_second']:.4g} |")  # fmt: skip
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--run", default=None, help="a run directory (lenet5); default: a random lenet5, random inputs")
    ap.add_argument("--data-dir", default=None, help="the dataset's folder (default: the run's)")
    ap.add_argument("--image-size", type=int, default=28, help="without a run: the random inputs' size")
    ap.add_argument("--n", type=int, default=200, help="points for ibp and crown-ibp")
    ap.add_argument("--n-slow", type=int, default=4, help="points for crown and alpha-crown")
    ap.add_argument("--batch", type=int, default=200)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--eps", type=float, nargs="+", default=[0.1, 0.02])
    ap.add_argument("--threads", type=int, nargs="+", default=[1, 2])
    ap.add_argument("--iterations", type=int, default=20, help="alpha-crown's iterations")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", default="benchmarks/results/bounds_speed.json")
    args = ap.parse_args()
    model, x, y, dataset = _points(args)
    rows = [r for threads in args.threads for r in _measure(model, x, y, args, threads)]
    print(_table(rows), flush=True)
    out = {"what": "certified-bound speed on lenet5", "run": args.run, "dataset": dataset, "batch": args.batch,
           "repeats": args.repeats, "alpha_iterations": args.iterations, "rows": rows}  # fmt: skip
    write_result(args.out, out)


if __name__ == "__main__":
    main()
