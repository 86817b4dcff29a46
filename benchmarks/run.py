"""The one benchmark entry point: cost of our attacks, training steps and evaluations, in one run.

Usage::

    python benchmarks/run.py --out benchmarks/results/bench.json [--quick] [--device cpu|cuda]
        [--models RUN ...] [--threads 1] [--repeats 5] [--n 1000] [--suites quick standard fast pgd40]
        [--jobs 1] [--docs docs/PERFORMANCE.md] [--scaling-run RUN --scaling-n 1000 --scaling-suites fast standard]

Definitions. A *pass* is one image through the model; forward images are counted with
autograd on (the forward built a graph) and off, separately (``_counting.CountingModel``).
A *floor* is a minimal reference loop written in this benchmark (``_workers.py``), never our
library code. Measured, every figure the median over ``--repeats`` interleaved repeats with
its min and max, each measurement in its own process (forked), with its peak memory:

- ``pgd_floor_ratio``: our ``pgd`` (library defaults: keep the best iterate) with k steps /
  k x (forward + ``torch.autograd.grad`` of the summed CE w.r.t. the input, parameters frozen);
  ``pgd_last_iterate_floor_ratio`` the same with ``keep_best=False``; ``apgd_floor_ratio``: APGD-CE.
- ``train_step_ratio``: one step of every registered method (``METHODS.get(name)(model, x, y,
  METHODS.settings(name)(), BatchContext())``, backward, SGD step) / its floor, the cost class
  its registry entry declares (``METHODS.entry(name).cost``: e.g. PGD-k + one forward+backward
  on the clean + adversarial batch for M-PGD and ALP; a plain regular step for regular, CLP,
  LSQ; see ``floor`` in each entry).
- ``vs_art``: ART's ``ProjectedGradientDescentPyTorch`` time / our ``pgd`` time (same model,
  batch, eps, step, steps, one random start, ``keep_best=False``), or ``"skipped"``.
- ``vs_autoattack``: per ``--models`` run, on its first ``--n`` test points at its training eps:
  robust accuracy, passes and wall time of the reference AutoAttack (``pyautoattack``,
  ``version="standard"``) and of each suite; ``targets`` compares them with the aims (issue 13:
  ``standard`` <= AA + 0.2 points; issue 17: ``fast`` <= AA + 0.5 points on every model, and at
  <= 1/10 of AA's wall time and autograd passes on the models not named by ``--masking``, the
  models built to mask gradients, where ``fast`` may escalate). Models may be ``RUN+saturate`` or
  ``RUN+quantize`` (``_masked.py``). Each evaluation runs once (``--eval-repeats``) in its own
  process, ``--jobs`` at a time. ``--autoattack-from FILE`` takes the AutoAttack entries of the
  models it names from an earlier result of the same settings instead of running them again
  (marked ``reused_from`` in the JSON); wall-time ratios against a reused entry are across runs.
- ``eval_speedup``: the ``--speedup-suite`` with every attack on all points / the protocol
  (each attack only on the points still robust). Reported, not a target.
- ``data``: Fashion-MNIST IDX read throughput, and decode+transform throughput of the
  ``imagenet`` folder loader on generated JPEGs.
- ``eval_scaling`` (issue 23, ``_scaling.py``): points per second of the protocol under each
  ``--scaling-suites`` suite on ``--scaling-run``, and ALP training images per second, with one
  process x 1 thread, 2 processes x 1 thread (torchrun) and one process x 2 threads (target:
  2 x 1 >= 1.8 x 1 x 1); a ``gpu`` entry, the sharded ``fast`` evaluation of ResNet-50 at 224 px,
  wherever a CUDA device is (skipped otherwise).

Models: ``lenet5`` and ``lenet`` (28x28x1), ``preact-resnet18`` (32x32x3) and, with
``--device cuda`` only, ``resnet50`` (224x224x3). ``--quick`` (the CI smoke test): the two
LeNets, small batches, 2 repeats, 100 evaluation points. Optional references:
``pip install -e '.[bench]'`` (ART and pyautoattack). ``--docs FILE`` rewrites the part of
FILE between the generated-section markers with the Markdown summary.
"""

