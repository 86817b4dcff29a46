"""ALP training throughput: 1 process x T threads vs torchrun with P processes x T/P threads.

Same config, same global batch, interleaved repeats; images/s = steps x global batch / the
run's own ``train_seconds`` (training only: start-up, data loading and validation excluded).
Scaling efficiency = (images/s with P processes) / (images/s with 1 process).

    python benchmarks/ddp_scaling.py --threads 2 --procs 2 --repeats 3 --out benchmarks/results/ddp_scaling.json
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

from _results import write_result


def run_once(procs: int, threads: int, args: list[str], out: Path) -> float:
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "CI": "1"}
    if procs == 1:
        cmd = [sys.executable, "-m", "logitpair"]
    else:
        cmd = [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--standalone",
            f"--nproc-per-node={procs}",
            "-m",
            "logitpair",
        ]
    subprocess.run([*cmd, *args, "--out", str(out)], env=env, check=True, capture_output=True, text=True)
    summary = json.loads((out / "train.json").read_text())
    batch = json.loads((out / "config.json").read_text())["optim"]["batch_size"]
    return summary["steps"] * batch / summary["train_seconds"]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--threads", type=int, default=2, help="threads in all (split over the processes)")
    ap.add_argument("--procs", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--batch-size", type=int, default=128)
    ap.add_argument("--epochs", type=int, default=1)
    ap.add_argument("--train-images", type=int, default=8000, help="training images used (the rest held out)")
    ap.add_argument("--out", default="benchmarks/results/ddp_scaling.json")
    a = ap.parse_args()
    train = ["train", "--method", "alp", "--model", "lenet5", "--epochs", str(a.epochs), "--batch-size",
             str(a.batch_size), "--attack-steps", "7", "--val-points", "0", "--val-size", str(60000 - a.train_images),
             "--quiet"]  # fmt: skip
    single, multi = [], []
    with tempfile.TemporaryDirectory() as tmp:
        for r in range(a.repeats):  # interleaved: both settings see the same machine load
            single.append(run_once(1, a.threads, train, Path(tmp) / f"s{r}"))
            multi.append(run_once(a.procs, max(a.threads // a.procs, 1), train, Path(tmp) / f"m{r}"))
    s, m = statistics.median(single), statistics.median(multi)
    result = {
        "benchmark": "ddp_scaling",
        "settings": {**vars(a), "method": "alp", "model": "lenet5", "dataset": "fashion-mnist", "attack_steps": 7},
        "images_per_s": {
            f"1x{a.threads}": {"median": s, "all": single},
            f"{a.procs}x{max(a.threads // a.procs, 1)}": {"median": m, "all": multi},
        },
        "scaling_efficiency": m / s,
    }
    write_result(Path(a.out), result)
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
