"""`benchmarks/run.py --quick` end to end on a tiny model trained here: the result's schema, no timings."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from logitpair.checkpoint import export_model
from logitpair.data import load_dataset
from logitpair.evaluation import SUITES
from logitpair.methods import METHODS
from logitpair.models import create_model

ROOT = Path(__file__).resolve().parents[1]
ARCH = "lenet5"


def _tiny_run(run_dir: Path, data_dir: Path) -> Path:
    """A LeNet-5 trained for one epoch on the generated IDX data, exported as a run directory."""
    torch.manual_seed(0)
    train = load_dataset("fashion-mnist", data_dir, val_size=0).train
    model = create_model(ARCH, num_classes=10, in_channels=1, image_size=28)
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    for i in range(0, len(train), 64):
        loss = F.cross_entropy(model(train.x[i : i + 64]), train.y[i : i + 64])
        opt.zero_grad()
        loss.backward()
        opt.step()
    run_dir.mkdir(parents=True)
    meta = {
        "model": {"name": ARCH, "kwargs": {"num_classes": 10, "in_channels": 1, "image_size": 28}},
        "dataset": "fashion-mnist",
        "method": "regular",
        "eps": 0.1,
        "config": {"data": {"dataset": "fashion-mnist", "data_dir": str(data_dir)}},
    }
    export_model(run_dir, model.eval(), meta)
    return run_dir


def _positive(x) -> bool:
    return isinstance(x, float) and math.isfinite(x) and x > 0


def _check_ratio(entry: dict) -> None:
    assert "error" not in entry, entry.get("error")
    assert _positive(entry["median"]) and _positive(entry["min"]) and _positive(entry["max"])
    assert entry["min"] <= entry["median"] <= entry["max"]
    assert len(entry["values"]) == 2  # --quick: 2 interleaved repeats
    assert isinstance(entry["peak_rss_mib"], float) and entry["peak_rss_mib"] > 0


# in CI (issue #13: the one benchmark the tests run; about 15 s here, the limit is 1 minute)
def test_quick_benchmark_writes_the_documented_schema(tmp_path, data_dir):
    run = _tiny_run(tmp_path / "run", data_dir)
    out = tmp_path / "bench.json"
    docs = tmp_path / "PERF.md"
    docs.write_text(
        "# Performance\n\nprose\n\n<!-- BEGIN benchmarks/run.py -->\nSTALE\n<!-- END benchmarks/run.py -->\nend\n"
    )
    masked = f"{run}+saturate"  # the same model behind a gradient-masking wrapper (benchmarks/_masked.py)
    cmd = [
        sys.executable, "benchmarks/run.py", "--quick", "--out", str(out), "--models", str(run), masked, "--n", "40",
        "--masking", masked, "--arch", ARCH, "--data-dir", str(data_dir), "--docs", str(docs),
        "--certify", str(run), "--certify-n", "10", "--certify-methods", "ibp", "crown", "--certify-eps", "0.1", "0.01",
    ]  # fmt: skip
    proc = subprocess.run(cmd, check=False, cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    r = json.loads(out.read_text())

    for key in ("settings", "versions", "environment", "floors", "command"):
        assert key in r
    assert r["settings"]["quick"] and r["settings"]["threads"] == 1 and r["settings"]["repeats"] == 2
    for key in ("pgd_floor_ratio", "pgd_last_iterate_floor_ratio", "apgd_floor_ratio"):
        _check_ratio(r[key][ARCH])
        assert r[key][ARCH]["passes"]["grad"] > 0
    art = r["vs_art"]
    assert art == "skipped: adversarial-robustness-toolbox is not installed" or _positive(art[ARCH]["median"])
    steps = r["train_step_ratio"][ARCH]
    assert set(steps) == set(METHODS.names())
    for entry in steps.values():
        _check_ratio(entry)
        assert entry["floor"]
    assert steps["mpgd"]["floor"].startswith("PGD-7") and steps["clp"]["floor"] == "regular step"

    ev = r["vs_autoattack"]
    entry, masked_entry = ev.values()
    assert entry["run"] == str(run) and entry["n"] == 40 and not entry["masking_model"]
    assert masked_entry["run"] == masked and masked_entry["masking_model"] and list(ev)[1].endswith("+saturate)")
    clean = [e["suites"]["pgd40"]["clean"]["value"] for e in (entry, masked_entry)]
    assert clean[0] == clean[1], "the wrapper keeps the decisions"
    suites = dict.fromkeys(["quick", "standard", "fast", "pgd40"])
    assert set(entry["suites"]) == set(suites) and set(suites) <= set(SUITES)
    results = list(entry["suites"].values())
    if entry["autoattack"] != "skipped: pyautoattack is not installed":
        results.append(entry["autoattack"])
        assert set(entry["targets"]) == {
            "standard_minus_autoattack_points", "fast_minus_autoattack_points", "fast_time_fraction",
            "fast_grad_pass_fraction", "fast_no_grad_pass_fraction",
        }  # fmt: skip
        for t in entry["targets"].values():
            assert isinstance(t["met"], bool) and isinstance(t["value"], float)
        assert set(masked_entry["targets"]) == {"standard_minus_autoattack_points", "fast_minus_autoattack_points"}
    for res in results:
        assert "error" not in res, res.get("error")
        assert 0 <= res["robust"]["value"] <= 1 and res["robust"]["n"] == 40
        assert len(res["robust_points"]) == 40
        assert res["passes"]["grad"] >= 0 and res["passes"]["no_grad"] > 0
        assert _positive(res["peak_rss_mib"])
    speed = next(iter(r["eval_speedup"].values()))
    assert speed["suite"] == "quick" and _positive(speed["median"])

    idx = r["data"]["idx"]
    assert idx["images"] == 800 and _positive(idx["images_per_second"]["median"])
    folder = r["data"]["image_folder"]
    assert folder == "skipped: Pillow is not installed" or _positive(folder["test"]["images_per_second"]["median"])

    _check_certify(r["certify"], run)
    _check_scaling_skipped(r["eval_scaling"])

    text = docs.read_text()
    assert text.startswith("# Performance\n\nprose\n") and text.endswith("end\n") and "STALE" not in text
    assert "Attack cost" in text and "Evaluations vs AutoAttack" in text and "Certified bounds" in text


def _check_scaling_skipped(e: dict) -> None:
    """Without --scaling-run the section starts no process (its CPU figures: the slow test)."""
    assert e["evaluation"] == e["training"] == "skipped: no --scaling-run"
    assert e["gpu_resnet50"] == "skipped: no CUDA device" or e["gpu_resnet50"]["points_per_second"] > 0


def _check_certify(c: dict, run: Path) -> None:
    speed = c["speed"]
    for method, n in (("ibp", 20), ("crown-ibp", 20), ("crown", 1), ("alpha-crown", 1)):
        assert speed[method]["n"] == n and _positive(speed[method]["points_per_second"]), method
    reps = len(speed["crown-ibp"]["seconds_per_point"])
    assert reps == 2 and speed["target"]["crown_ibp_points_per_second"]["target"] == 200
    entry = c["runs"][str(run)]
    assert entry["method"] == "regular" and set(entry["by_eps"]) == {"0.1", "0.01"}
    for row in entry["by_eps"].values():
        assert set(row["methods"]) == {"ibp", "crown"} and "target" not in row  # a regular run: no target
        ibp, crown = row["methods"]["ibp"], row["methods"]["crown"]
        assert ibp["clean"] == crown["clean"] and ibp["certified"]["n"] == 10
        assert crown["certified"]["value"] >= ibp["certified"]["value"], "crown's bound is floored at IBP's"
        assert crown["certified"]["value"] <= crown["clean"]["value"] and sum(crown["counts"].values()) == 10
        assert row["attacked"]["suite"] == "fast" and row["attacked"]["clean"] == crown["clean"]
        assert crown["certified"]["value"] <= row["attacked"]["robust"]["value"]
        assert {m: c["contradictions"] for m, c in row["sandwich"].items()} == {"ibp": 0, "crown": 0}
    assert (
        entry["by_eps"]["0.01"]["methods"]["crown"]["certified"]["value"]
        >= entry["by_eps"]["0.1"]["methods"]["crown"]["certified"]["value"]
    )


def test_autoattack_entries_can_be_reused_from_an_earlier_result(tmp_path, data_dir):
    run = _tiny_run(tmp_path / "run", data_dir)
    flags = "1" * 30 + "0" * 10
    earlier = {
        "settings": {"n": 40, "eval_batch": 500, "eps_eval": None, "data_dir": str(data_dir)},
        "vs_autoattack": {"regular (run)": {"run": str(run), "autoattack": {
            "eps": 0.1, "robust": {"value": 0.75, "n": 40, "ci95": [0.6, 0.86]}, "robust_points": flags,
            "seconds": {"median": 100.0, "min": 100.0, "max": 100.0}, "passes": {"grad": 1000, "no_grad": 1000}}}},
    }  # fmt: skip
    old = tmp_path / "old.json"
    old.write_text(json.dumps(earlier))
    out = tmp_path / "bench.json"
    base = [sys.executable, "benchmarks/run.py", "--out", str(out), "--models", str(run), "--n", "40",
            "--skip", "attacks", "training", "data", "--suites", "pgd40", "--speedup-suite", "none",
            "--data-dir", str(data_dir)]  # fmt: skip
    proc = subprocess.run([*base, "--autoattack-from", str(old)], check=False, cwd=ROOT, capture_output=True,
                          text=True, timeout=600)  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    (entry,) = json.loads(out.read_text())["vs_autoattack"].values()
    assert entry["autoattack"]["reused_from"] == str(old) and entry["autoattack"]["robust_points"] == flags
    earlier["settings"]["n"] = 100
    old.write_text(json.dumps(earlier))
    proc = subprocess.run([*base, "--autoattack-from", str(old)], check=False, cwd=ROOT, capture_output=True,
                          text=True, timeout=600)  # fmt: skip
    assert proc.returncode == 2 and "other settings (n)" in proc.stderr


def test_fast_design_measurements_run(tmp_path, data_dir):
    run = _tiny_run(tmp_path / "run", data_dir)
    out = tmp_path / "design.json"
    cmd = [sys.executable, "benchmarks/fast_design.py", str(run), f"{run}+saturate", "--n", "40", "--eps", "0.02",
           "--out", str(out)]  # fmt: skip
    proc = subprocess.run(cmd, check=False, cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    plain, sat = json.loads(out.read_text())["models"]
    for r in (plain, sat):
        assert "error" not in r, r.get("error")
        assert 0 <= r["fast"]["robust"] <= r["clean_correct"] <= 40
        assert set(r["targets"]) == {f"T{k} {how}" for k in (1, 3) for how in
                                     ("clean-ranked", "drift-ranked", "drift-ranked, warm")}  # fmt: skip
    assert plain["clean_correct"] == sat["clean_correct"]
    assert 0 <= sat["stage1"]["remaining_at_least_0.9"] <= sat["stage1"]["left"] <= sat["clean_correct"]
    assert "| model |" in proc.stdout


def _table(script: str, args: list[str]) -> subprocess.CompletedProcess:
    cmd = [sys.executable, f"benchmarks/{script}", *args]
    proc = subprocess.run(cmd, check=False, cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc


def test_the_resumable_tables_add_up_and_resume(tmp_path, data_dir):
    """milp_table.py and smoothing_table.py at a tiny size: every point is counted once, and a
    rerun with the same settings runs no task again (the file is rewritten with the same runs)."""
    run = str(_tiny_run(tmp_path / "run", data_dir))
    out = tmp_path / "milp.json"
    _table("milp_table.py", [run, "--eps", "0.002", "--n", "6", "--time-limit", "20", "--out", str(out)])
    first = json.loads(out.read_text())
    r = first["runs"][run]["milp"]["0.002"]
    assert first["complete"] and r["n"] == 6
    decided = r["broken_by_attack"] + r["alpha_crown"] + sum(r["milp"].values())
    assert decided == r["clean"] <= 6 and r["milp_points"] == sum(r["milp"].values())
    assert r["summary"]["certified"]["value"] * 6 == r["alpha_crown"] + r["milp"]["verified"]
    proc = _table("milp_table.py", [run, "--eps", "0.002", "--n", "6", "--time-limit", "20", "--out", str(out)])
    again = json.loads(out.read_text())
    assert again["runs"] == first["runs"] and again["wall_seconds_this_call"] < r["seconds"] + 5
    assert "| `run` |" in proc.stdout
    out = tmp_path / "smoothing.json"
    args = [f"{run}@0.25", "--n", "4", "--n0", "20", "--n-samples", "200", "--radii", "0.1", "--suite", "quick",
            "--batch", "100", "--out", str(out)]  # fmt: skip
    _table("smoothing_table.py", args)
    e = json.loads(out.read_text())["runs"][f"{run}@0.25"]
    assert set(e["smoothing"]) == {"0.25"} and set(e["attack"]) == {"0.1"}
    cert = e["smoothing"]["0.25"]["certified_accuracy"][0]["value"]
    assert 0 <= cert <= e["smoothing"]["0.25"]["smoothed_accuracy"]["value"] <= 1
    assert e["attack"]["0.1"]["robust"]["value"] <= e["attack"]["0.1"]["clean"]["value"]


def _scaling(tmp_path: Path, data_dir: Path, *extra: str) -> dict:
    out = tmp_path / "scaling.json"
    cmd = [sys.executable, "benchmarks/run.py", "--out", str(out), "--skip", "attacks", "training", "data",
           "evaluations", "certify", "--data-dir", str(data_dir), *extra]  # fmt: skip
    proc = subprocess.run(cmd, check=False, cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "Processes against threads" in proc.stdout
    return json.loads(out.read_text())["eval_scaling"]


@pytest.mark.slow
def test_eval_scaling_section(tmp_path, data_dir):
    """Processes against threads (issue 23) at a tiny size: the schema and the same record everywhere."""
    run = _tiny_run(tmp_path / "run", data_dir)
    e = _scaling(tmp_path, data_dir, "--scaling-run", str(run), "--scaling-n", "32", "--scaling-batch", "8",
                 "--scaling-suites", "fast", "--scaling-repeats", "1", "--scaling-train-images", "256")  # fmt: skip
    fast = e["evaluation"]["fast"]
    assert fast["same_result"] is True, "1 x 1, 2 x 1 and 1 x 2 gave the same per-example record"
    for key in ("1x1", "2x1", "1x2"):
        assert _positive(fast["points_per_second"][key]["median"])
        assert _positive(e["training"]["images_per_second"][key]["median"])
    for entry in (fast, e["training"]):
        t = entry["2x1_over_1x1"]
        assert t["target"] == 1.8 and isinstance(t["met"], bool) and _positive(entry["2x1_over_1x2"])
    assert e["settings"]["configs"] == {"1x1": [1, 1], "2x1": [2, 1], "1x2": [1, 2]}


@pytest.mark.gpu
def test_eval_scaling_gpu_entry(tmp_path, data_dir):
    """The sharded fast evaluation of ResNet-50 at 224 px on every visible GPU (a small count)."""
    g = _scaling(tmp_path, data_dir, "--scaling-gpu-n", "64")["gpu_resnet50"]
    assert g["marker"] == "gpu" and g["points"] == 64 and _positive(g["points_per_second"])
    assert len(g["devices"]) == g["gpus"] >= 1