from __future__ import annotations

import argparse
import importlib.metadata
import importlib.util
import multiprocessing as mp
import shlex
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from _certify import add_arguments as add_certify_arguments
from _certify import measure_certify
from _certify import resolve_arguments as resolve_certify_arguments
from _masked import split_name
from _report import markdown_summary, write_docs
from _results import write_result
from _scaling import add_arguments as add_scaling_arguments
from _scaling import measure as measure_scaling
from _workers import worker

MODELS: dict[str, dict[str, Any]] = {  # shape (C, H, W); attack batch and steps; training batch
    "lenet5": {"shape": (1, 28, 28), "batch": 256, "steps": 20, "train_batch": 128},
    "lenet": {"shape": (1, 28, 28), "batch": 256, "steps": 20, "train_batch": 128},
    "preact-resnet18": {"shape": (3, 32, 32), "batch": 32, "steps": 10, "train_batch": 32},
    "resnet50": {"shape": (3, 224, 224), "batch": 32, "steps": 10, "train_batch": 32},
}
CUDA_BATCH = {"lenet5": (1024, 512), "lenet": (1024, 512), "preact-resnet18": (256, 128), "resnet50": (64, 64)}
QUICK = {"batch": 32, "steps": 3, "train_batch": 16}

NO_FLOOR = "regular step (no method-specific floor)"  # a method whose registry entry declares no cost
SPEC_SUITES = ("quick", "standard", "fast", "pgd40")
SMALL_ARCHS = ("lenet5", "lenet")  # every training method is measured on these; others: --large-methods
CORE_METHODS = ("regular", "mpgd", "alp", "clp", "lsq")
MARK_BEGIN = "<!-- BEGIN benchmarks/run.py -->"
MARK_END = "<!-- END benchmarks/run.py -->"


def spread(values: list[float]) -> dict[str, Any]:
    """Median, min and max (and the values) of the repeats."""
    if not values:
        return {"median": None, "min": None, "max": None, "values": []}
    return {"median": statistics.median(values), "min": min(values), "max": max(values), "values": values}


def floor_for(method: str) -> tuple[str, dict[str, Any]]:
    """The floor of ``method``'s training step: the cost class of its registry entry."""
    from logitpair.methods import METHODS, StepCost

    cost = METHODS.entry(method).cost or StepCost(NO_FLOOR)
    return cost.floor, {"attack_steps": cost.attack_steps, "attack_frac": cost.attack_rows,
                        "train_mult": cost.train_rows}  # fmt: skip


