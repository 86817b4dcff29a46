"""Is the strong suite at least as strong as the paper's PGD on our own models?

For each run directory, on the same first N test points:
- PGD-40 with 2 restarts (the paper-style baseline, 80 gradient steps in total);
- the suite alone (no PGD in it), default ``quick``;
- APGD-CE alone with the same iteration budget as the baseline (2 restarts x 40 iterations).
Writes accuracies with N and 95% intervals, and the differences in points, to JSON.

Usage::

    python benchmarks/suite_vs_pgd.py runs/demo/mpgd runs/demo/alp [--n 1000] [--suite quick]
        [--out benchmarks/results/suite_vs_pgd.json]
"""

from __future__ import annotations

import argparse
import json

from _results import write_result

from logitpair.checkpoint import load_model
from logitpair.evaluation import AttackSpec, get_suite, pgd_spec, run_protocol
from logitpair.evaluation.run import test_points
from logitpair.metrics import summarize
from logitpair.threat import Linf


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("runs", nargs="+")
    ap.add_argument("--n", type=int, default=1000)
    ap.add_argument("--suite", default="quick")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", default="benchmarks/results/suite_vs_pgd.json")
    args = ap.parse_args()
    rows = []
    for run in args.runs:
        model = load_model(run)
        x, y, _ = test_points(model, args.n, None)
        threat = Linf(float(model.meta.get("eps", 0.1)))
        common = {"threat": threat, "seed": args.seed}
        acc = {
            "pgd40x2": run_protocol(model, x, y, [pgd_spec(40, 2)], **common).robust,
            "suite": run_protocol(model, x, y, get_suite(args.suite), **common).robust,
            "apgd_ce_40x2": run_protocol(
                model, x, y, [AttackSpec("apgd-ce", {"steps": 40, "restarts": 2})], **common
            ).robust,
        }
        row = {"run": run, "method": model.meta.get("method"), **{k: summarize(v) for k, v in acc.items()}}
        row["suite_minus_pgd_points"] = 100 * (row["suite"]["value"] - row["pgd40x2"]["value"])
        row["apgd_minus_pgd_points"] = 100 * (row["apgd_ce_40x2"]["value"] - row["pgd40x2"]["value"])
        rows.append(row)
        print(json.dumps({k: row[k] for k in ("run", "suite_minus_pgd_points", "apgd_minus_pgd_points")}))
    out = {
        "suite": args.suite,
        "n": args.n,
        "rows": rows,
    }
    write_result(args.out, out)


if __name__ == "__main__":
    main()
