"""Sharded evaluation under torchrun: whole protocol batches, batch b to rank b mod N.

The sharding and resume logic of ``run_batches`` with the collectives simulated by threads
(fast, exact), then ``logitpair evaluate`` and ``logitpair transfer`` under torchrun (gloo on
loopback, one thread per process): 2 and 3 processes give the per-example records and summaries
of one process, and a 2-process evaluation whose rank 1 is SIGKILLed after its first saved
batch finishes under ``--max-restarts 1`` with the same result, continuing from its saved batch.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import threading
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file

from logitpair.checkpoint import export_model
from logitpair.cli import main
from logitpair.data import load_dataset
from logitpair.distributed import Dist
from logitpair.evaluation import cache as cache_mod
from logitpair.evaluation.cache import EvalCache, run_batches
from logitpair.models import create_model


# --------------------------------------------------------------------------- run_batches, threads as ranks
class _Interrupt(Exception):
    pass


def _threaded(monkeypatch, world_size: int, fn) -> list:
    """Run ``fn(world)`` once per rank, each in a thread, with ``all_gather`` and ``barrier``
    simulated; returns each rank's result (or the exception it raised)."""
    slots: list = [None] * world_size
    sync = threading.Barrier(world_size, timeout=60)

    def all_gather(world, value):
        slots[world.rank] = value
        sync.wait()
        out = list(slots)
        sync.wait()
        return out

    monkeypatch.setattr(cache_mod, "all_gather", all_gather)
    monkeypatch.setattr(cache_mod, "barrier", lambda world: sync.wait())
    monkeypatch.setattr(cache_mod, "wait_for_all", lambda world: sync.wait())
    results: list = [None] * world_size

    def target(rank):
        try:
            results[rank] = fn(Dist(rank=rank, world_size=world_size, local_rank=rank))
        except BaseException as exc:  # noqa: BLE001 - reported to the test
            results[rank] = exc
            sync.abort()

    threads = [threading.Thread(target=target, args=(r,)) for r in range(world_size)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return results


def _fresh(n: int = 10):
    return lambda: {"v": torch.zeros(n, dtype=torch.long), "w": torch.zeros(n, 2)}


def _step(log: list, die_at: int | None = None):
    def step(b, start, stop, st):
        if b == die_at:
            raise _Interrupt
        log.append(b)
        st["v"][start:stop] = b + 1
        st["w"][start:stop] = torch.arange(start, stop, dtype=torch.float32)[:, None] * (b + 1)

    return step


@pytest.mark.parametrize("world_size", [2, 3, 5])
def test_batches_go_to_rank_b_mod_n_and_every_rank_gets_the_one_process_result(monkeypatch, tmp_path, world_size):
    single = run_batches(10, 3, EvalCache(None, "fp"), fresh=_fresh(), step=_step([]))
    logs: dict[int, list] = {r: [] for r in range(world_size)}
    path = tmp_path / "state.safetensors"
    res = _threaded(monkeypatch, world_size, lambda w: run_batches(
        10, 3, EvalCache(path, "fp"), fresh=_fresh(), step=_step(logs[w.rank]), world=w))  # fmt: skip
    for r in range(world_size):
        assert logs[r] == [b for b in range(4) if b % world_size == r]  # 5 ranks: rank 4 has none, still gathers
        assert set(res[r]) == {"v", "w"}
        for k in single:
            assert torch.equal(res[r][k], single[k]), (r, k)
    tensors, done = EvalCache(path, "fp").load()
    assert done == 10 and torch.equal(tensors["v"], single["v"]), "rank 0 writes the complete plain file"
    assert not EvalCache(path, "fp").rank_files(), "the rank files are removed once the plain file is complete"


def test_a_restarted_shard_continues_from_its_saved_batches_with_any_number_of_processes(monkeypatch, tmp_path):
    single = run_batches(20, 3, EvalCache(None, "fp"), fresh=_fresh(20), step=_step([]))
    path = tmp_path / "state.safetensors"
    logs: dict[int, list] = {r: [] for r in range(3)}
    # 3 ranks, 7 batches: rank 0 has 0, 3, 6 and dies at 3; rank 1 has 1, 4 and dies at 4; rank 2 finishes 2, 5
    dies = {0: 3, 1: 4, 2: None}
    res = _threaded(monkeypatch, 3, lambda w: run_batches(
        20, 3, EvalCache(path, "fp"), fresh=_fresh(20), step=_step(logs[w.rank], dies[w.rank]), world=w))  # fmt: skip
    assert isinstance(res[0], _Interrupt) and isinstance(res[1], _Interrupt)
    assert {p.path.name for p in EvalCache(path, "fp").rank_files()} == {
        "state.rank0-of-3.safetensors", "state.rank1-of-3.safetensors", "state.rank2-of-3.safetensors"
    }  # fmt: skip
    assert EvalCache(path, "other").rank_files()[0].load_batches([(0, 3)] * 7, 3) is None, "keyed by fingerprint"
    # restarted with 2 processes: every finished batch found (0, 1, 2, 5) is taken, the rest computed
    logs = {r: [] for r in range(2)}
    res = _threaded(monkeypatch, 2, lambda w: run_batches(
        20, 3, EvalCache(path, "fp"), fresh=_fresh(20), step=_step(logs[w.rank]), world=w))  # fmt: skip
    assert logs == {0: [4, 6], 1: [3]}
    for r in range(2):
        for k in single:
            assert torch.equal(res[r][k], single[k]), (r, k)
    assert not EvalCache(path, "fp").rank_files(), "rank 0 also removes the rank files of another world size"
    # a single process then finds everything done
    ran: list = []
    again = run_batches(20, 3, EvalCache(path, "fp"), fresh=_fresh(20), step=_step(ran))
    assert ran == [] and torch.equal(again["w"], single["w"])


def test_rank_files_of_another_batch_size_are_ignored(monkeypatch, tmp_path):
    path = tmp_path / "state.safetensors"
    EvalCache(path, "fp").for_rank(1, 2).save_batches({"v": torch.full((10,), 7), "w": torch.zeros(10, 2)}, [1], 4)
    logs: dict[int, list] = {0: [], 1: []}
    res = _threaded(monkeypatch, 2, lambda w: run_batches(
        10, 3, EvalCache(path, "fp"), fresh=_fresh(), step=_step(logs[w.rank]), world=w))  # fmt: skip
    assert logs == {0: [0, 2], 1: [1, 3]} and 7 not in res[0]["v"].tolist()


def test_sharded_state_must_be_per_example(monkeypatch):
    fresh = lambda: {"v": torch.zeros(10), "count": torch.zeros(3)}
    res = _threaded(monkeypatch, 2, lambda w: run_batches(10, 3, EvalCache(None, "fp"), fresh=fresh,
                                                         step=lambda *a: None, world=w))  # fmt: skip
    assert all(isinstance(r, ValueError) and "count is not per-example" in str(r) for r in res)


# --------------------------------------------------------------------------- the CLI under torchrun
N, BATCH = 40, 16  # 3 batches: with 3 processes every rank has one
# eps 0.03 on the trained model: clean 100%, PGD-1 60%, the fast suite's worst case 37.5%, every gated
# attack of the suite running on some points (measured), so a shard that differs shows
EVAL = ["--n", str(N), "--batch-size", str(BATCH), "--eps", "0.03", "--suite", "fast", "--steps", "1", "--restarts",
        "1", "--seed", "3", "--quiet", "--json"]  # fmt: skip
CERTIFY = ["--method", "crown-ibp", "--n", str(N), "--batch-size", str(BATCH), "--eps", "0.03", "--eps-curve", "0.03",
           "--quiet"]  # fmt: skip
TRANSFER = ["--n", str(N), "--batch-size", str(BATCH), "--attack", "pgd:steps=3;restarts=1", "--eps", "0.03",
            "--seed", "4", "--quiet", "--json"]  # fmt: skip

# Test-only driver (never part of the library): logs every state file a rank saves or resumes
# from, with the global batches it holds, and with LP_TEST_KILL_RANK1=1 SIGKILLs rank 1 of the
# first attempt right after its first saved batch; then runs the CLI.
DRIVER = r"""
import os, signal, sys
from logitpair.evaluation.cache import EvalCache
rank, attempt = os.environ["RANK"], os.environ.get("TORCHELASTIC_RESTART_COUNT", "0")
save, load = EvalCache.save_batches, EvalCache.load_batches
def saving(self, tensors, batches, batch_size):
    save(self, tensors, batches, batch_size)
    done = ",".join(map(str, sorted(batches)))
    print(f"[saved] rank={rank} attempt={attempt} file={self.path.name} batches={done}", file=sys.stderr, flush=True)
    if os.environ.get("LP_TEST_KILL_RANK1") and rank == "1" and attempt == "0":
        os.kill(os.getpid(), signal.SIGKILL)
def loading(self, bounds, batch_size):
    out = load(self, bounds, batch_size)
    if out is not None:
        done = ",".join(map(str, sorted(out[1])))
        print(f"[loaded] rank={rank} attempt={attempt} file={self.path.name} batches={done}", file=sys.stderr,
              flush=True)
    return out
EvalCache.save_batches, EvalCache.load_batches = saving, loading
from logitpair.cli import main
sys.exit(main(sys.argv[1:]))
"""


def _small_run(run_dir: Path, data_dir: Path, *, trained: bool, seed: int) -> Path:
    """A ``cnn-small`` run directory: trained for four epochs on the generated data (test accuracy
    about 1), or left at its random initialisation."""
    torch.manual_seed(seed)
    model = create_model("cnn-small", num_classes=10, in_channels=1, image_size=28)
    if trained:
        train = load_dataset("fashion-mnist", data_dir, val_size=0).train
        opt = torch.optim.Adam(model.parameters(), lr=1e-3)
        for i in [*range(0, len(train), 64)] * 4:
            loss = F.cross_entropy(model(train.x[i : i + 64]), train.y[i : i + 64])
            opt.zero_grad()
            loss.backward()
            opt.step()
    meta = {"model": {"name": "cnn-small", "kwargs": {"num_classes": 10, "in_channels": 1, "image_size": 28}},
            "dataset": "fashion-mnist", "method": "regular", "eps": 0.1,
            "config": {"data": {"dataset": "fashion-mnist", "data_dir": str(data_dir)}}}  # fmt: skip
    run_dir.mkdir(parents=True)
    export_model(run_dir, model.eval(), meta)
    return run_dir


def _torchrun(args: list[str], driver: Path, nproc: int, restarts: int = 0, **env: str) -> subprocess.Popen:
    # `--` ends torchrun's own options: without it torchrun's parser rejects `--n` (a prefix of its --nnodes, ...)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}",
           f"--max-restarts={restarts}", "--monitor-interval=0.2", str(driver), "--", *args]  # fmt: skip
    full_env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1", **env}
    return subprocess.Popen(cmd, env=full_env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def _finish(job: subprocess.Popen, printed: bool = True) -> tuple[dict, str]:
    """The JSON the job printed (once, by rank 0) and its stderr."""
    out, err = job.communicate(timeout=300)
    assert job.returncode == 0, err[-4000:]
    return json.loads(out) if printed else {}, err


def _log(err: str, kind: str) -> list[dict[str, str]]:
    """The driver's ``[saved]`` / ``[loaded]`` lines as dicts."""
    rows = []
    for line in err.splitlines():
        if line.startswith(f"[{kind}] "):
            rows.append(dict(part.split("=", 1) for part in line[len(kind) + 3 :].split(" ")))
    return rows


def _check_sharding(err: str, nproc: int) -> dict[tuple[str, str], list[int]]:
    """Every rank saved only batches b with b mod N == rank, and all of them for the N points (3
    batches); returns the last saved batches per (rank, file)."""
    final: dict[tuple[str, str], list[int]] = {}
    for row in _log(err, "saved"):
        assert f".rank{row['rank']}-of-{nproc}." in row["file"]
        final[row["rank"], row["file"]] = [int(b) for b in row["batches"].split(",") if b]
    assert final, "no rank saved a batch"
    for (rank, file), batches in final.items():
        assert all(b % nproc == int(rank) for b in batches), (rank, file, batches)
        if ".rest." not in file:  # the clean-misclassified points form batches of their own
            assert batches == [b for b in range(3) if b % nproc == int(rank)], (rank, file)
    return final


EVAL_KEYS = ("n", "clean", "pgd", "white_box", "black_box", "per_example", "threat")


def _same_evaluation(a: dict, b: dict) -> None:
    for key in EVAL_KEYS:
        if key == "black_box":  # the source is named by its path, which differs
            assert {**a[key], "source": None} == {**b[key], "source": None}
        else:
            assert a[key] == b[key], key


def _evaluate_args(d: Path) -> list[str]:
    """``evaluate`` of run ``a`` with black box from ``random``, keeping the adversarial examples:
    their random starts come from the per-batch seeds, so a batch seeded differently shows."""
    return ["evaluate", str(d / "a"), "--source", str(d / "random"), "--save-adversarial", str(d / "adv.safetensors"),
            *EVAL]  # fmt: skip


def _same_state(a: Path, b: Path) -> None:
    """The protocol's complete per-example state (white box: flags, attacks run, adversarial
    examples) and the saved adversarial examples, tensor for tensor."""
    for file in ("a/eval-state/white-box.safetensors", "adv.safetensors"):
        ta, tb = load_file(str(a / file)), load_file(str(b / file))
        assert ta.keys() == tb.keys()
        for k in ta:
            assert torch.equal(ta[k], tb[k]), (file, k)


TRANSFER_SKIP = ("seconds", "crafted", "processes", "runs")  # timings, paths and the number of processes


@pytest.fixture(scope="module")
def runs(tmp_path_factory, data_dir):
    root = tmp_path_factory.mktemp("sharded")
    (root / "driver.py").write_text(DRIVER)
    a = _small_run(root / "base" / "a", data_dir, trained=True, seed=0)
    _small_run(root / "base" / "random", data_dir, trained=False, seed=1)  # misclassifies most points
    single = root / "single"
    shutil.copytree(root / "base", single)
    torch.set_num_threads(1)
    assert main(_evaluate_args(single)) == 0
    assert main(["transfer", str(single / "a"), str(single / "random"), "--out", str(single / "transfer"),
                 *TRANSFER]) == 0  # fmt: skip
    assert main(["certify", str(single / "a"), *CERTIFY]) == 0
    assert a.is_dir()
    return root


@pytest.fixture(scope="module")
def sharded(runs):
    """``evaluate`` and ``transfer`` with 2 and 3 processes and ``certify`` with 2, all started at once."""
    jobs = {}
    for nproc in (2, 3):
        d = runs / f"p{nproc}"
        shutil.copytree(runs / "base", d)
        jobs["evaluate", nproc] = _torchrun(_evaluate_args(d), runs / "driver.py", nproc)
        jobs["transfer", nproc] = _torchrun(["transfer", str(d / "a"), str(d / "random"), "--out",
                                             str(d / "transfer"), *TRANSFER], runs / "driver.py", nproc)  # fmt: skip
    shutil.copytree(runs / "base", runs / "certify")  # with the one-process evaluation (certify's sandwich reads it)
    shutil.copy(runs / "single" / "a" / "evaluation.json", runs / "certify" / "a" / "evaluation.json")
    jobs["certify", 2] = _torchrun(["certify", str(runs / "certify" / "a"), *CERTIFY], runs / "driver.py", 2)
    return {key: _finish(job, printed=key[0] != "certify") for key, job in jobs.items()}


@pytest.mark.parametrize("nproc", [2, 3])
def test_evaluate_under_torchrun_equals_one_process(runs, sharded, nproc):
    single = json.loads((runs / "single" / "a" / "evaluation.json").read_text())
    printed, err = sharded["evaluate", nproc]
    written = json.loads((runs / f"p{nproc}" / "a" / "evaluation.json").read_text())
    assert written["processes"] == nproc and single["processes"] == 1
    _same_evaluation(written, single)
    _same_evaluation(printed, single)  # rank 0 printed it, once
    assert single["suite"] == "fast" and 0 < single["white_box"]["robust"]["value"] < 1, "a result that can differ"
    _same_state(runs / f"p{nproc}", runs / "single")
    _check_sharding(err, nproc)
    assert not list((runs / f"p{nproc}" / "a" / "eval-state").glob("*.rank*")), "rank files removed"


@pytest.mark.parametrize("nproc", [2, 3])
def test_transfer_under_torchrun_equals_one_process(runs, sharded, nproc):
    single = json.loads((runs / "single" / "transfer" / "transfer.json").read_text())
    printed, err = sharded["transfer", nproc]
    written = json.loads((runs / f"p{nproc}" / "transfer" / "transfer.json").read_text())
    for doc in (written, printed):
        assert {k: v for k, v in doc.items() if k not in TRANSFER_SKIP} == {
            k: v for k, v in single.items() if k not in TRANSFER_SKIP
        }
    final = _check_sharding(err, nproc)
    wrong = [round(N * (1 - single["clean"][s]["value"])) for s in single["sources"]]
    assert max(wrong) > 2 * BATCH, "the random source misclassifies enough points for 3 batches of their own"
    expected = {str(b % nproc) for w in wrong for b in range(-(-w // BATCH))}
    rest = {rank for (rank, file) in final if ".rest." in file}
    assert rest == expected == {str(r) for r in range(nproc)}, "the clean-misclassified points' batches are sharded"
    crafted = sorted(p.name for p in (runs / f"p{nproc}" / "transfer" / "crafted").iterdir())
    assert crafted == sorted(p.name for p in (runs / "single" / "transfer" / "crafted").iterdir())
    for name in crafted:
        a = load_file(str(runs / f"p{nproc}" / "transfer" / "crafted" / name))
        b = load_file(str(runs / "single" / "transfer" / "crafted" / name))
        assert torch.equal(a["x_adv"], b["x_adv"]), name


def test_killed_rank_restarts_and_continues_from_its_saved_batch(runs):
    d = runs / "killed"
    shutil.copytree(runs / "base", d)
    job = _torchrun(_evaluate_args(d), runs / "driver.py", 2, restarts=1, LP_TEST_KILL_RANK1="1")
    doc, err = _finish(job)
    saved, loaded = _log(err, "saved"), _log(err, "loaded")
    assert [r for r in saved if r["rank"] == "1" and r["attempt"] == "0"] == [
        {"rank": "1", "attempt": "0", "file": "white-box.rank1-of-2.safetensors", "batches": "1"}
    ], "rank 1 was killed right after its first saved batch"
    assert {"rank": "1", "attempt": "1", "file": "white-box.rank1-of-2.safetensors", "batches": "1"} in loaded
    assert not [r for r in saved if r["rank"] == "1" and r["attempt"] == "1" and r["file"].startswith("white-box")], (
        "the restarted rank 1 did not run its saved batch again"
    )
    single = json.loads((runs / "single" / "a" / "evaluation.json").read_text())
    _same_evaluation(doc, single)
    _same_evaluation(json.loads((d / "a" / "evaluation.json").read_text()), single)
    _same_state(d, runs / "single")


def test_certify_under_torchrun_equals_one_process(runs, sharded):
    """Bound propagation (CROWN-IBP) and the curve's fast-suite attacks, sharded over 2 processes."""
    _, err = sharded["certify", 2]
    one = json.loads((runs / "single" / "a" / "certify.json").read_text())
    two = json.loads((runs / "certify" / "a" / "certify.json").read_text())
    assert one["processes"] == 1 and two["processes"] == 2
    for key in ("points", "curve", "sandwich"):
        assert one[key] == two[key], key
    timing = ("seconds_per_point",)
    assert {k: v for k, v in one["certify"].items() if k not in timing} == {
        k: v for k, v in two["certify"].items() if k not in timing
    }
    assert 0 < one["curve"][0]["attacked"]["value"] < 1 and one["certify"]["certified"]["value"] < 1
    assert len(one["sandwich"]) == 2, "the curve's sandwich and the evaluation's"
    _check_sharding(err, 2)


def test_audit_refuses_torchrun_with_one_error(runs, monkeypatch, capsys):
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "0")
    assert main(["audit", str(runs / "base" / "a"), "--quick", "--n", "2"]) == 2
    expected = ("logitpair: error: audit under torchrun: its checks share attack runs, so it runs in one process; "
                "run `logitpair audit` without torchrun")  # fmt: skip
    assert capsys.readouterr().err.strip().splitlines() == [expected]
    assert not (runs / "base" / "a" / "audit.json").exists()


@pytest.mark.parametrize("method", ["milp", "smoothing"])
def test_one_process_certifiers_refuse_torchrun_with_one_error(runs, method, monkeypatch, capsys):
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "0")
    extra = ["--sigma", "0.25", "--n-samples", "10"] if method == "smoothing" else []
    assert main(["certify", str(runs / "base" / "a"), "--method", method, "--n", "2", *extra]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [f"logitpair: error: --method {method} under torchrun: "
                   + {"milp": "the exact verification", "smoothing": "randomized smoothing"}[method]
                   + " is not sharded; run it in one process"]  # fmt: skip
