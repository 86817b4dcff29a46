"""Cost of the attacks relative to plain forward+backward passes, measured in one run.

ratio(attack) = time(attack with k iterations) / (k * time(one forward + backward w.r.t. the input))

on the same batch, model in eval mode with frozen parameters. PGD and APGD need k
forward+backward passes plus a couple of forwards for bookkeeping; a ratio close to 1 means
the bookkeeping is cheap and nothing synchronises needlessly. Targets: PGD <= 1.1, APGD-CE <= 1.1.

Usage::

    python benchmarks/attack_cost.py [--out benchmarks/results/attack_cost.json] [--steps 100]
        [--batch 256] [--repeats 3] [--threads 0] [--model lenet5] [--device cpu]

Labels are the model's own clean predictions, so every example is attacked for the whole run.
"""

from __future__ import annotations

import argparse
import json
import platform
import time
from collections.abc import Callable
from pathlib import Path

import torch

from logitpair.attacks import apgd_ce, pgd
from logitpair.attacks.common import input_grad
from logitpair.models import create_model
from logitpair.modes import attack_context
from logitpair.threat import Linf


def _time(fn: Callable[[], object], repeats: int, sync: Callable[[], None]) -> list[float]:
    fn()  # warm-up
    sync()
    out = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        sync()
        out.append(time.perf_counter() - t)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default="benchmarks/results/attack_cost.json")
    ap.add_argument("--steps", type=int, default=100)
    ap.add_argument("--batch", type=int, default=256)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0: leave the default)")
    ap.add_argument("--model", default="lenet5")
    ap.add_argument("--device", default="cpu")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    dev = torch.device(args.device)
    sync = torch.cuda.synchronize if dev.type == "cuda" else (lambda: None)
    torch.manual_seed(0)
    model = create_model(args.model).to(dev).eval()
    x = torch.rand(args.batch, 1, 28, 28, device=dev)
    with torch.no_grad():
        y = model(x).argmax(1)
    threat = Linf(0.1)
    k = args.steps

    def fwd_bwd_k() -> None:
        with attack_context(model):
            for _ in range(k):
                input_grad(model, x, y, None)

    base = min(_time(fwd_bwd_k, args.repeats, sync))
    attacks = {
        "pgd": lambda: pgd(model, x, y, threat=threat, steps=k, generator=torch.Generator(dev).manual_seed(0)),
        "pgd_last_iterate": lambda: pgd(model, x, y, threat=threat, steps=k, keep_best=False),
        "apgd_ce": lambda: apgd_ce(model, x, y, threat=threat, steps=k, generator=torch.Generator(dev).manual_seed(0)),
    }
    result = {
        "what": "attack time / (k x forward+backward time), same batch, same run",
        "k": k,
        "batch": args.batch,
        "model": args.model,
        "device": str(dev),
        "threads": torch.get_num_threads(),
        "machine": platform.machine(),
        "torch": torch.__version__,
        "k_forward_backward_seconds": base,
        "ratios": {},
        "seconds": {},
    }
    for name, fn in attacks.items():
        t = min(_time(fn, args.repeats, sync))
        result["seconds"][name] = t
        result["ratios"][name] = t / base
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result["ratios"], indent=2))


if __name__ == "__main__":
    main()
