"""Data-parallel training under torchrun (gloo, loopback): equivalence with one process and with
gradient accumulation, elastic restart after a killed worker, resume with another world size,
and the TensorFlow-style RMSProp of the official recipe."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from logitpair.config import make_config
from logitpair.training import train
from logitpair.training.optim import TFRMSprop

# 600 generated images - 88 for validation = 512 training images = 8 global batches of 64
BASE = ["--dataset", "mnist", "--val-size", "88", "--model", "lenet5", "--method", "alp", "--attack-steps", "2",
        "--epochs", "1", "--batch-size", "64", "--seed", "5", "--quiet"]  # fmt: skip
LOUD = BASE[:-1]  # logs on stderr (the resume line)
# Measured on the 2-core CPU machine: equivalent runs differ by < 2e-6 (float summation order of
# the gradient all-reduce); the negative control (random starts drawn from each process's own
# global RNG) by > 1e-3.
TOL = 1e-4

# A driver that slows every training step down (so that the test can kill a worker mid-epoch)
# and optionally exits rank 0 right after the checkpoint of a given step; then runs the CLI.
DRIVER = r"""
import os, sys, time
import logitpair.training.loop as loop
from logitpair.methods import METHODS
delay = float(os.environ.get("LP_STEP_DELAY", "0"))
if delay:
    name = sys.argv[sys.argv.index("--method") + 1]
    entry = METHODS.entry(name)
    def slow(*a, **k):
        time.sleep(delay)
        return entry.loss(*a, **k)
    METHODS.unregister(name)
    METHODS.register(name, settings=entry.settings, cost=entry.cost)(slow)
exit_after = int(os.environ.get("LP_EXIT_AFTER_CKPT", "0"))
if exit_after:
    save = loop.save_checkpoint
    def save_then_exit(root, step, *a, **k):
        out = save(root, step, *a, **k)
        if step == exit_after:
            os._exit(3)
        return out
    loop.save_checkpoint = save_then_exit