# --------------------------------------------------------------------------- running workers
class Runner:
    """Starts one forked worker per task of a group, interleaves their repeats, collects results."""

    def __init__(self, threads: int, device: str, log: bool = True) -> None:
        self.ctx = mp.get_context("fork" if sys.platform.startswith("linux") else "spawn")
        self.threads, self.device, self.log = threads, device, log

    def say(self, text: str) -> None:
        if self.log:
            print(f"[{time.strftime('%H:%M:%S')}] {text}", file=sys.stderr, flush=True)

    def _start(self, name: Any, task: dict[str, Any], out: dict[Any, dict[str, Any]]) -> tuple[Any, Any] | None:
        """Fork the worker of ``task`` and wait until it is ready; ``out[name]`` gets its ready
        message. Returns ``(process, connection)``, or None when it failed to start."""
        parent, child = self.ctx.Pipe()
        proc = self.ctx.Process(target=worker, args=(child, task, self.threads, self.device), daemon=True)
        proc.start()
        child.close()
        msg = self._recv(parent, proc)
        out[name] = {"runs": [], **{k: v for k, v in msg.items() if k != "traceback"}}
        if "error" in msg:
            self.say(f"{name}: {msg['error']}\n{msg.get('traceback', '')}")
            proc.join()
            return None
        return proc, parent

    def group(self, tasks: dict[str, dict[str, Any]], repeats: int) -> dict[str, dict[str, Any]]:
        out: dict[str, dict[str, Any]] = {}
        live: dict[str, tuple[Any, Any]] = {}
        for name, task in tasks.items():
            started = self._start(name, task, out)
            if started is not None:
                live[name] = started
        for r in range(repeats):
            for name, (proc, conn) in list(live.items()):
                self.say(f"{name}: repeat {r + 1}/{repeats}")
                conn.send("run")
                msg = self._recv(conn, proc)
                if "error" in msg:
                    self.say(f"{name}: {msg['error']}\n{msg.get('traceback', '')}")
                    out[name]["error"] = msg["error"]
                    del live[name]
                    proc.join()
                else:
                    out[name]["runs"].append(msg)
        for name, (proc, conn) in live.items():
            conn.send("stop")
            out[name].update(self._recv(conn, proc))
            proc.join()
        return out

    def pool(self, tasks: dict[Any, dict[str, Any]], repeats: int, jobs: int) -> dict[Any, dict[str, Any]]:
        """Run each task ``repeats`` times in its own worker, ``jobs`` workers at a time (no interleaving)."""
        from multiprocessing.connection import wait

        todo = list(tasks.items())
        out: dict[Any, dict[str, Any]] = {}
        live: dict[Any, tuple[Any, Any, Any]] = {}  # conn -> (name, proc, runs left)
        while todo or live:
            while todo and len(live) < jobs:
                name, task = todo.pop(0)
                started = self._start(name, task, out)
                if started is None:
                    continue
                proc, parent = started
                self.say(f"{name}: started")
                parent.send("run")
                live[parent] = (name, proc, repeats - 1)
            for conn in wait(list(live)):
                name, proc, left = live.pop(conn)
                msg = self._recv(conn, proc)
                if "error" in msg:
                    self.say(f"{name}: {msg['error']}\n{msg.get('traceback', '')}")
                    out[name]["error"] = msg["error"]
                    proc.join()
                    continue
                out[name]["runs"].append(msg)
                self.say(f"{name}: {msg['seconds']:.1f} s")
                if left > 0:
                    conn.send("run")
                    live[conn] = (name, proc, left - 1)
                else:
                    conn.send("stop")
                    out[name].update(self._recv(conn, proc))
                    proc.join()
        return out

    @staticmethod
    def _recv(conn: Any, proc: Any) -> dict[str, Any]:
        try:
            return conn.recv()
        except EOFError:
            proc.join()
            return {"error": f"worker died (exit code {proc.exitcode})"}


def seconds(entry: dict[str, Any]) -> list[float]:
    return [r["seconds"] for r in entry.get("runs", [])]


def ratio(ours: dict[str, Any], ref: dict[str, Any]) -> dict[str, Any]:
    """Per-repeat ``ours / ref`` (repeats are interleaved, so each pair shares the machine's load)."""
    if "error" in ours or "error" in ref:
        return {"error": ours.get("error") or ref.get("error")}
    values = [a / b for a, b in zip(seconds(ours), seconds(ref))]
    return {
        **spread(values),
        "seconds": spread(seconds(ours)),
        "reference_seconds": spread(seconds(ref)),
        "passes": ours.get("passes"),
        "reference_passes": ref.get("passes"),
        "peak_rss_mib": ours.get("peak_rss_mib"),
        "reference_peak_rss_mib": ref.get("peak_rss_mib"),
        "rss_start_mib": ours.get("rss_start_mib"),
        **({"cuda_peak_mib": ours["cuda_peak_mib"]} if "cuda_peak_mib" in ours else {}),
    }


# --------------------------------------------------------------------------- the measurements
def model_settings(name: str, args: argparse.Namespace) -> dict[str, Any]:
    s = dict(MODELS[name])
    if args.device == "cuda":
        s["batch"], s["train_batch"] = CUDA_BATCH[name]
    if args.quick:
        s.update(QUICK)
    return s


