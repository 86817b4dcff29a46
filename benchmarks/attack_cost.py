"""Cost of the attacks relative to plain forward+backward passes, measured in one run.

ratio(attack) = time(attack with k iterations) / (k * time(one forward + backward w.r.t. the input))

on the same batch, model in eval mode with frozen parameters. PGD and APGD need k
forward+backward passes plus a couple of forwards for bookkeeping; a ratio close to 1 means
the bookkeeping is cheap and nothing synchronises needlessly. Targets: PGD <= 1.1, APGD-CE <= 1.1.

The repeats are interleaved (baseline, each attack, baseline at the adversarial points, then
again), so load from other processes on a shared machine hits every measurement alike; the
best of the repeats is reported, plus every timing. CPU kernels can be slightly
data-dependent, so the baseline is also timed at the attack's output points.

Usage::

    python benchmarks/attack_cost.py [--out benchmarks/results/attack_cost.json] [--steps 100]
        [--batch 256] [--repeats 3] [--threads 0] [--model lenet5] [--eps 0.1] [--device cpu]

Labels are the model's own clean predictions, so every example is attacked for the whole run.
"""

from __future__ import annotations

import argparse
import json
import time
from collections.abc import Callable

import torch
from _results import write_result
from torch import Tensor

from logitpair.attacks import apgd_ce, pgd
from logitpair.attacks.common import input_grad
from logitpair.models import create_model
from logitpair.modes import attack_context
from logitpair.threat import Linf


def _timed(fn: Callable[[], object], sync: Callable[[], None]) -> float:
    sync()
    t = time.perf_counter()
    fn()
    sync()
    return time.perf_counter() - t


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default="benchmarks/results/attack_cost.json")
    ap.add_argument("--steps", type=int, default=100)
    ap.add_argument("--batch", type=int, default=256)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0: leave the default)")
    ap.add_argument("--model", default="lenet5")
    ap.add_argument("--eps", type=float, default=0.1)
    ap.add_argument("--device", default="cpu")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    dev = torch.device(args.device)
    sync = (lambda: torch.cuda.synchronize(dev)) if dev.type == "cuda" else (lambda: None)
    torch.manual_seed(0)
    model = create_model(args.model).to(dev).eval()
    x = torch.rand(args.batch, 1, 28, 28, device=dev)
    with torch.no_grad():
        y = model(x).argmax(1)
    threat = Linf(args.eps)
    k = args.steps

    def fwd_bwd_k(inputs: Tensor) -> None:
        with attack_context(model):
            for _ in range(k):
                input_grad(model, inputs, y, None)

    def gen() -> torch.Generator:
        return torch.Generator(dev).manual_seed(0)

    attacks: dict[str, Callable[[], Tensor]] = {
        "pgd": lambda: pgd(model, x, y, threat=threat, steps=k, generator=gen()),
        "pgd_last_iterate": lambda: pgd(model, x, y, threat=threat, steps=k, keep_best=False, generator=gen()),
        "apgd_ce": lambda: apgd_ce(model, x, y, threat=threat, steps=k, generator=gen()),
    }
    x_adv = {name: fn() for name, fn in attacks.items()}  # warm-up, and the points for the second baseline
    fwd_bwd_k(x)
    times: dict[str, list[float]] = {"forward_backward": [], **{n: [] for n in attacks}}
    times.update({f"forward_backward_at_{n}": [] for n in attacks})
    for _ in range(args.repeats):
        times["forward_backward"].append(_timed(lambda: fwd_bwd_k(x), sync))
        for name, fn in attacks.items():
            times[name].append(_timed(fn, sync))
            adv = x_adv[name]
            times[f"forward_backward_at_{name}"].append(_timed(lambda a=adv: fwd_bwd_k(a), sync))
    best = {name: min(v) for name, v in times.items()}
    result = {
        "what": "attack time / (k x forward+backward time), same batch, same run, best of interleaved repeats",
        "k": k,
        "batch": args.batch,
        "eps": args.eps,
        "model": args.model,
        "device": str(dev),
        "repeats": args.repeats,
        "k_forward_backward_seconds": best["forward_backward"],
        "ratios": {n: best[n] / best["forward_backward"] for n in attacks},
        "ratios_vs_forward_backward_at_adversarial": {n: best[n] / best[f"forward_backward_at_{n}"] for n in attacks},
        "seconds": {n: best[n] for n in attacks},
        "all_seconds": times,
    }
    write_result(args.out, result)
    print(
        json.dumps(
            {
                "ratios": result["ratios"],
                "at_adversarial": result["ratios_vs_forward_backward_at_adversarial"],
            },
            indent=2,
        )
    )


if __name__ == "__main__":
    main()
