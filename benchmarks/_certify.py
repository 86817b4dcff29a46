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
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

FAST = ("ibp", "crown-ibp")
SLOW = ("crown", "alpha-crown")
CERTIFIED_METHODS = ("ibp", "crown-ibp")  # training methods the certified-accuracy target applies to
ATTACKED = "attacked"  # the key of the attack evaluation beside the bound methods
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
        flags = "".join("1" if c else "0" for c in res.certified.tolist())
        return {k: s[k] for k in ("clean", "certified", "counts", "seconds_per_point")} | {
            "eps": eps,
            "certified_points": flags,
        }

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


def _tasks(args: argparse.Namespace) -> dict[tuple[str, Any, str], dict[str, Any]]:
    """One task per run, eps and bound method, and one attack evaluation per run and eps."""
    tasks: dict[tuple[str, Any, str], dict[str, Any]] = {}
    for run in args.certify:
        for eps in args.certify_eps or [None]:
            base = {"run": run, "eps": eps, "once": True, "n": args.certify_n, "data_dir": args.data_dir}
            if args.certify_attack != "none":
                tasks[run, eps, ATTACKED] = {
                    **base,
                    "kind": "suite",
                    "suite": args.certify_attack,
                    "batch": args.eval_batch,
                }
            for method in args.certify_methods:
                tasks[run, eps, method] = {**base, "kind": "certify", "method": method, "batch": args.certify_batch}
    return tasks


def _sandwich(methods: dict[str, Any], attacked: dict[str, Any]) -> dict[str, Any]:
    """Per method: points certified and broken by the attacks (must be 0), and undecided ones."""
    robust = attacked["robust_points"]
    out = {}
    for m, e in methods.items():
        if "certified_points" in e:
            cert = e["certified_points"]
            out[m] = {"contradictions": sum(c == "1" and r == "0" for c, r in zip(cert, robust, strict=True)),
                      "undecided": sum(c == "0" and r == "1" for c, r in zip(cert, robust, strict=True))}  # fmt: skip
    return out


def _row(run: str, eps: Any, meta: dict[str, Any], res: dict, args: argparse.Namespace) -> dict[str, Any]:
    methods = {}
    for method in args.certify_methods:
        r = res[run, eps, method]
        methods[method] = {"error": r["error"]} if "error" in r else r["runs"][-1]
    found = next((m["eps"] for m in methods.values() if "eps" in m), eps)
    row: dict[str, Any] = {"eps": found, "methods": methods}
    if (run, eps, ATTACKED) in res:
        a = res[run, eps, ATTACKED]
        row["attacked"] = {"error": a["error"]} if "error" in a else {"suite": args.certify_attack, **a["runs"][-1]}
        if "robust_points" in row["attacked"]:
            row["sandwich"] = _sandwich(methods, row["attacked"])
    target = _target(meta, found, methods) if found is not None else None
    if target:
        row["target"] = target
    return row


def _runs(runner: Any, args: argparse.Namespace, run_meta: Callable[[str], dict[str, Any]]) -> dict[str, Any]:
    res = runner.pool(_tasks(args), 1, args.jobs)
    out: dict[str, Any] = {}
    for run in args.certify:
        meta = run_meta(run)
        entry: dict[str, Any] = {"run": run, "method": meta.get("method"), "model": (meta.get("model") or {}).get("name"),
                                 "n": args.certify_n, "by_eps": {}}  # fmt: skip
        for eps in args.certify_eps or [None]:
            row = _row(run, eps, meta, res, args)
            entry["by_eps"][f"{row['eps']:g}" if row["eps"] is not None else "run's"] = row
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
    g.add_argument("--certify-attack", default="fast", help="suite run on the same points (default fast; none: skip)")
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
    if isinstance(runs, dict) and runs:
        text += _runs_markdown(runs)
    return text


def _cell(e: dict[str, Any], key: str) -> str:
    if "error" in e:
        return "error"
    return f"{100 * e[key]['value']:.1f}"


def _runs_markdown(runs: dict[str, Any]) -> str:
    """One table per eps: a row per run, its clean and attacked accuracy and each method's certified accuracy."""
    first = next(iter(runs.values()))
    methods = list(next(iter(first["by_eps"].values()))["methods"])
    text = ""
    for key in first["by_eps"]:
        rows = [e for e in runs.values() if key in e["by_eps"]]
        attack = next((r["by_eps"][key]["attacked"].get("suite") for r in rows if "attacked" in r["by_eps"][key]), None)
        text += f"\nε = {key}, first {first['n']} test points (accuracy %; certified: every margin bound > 0):\n\n"
        head = ["run", "clean"] + ([f"attacked ({attack})"] if attack else []) + [f"certified {m}" for m in methods]
        text += "| " + " | ".join(head) + " |\n|" + "---|" * len(head) + "\n"
        for e in rows:
            row = e["by_eps"][key]
            m0 = next(iter(row["methods"].values()))
            cells = [f"`{e['method']}` ({Path(e['run']).name})", _cell(m0, "clean")]
            if attack:
                cells.append(_cell(row.get("attacked", {"error": 1}), "robust"))
            cells += [_cell(row["methods"][m], "certified") for m in methods]
            text += "| " + " | ".join(cells) + " |\n"
        bad = sum(c["contradictions"] for e in rows for c in e["by_eps"][key].get("sandwich", {}).values())
        if attack:
            text += f"\nPoints certified by a method and broken by {attack}: {bad} (0 unless a bound or an attack is wrong).\n"
        text += _target_lines(rows, key)
    return text


def _target_lines(rows: list[dict[str, Any]], key: str) -> str:
    lines = ""
    for e in rows:
        target = e["by_eps"][key].get("target")
        if target:
            met = all(t["met"] for t in target.values())
            lines += (f"\nTarget (issue 20) on `{e['method']}` ({Path(e['run']).name}): CROWN-certified "
                      f"{100 * target['crown_certified']['value']:.1f}% (≥ 66) at clean {100 * target['clean']['value']:.1f}% "
                      f"(≥ 76) on {target['points']['value']} points (≥ 1000): {'met' if met else 'not met'}.\n")  # fmt: skip
    return lines