def measure_attacks(runner: Runner, name: str, s: dict[str, Any], args: argparse.Namespace, art: bool):
    base = {"kind": "attack", "model": name, "shape": s["shape"], "batch": s["batch"], "steps": s["steps"],
            "eps": args.eps, "min_seconds": args.min_seconds}  # fmt: skip
    which = ["pgd_floor", "pgd", "pgd_last", "apgd"] + (["art"] if art else [])
    res = runner.group({w: {**base, "which": w} for w in which}, args.repeats)
    common = {"batch": s["batch"], "steps": s["steps"], "shape": list(s["shape"])}
    out = {
        "pgd_floor_ratio": {**ratio(res["pgd"], res["pgd_floor"]), **common},
        "pgd_last_iterate_floor_ratio": {**ratio(res["pgd_last"], res["pgd_floor"]), **common},
        "apgd_floor_ratio": {**ratio(res["apgd"], res["pgd_floor"]), **common},
    }
    out["vs_art"] = {**ratio(res["art"], res["pgd_last"]), **common} if art else "skipped"
    return out


def measure_training(runner: Runner, name: str, s: dict[str, Any], args: argparse.Namespace) -> dict[str, Any]:
    from logitpair.methods import METHODS

    b = s["train_batch"]
    base = {"kind": "train", "model": name, "shape": s["shape"], "batch": b, "min_seconds": args.min_seconds}
    out: dict[str, Any] = {}
    methods = METHODS.names() if name in SMALL_ARCHS else [m for m in args.large_methods if m in METHODS.names()]
    for method in methods:
        floor_name, f = floor_for(method)
        floor = {"attack_steps": f["attack_steps"], "attack_rows": max(1, int(b * f["attack_frac"])),
                 "train_rows": b * f["train_mult"]}  # fmt: skip
        runner.say(f"train step {name} {method}")
        ours = {**base, "method": method, **mid_ramp(method)}
        res = runner.group({"ours": ours, "floor": {**base, "floor": floor}}, args.repeats)
        out[method] = {**ratio(res["ours"], res["floor"]), "floor": floor_name, "batch": b}
        if "step" in ours:
            out[method]["measured_at"] = "mid-ramp (eps and the schedules half-way: the bounds computed)"
    return out


def mid_ramp(method: str) -> dict[str, Any]:
    """For a method with a warm-up and ramp schedule (the certified ones) a step half-way up the
    ramp, where it pays for its bounds (at step 0 it would be in its warm-up: a clean step)."""
    from logitpair.methods import METHODS

    fields = METHODS.settings(method).__dataclass_fields__
    if "warmup_steps" not in fields or "ramp_steps" not in fields:
        return {}
    return {"config": {"warmup_steps": 0, "ramp_steps": 2}, "step": 1}


def measure_data(runner: Runner, args: argparse.Namespace) -> dict[str, Any]:
    out: dict[str, Any] = {}
    idx = runner.group({"idx": {"kind": "idx", "data_dir": args.data_dir}}, args.repeats)["idx"]
    if "error" in idx:
        out["idx"] = f"skipped: {idx['error']}"
    else:
        n = idx["runs"][0]["images"]
        out["idx"] = {"images": n, "images_per_second": spread([n / t for t in seconds(idx)]),
                      "seconds": spread(seconds(idx)), "peak_rss_mib": idx.get("peak_rss_mib")}  # fmt: skip
    if importlib.util.find_spec("PIL") is None:
        out["image_folder"] = "skipped: Pillow is not installed"
        return out
    with tempfile.TemporaryDirectory(prefix="bench-imagenet-") as root:
        classes, per_class = (2, 4) if args.quick else (4, 16)
        make_jpeg_folder(Path(root), classes, per_class)
        tasks = {
            split: {"kind": "folder", "root": root, "train": split == "train", "image_size": 224, "batch": 16}
            for split in ("test", "train")
        }
        res = runner.group(tasks, args.repeats)
    out["image_folder"] = {"classes": classes, "images_per_split": classes * per_class, "image_size": 224,
                           "source_size": [375, 500]}  # fmt: skip
    for split, entry in res.items():
        if "error" in entry:
            out["image_folder"][split] = f"error: {entry['error']}"
            continue
        n = entry["runs"][0]["images"]
        out["image_folder"][split] = {"images_per_second": spread([n / t for t in seconds(entry)]),
                                      "peak_rss_mib": entry.get("peak_rss_mib")}  # fmt: skip
    return out


