"""The ``certify`` section of ``benchmarks/run.py`` (issue 20): how fast the bounds are, and how
much the bounds certify on given runs.

- ``speed``: seconds per point of each bound method on ``lenet5`` (random weights, random inputs
  in [0, 1], random labels, eps ``--eps``), batched (``--certify-batch``): ``ibp`` and
  ``crown-ibp`` on ``--certify-speed-n`` points, interleaved ``--repeats`` times; ``crown`` and
  ``alpha-crown`` (20 iterations) once on ``--certify-speed-n-slow`` points. Target: CROWN-IBP at
  >= 200 points per second on this CPU with ``--threads``.
- ``runs``: per ``--certify`` run and eps (``--certify-eps``, default the run's), on its first
  ``--certify-n`` test points, each method of ``--certify-methods`` through
  :func:`logitpair.certify` (the bound of every method but IBP is the larger of its own and IBP's):
  clean and certified accuracy with their Wilson intervals, the statuses, seconds per point.
  Target (on a run trained by ``ibp`` or ``crown-ibp`` at eps 0.1, certified at 0.1 on >= 1000
  points): CROWN-certified >= 66% at clean >= 76%.
"""

from __future__ import annotations

import argparse
from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor, nn

FAST = ("ibp", "crown-ibp")
SLOW = ("crown", "alpha-crown")
CERTIFIED_METHODS = ("ibp", "crown-ibp")  # training methods the certified-accuracy target applies to
SPEED_TARGET = 200.0  # CROWN-IBP points per second on lenet5
TARGET_EPS, TARGET_N, TARGET_CERTIFIED, TARGET_CLEAN = 0.1, 1000, 0.66, 0.76


# --------------------------------------------------------------------------- worker tasks
def _random_lenet5(task: dict[str, Any], device: torch.device) -> tuple[nn.Module, Tensor, Tensor]:
    from logitpair.models import create_model

    gen = torch.Generator().manual_seed(task.get("seed", 0))
    torch.manual_seed(task.get("seed", 0))
    model = create_model("lenet5", num_classes=10, in_channels=1, image_size=28).eval().to(device)
    n = task["n"]
    x = torch.rand(n, 1, 28, 28, generator=gen)
    y = torch.randint(0, 10, (n,), generator=gen)
    return model, x.to(device), y.to(device)


def build_bounds(task: dict[str, Any], device: torch.device) -> tuple[Callable[[], Any], None]:
    """One pass of ``margin_bounds(method)`` over ``n`` points in batches of ``batch`` (no autograd)."""
    from logitpair.bounds import margin_bounds
    from logitpair.threat import Linf

    model, x, y = _random_lenet5(task, device)
    model.requires_grad_(False)
    threat, method, batch = Linf(task["eps"]), task["method"], task["batch"]
    opts = {"iterations": 20} if method == "alpha-crown" else {}

    def fn() -> dict[str, Any]:
        with torch.no_grad():
            for i in range(0, len(y), batch):
                margin_bounds(model, x[i : i + batch], y[i : i + batch], threat=threat, method=method, **opts)
        return {"n": len(y)}

    return fn, None


def build_certify(task: dict[str, Any], device: torch.device) -> tuple[Callable[[], Any], None]:
    """``logitpair.certify`` of a run on its first ``n`` test points at ``eps`` with ``method``."""
    from _workers import _load_points

    from logitpair.certification import certify
    from logitpair.threat import Linf

    net, x, y, eps = _load_points(task, device)
    net.eval()

    def fn() -> dict[str, Any]:
        res = certify(net, x, y, threat=Linf(eps), method=task["method"], batch_size=task["batch"])
        s = res.summary()
        return {k: s[k] for k in ("clean", "certified", "counts", "seconds_per_point")} | {"eps": eps}

    return fn, None


# --------------------------------------------------------------------------- the section
def _speed(runner: Any, args: argparse.Namespace) -> dict[str, Any]:
    base = {"kind": "bounds", "eps": args.eps, "batch": args.certify_batch}
    fast = runner.group({m: {**base, "method": m, "n": args.certify_speed_n} for m in FAST}, args.repeats)
    slow = runner.group({m: {**base, "method": m, "n": args.certify_speed_n_slow, "once": True} for m in SLOW}, 1)
    out: dict[str, Any] = {"model": "lenet5 (random weights, random inputs)", "eps": args.eps,
                           "threads": args.threads, "batch": args.certify_batch}  # fmt: skip
    for method, entry in {**fast, **slow}.items():
        if "error" in entry:
            out[method] = {"error": entry["error"]}
            continue
        per_point = sorted(r["seconds"] / r["n"] for r in entry["runs"])
        best = per_point[0]
        out[method] = {"n": entry["runs"][0]["n"], "seconds_per_point": per_point, "points_per_second": 1 / best}
    crown_ibp = out.get("crown-ibp", {})
    if "points_per_second" in crown_ibp:
        value = crown_ibp["points_per_second"]
        out["target"] = {"crown_ibp_points_per_second": {"value": value, "target": SPEED_TARGET,
                                                         "met": value >= SPEED_TARGET}}  # fmt: skip
    return out


