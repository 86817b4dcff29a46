"""The ``eval_scaling`` section of ``benchmarks/run.py`` (issue 23): processes against threads.

- ``evaluation``: points per second of the protocol (:func:`logitpair.evaluation.run_protocol`)
  with each suite of ``--scaling-suites`` on the first ``--scaling-n`` test points of
  ``--scaling-run`` at its training ε, batch ``--scaling-batch``, in three configurations:
  one process × 1 thread, 2 processes × 1 thread (torchrun, gloo: batches sharded by rank) and
  one process × 2 threads. Seconds are the protocol's own, between two barriers (loading and
  start-up excluded, the exchange of the shards' rows included). Repeats are interleaved, so every
  configuration sees the same machine load; every repeat must give the same per-example record
  (``same_result``). Target: 2 × 1 ≥ 1.8 × (1 × 1) under ``fast`` and ``standard``; 2 × 1 against
  1 × 2 is stated.
- ``training``: ALP training images per second (LeNet-5, Fashion-MNIST, PGD-7, the run's own
  ``train_seconds``: start-up, loading and validation excluded) in the same three configurations
  (this replaces the former ``benchmarks/ddp_scaling.py``, whose figure was measured under load).
- ``gpu_resnet50`` (a ``gpu`` entry, only with a CUDA device, else skipped): the sharded ``fast``
  evaluation of a randomly initialised ResNet-50 at 224 px (1000 classes, ε 4/255) on every
  visible GPU, one process each; the labels are the model's own clean predictions, so every
  point is attacked (an untrained model would be wrong on nearly all points and cost nothing).

Run alone, this file is the measuring worker (under torchrun or in one process)::

    torchrun --standalone --nproc-per-node 2 benchmarks/_scaling.py -- --run RUN --suite fast --count 200 \\
        --batch 50 --out result.json
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = {"1x1": (1, 1), "2x1": (2, 1), "1x2": (1, 2)}  # processes x threads each
TARGET = 1.8  # 2 processes x 1 thread over 1 process x 1 thread


def add_arguments(ap: argparse.ArgumentParser) -> None:
    g = ap.add_argument_group("eval_scaling (issue 23)")
    g.add_argument("--scaling-run", default=None, metavar="RUN",
                   help="run directory whose evaluation is timed (skipped without it)")  # fmt: skip
    g.add_argument("--scaling-n", type=int, default=1000, help="test points of the evaluation (default 1000)")
    g.add_argument("--scaling-batch", type=int, default=100, help="evaluation batch (default 100)")
    g.add_argument("--scaling-suites", nargs="+", default=["fast", "standard"], help="suites timed")
    g.add_argument("--scaling-repeats", type=int, default=3, help="interleaved repeats (default 3)")
    g.add_argument("--scaling-train-images", type=int, default=8192,
                   help="training images of the training measurement (default 8192; 0: skip it)")  # fmt: skip
    g.add_argument("--scaling-gpu-n", type=int, default=512, help="points of the ResNet-50 entry (default 512)")


# --------------------------------------------------------------------------- the worker
def _points_and_model(a: argparse.Namespace, device: Any) -> tuple[Any, Any, Any, Any]:
    import torch

    from logitpair.attacks import predict
    from logitpair.checkpoint import load_run
    from logitpair.evaluation import test_points
    from logitpair.models import create_model
    from logitpair.threat import Linf

    if a.run:
        model, info = load_run(a.run, device=device)
        x, y, _ = test_points(info, a.count, a.data_dir)
        return model, x, y, Linf(info.eps)
    torch.manual_seed(0)
    model = create_model(a.random_model, num_classes=1000, in_channels=3, image_size=a.image_size)
    model = model.eval().to(device)
    x = torch.rand(a.count, 3, a.image_size, a.image_size, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():  # the model's own predictions: every point starts correct, so every point is attacked
        y = torch.cat(
            [predict(model, x[i : i + a.batch].to(device)).argmax(1).cpu() for i in range(0, len(x), a.batch)]
        )
    return model, x, y, Linf(4 / 255)


def worker(argv: list[str]) -> None:
    """Time one protocol run (sharded under torchrun); rank 0 writes the figures to ``--out``."""
    import torch

    from logitpair.distributed import all_gather, barrier, setup
    from logitpair.evaluation import get_suite, run_protocol

    ap = argparse.ArgumentParser()
    ap.add_argument("--run")
    ap.add_argument("--random-model")
    ap.add_argument("--image-size", type=int, default=224)
    ap.add_argument("--suite", required=True)
    ap.add_argument("--count", type=int, required=True)
    ap.add_argument("--batch", type=int, required=True)
    ap.add_argument("--data-dir")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--out", required=True)
    a = ap.parse_args(argv)
    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "1")))
    world, device = setup(a.device)
    model, x, y, threat = _points_and_model(a, device)
    barrier(world)
    if device.type == "cuda":
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    res = run_protocol(model, x, y, get_suite(a.suite), threat=threat, batch_size=a.batch, seed=0, world=world)
    if device.type == "cuda":
        torch.cuda.synchronize()
    barrier(world)
    seconds = time.perf_counter() - t0
    devices = all_gather(world, torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu")
    if not world.is_main:
        return
    record = b"".join(t.numpy().tobytes() for t in (res.clean_correct, res.robust, res.broken_by))
    out = {"seconds": seconds, "points": len(y), "points_per_second": len(y) / seconds, "processes": world.world_size,
           "threads": torch.get_num_threads(), "robust": float(res.robust.float().mean()),
           "record_sha256": hashlib.sha256(record).hexdigest(), "devices": devices}  # fmt: skip
    Path(a.out).write_text(json.dumps(out))


# --------------------------------------------------------------------------- running it
def _launch(procs: int, threads: int, script: list[str], env_extra: dict[str, str] | None = None) -> None:
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "CI": "1", **(env_extra or {})}
    src = str(ROOT / "src")
    env["PYTHONPATH"] = src + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    head = [sys.executable]
    if procs > 1:  # `--` ends torchrun's options (its parser would take some of ours for its own)
        head += ["-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={procs}"]
    cmd = [*head, *script]
    res = subprocess.run(cmd, env=env, cwd=ROOT, capture_output=True, text=True, check=False)
    if res.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed:\n{res.stderr[-3000:]}")


def evaluate_once(procs: int, threads: int, worker_args: list[str], env: dict[str, str] | None = None) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "out.json"
        script = [__file__] + (["--"] if procs > 1 else []) + [*worker_args, "--out", str(out)]
        _launch(procs, threads, script, env)
        return json.loads(out.read_text())


def train_once(procs: int, threads: int, train_args: list[str]) -> float:
    """ALP training images per second with ``procs`` processes x ``threads`` threads (the run's own
    ``train_seconds``)."""
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "run"
        logitpair = ["-m", "logitpair"] + (["--"] if procs > 1 else [])
        _launch(procs, threads, [*logitpair, *train_args, "--out", str(out)])
        summary = json.loads((out / "train.json").read_text())
        batch = json.loads((out / "config.json").read_text())["optim"]["batch_size"]
        return summary["steps"] * batch / summary["train_seconds"]


def _spread(values: list[float]) -> dict[str, Any]:
    return {"median": statistics.median(values), "min": min(values), "max": max(values), "values": values}


def _ratios(per: dict[str, dict[str, Any]]) -> dict[str, Any]:
    s11, s21, s12 = (per[k]["median"] for k in ("1x1", "2x1", "1x2"))
    speedup = s21 / s11
    return {"2x1_over_1x1": {"value": speedup, "target": TARGET, "met": speedup >= TARGET}, "2x1_over_1x2": s21 / s12}


def _evaluation(args: argparse.Namespace, say: Any) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for suite in args.scaling_suites:
        base = ["--run", args.scaling_run, "--suite", suite, "--count", str(args.scaling_n), "--batch",
                str(args.scaling_batch)] + (["--data-dir", args.data_dir] if args.data_dir else [])  # fmt: skip
        runs: dict[str, list[dict[str, Any]]] = {k: [] for k in CONFIGS}
        for r in range(args.scaling_repeats):  # interleaved: each configuration sees the same load
            for name, (procs, threads) in CONFIGS.items():
                say(f"eval_scaling: {suite} {name} repeat {r + 1}/{args.scaling_repeats}")
                runs[name].append(evaluate_once(procs, threads, base))
        per = {k: _spread([v["points_per_second"] for v in vs]) for k, vs in runs.items()}
        digests = {v["record_sha256"] for vs in runs.values() for v in vs}
        out[suite] = {"points_per_second": per, **_ratios(per), "same_result": len(digests) == 1,
                      "robust": runs["1x1"][0]["robust"]}  # fmt: skip
    return out


def _training(args: argparse.Namespace, say: Any) -> dict[str, Any]:
    from logitpair.data import load_dataset  # (this runs after every forked measurement of run.py)

    total = len(load_dataset("fashion-mnist", args.data_dir, val_size=0).train)
    images = min(args.scaling_train_images, total)
    train = ["train", "--dataset", "fashion-mnist", "--method", "alp", "--model", "lenet5", "--epochs", "1",
             "--batch-size", "128", "--attack-steps", "7", "--val-points", "0", "--val-size", str(total - images),
             "--quiet"] + (["--data-dir", args.data_dir] if args.data_dir else [])  # fmt: skip
    values: dict[str, list[float]] = {k: [] for k in CONFIGS}
    for r in range(args.scaling_repeats):
        for name, (procs, threads) in CONFIGS.items():
            say(f"eval_scaling: training {name} repeat {r + 1}/{args.scaling_repeats}")
            values[name].append(train_once(procs, threads, train))
    per = {k: _spread(v) for k, v in values.items()}
    return {"images_per_second": per, **_ratios(per),
            "settings": {"method": "alp", "model": "lenet5", "train_images": images, "batch": 128, "attack_steps": 7}}  # fmt: skip


def _gpu(args: argparse.Namespace, say: Any) -> dict[str, Any] | str:
    import torch

    if not torch.cuda.is_available():
        return "skipped: no CUDA device"
    gpus = torch.cuda.device_count()
    say(f"eval_scaling: ResNet-50 224 px, fast, {gpus} GPU(s)")
    worker_args = ["--random-model", "resnet50", "--image-size", "224", "--suite", "fast", "--count",
                   str(args.scaling_gpu_n), "--batch", "64", "--device", "cuda"]  # fmt: skip
    res = evaluate_once(gpus, 1, worker_args)
    return {"marker": "gpu", "model": "resnet50 (random init, 1000 classes)", "image_size": 224, "eps": "4/255",
            "suite": "fast", "gpus": gpus, "devices": res["devices"], "points": res["points"],
            "points_per_second": res["points_per_second"], "seconds": res["seconds"]}  # fmt: skip


def measure(args: argparse.Namespace, say: Any) -> dict[str, Any]:
    """The ``eval_scaling`` section (see the module docstring): the CPU figures with
    ``--scaling-run`` only (they start many processes), the ``gpu`` entry wherever CUDA is."""
    out: dict[str, Any] = {}
    if args.scaling_run:
        out["settings"] = {"run": args.scaling_run, "n": args.scaling_n, "batch": args.scaling_batch,
                           "repeats": args.scaling_repeats, "configs": {k: list(v) for k, v in CONFIGS.items()}}  # fmt: skip
        out["evaluation"] = _evaluation(args, say)
        out["training"] = (_training(args, say) if args.scaling_train_images > 0
                           else "skipped: --scaling-train-images 0")  # fmt: skip
    else:
        out["evaluation"] = out["training"] = "skipped: no --scaling-run"
    out["gpu_resnet50"] = _gpu(args, say)
    return out


def markdown(r: dict[str, Any]) -> str:
    e = r.get("eval_scaling")
    if not isinstance(e, dict):
        return ""
    rows = []

    def row(what: str, per: dict[str, Any], entry: dict[str, Any], unit: str) -> None:
        cells = [f"{per[k]['median']:.1f} [{per[k]['min']:.1f}–{per[k]['max']:.1f}]" for k in CONFIGS]
        t = entry["2x1_over_1x1"]
        rows.append([what, unit, *cells, f"{t['value']:.2f} ({'met' if t['met'] else '**not met**'})",
                     f"{entry['2x1_over_1x2']:.2f}"])  # fmt: skip

    ev = e.get("evaluation")
    if isinstance(ev, dict):
        for suite, entry in ev.items():
            same = "" if entry["same_result"] else " (**results differ**)"
            row(f"evaluation, `{suite}`{same}", entry["points_per_second"], entry, "points/s")
    tr = e.get("training")
    if isinstance(tr, dict):
        row("ALP training, LeNet-5", tr["images_per_second"], tr, "images/s")
    text = "### Processes against threads (`eval_scaling`, issue 23)\n\n"
    if rows:
        s = e.get("settings", {})
        text += (f"Run `{s.get('run')}`, first {s.get('n')} test points, batch {s.get('batch')}; median [min–max] "
                 f"over {s.get('repeats')} interleaved repeats. Target: 2 × 1 ≥ {TARGET} × (1 × 1).\n\n")  # fmt: skip
        lines = ["| what | unit | 1 proc × 1 thread | 2 procs × 1 thread | 1 proc × 2 threads | 2×1 ÷ 1×1 | 2×1 ÷ 1×2 |",
                 "|---|---|---|---|---|---|---|"] + ["| " + " | ".join(r) + " |" for r in rows]  # fmt: skip
        text += "\n".join(lines) + "\n"
    if isinstance(ev, str):
        text += f"\nEvaluation: {ev}.\n"
    g = e.get("gpu_resnet50")
    if isinstance(g, dict):
        text += (f"\nResNet-50 at 224 px, sharded `fast` on {g['gpus']} × {g['devices'][0]}: "
                 f"{g['points_per_second']:.1f} points/s ({g['points']} points).\n")  # fmt: skip
    else:
        text += f"\nResNet-50 at 224 px (gpu entry): {g}.\n"
    return text


if __name__ == "__main__":
    sys.path.insert(0, str(ROOT / "src"))
    worker(sys.argv[1:])