def make_jpeg_folder(root: Path, classes: int, per_class: int) -> None:
    """An ``imagenet`` layout (train/<wnid>/*.JPEG, val/<wnid>/*.JPEG) of 500x375 photos-like JPEGs."""
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(0)
    yy, xx = np.mgrid[0:375, 0:500]
    for c in range(classes):
        wnid = f"n{c:08d}"
        for split in ("train", "val"):
            (root / split / wnid).mkdir(parents=True, exist_ok=True)
            for i in range(per_class):
                phase = rng.uniform(0, 6.3, 3)
                base = np.stack([np.sin(xx / (40 + 9 * k) + yy / 57 + phase[k]) for k in range(3)], -1)
                img = 127 + 90 * base + rng.normal(0, 12, (375, 500, 3))
                Image.fromarray(img.clip(0, 255).astype(np.uint8)).save(root / split / wnid / f"{wnid}_{i}.JPEG",
                                                                         quality=90)  # fmt: skip


def measure_evaluations(runner: Runner, args: argparse.Namespace, have_aa: bool) -> tuple[dict, dict]:
    """Every evaluation of every ``--models`` run in its own process, ``--jobs`` at a time."""
    with_speedup = args.speedup_suite != "none"
    suites = list(dict.fromkeys(args.suites + ([args.speedup_suite] if with_speedup else [])))
    every = f"{args.speedup_suite} (every attack on all points)"
    tasks: dict[tuple[str, str], dict[str, Any]] = {}
    for run in args.models:
        base = {"kind": "suite", "run": run, "n": args.n, "batch": args.eval_batch, "once": True,
                "data_dir": args.data_dir, "eps": args.eps_eval}  # fmt: skip
        if have_aa and run not in args.reuse:
            tasks[run, "autoattack"] = {**base, "suite": "autoattack"}
        tasks.update({(run, s): {**base, "suite": s} for s in suites})
        if with_speedup:
            tasks[run, every] = {**base, "suite": args.speedup_suite, "individual": True}
    res = runner.pool(tasks, args.eval_repeats, args.jobs)
    vs_aa: dict[str, Any] = {}
    speedup: dict[str, Any] = {}
    for run in args.models:
        meta = run_meta(run)
        path, wrapper = split_name(run)
        label = f"{meta.get('method')} ({Path(path).name}{'+' + wrapper if wrapper else ''})"
        entry: dict[str, Any] = {"run": run, "method": meta.get("method"), "model": (meta.get("model") or {}).get("name"),
                                 "n": args.n}  # fmt: skip
        entry["autoattack"] = (
            args.reuse[run]
            if run in args.reuse
            else eval_entry(res[run, "autoattack"])
            if have_aa
            else "skipped: --no-autoattack"
            if args.no_autoattack
            else "skipped: pyautoattack is not installed"
        )
        entry["suites"] = {s: eval_entry(res[run, s]) for s in args.suites}
        entry["masking_model"] = run in args.masking
        entry["targets"] = targets(entry)
        vs_aa[label] = entry
        if with_speedup:
            speedup[label] = {"suite": args.speedup_suite, **ratio(res[run, every], res[run, args.speedup_suite])}
    return vs_aa, speedup if with_speedup else "skipped: --speedup-suite none"


