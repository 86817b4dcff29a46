"""The measurements behind the gates of the ``fast`` suite (docs/PERFORMANCE.md, "The `fast` suite").

Usage::

    python benchmarks/fast_design.py RUN [RUN+saturate ...] --out benchmarks/results/fast_design.json
        [--n 1000] [--threads 1] [--jobs 2]

For each model (a run directory, or ``RUN+saturate`` / ``RUN+quantize``, see ``_masked.py``), on
its first ``--n`` test points at its training eps, each model in its own process:

- ``stage1``: APGD-CE with 10 steps on the clean-correct points (the first stage of ``fast``);
  of the points it leaves, the distribution of the *remaining margin* (margin after / clean
  margin), how many it left at >= 0.9 (barely moved), and on how many Square with 100 queries
  (run from the clean point) got further than APGD-CE did.
- ``targets``: on the points APGD-CE-10 left, APGD-T with 50 steps and 1 or 3 targets, the
  targets ranked by the clean logits from a random start (AutoAttack's way), ranked by the logits
  at the APGD-CE-10 point from a random start, and the same started at that point ("warm", as
  ``fast`` does): points broken by each.
- ``fast``: the ``fast`` suite itself: robust points, and per attack the points it ran on and
  broke; ``near_yield`` = broken / ran on, summed over the attacks behind ``near`` gates (the
  yield signal of ``gate="escalate"``).

Seeds are fixed (APGD-CE-10 batch b: 1000 + b; APGD-T: 9 + batch start; ``fast``: protocol seed 0).
"""

from __future__ import annotations

import argparse
import multiprocessing as mp
import shlex
import sys
import time
from typing import Any

from _masked import load
from _results import write_result

CANDIDATES = {  # name -> (targets, ranking, warm)
    "T1 clean-ranked": (1, "clean", False),
    "T1 drift-ranked": (1, "drift", False),
    "T1 drift-ranked, warm": (1, "drift", True),
    "T3 clean-ranked": (3, "clean", False),
    "T3 drift-ranked": (3, "drift", False),
    "T3 drift-ranked, warm": (3, "drift", True),
}


def _batches(n: int, size: int = 500) -> list[slice]:
    return [slice(s, min(s + size, n)) for s in range(0, n, size)]


def _cat(parts: list[Any], like: Any) -> Any:
    import torch

    return torch.cat(parts) if parts else like[:0]


