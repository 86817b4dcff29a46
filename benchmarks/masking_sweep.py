"""How much does the PGD-40 baseline overstate robustness? (the Mosbach et al. 2018 check)

For each run directory and each eps, on the same first N test points (one seed):
- ``paper_pgd40``: the paper's own MNIST attack, PGD 40 steps of eps/30 from one random start
  (each point's best iterate kept; the paper keeps the last);
- ``pgd40x2``: logitpair's baseline, PGD-40 with 2 restarts, step 2.5 eps / 40;
- ``quick`` and ``standard``: each suite alone (no PGD in it);
- ``worst``: the per-example worst case over PGD-40x2 and the standard suite (robust only if
  it survives both runs; what ``logitpair evaluate`` reports by default and ``audit``'s
  ``baseline_gap`` compares with).
Writes every accuracy (N, 95% interval) and the gaps in points to JSON; see docs/MASKING.md.

Usage::

    python benchmarks/masking_sweep.py runs/masking/clp [more runs] [--eps 0.15 0.2] [--n 500]
        [--threads 1] [--out benchmarks/results/masking_sweep.json]
"""

from __future__ import annotations

import argparse
import json
import time

import torch
from _results import write_result

from logitpair.checkpoint import load_model
from logitpair.evaluation import get_suite, pgd_spec, run_protocol
from logitpair.evaluation.run import test_points
from logitpair.metrics import summarize
from logitpair.threat import Linf


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("runs", nargs="+")
    ap.add_argument("--eps", type=float, nargs="+", default=[0.15, 0.2])
    ap.add_argument("--n", type=int, default=500)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0: leave the default)")
    ap.add_argument("--out", default="benchmarks/results/masking_sweep.json")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    rows = []
    for run in args.runs:
        model = load_model(run)
        x, y, dataset = test_points(model, args.n, None)
        cfg = model.meta.get("config") or {}
        for eps in args.eps:
            t0 = time.perf_counter()
            common = {"threat": Linf(eps), "seed": args.seed}
            attacks = {
                "paper_pgd40": [pgd_spec(40, 1, step_size=eps / 30)],
                "pgd40x2": [pgd_spec(40, 2)],
                "quick": get_suite("quick"),
                "standard": get_suite("standard"),
            }
            res = {name: run_protocol(model, x, y, specs, **common).robust for name, specs in attacks.items()}
            res["worst"] = res["pgd40x2"] & res["standard"]
            clean = run_protocol(model, x, y, [], **common).clean_correct
            acc = {"clean": summarize(clean), **{k: summarize(r) for k, r in res.items()}}
            row = {
                "run": run,
                "dataset": dataset,
                "model": (model.meta.get("model") or {}).get("name"),
                "method": model.meta.get("method"),
                "lam": (cfg.get("loss") or {}).get("lam"),
                "noise_std": (cfg.get("loss") or {}).get("noise_std"),
                "epochs": (cfg.get("optim") or {}).get("epochs"),
                "eps": eps,
                "n": len(y),
                "accuracy": acc,
                "gap_points": {
                    "pgd40x2_minus_worst": 100 * (acc["pgd40x2"]["value"] - acc["worst"]["value"]),
                    "paper_pgd40_minus_worst": 100 * (acc["paper_pgd40"]["value"] - acc["worst"]["value"]),
                },
                "seconds": time.perf_counter() - t0,
            }
            rows.append(row)
            print(
                json.dumps({"run": run, "eps": eps, **{k: round(100 * v["value"], 1) for k, v in acc.items()}}),
                flush=True,
            )
    out = {
        "what": "robust accuracy under the baselines and the suites, same points and seed",
        "n": args.n,
        "seed": args.seed,
        "rows": rows,
    }
    write_result(args.out, out)


if __name__ == "__main__":
    main()