def run_meta(run: str) -> dict[str, Any]:
    """The run's ``model.json`` without loading weights (the parent process runs no torch ops, so
    forking stays safe)."""
    from logitpair.checkpoint import read_model_meta

    path = Path(split_name(run)[0]) / "model.json"
    return read_model_meta(path) if path.is_file() else {}


def eval_entry(entry: dict[str, Any]) -> dict[str, Any]:
    if "error" in entry:
        return {"error": entry["error"]}
    runs = entry["runs"]
    last = runs[-1]
    out = {k: v for k, v in last.items() if k not in ("seconds", "passes")}
    out["seconds"] = spread(seconds(entry))
    out["passes"] = last.get("passes")
    out["peak_rss_mib"] = entry.get("peak_rss_mib")
    out["rss_start_mib"] = entry.get("rss_start_mib")
    if "cuda_peak_mib" in entry:
        out["cuda_peak_mib"] = entry["cuda_peak_mib"]
    return out


def targets(entry: dict[str, Any]) -> dict[str, Any]:
    """Issue 13: standard <= AA + 0.2 points. Issue 17: fast <= AA + 0.5 points; on the models that
    are not masking models also <= 1/10 of AA's wall time and autograd passes and no more
    forward-only passes."""
    aa, suites = entry["autoattack"], entry["suites"]
    if not isinstance(aa, dict) or "error" in aa:
        return {"skipped": "no AutoAttack result"}
    out: dict[str, Any] = {}

    def acc(e: dict[str, Any]) -> float:
        return 100 * e["robust"]["value"]

    if "error" not in suites.get("standard", {"error": 1}):
        d = acc(suites["standard"]) - acc(aa)
        out["standard_minus_autoattack_points"] = {"value": d, "target": 0.2, "met": d <= 0.2}
    fast = suites.get("fast", {"error": 1})
    if "error" not in fast:
        d = acc(fast) - acc(aa)
        t = fast["seconds"]["median"] / aa["seconds"]["median"]
        g = fast["passes"]["grad"] / max(aa["passes"]["grad"], 1)
        f = fast["passes"]["no_grad"] / max(aa["passes"]["no_grad"], 1)
        out["fast_minus_autoattack_points"] = {"value": d, "target": 0.5, "met": d <= 0.5}
        if entry.get("masking_model"):
            return out
        out["fast_time_fraction"] = {"value": t, "target": 0.1, "met": t <= 0.1}
        out["fast_grad_pass_fraction"] = {"value": g, "target": 0.1, "met": g <= 0.1}
        out["fast_no_grad_pass_fraction"] = {"value": f, "target": 1.0, "met": f <= 1.0}
    return out


