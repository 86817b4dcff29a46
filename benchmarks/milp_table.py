"""Exact verification by MILP against attacks and bounds (issue 21): the README table, regenerated.

For every run and ε, ``logitpair.certify(..., method="milp")`` on the first ``--n`` test points
(one CPU thread per task, ``--time-limit`` seconds per solver point, everything included): each
point is decided by the cheapest step that can — wrong clean, broken by the ``fast`` suite,
certified by α-CROWN (∨ IBP), or the MILP (HiGHS): verified, counterexample or timeout. The table
gives clean, attacked (``fast``), certified by α-CROWN, and the MILP's verified / counterexample /
timeout with the median and maximum seconds of the points it decided; exact-robust accuracy lies
between ``certified`` (α-CROWN + MILP verified) and ``not broken`` (clean − attacks − MILP
counterexamples). A MILP counterexample is a point the ``fast`` suite failed on: a finding for the
evaluation. Each task keeps its per-point state beside ``--out`` and resumes.

Usage::

    python benchmarks/milp_table.py runs/demo/{regular,mpgd,alp,clp,lsq} runs/ibp --eps 0.005 0.01 \
        --time-limit 30 --out benchmarks/results/milp_table.json --jobs 2
"""

from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path
from typing import Any

from _tables import run_table


def _task(task: dict[str, Any]) -> dict[str, Any]:
    import torch

    torch.set_num_threads(1)
    import logitpair
    from logitpair.certification.result import DECIDERS, MILP_STATUSES
    from logitpair.evaluation.run import test_points
    from logitpair.threat import Linf

    model, info = logitpair.load_run(task["run"])
    x, y, _ = test_points(info, task["n"], task["data_dir"])
    t0 = time.perf_counter()
    res = logitpair.certify(model.eval(), x, y, threat=Linf(task["eps"]), method="milp",
                            options={"time_limit": task["time_limit"]}, batch_size=task["n"],
                            state_path=task["state"])  # fmt: skip
    status = [MILP_STATUSES[int(i)] for i in res.outcome]
    by = [DECIDERS[int(i)] for i in res.decided_by]
    solver = [(s, float(t)) for s, b, t in zip(status, by, res.milp_seconds) if b == "milp"]
    decided = [t for s, t in solver if s != "timeout"]
    summary = res.summary()
    return {
        "n": len(status),
        "clean": len(status) - status.count("wrong_clean"),
        "broken_by_attack": sum(b == "attack" for b in by),
        "alpha_crown": sum(b == "alpha-crown" for b in by),
        "milp": {s: sum(t == s for t, _ in solver) for s in ("verified", "counterexample", "timeout")},
        "milp_points": len(solver),
        "milp_decided_seconds": {
            "median": statistics.median(decided) if decided else None,
            "max": max(decided) if decided else None,
        },
        "milp_seconds_all": [t for _, t in solver],
        "summary": summary,
        "point_seconds": summary["seconds_per_point"] * len(status),  # every point's cost, resumed calls included
        "seconds": time.perf_counter() - t0,
    }


def _tasks(args: argparse.Namespace) -> dict[tuple[str, str, float], dict[str, Any]]:
    state = Path(args.state_dir) if args.state_dir else Path(args.out).with_suffix(".state")
    return {
        (run, "milp", eps): {
            "run": run,
            "n": args.n,
            "eps": eps,
            "time_limit": args.time_limit,
            "data_dir": args.data_dir,
            "state": str(state / f"{Path(run).name}-eps{eps:g}.safetensors"),
        }
        for run in args.runs
        for eps in args.eps
    }


def markdown(result: dict[str, Any]) -> str:
    lines = []
    for eps in result["settings"]["eps"]:
        lines += [
            (
                f"ε = {eps:g}, first {result['settings']['n']} test points, {result['settings']['time_limit']:g} s per "
                "solver point (points; MILP seconds: median / max over the points it decided)"
            ),
            "",
            (
                "| run | clean | attacked (fast) | certified α-CROWN | to MILP | MILP verified | MILP counterexample "
                "| MILP timeout | exact robust (range) | MILP s (median / max) |"
            ),
            "|---|---|---|---|---|---|---|---|---|---|",
        ]
        for run, e in result["runs"].items():
            r = e["milp"].get(f"{eps:g}")
            if r is None:
                continue
            m, sec = r["milp"], r["milp_decided_seconds"]
            attacked = r["clean"] - r["broken_by_attack"]
            low, high = r["alpha_crown"] + m["verified"], attacked - m["counterexample"]
            span = f"{low}" if low == high else f"{low}–{high}"
            secs = "–" if sec["median"] is None else f"{sec['median']:.1f} / {sec['max']:.1f}"
            lines.append(
                f"| `{Path(run).name}` | {r['clean']} | {attacked} | {r['alpha_crown']} | {r['milp_points']} "
                f"| {m['verified']} | {m['counterexample']} | {m['timeout']} | {span} | {secs} |"
            )
        lines.append("")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("runs", nargs="+", help="run directories")
    ap.add_argument("--eps", nargs="+", type=float, required=True)
    ap.add_argument("--n", type=int, default=100, help="test points (the first ones)")
    ap.add_argument("--time-limit", type=float, default=60.0, help="seconds per solver point")
    ap.add_argument("--data-dir", default=None)
    ap.add_argument("--jobs", type=int, default=1)
    ap.add_argument("--out", required=True)
    ap.add_argument("--state-dir", default=None, help="per-point records (default: OUT's name + .state/)")
    args = ap.parse_args(argv)
    settings = {k: v for k, v in vars(args).items() if k not in ("out", "state_dir")}
    result = run_table(what="exact verification (MILP) vs attacks and alpha-CROWN, issue 21", script="milp_table.py",
                       argv=argv, settings=settings, kinds=("milp",), tasks=_tasks(args), fn=_task, out=args.out,
                       jobs=args.jobs)  # fmt: skip
    print(markdown(result))
    print(f"{result['wall_seconds_this_call']:.0f} s this call")
    return result


if __name__ == "__main__":
    main()
