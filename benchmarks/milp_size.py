"""How big one point's MILP is, and what its LP relaxation costs HiGHS (issue 21).

For test point ``--index`` of a run at ``--eps``: the encoding's binaries (unstable ReLUs,
max-pool windows with a choice), variables, rows and nonzeros, then the LP relaxation's minimum of
the margin to the class with the lowest CROWN bound, solved by ``scipy.optimize.linprog`` with each
``--methods`` (HiGHS interior point / dual simplex) within ``--time-limit`` seconds. One thread.

Usage::

    python benchmarks/milp_size.py runs/demo/mpgd --eps 0.02 --index 0 --out benchmarks/results/milp_size.json
"""

from __future__ import annotations

import argparse
import time
from typing import Any

from _results import write_result


def _linprog_form(enc: Any) -> dict[str, Any]:
    """The encoding's rows ``lb ≤ A v ≤ ub`` as linprog's ``A_ub v ≤ b_ub`` and ``A_eq v = b_eq``."""
    import numpy as np
    from scipy import sparse

    A, lb, ub = enc.program.rows()
    eq = np.isfinite(lb) & np.isfinite(ub) & (lb == ub)
    up, low = np.isfinite(ub) & ~eq, np.isfinite(lb) & ~eq
    lo, hi = enc.program.bounds
    return {"A_ub": sparse.vstack([A[up], -A[low]]).tocsr(), "b_ub": np.concatenate([ub[up], -lb[low]]),
            "A_eq": A[eq] if eq.any() else None, "b_eq": lb[eq] if eq.any() else None,
            "bounds": np.stack([lo, hi], 1)}  # fmt: skip


def main(argv: list[str] | None = None) -> dict[str, Any]:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("run")
    ap.add_argument("--eps", type=float, required=True)
    ap.add_argument("--index", type=int, default=0, help="test point")
    ap.add_argument("--methods", nargs="+", default=["highs-ipm", "highs-ds"])
    ap.add_argument("--time-limit", type=float, default=120.0)
    ap.add_argument("--data-dir", default=None)
    ap.add_argument("--out", required=True)
    args = ap.parse_args(argv)

    import numpy as np
    import torch
    from scipy import optimize

    import logitpair
    from logitpair.bounds.exact import margin_row, prepare
    from logitpair.bounds.milp import encode, network, widen
    from logitpair.evaluation.run import test_points
    from logitpair.threat import Linf

    torch.set_num_threads(1)
    model, info = logitpair.load_run(args.run)
    x, y, _ = test_points(info, args.index + 1, args.data_dir)
    xi, yi = x[args.index : args.index + 1], int(y[args.index])
    net = network(model.eval(), xi)
    t0 = time.perf_counter()
    prep = prepare(net, xi, yi, Linf(args.eps))
    enc = encode(net, *prep.box, prep.bounds)
    build = time.perf_counter() - t0
    A, _, _ = enc.program.rows()
    j = int(np.argmin(prep.crown))
    a, c = margin_row(enc, yi, j, enc.program.size)
    cost = widen(a, enc.program.size).toarray().ravel()
    result: dict[str, Any] = {
        "what": "one point's MILP: size and the LP relaxation's cost (issue 21)",
        "settings": vars(args),
        "crown_margins": [None if not np.isfinite(v) else float(v) for v in prep.crown],
        "size": {
            "binaries": int(enc.program.integrality.sum()),
            "unstable_relus": enc.relus,
            "pool_windows_with_choice": enc.pools,
            "variables": enc.program.size,
            "rows": A.shape[0],
            "nonzeros": int(A.nnz),
        },
        "bounds_and_encoding_seconds": build,
        "class": j,
        "lp": {},
    }
    form = _linprog_form(enc)
    for method in args.methods:
        t = time.perf_counter()
        res = optimize.linprog(cost, method=method, options={"time_limit": args.time_limit, "presolve": True}, **form)
        result["lp"][method] = {"status": int(res.status), "message": res.message,
                                "minimum": None if res.fun is None else float(res.fun) + c,
                                "seconds": time.perf_counter() - t}  # fmt: skip
        print(method, result["lp"][method])
    write_result(args.out, result)
    print(result["size"], f"{build:.1f} s to bound and encode")
    return result


if __name__ == "__main__":
    main()