# --------------------------------------------------------------------------- main
def versions() -> dict[str, str | None]:
    out: dict[str, str | None] = {}
    for dist in ("torch", "numpy", "pillow", "adversarial-robustness-toolbox", "pyautoattack"):
        try:
            out[dist] = importlib.metadata.version(dist)
        except importlib.metadata.PackageNotFoundError:
            out[dist] = None
    return out


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", required=True, help="result JSON")
    ap.add_argument("--quick", action="store_true", help="small settings for a smoke test")
    ap.add_argument("--device", default="cpu", choices=("cpu", "cuda"))
    ap.add_argument(
        "--models", nargs="*", default=[], metavar="RUN",
        help="run directories for vs_autoattack; RUN+saturate / RUN+quantize: behind a masking wrapper (_masked.py)",
    )  # fmt: skip
    ap.add_argument("--threads", type=int, default=1, help="torch threads in every measurement (default 1)")
    ap.add_argument("--repeats", type=int, default=None, help="interleaved repeats (default 5; --quick 2)")
    ap.add_argument("--n", type=int, default=None, help="test points per evaluation (default 1000; --quick 100)")
    ap.add_argument("--suites", nargs="+", default=list(SPEC_SUITES), help="our suites compared with AutoAttack")
    ap.add_argument("--speedup-suite", default="quick", help="suite of eval_speedup (default quick; none: skip)")
    ap.add_argument("--no-autoattack", action="store_true", help="leave the AutoAttack reference out")
    ap.add_argument(
        "--masking",
        nargs="*",
        default=[],
        metavar="RUN",
        help="models of --models built to mask gradients: no cost targets for fast on them",
    )
    ap.add_argument(
        "--autoattack-from",
        default=None,
        metavar="JSON",
        help="reuse the AutoAttack entries of an earlier result with the same settings",
    )
    ap.add_argument("--eval-repeats", type=int, default=1, help="repeats of each evaluation (default 1)")
    ap.add_argument("--jobs", type=int, default=1, help="evaluations running at the same time (default 1)")
    ap.add_argument("--eval-batch", type=int, default=500, help="batch size of the evaluations (ours and AutoAttack)")
    ap.add_argument("--eps", type=float, default=0.1, help="eps of the attack-cost measurements")
    ap.add_argument("--eps-eval", type=float, default=None, help="eps of the evaluations (default: the run's)")
    ap.add_argument("--arch", nargs="+", default=None, help="architectures for the cost measurements")
    ap.add_argument("--data-dir", default=None, help="Fashion-MNIST folder (default: the dataset's location)")
    ap.add_argument(
        "--large-methods", nargs="+", default=list(CORE_METHODS),
        help="training methods measured on architectures other than lenet5 / lenet (default: the paper's five)",
    )  # fmt: skip
    ap.add_argument("--min-seconds", type=float, default=None, help="shortest timed sample (default 0.3; --quick 0)")
    ap.add_argument(
        "--skip",
        nargs="*",
        default=[],
        choices=("attacks", "training", "data", "evaluations", "certify", "eval_scaling"),
    )
    add_certify_arguments(ap)
    add_scaling_arguments(ap)
    ap.add_argument("--docs", default=None, help="Markdown file whose generated section is rewritten")
    ap.add_argument(
        "--docs-section", default=None, metavar="NAME",
        help="rewrite the section between <!-- BEGIN benchmarks/run.py NAME --> and its END marker instead",
    )  # fmt: skip
    args = ap.parse_args(argv)
    if args.repeats is None:
        args.repeats = 2 if args.quick else 5
    if args.n is None:
        args.n = 100 if args.quick else 1000
    if args.min_seconds is None:
        args.min_seconds = 0.0 if args.quick else 0.3
    if args.arch is None:
        args.arch = ["lenet5", "lenet"] if args.quick else ["lenet5", "lenet", "preact-resnet18"]
        if args.device == "cuda" and not args.quick:
            args.arch.append("resnet50")
    resolve_certify_arguments(args)
    if min(args.repeats, args.n, args.threads, args.jobs, args.eval_repeats, args.certify_n) < 1:
        ap.error("--repeats, --n, --certify-n, --threads, --jobs and --eval-repeats must be >= 1")
    if min(args.scaling_n, args.scaling_batch, args.scaling_repeats, args.scaling_gpu_n) < 1:
        ap.error("--scaling-n, --scaling-batch, --scaling-repeats and --scaling-gpu-n must be >= 1")
    if set(args.masking) - set(args.models):
        ap.error("--masking names models that --models does not")
    args.reuse = reused_autoattack(args, ap.error)
    return args


def reused_autoattack(args: argparse.Namespace, error: Any) -> dict[str, dict[str, Any]]:
    """The AutoAttack entries of ``--autoattack-from`` for the ``--models`` it has, checked to come
    from the same settings (points, batch, eps); each marked with the file it came from."""
    if not args.autoattack_from:
        return {}
    import json

    old = json.loads(Path(args.autoattack_from).read_text())
    same = ("n", "eval_batch", "eps_eval", "data_dir")
    diff = [k for k in same if old.get("settings", {}).get(k) != getattr(args, k)]
    if diff:
        error(f"--autoattack-from {args.autoattack_from}: other settings ({', '.join(diff)})")
    found = {}
    for entry in (old.get("vs_autoattack") or {}).values():
        aa = entry.get("autoattack")
        if entry.get("run") in args.models and isinstance(aa, dict) and "robust" in aa:
            found[entry["run"]] = {**aa, "reused_from": args.autoattack_from}
    return found


