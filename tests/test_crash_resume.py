"""Crash safety: SIGKILL at random moments and inside every stage of a checkpoint write, disk
full while checkpointing; each time ``train --resume`` must end bit-identical to an
uninterrupted run (weights, metrics.jsonl, model.json and train.json up to timing fields)
and leave no temporary file behind."""

from __future__ import annotations

import errno
import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from conftest import write_mnist_dir
from safetensors.torch import load_file

from logitpair import checkpoint as ckmod
from logitpair import load_model
from logitpair.checkpoint import latest_checkpoint, load_checkpoint
from logitpair.cli import main

pytestmark = pytest.mark.skipif(not hasattr(signal, "SIGKILL"), reason="needs SIGKILL")

# 350 images - 50 for validation = 300 training images, 6 steps per epoch, 12 steps in all;
# checkpoints at steps 2, 4, 6 (end of epoch 1), 8, 10, 12 (end of epoch 2); the last two are kept.
TRAIN = ["train", "--val-size", "50", "--model", "lenet5", "--method", "alp", "--attack-steps", "2",
         "--epochs", "2", "--batch-size", "50", "--checkpoint-every", "2", "--seed", "3", "--quiet"]  # fmt: skip
TIMING = ("train_seconds",)

# A fork server for the staged kills: imports torch and logitpair once, then for each job
# line on stdin forks a child that wraps one function so that its n-th matching call SIGKILLs
# the child (optionally after deleting model.safetensors from the directory it was given: a
# kill in the middle of removing a checkpoint), runs the CLI, and reports how the child ended.
DRIVER = r"""
import importlib, json, os, signal, sys, traceback
import torch
torch.set_num_threads(1)
import logitpair.training.loop
from logitpair.cli import main

def install(spec):
    mod_name, attr = spec["target"].rsplit(".", 1)
    mod = importlib.import_module(mod_name)
    orig, calls = getattr(mod, attr), [0]
    def wrapper(*args, **kwargs):
        if spec.get("match") is None or spec["match"] in str(args[0] if args else ""):
            calls[0] += 1
            if calls[0] == spec["n"]:
                if spec.get("partial"):
                    victim = os.path.join(str(args[0]), "model.safetensors")
                    if os.path.exists(victim):
                        os.unlink(victim)
                os.kill(os.getpid(), signal.SIGKILL)
        return orig(*args, **kwargs)
    setattr(mod, attr, wrapper)

for line in sys.stdin:
    job = json.loads(line)
    pid = os.fork()
    if pid == 0:
        code = 99
        try:
            os.dup2(os.open(os.devnull, os.O_WRONLY), 1)
            if job["spec"]:
                install(job["spec"])
            code = main(job["argv"])
        except BaseException:
            traceback.print_exc()
        os._exit(code)
    _, status = os.waitpid(pid, 0)
    signum = os.WTERMSIG(status) if os.WIFSIGNALED(status) else None
    print(json.dumps({"signal": signum, "rc": os.WEXITSTATUS(status) if os.WIFEXITED(status) else None}), flush=True)
"""