from logitpair.cli import main
sys.exit(main(sys.argv[1:]))
"""


def _env(**extra: str) -> dict[str, str]:
    return {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1", **extra}


def _torchrun(args: list[str], *, nproc: int = 2, restarts: int = 0, driver: Path | None = None, **env: str):
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}",
           f"--max-restarts={restarts}"]  # fmt: skip
    cmd += [str(driver)] if driver else ["-m", "logitpair"]
    return subprocess.Popen(cmd + args, env=_env(**env), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def _weights(run: Path) -> dict[str, torch.Tensor]:
    return load_file(str(run / "model.safetensors"))


def _max_diff(a: Path, b: Path) -> float:
    wa, wb = _weights(a), _weights(b)
    return max(float((wa[k] - wb[k]).abs().max()) for k in wa)


def _train_inproc(data_dir: Path, out: Path, *extra: str) -> None:
    from logitpair.cli.flags import config_overrides
    from logitpair.cli.main import build_parser

    args = build_parser().parse_args([*["train", *BASE], "--data-dir", str(data_dir), "--out", str(out), *extra])
    torch.set_num_threads(1)
    train(make_config(None, config_overrides(args)), out)


@pytest.fixture(scope="module")
def runs(tmp_path_factory, data_dir):
    """The same ALP training as 1 x 64, 2 x 32 (torchrun), 1 x 32 with 2 accumulation steps,
    and the negative control: 2 x 32 with random starts from the global RNG."""
    root = tmp_path_factory.mktemp("ddp")
    common = [*["train", *BASE], "--data-dir", str(data_dir)]
    ddp = _torchrun([*common, "--out", str(root / "ddp")])
    control = _torchrun([*common, "--out", str(root / "control"), "--noise", "global"])
    _train_inproc(data_dir, root / "single")
    _train_inproc(data_dir, root / "accum", "--accum-steps", "2")
    for p in (ddp, control):
        _, err = p.communicate(timeout=300)
        assert p.returncode == 0, err
    return root


def test_two_processes_equal_one_process_and_accumulation(runs):
    assert _max_diff(runs / "single", runs / "ddp") < TOL
    assert _max_diff(runs / "single", runs / "accum") < TOL


def test_negative_control_global_rng_exceeds_tolerance(runs):
    assert _max_diff(runs / "single", runs / "control") > TOL


def test_only_rank0_writes_and_metrics_are_global(runs):
    summary = json.loads((runs / "ddp" / "train.json").read_text())
    single = json.loads((runs / "single" / "train.json").read_text())
    assert summary["world_size"] == 2 and summary["steps"] == single["steps"] == 8
    a, b = summary["history"][-1], single["history"][-1]
    assert abs(a["train_loss"] - b["train_loss"]) < 1e-4  # reduced over both processes
    assert not list((runs / "ddp").glob(".*tmp*"))


def test_killed_worker_restarts_and_resumes(tmp_path, data_dir, runs):
    """torchrun --max-restarts 1 ... --resume: SIGKILL one worker mid-epoch; the job restarts,
    resumes from the last checkpoint and ends with the uninterrupted 2-process weights."""
    driver = tmp_path / "driver.py"
    driver.write_text(DRIVER)
    out = tmp_path / "run"
    marker = f"lp-fault-{os.getpid()}-{time.time_ns()}"
    job = _torchrun(
        [*["train", *LOUD], "--data-dir", str(data_dir), "--out", str(out), "--resume", "--checkpoint-every", "2"],
        restarts=1,
        driver=driver,
        LP_STEP_DELAY="0.4",
        LP_FAULT_MARKER=marker,
    )
    deadline = time.time() + 120
    while not (out / "checkpoints" / "ckpt-000000002").exists():
        assert job.poll() is None and time.time() < deadline, "no checkpoint appeared"
        time.sleep(0.05)
    victim = _worker_pid(marker, local_rank=1)
    os.kill(victim, signal.SIGKILL)
    _, err = job.communicate(timeout=300)
    assert job.returncode == 0, err
    assert "resumed from ckpt-" in err
    assert _max_diff(out, runs / "ddp") < TOL


def test_resume_with_another_world_size(tmp_path, data_dir, runs):
    """A 2-process run stopped after the checkpoint of step 4 is finished by one process."""
    driver = tmp_path / "driver.py"
    driver.write_text(DRIVER)
    out = tmp_path / "run"
    args = [*["train", *LOUD], "--data-dir", str(data_dir), "--out", str(out), "--checkpoint-every", "4"]
    job = _torchrun(args, driver=driver, LP_EXIT_AFTER_CKPT="4")
    job.communicate(timeout=300)
    assert job.returncode != 0
    assert (out / "checkpoints" / "ckpt-000000004").is_dir() and not (out / "model.safetensors").exists()
    res = subprocess.run(
        [sys.executable, "-m", "logitpair", *args, "--resume"],
        env=_env(),
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    assert res.returncode == 0, res.stderr
    assert "resumed from ckpt-000000004 (epoch 1, batch 4, step 4)" in res.stderr
    assert _max_diff(out, runs / "ddp") < TOL


def _worker_pid(marker: str, local_rank: int) -> int:
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        try:
            env = (proc / "environ").read_bytes().split(b"\0")
        except OSError:
            continue
        if f"LP_FAULT_MARKER={marker}".encode() in env and f"LOCAL_RANK={local_rank}".encode() in env:
            return int(proc.name)
    raise AssertionError("worker process not found")


def test_bad_global_batch_is_one_error_from_rank0(tmp_path, data_dir):
    job = _torchrun([*["train", *BASE[:-5]], "--batch-size", "63", "--seed", "5", "--quiet",
                     "--data-dir", str(data_dir), "--out", str(tmp_path / "run")])  # fmt: skip
    _, err = job.communicate(timeout=300)
    assert job.returncode != 0
    lines = [ln for ln in err.splitlines() if ln.startswith("logitpair: error:")]
    expected = (
        "logitpair: error: --batch-size 63: the global batch must divide into 2 process(es) x 1 accumulation "
        "step(s) = 2 equal micro-batches"
    )
    assert lines == [expected]
    assert not (tmp_path / "run").exists()


def test_tf_rmsprop_matches_the_update_rule_by_hand():
    torch.manual_seed(0)
    w = torch.nn.Parameter(torch.randn(5, dtype=torch.float64))
    opt = TFRMSprop([w], lr=0.1, decay=0.9, momentum=0.9, eps=1.0, weight_decay=1e-4)
    ref = w.detach().clone()
    ms, mom = torch.ones(5, dtype=torch.float64), torch.zeros(5, dtype=torch.float64)
    for _ in range(3):
        g = torch.randn(5, dtype=torch.float64)
        w.grad = g.clone()
        opt.step()
        g = g + 1e-4 * ref
        ms = 0.9 * ms + 0.1 * g * g
        mom = 0.9 * mom + 0.1 * g / torch.sqrt(ms + 1.0)
        ref = ref - mom
    assert torch.allclose(w.detach(), ref, atol=1e-12, rtol=0)
    # not torch's RMSprop with eps 1.0 (mean square from 0, eps outside the root)
    v = torch.nn.Parameter(torch.zeros(1, dtype=torch.float64))
    u = torch.nn.Parameter(torch.zeros(1, dtype=torch.float64))
    a, b = TFRMSprop([v], lr=0.1, eps=1.0), torch.optim.RMSprop([u], lr=0.1, alpha=0.9, eps=1.0, momentum=0.9)
    v.grad, u.grad = torch.ones(1, dtype=torch.float64), torch.ones(1, dtype=torch.float64)
    a.step()
    b.step()
    assert not torch.allclose(v, u)