def measure_costs(runner: Runner, args: argparse.Namespace, have_art: bool) -> dict[str, Any]:
    """Attack and training-step cost on every ``--arch``."""
    result: dict[str, Any] = {}
    for key in ("pgd_floor_ratio", "pgd_last_iterate_floor_ratio", "apgd_floor_ratio", "vs_art", "train_step_ratio"):
        result[key] = {}
    for name in args.arch:
        s = model_settings(name, args)
        if "attacks" not in args.skip:
            runner.say(f"attack cost on {name}")
            for key, value in measure_attacks(runner, name, s, args, have_art).items():
                result[key][name] = value
        if "training" not in args.skip:
            result["train_step_ratio"][name] = measure_training(runner, name, s, args)
    return result


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    import torch

    torch.set_num_threads(1)  # the parent only orchestrates; workers set --threads
    preload()
    runner = Runner(args.threads, args.device)
    have_art = importlib.util.find_spec("art") is not None
    have_aa = importlib.util.find_spec("pyautoattack") is not None and not args.no_autoattack
    t0 = time.perf_counter()
    result: dict[str, Any] = {
        "what": "benchmarks (issues 13, 17, 20, 23): cost ratios, evaluations vs AutoAttack, data throughput, "
        "certified bounds, processes against threads",
        "command": "python benchmarks/run.py " + " ".join(shlex.quote(a) for a in (argv or sys.argv[1:])),
        "settings": {k: v for k, v in vars(args).items() if k not in ("out", "docs", "reuse")},
        "versions": versions(),
        "floors": {m: floor_for(m)[0] for m in _method_names()},
    }
    result.update(measure_costs(runner, args, have_art))
    if not have_art:
        result["vs_art"] = "skipped: adversarial-robustness-toolbox is not installed"
    if "data" not in args.skip:
        result["data"] = measure_data(runner, args)
    if "evaluations" not in args.skip and args.models:
        result["vs_autoattack"], result["eval_speedup"] = measure_evaluations(runner, args, have_aa)
    else:
        result["vs_autoattack"] = "skipped: no --models given"
        result["eval_speedup"] = "skipped: no --models given"
    if "certify" not in args.skip:
        result["certify"] = measure_certify(runner, args, run_meta)
    if "eval_scaling" not in args.skip:
        result["eval_scaling"] = measure_scaling(args, runner.say)
    result["seconds"] = time.perf_counter() - t0
    write_result(args.out, result)
    from logitpair.environment import environment

    summary = markdown_summary({**result, "environment": environment()})
    print(summary)
    if args.docs:
        tag = f" {args.docs_section}" if args.docs_section else ""
        write_docs(
            Path(args.docs), summary, MARK_BEGIN.replace(" -->", tag + " -->"), MARK_END.replace(" -->", tag + " -->")
        )
    return result


def preload() -> None:
    """Import what the workers use once, here: forked workers then start without importing."""
    import torch

    import logitpair.attacks
    import logitpair.data
    import logitpair.evaluation
    import logitpair.methods
    import logitpair.models  # noqa: F401

    w = torch.zeros(2, 2, requires_grad=True)  # the first optimizer imports torch's compiler stack
    torch.optim.SGD([w], lr=0.1).step()
    for optional in ("art.attacks.evasion", "art.estimators.classification", "pyautoattack", "PIL.Image"):
        if importlib.util.find_spec(optional.split(".")[0]) is not None:
            importlib.import_module(optional)


def _method_names() -> list[str]:
    from logitpair.methods import METHODS

    return METHODS.names()


if __name__ == "__main__":
    main()