def _target(meta: dict[str, Any], eps: float, methods: dict[str, Any]) -> dict[str, Any] | None:
    """The certified-training target, where it applies (a certified-trained run at eps 0.1)."""
    crown = methods.get("crown", {})
    if meta.get("method") not in CERTIFIED_METHODS or abs(eps - TARGET_EPS) > 1e-12 or "certified" not in crown:
        return None
    cert, clean, n = crown["certified"]["value"], crown["clean"]["value"], crown["certified"]["n"]
    return {
        "crown_certified": {"value": cert, "target": TARGET_CERTIFIED, "met": cert >= TARGET_CERTIFIED},
        "clean": {"value": clean, "target": TARGET_CLEAN, "met": clean >= TARGET_CLEAN},
        "points": {"value": n, "target": TARGET_N, "met": n >= TARGET_N},
    }


def _runs(runner: Any, args: argparse.Namespace, run_meta: Callable[[str], dict[str, Any]]) -> dict[str, Any]:
    tasks: dict[tuple[str, Any, str], dict[str, Any]] = {}
    for run in args.certify:
        for eps in args.certify_eps or [None]:
            for method in args.certify_methods:
                tasks[run, eps, method] = {"kind": "certify", "run": run, "eps": eps, "method": method, "once": True,
                                           "n": args.certify_n, "batch": args.certify_batch,
                                           "data_dir": args.data_dir}  # fmt: skip
    res = runner.pool(tasks, 1, args.jobs)
    out: dict[str, Any] = {}
    for run in args.certify:
        meta = run_meta(run)
        entry: dict[str, Any] = {"run": run, "method": meta.get("method"), "model": (meta.get("model") or {}).get("name"),
                                 "n": args.certify_n, "by_eps": {}}  # fmt: skip
        for eps in args.certify_eps or [None]:
            methods = {}
            for method in args.certify_methods:
                r = res[run, eps, method]
                methods[method] = {"error": r["error"]} if "error" in r else r["runs"][-1]
            found = next((m["eps"] for m in methods.values() if "eps" in m), eps)
            row: dict[str, Any] = {"eps": found, "methods": methods}
            target = _target(meta, found, methods) if found is not None else None
            if target:
                row["target"] = target
            entry["by_eps"][f"{found:g}" if found is not None else "run's"] = row
        out[run] = entry
    return out


def measure_certify(runner: Any, args: argparse.Namespace, run_meta: Callable[[str], dict[str, Any]]) -> dict[str, Any]:
    runner.say("certify: bound speed on lenet5")
    out: dict[str, Any] = {"speed": _speed(runner, args)}
    out["runs"] = _runs(runner, args, run_meta) if args.certify else "skipped: no --certify runs given"
    return out


def add_arguments(ap: argparse.ArgumentParser) -> None:
    g = ap.add_argument_group("certify (issue 20)")
    g.add_argument("--certify", nargs="*", default=[], metavar="RUN", help="run directories to certify")
    g.add_argument(
        "--certify-eps", nargs="+", type=float, default=None, help="eps of the certification (default: the run's)"
    )
    g.add_argument("--certify-methods", nargs="+", default=["ibp", "crown-ibp", "crown", "alpha-crown"],
                   choices=(*FAST, *SLOW))  # fmt: skip
    g.add_argument("--certify-n", type=int, default=None, help="test points per certification (default --n)")
    g.add_argument("--certify-batch", type=int, default=200, help="points per bound batch (default 200)")
    g.add_argument(
        "--certify-speed-n", type=int, default=None, help="points of the ibp / crown-ibp speed (200; --quick 20)"
    )
    g.add_argument(
        "--certify-speed-n-slow", type=int, default=None, help="points of the crown / alpha-crown speed (4; --quick 1)"
    )


def resolve_arguments(args: argparse.Namespace) -> None:
    if args.certify_n is None:
        args.certify_n = args.n
    if args.certify_speed_n is None:
        args.certify_speed_n = 20 if args.quick else 200
    if args.certify_speed_n_slow is None:
        args.certify_speed_n_slow = 1 if args.quick else 4


def markdown(r: dict[str, Any]) -> str:
    """The section's Markdown: the speed table, then one table per certified run."""
    c = r.get("certify")
    if not isinstance(c, dict):
        return ""
    sp = c["speed"]
    text = "### Certified bounds (issue 20)\n\n"
    text += (f"Speed on `{sp['model']}`, eps {sp['eps']:g}, batch {sp['batch']}, {sp['threads']} thread(s) "
             "(best of the repeats):\n\n| method | points | s/point | points/s |\n|---|---|---|---|\n")  # fmt: skip
    for m in (*FAST, *SLOW):
        e = sp.get(m, {})
        if "error" in e or not e:
            text += f"| {m} | – | {e.get('error', 'not run')} | – |\n"
        else:
            text += f"| {m} | {e['n']} | {min(e['seconds_per_point']):.4g} | {e['points_per_second']:.4g} |\n"
    runs = c.get("runs")
    if isinstance(runs, dict):
        for entry in runs.values():
            text += f"\n`{entry['method']}` ({entry['run']}), first {entry['n']} test points:\n\n"
            text += "| eps | method | clean | certified [95% CI] | s/point |\n|---|---|---|---|---|\n"
            for row in entry["by_eps"].values():
                for m, e in row["methods"].items():
                    if "error" in e:
                        text += f"| {row['eps']} | {m} | – | {e['error']} | – |\n"
                        continue
                    lo, hi = e["certified"]["ci95"]
                    text += (f"| {e['eps']:g} | {m} | {100 * e['clean']['value']:.1f} | "
                             f"{100 * e['certified']['value']:.1f} [{100 * lo:.1f}, {100 * hi:.1f}] | "
                             f"{e['seconds_per_point']:.3g} |\n")  # fmt: skip
    return text