def measure(name: str, n: int, threads: int, eps: float | None = None) -> dict[str, Any]:
    import torch

    from logitpair.attacks import apgd_ce, apgd_t, square
    from logitpair.attacks.common import predict
    from logitpair.checkpoint import run_info
    from logitpair.evaluation import get_suite, run_protocol, test_points
    from logitpair.evaluation.gates import margin
    from logitpair.threat import Linf

    torch.set_num_threads(threads)
    t0 = time.perf_counter()
    model = load(name)
    info = run_info(model, where=name, eps=eps)
    x, y, _ = test_points(info, n)
    eps = info.eps
    threat = Linf(eps)
    ok = predict(model, x).argmax(1) == y
    xs, ys = x[ok], y[ok]
    m0 = margin(predict(model, xs), ys)
    xa = _cat(
        [apgd_ce(model, xs[b], ys[b], threat=threat, steps=10, generator=torch.Generator().manual_seed(1000 + i))
         for i, b in enumerate(_batches(len(xs)))], xs,
    )  # fmt: skip
    m1 = margin(predict(model, xa), ys)
    left = m1 >= 0
    rem = (m1 / m0)[left]
    xq = _cat(
        [square(model, xs[left][b], ys[left][b], threat=threat, queries=100, generator=torch.Generator().manual_seed(i))
         for i, b in enumerate(_batches(int(left.sum())))], xs,
    )  # fmt: skip
    mq = margin(predict(model, xq), ys[left])
    qs = torch.quantile(rem, torch.tensor([0.1, 0.5, 0.9])).tolist() if len(rem) else []
    out: dict[str, Any] = {
        "run": name, "eps": eps, "n": n, "clean_correct": int(ok.sum()),
        "stage1": {
            "left": int(left.sum()), "remaining_max": float(rem.max()) if len(rem) else None,
            "remaining_q10_q50_q90": qs, "remaining_at_least_0.9": int((rem >= 0.9).sum()),
            "square100_further_than_apgd_ce": int((mq < m1[left]).sum()),
        },
    }  # fmt: skip
    xs, ys, xa = xs[left], ys[left], xa[left]
    targets = {}
    for label, (k, ranking, warm) in CANDIDATES.items():
        broken = 0
        for b in _batches(len(xs)):
            kw = {"rank_by": xa[b]} if ranking == "drift" else {}
            if warm:
                kw["init"] = xa[b]
            gen = torch.Generator().manual_seed(9 + b.start)
            adv = apgd_t(model, xs[b], ys[b], threat=threat, steps=50, n_target_classes=k, generator=gen, **kw)
            broken += int((predict(model, adv).argmax(1) != ys[b]).sum())
        targets[label] = broken
    out["targets"] = targets
    specs = get_suite("fast")
    s = run_protocol(model, x, y, specs, threat=threat, seed=0).summary()
    near = [a["label"] for a in s["attacks"] if (a.get("gate") or {}).get("kind") == "near"]
    ran = sum(s["attacked"][lb] for lb in near)
    out["fast"] = {
        "robust": round(s["robust"]["value"] * s["n"]), "attacked": s["attacked"], "broken_by": s["broken_by"],
        "near_yield": sum(s["broken_by"][lb] for lb in near) / ran if ran else None,
    }  # fmt: skip
    out["seconds"] = time.perf_counter() - t0
    return out


def _work(args: tuple[str, int, int, float | None]) -> dict[str, Any]:
    try:
        return measure(*args)
    except Exception as exc:  # noqa: BLE001 - one model's failure is reported, the others still run
        return {"run": args[0], "error": repr(exc)}


def markdown(results: list[dict[str, Any]]) -> str:
    rows = ["| model | clean | left by APGD-CE-10 | remaining margin q10 / q50 / q90 / max | left at >= 0.9 | "
            "Square-100 further than APGD-CE | " + " | ".join(CANDIDATES) + " | `fast` robust | near yield |",
            "|" + "---|" * (8 + len(CANDIDATES))]  # fmt: skip
    for r in results:
        if "error" in r:
            rows.append(f"| {r['run']} | error: {r['error']} |")
            continue
        s1 = r["stage1"]
        q = " / ".join(f"{v:.2f}" for v in [*s1["remaining_q10_q50_q90"], s1["remaining_max"] or 0])
        y = r["fast"]["near_yield"]
        rows.append(
            f"| {r['run']} | {r['clean_correct']} | {s1['left']} | {q} | {s1['remaining_at_least_0.9']} | "
            f"{s1['square100_further_than_apgd_ce']} | " + " | ".join(str(v) for v in r["targets"].values())
            + f" | {r['fast']['robust']} | {'–' if y is None else f'{y:.2f}'} |"
        )  # fmt: skip
    return "\n".join(rows) + "\n"


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("models", nargs="+", metavar="RUN")
    ap.add_argument("--out", required=True)
    ap.add_argument("--n", type=int, default=1000)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--jobs", type=int, default=1)
    ap.add_argument("--eps", type=float, default=None, help="default: each run's training eps")
    args = ap.parse_args(argv)
    ctx = mp.get_context("fork" if sys.platform.startswith("linux") else "spawn")
    with ctx.Pool(args.jobs) as pool:
        results = pool.map(_work, [(m, args.n, args.threads, args.eps) for m in args.models], chunksize=1)
    command = "python benchmarks/fast_design.py " + " ".join(shlex.quote(a) for a in (argv or sys.argv[1:]))
    write_result(args.out, {"what": "fast suite design measurements", "command": command, "models": results})
    print(markdown(results))


if __name__ == "__main__":
    main()
