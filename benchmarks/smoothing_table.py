"""Randomized smoothing against the L2 attacks (issue 22): the README table, regenerated.

For every run and noise level σ, Cohen et al.'s CERTIFY on the first ``--n`` test points
(``--n0`` selection and ``--n-samples`` estimation samples, level ``--alpha``; noise not
clipped, as theirs): certified accuracy of the *smoothed* classifier at each L2 radius of
``--radii``. Beside it, the L2 attacks (``--suite``, default ``standard``: AutoAttack's L2
standard version) on the *base* classifier at the same radii and points: the smoothed classifier
is not attacked (its prediction is a Monte-Carlo estimate; attacking it needs the attacks of
Salman et al. 2019), so the attacked column bounds the base model, not the certificate's model.
A run named ``NAME@S`` is certified at σ = S only (e.g. a model trained with noise S).

Usage::

    python benchmarks/smoothing_table.py runs/smoothing/regular-noise-0.25@0.25 runs/smoothing/regular-noise-0.5@0.5 \
        runs/demo/{clp,lsq,mpgd,alp} --sigmas 0.25 0.5 --out benchmarks/results/smoothing_table.json --jobs 2
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path
from typing import Any

from _tables import run_table


def _points(run: str, n: int, data_dir: str | None) -> tuple[Any, Any, Any]:
    import logitpair
    from logitpair.evaluation.run import test_points

    model, info = logitpair.load_run(run)
    x, y, _ = test_points(info, n, data_dir)
    return model.eval(), x, y


def _task(task: dict[str, Any]) -> dict[str, Any]:
    import torch

    torch.set_num_threads(1)
    model, x, y = _points(task["run"], task["n"], task["data_dir"])
    t0 = time.perf_counter()
    if task["kind"] == "smoothing":
        from logitpair.certification.smoothing import certify_smoothing

        res = certify_smoothing(model, x, y, sigma=task["sigma"], n0=task["n0"], n=task["samples"],
                                alpha=task["alpha"], batch_size=task["batch"], seed=0)  # fmt: skip
        out = res.summary(task["radii"])
    else:
        from logitpair.evaluation import evaluate
        from logitpair.threat import L2

        res = evaluate(model, x, y, threat=L2(task["radius"]), suite=task["suite"], batch_size=task["n"])
        s = res.summary()
        out = {"clean": s["clean"], "robust": s["robust"]}
    return {**out, "seconds": time.perf_counter() - t0}


def _tasks(args: argparse.Namespace) -> dict[tuple[str, str, float], dict[str, Any]]:
    tasks: dict[tuple[str, str, float], dict[str, Any]] = {}
    for spec in args.runs:
        run, _, only = spec.partition("@")
        base = {"run": run, "n": args.n, "data_dir": args.data_dir}
        for sigma in [float(only)] if only else args.sigmas:
            tasks[spec, "smoothing", sigma] = {**base, "kind": "smoothing", "sigma": sigma, "n0": args.n0,
                                               "samples": args.n_samples, "alpha": args.alpha, "batch": args.batch,
                                               "radii": args.radii}  # fmt: skip
        for radius in args.radii:
            tasks[spec, "attack", radius] = {**base, "kind": "attack", "radius": radius, "suite": args.suite}
    return tasks


def _pct(s: dict[str, Any]) -> str:
    return f"{100 * s['value']:.0f}"


def markdown(result: dict[str, Any]) -> str:
    a = result["settings"]
    head = ["run", "clean (base)"] + [f"smoothed σ {s:g}: clean (abstain)" for s in a["sigmas"]]
    for r in a["radii"]:
        head += [f"L2 {r:g}: attacked (base, {a['suite']})"] + [f"L2 {r:g}: certified σ {s:g}" for s in a["sigmas"]]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for spec, e in result["runs"].items():
        first = next(iter(e["attack"].values()))
        cells = [f"`{Path(spec.partition('@')[0]).name}`", _pct(first["clean"])]
        for s in a["sigmas"]:
            sm = e["smoothing"].get(f"{s:g}")
            cells.append(f"{_pct(sm['smoothed_accuracy'])} ({sm['abstained']})" if sm else "–")
        for r in a["radii"]:
            cells.append(_pct(e["attack"][f"{r:g}"]["robust"]))
            for s in a["sigmas"]:
                sm = e["smoothing"].get(f"{s:g}")
                cell = next((_pct(c) for c in sm["certified_accuracy"] if c["radius"] == r), "–") if sm else "–"
                cells.append(cell)
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> dict[str, Any]:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("runs", nargs="+", help="run directories; RUN@S: certify at sigma S only")
    ap.add_argument("--sigmas", nargs="+", type=float, default=[0.25, 0.5])
    ap.add_argument("--radii", nargs="+", type=float, default=[0.25, 0.5, 1.0])
    ap.add_argument("--n", type=int, default=100, help="test points (the first ones)")
    ap.add_argument("--n0", type=int, default=100)
    ap.add_argument("--n-samples", type=int, default=10_000)
    ap.add_argument("--alpha", type=float, default=0.001)
    ap.add_argument("--batch", type=int, default=1000, help="noisy samples per forward pass")
    ap.add_argument("--suite", default="standard", help="L2 attack suite on the base classifier")
    ap.add_argument("--data-dir", default=None)
    ap.add_argument("--jobs", type=int, default=1)
    ap.add_argument("--out", required=True)
    args = ap.parse_args(argv)
    settings = {k: v for k, v in vars(args).items() if k != "out"}
    result = run_table(what="randomized smoothing (certified, smoothed classifier) vs L2 attacks (base classifier), issue 22",
                       script="smoothing_table.py", argv=argv, settings=settings, kinds=("smoothing", "attack"),
                       tasks=_tasks(args), fn=_task, out=args.out, jobs=args.jobs)  # fmt: skip
    print(markdown(result))
    print(f"{result['wall_seconds_this_call']:.0f} s this call")
    return result


if __name__ == "__main__":
    main()