def _env() -> dict[str, str]:
    return {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    return write_mnist_dir(tmp_path_factory.mktemp("crashdata"), n_train=350, n_test=20)


def cli_args(data: Path, out: Path, resume: bool) -> list[str]:
    return [*TRAIN, "--data-dir", str(data), "--out", str(out), *(["--resume"] if resume else [])]


def popen(args: list[str]) -> subprocess.Popen:
    cmd = [sys.executable, "-m", "logitpair", *args]
    return subprocess.Popen(cmd, env=_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


@pytest.fixture(scope="module")
def reference(data, tmp_path_factory) -> dict:
    """One uninterrupted run, timed (seconds from start to config.json and to train.json) to
    place the kills."""
    out = tmp_path_factory.mktemp("ref") / "run"
    t0 = time.monotonic()
    proc = popen(cli_args(data, out, resume=False))
    t_cfg = t_done = None
    while proc.poll() is None:
        if t_cfg is None and (out / "config.json").exists():
            t_cfg = time.monotonic() - t0
        if t_done is None and (out / "train.json").exists():
            t_done = time.monotonic() - t0
        time.sleep(0.005)
    assert proc.returncode == 0, proc.stderr.read()
    t_done = t_done or time.monotonic() - t0
    return {"dir": out, "t_cfg": t_cfg or t_done / 2, "t_done": t_done}


def _strip(obj):
    if isinstance(obj, dict):
        return {k: _strip(v) for k, v in obj.items() if k not in TIMING}
    if isinstance(obj, list):
        return [_strip(v) for v in obj]
    return obj


def assert_same_run(run: Path, ref: Path) -> None:
    a, b = load_file(str(run / "model.safetensors")), load_file(str(ref / "model.safetensors"))
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), f"weights differ at {k}"
    lines = lambda p: [_strip(json.loads(s)) for s in (p / "metrics.jsonl").read_text().splitlines()]
    assert lines(run) == lines(ref)
    for name in ("model.json", "train.json"):
        assert _strip(json.loads((run / name).read_text())) == _strip(json.loads((ref / name).read_text())), name
    for name in ("config.json", "env.json"):
        assert (run / name).is_file(), name
    leftovers = [str(p.relative_to(run)) for p in run.rglob("*") if ".tmp" in p.name or p.name.endswith(".del")]
    assert not leftovers, f"temporary files left behind: {leftovers}"
    ckpts = run / "checkpoints"
    assert (ckpts / "latest").read_text().strip() == "ckpt-000000012"
    assert sorted(p.name for p in ckpts.iterdir()) == ["ckpt-000000010", "ckpt-000000012", "latest"]


def describe(out: Path) -> str:
    """Where a kill landed, from what it left on disk (printed with `pytest -s`)."""
    if not out.exists():
        return "before the run directory existed"
    ckpts = out / "checkpoints"
    names = [p.name for p in out.iterdir()] + [
        f"checkpoints/{p.name}" for p in (ckpts.iterdir() if ckpts.is_dir() else [])
    ]
    return ", ".join(sorted(names)) or "empty run directory"


def latest_name(out: Path) -> str | None:
    try:
        return (out / "checkpoints" / "latest").read_text().strip()
    except OSError:
        return None


def wait_for_new_checkpoint(proc: subprocess.Popen, out: Path) -> int:
    """Wait until ``proc`` has written a checkpoint; return the steps still to train."""
    before = latest_name(out)
    while proc.poll() is None and latest_name(out) == before:
        time.sleep(0.005)
    now = latest_name(out)
    return 12 - int(now.split("-")[1]) if now else 12


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_sigkill_at_random_moments_then_resume(data, reference, tmp_path, seed):
    """SIGKILL at seeded random moments, then ``--resume`` until the run ends. The first
    delay is drawn from the whole run (start-up included); the second kill, in the resumed
    process, comes a random time (up to about one checkpoint interval) after a random one of
    its remaining checkpoints, so that it lands while training or writing a checkpoint."""
    rng = random.Random(seed)
    out = tmp_path / "run"
    per_step = (reference["t_done"] - reference["t_cfg"]) / 12
    kills: list[str] = []
    for attempt in range(4):
        proc = popen(cli_args(data, out, resume=attempt > 0))
        if len(kills) < 2 and attempt < 3:
            if not kills:
                delay = rng.uniform(0, reference["t_done"])
            else:
                left = wait_for_new_checkpoint(proc, out)
                for _ in range(rng.randrange(max(left // 2 - 1, 1))):  # not past the last checkpoint
                    wait_for_new_checkpoint(proc, out)
                delay = rng.uniform(0, 2 * per_step)
            try:
                proc.wait(delay)
            except subprocess.TimeoutExpired:
                proc.send_signal(signal.SIGKILL)
                proc.communicate()
                kills.append(f"{delay:.2f}s: {describe(out)}")
                continue
        _, err = proc.communicate(timeout=300)
        assert proc.returncode == 0, err
        break
    print(f"seed {seed}: {len(kills)} kills, leaving", *kills, sep="\n  ")
    assert_same_run(out, reference["dir"])


def ckpts(out: Path) -> list[str]:
    return sorted(p.name for p in (out / "checkpoints").iterdir())


def latest_is(out: Path, step: int) -> bool:
    return latest_name(out) == f"ckpt-{step:09d}"


# (where the process is killed, what must be on disk afterwards); each row after the first runs
# with --resume on what the previous one left
# fmt: off
CHAIN = [
    # before the run directory exists
    ({"target": "os.mkdir", "n": 1, "match": "run"}, lambda out: not out.exists()),
    # config.json's temporary written, not yet renamed
    ({"target": "os.fsync", "n": 1},
     lambda out: not (out / "config.json").exists() and any(out.glob(".config.json.tmp-*"))),
    # config.json complete, env.json's temporary written
    ({"target": "os.fsync", "n": 3},
     lambda out: (out / "config.json").is_file() and not (out / "env.json").exists()),
    # inside the first checkpoint's .tmp directory
    ({"target": "logitpair.checkpoint._save_tensors", "n": 2},
     lambda out: ckpts(out) == ["ckpt-000000002.tmp"]),
    # second checkpoint renamed into place, `latest` not updated yet
    ({"target": "logitpair.checkpoint.write_text", "n": 2, "match": "latest"},
     lambda out: ckpts(out) == ["ckpt-000000002", "ckpt-000000004", "latest"] and latest_is(out, 2)),
    # halfway through removing ckpt-2 (after the resumed run rewrote ckpt-4 and wrote ckpt-6)
    ({"target": "shutil.rmtree", "n": 1, "match": "ckpt-000000002", "partial": True},
     lambda out: ckpts(out) == ["ckpt-000000002.del", "ckpt-000000004", "ckpt-000000006", "latest"]
     and latest_is(out, 6)),
    # last checkpoint complete and `latest` updated, older ones not yet pruned
    ({"target": "logitpair.checkpoint.prune", "n": 3},
     lambda out: ckpts(out) == ["ckpt-000000008", "ckpt-000000010", "ckpt-000000012", "latest"]
     and latest_is(out, 12)),
    # nothing left to train; killed while exporting the model (its temporary written)
    ({"target": "os.replace", "n": 1, "match": ".model.safetensors"},
     lambda out: ckpts(out) == ["ckpt-000000010", "ckpt-000000012", "latest"]
     and (out / ".model.safetensors.tmp").is_file() and not (out / "model.json").exists()),
]
# fmt: on


def test_sigkill_inside_each_write_stage_then_resume(data, reference, tmp_path):
    """Deterministic kills at each stage: before the run dir exists, mid config.json, after
    config.json only, inside a checkpoint's .tmp, between rename and `latest`, mid-pruning,
    mid-export; each followed by ``--resume`` (which must start afresh when nothing was saved).
    The runs are forked from one process that imported everything already (fast)."""
    driver = tmp_path / "driver.py"
    driver.write_text(DRIVER)
    out, log = tmp_path / "run", tmp_path / "stderr.txt"
    with open(log, "w") as err:
        server = subprocess.Popen([sys.executable, str(driver)], env=_env(), stdin=subprocess.PIPE,
                                  stdout=subprocess.PIPE, stderr=err, text=True)  # fmt: skip

    def run(spec: dict | None, resume: bool) -> dict:
        server.stdin.write(json.dumps({"spec": spec, "argv": cli_args(data, out, resume)}) + "\n")
        server.stdin.flush()
        reply = server.stdout.readline()
        assert reply, f"fork server died: {log.read_text()}"
        return json.loads(reply)

    try:
        for i, (spec, check) in enumerate(CHAIN):
            ended = run(spec, resume=i > 0)
            assert ended["signal"] == signal.SIGKILL, f"{spec}: not killed ({ended}): {log.read_text()}"
            assert check(out), f"{spec}: kill did not land where intended: {describe(out)}"
        ended = run(None, resume=True)
        assert ended == {"signal": None, "rc": 0}, log.read_text()
    finally:
        server.stdin.close()
        server.wait(timeout=60)
    assert_same_run(out, reference["dir"])


# --------------------------------------------------------------------------- disk full
@pytest.fixture(scope="module")
def inproc_reference(data, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("inproc") / "run"
    assert main(cli_args(data, out, resume=False)) == 0
    return out


@pytest.mark.parametrize("target", ["_save_tensors", "write_json", "write_text"])
def test_disk_full_at_second_checkpoint(data, inproc_reference, tmp_path, monkeypatch, capsys, target):
    """ENOSPC from the safetensors writer, the manifest write or the `latest` update of the
    second checkpoint: one error line naming the checkpoint and the OS error, exit 2, the
    first checkpoint and `latest` intact, no .tmp left; --resume then ends identical."""
    out = tmp_path / "run"
    orig = getattr(ckmod, target)

    def full(*args, **kwargs):
        if "ckpt-000000004" in str(args):
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return orig(*args, **kwargs)

    monkeypatch.setattr(ckmod, target, full)
    assert main(cli_args(data, out, resume=False)) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("logitpair: error: ")
    assert "ckpt-000000004" in err and "No space left on device" in err
    ckpts = out / "checkpoints"
    assert (ckpts / "latest").read_text().strip() == "ckpt-000000002"
    assert sorted(p.name for p in ckpts.iterdir()) == ["ckpt-000000002", "latest"]
    load_checkpoint(ckpts / "ckpt-000000002")
    assert latest_checkpoint(ckpts) == ckpts / "ckpt-000000002"
    load_model(out)
    monkeypatch.undo()
    assert main(cli_args(data, out, resume=True)) == 0
    assert_same_run(out, inproc_reference)


def test_disk_full_writing_metrics(data, inproc_reference, tmp_path, monkeypatch, capsys):
    """ENOSPC when metrics.jsonl is rewritten at the end of epoch 1: one error line, exit 2,
    checkpoints untouched; --resume then ends identical."""
    import logitpair.training.loop as trainmod

    out = tmp_path / "run"
    orig = trainmod.write_text

    def full(path, text):
        if Path(path).name == "metrics.jsonl":
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return orig(path, text)

    monkeypatch.setattr(trainmod, "write_text", full)
    assert main(cli_args(data, out, resume=False)) == 2
    err = capsys.readouterr().err
    assert err == f"logitpair: error: cannot write {out / 'metrics.jsonl'}: No space left on device\n"
    assert latest_checkpoint(out / "checkpoints").name == "ckpt-000000004"
    assert not list(out.glob(".*"))
    monkeypatch.undo()
    assert main(cli_args(data, out, resume=True)) == 0
    assert_same_run(out, inproc_reference)
