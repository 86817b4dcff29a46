"""``logitpair reproduce``: every paper-table preset end to end at smoke scale, the presets' records,
McNemar's test, the targeted ImageNet protocol, the official attack notation wherever an attack is
named, and the GPU / TensorBoard paths of training."""

from __future__ import annotations

import dataclasses
import json
import math
from pathlib import Path

import pytest
import torch
from _fixtures import write_imagenet, write_svhn_mat
from conftest import write_mnist_dir

from logitpair.attacks import ATTACKS
from logitpair.cli.main import main
from logitpair.data import load_dataset, take
from logitpair.errors import ConfigError
from logitpair.evaluation import AttackSpec, get_suite, parse_attacks
from logitpair.evaluation import test_points as points_of  # (not collected as a test)
from logitpair.evaluation.targeted import targeted_protocol
from logitpair.experiments.presets import PRESETS, PaperAttack, long_attack
from logitpair.experiments.reproduce import ReproduceOptions, make_plan, report_markdown
from logitpair.experiments.smokedata import write_smoke_data
from logitpair.experiments.stats import binomial_two_sided, mcnemar, spread
from logitpair.threat import Linf

# six classes, so that top-5 is not trivially 100%
IMAGENET_WNIDS = ("n01440764", "n01443537", "n01484850", "n01491361", "n01494475", "n01496331")
# the ImageNet presets train InceptionV3 / ResNet-101 / ResNet-v2-50 (0.1-0.5 s per forward at 64-75 px on a CPU)
SLOW = {"table3", "table4", "table5", "table6", "table9", "engstrom"}


@pytest.fixture(scope="module")
def smoke_data(tmp_path_factory) -> dict[str, Path]:
    """Each dataset the presets need, written in its real format by the shared test writers."""
    root = tmp_path_factory.mktemp("smoke-data")
    out = {"mnist": write_mnist_dir(root / "mnist", n_train=60, n_test=20)}
    out["fashion-mnist"] = out["mnist"]
    if _has("scipy"):
        (root / "svhn").mkdir()
        write_svhn_mat(root / "svhn" / "train_32x32.mat", 30, 0)
        write_svhn_mat(root / "svhn" / "test_32x32.mat", 12, 1)
        out["svhn"] = root / "svhn"
    if _has("PIL"):
        out["imagenet"] = write_imagenet(root / "imagenet", IMAGENET_WNIDS, n_train=2, n_val=1, special={2: "L"})
    return out


@pytest.fixture(scope="module")
def store(tmp_path_factory) -> Path:
    """One store of run directories for every preset: models shared by tables are trained once."""
    return tmp_path_factory.mktemp("runs-store")


def _has(module: str) -> bool:
    try:
        __import__(module)
    except ImportError:
        return False
    return True


PRESET_PARAMS = [pytest.param(name, marks=[pytest.mark.slow] if name in SLOW else [], id=name) for name in PRESETS]


@pytest.mark.parametrize("name", PRESET_PARAMS)
def test_every_preset_passes_a_smoke_run(name, smoke_data, store, tmp_path, capsys):
    preset = PRESETS.get(name)
    if preset.dataset not in smoke_data:
        pytest.skip(f"{preset.dataset} needs an optional reader (scipy / Pillow)")
    out = tmp_path / "out" / name
    seeds = 2 if name == "table7" else 1  # one preset with two seeds: the spread and per-seed tests
    argv = ["reproduce", name, "--scale", "smoke", "--data-dir", str(smoke_data[preset.dataset]), "--out", str(out),
            "--runs", str(store), "--seeds", str(seeds), "--quiet"]  # fmt: skip
    assert main(argv) == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["out"] == str(out)
    assert sorted(p.name for p in out.parent.iterdir()) == [name], "no work folder left behind"
    res = json.loads((out / "results.json").read_text())
    report = (out / "report.md").read_text()
    assert (out / "comparison.png").stat().st_size > 0
    assert res["preset"] == name and res["scale"] == "smoke" and res["seeds"] == seeds
    assert [r["name"] for r in res["rows"]] == [r.name for r in preset.table_rows]
    for row, r in zip(preset.table_rows, res["rows"], strict=True):
        assert r["paper"] == dict(row.paper)
        for value in row.paper.values():
            assert f"| {value:.1f} |" in report, f"paper's {value} missing from the report"
        assert len(r["seeds"]) == seeds and len(r["audit"]) == seeds
        assert all(a["verdict"] in ("pass", "suspect") for a in r["audit"])
        for seed in r["seeds"]:
            for key, summ in seed.items():
                assert 0.0 <= summ["value"] <= 1.0 and summ["n"] == res["n"] == 4, key
                assert summ["ci95"][0] <= summ["value"] <= summ["ci95"][1]
        ours = {k: v["value"] for k, v in r["ours"].items()}
        if preset.protocol == "untargeted":
            assert ours["strong"] <= ours["white_box"] <= ours["clean"]
            assert ours["black_box_robust"] <= min(ours["black_box"], ours["clean"])
        elif preset.protocol == "targeted":
            for key in ("clean", "wb", "long", "suite", "worst", "untargeted"):
                assert ours[f"{key}_top1"] <= ours[f"{key}_top5"], key
            for key in ("wb", "long", "suite"):
                assert ours["worst_top1"] <= ours[f"{key}_top1"] and ours["worst_top5"] <= ours[f"{key}_top5"]
                assert ours[f"{key}_success"] + ours[f"{key}_top1"] <= 1.0
            assert ours["worst_success"] + ours["worst_top1"] <= 1.0
            if "bb_top1" in r["paper"]:
                assert ours["bb_top1"] <= ours["bb_top5"] <= ours["clean_top5"]
        else:
            assert {f"from_{m.name}" for m in preset.rows} <= set(ours)
        for d in r["run_dirs"]:
            assert (Path(d) / "model.safetensors").is_file() and (Path(d) / "audit.json").is_file()
        assert len(r["passes"]) == seeds  # model passes counted per seed's run: at least one pass per image
        for p in r["passes"]:
            assert p["per_image_last_step"]["forward"] >= 1 and p["steps"] >= 1
            assert p["total"]["forward"] >= p["steps"] * p["batch_size"]
    assert "commit" in res["environment"]
    assert len(res["comparisons"]) == len(preset.compare) * seeds
    for c in res["comparisons"]:
        assert c["a_only"] + c["b_only"] + c["both"] + c["neither"] == c["n"] and 0 <= c["p_value"] <= 1
    if seeds > 1:
        assert all(r["spread"]["clean"]["k"] == seeds for r in res["rows"]) and "Spread over 2 seeds" in report
    assert res["substitutions"] and "smoke" in res["substitutions"][-1]
    assert "## Side by side with the paper" in report and res["command"] in report


def test_smoke_without_data_dir_generates_the_data(tmp_path):
    """A smoke run on nothing but the package: the generated IDX files go through the real loader."""
    out = tmp_path / "t1"
    assert main(["reproduce", "table1", "--scale", "smoke", "--out", str(out), "--quiet"]) == 0
    res = json.loads((out / "results.json").read_text())
    assert res["dataset"] == "mnist" and res["n"] == 4
    cfg = json.loads((out / "seed-0" / "alp" / "config.json").read_text())
    assert cfg["loss"]["eps"] == 0.3 and cfg["model"] == "lenet" and cfg["optim"]["batch_size"] == 2
    assert not Path(cfg["data"]["data_dir"]).exists(), "the generated data lives in a temporary folder"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["t1"], "no work folder left behind"


@pytest.mark.parametrize("dataset", ["mnist", "fashion-mnist", "svhn", "cifar10", "imagenet", "tiny-imagenet"])
def test_generated_smoke_data_loads_through_the_real_loader(dataset, tmp_path):
    if dataset == "svhn":
        pytest.importorskip("scipy.io")
    if dataset in ("imagenet", "tiny-imagenet"):
        pytest.importorskip("PIL")
    root = write_smoke_data(dataset, tmp_path / dataset)
    s = load_dataset(dataset, root, val_size=2)
    x, y = take(s.test, 100)
    classes = 6 if dataset in ("imagenet", "tiny-imagenet") else 10
    assert s.train.num_classes == classes and sorted(set(y.tolist())) == list(range(classes))
    assert 0 <= x.min() and x.max() <= 1 and len(s.val) == 2


def test_list_names_every_preset_and_its_data(capsys):
    assert main(["reproduce", "--list"]) == 0
    text = capsys.readouterr().out
    for name in PRESETS:
        assert f"\n{name} " in "\n" + text
    for need in ("train_32x32.mat", "train/<wnid>/*.JPEG", "IDX files", "dataset-fashion-mnist", "tiny-imagenet"):
        assert need in text
    with pytest.raises(SystemExit):  # argparse rejects an unknown scale
        main(["reproduce", "table1", "--scale", "huge"])
    assert main(["reproduce"]) == 2  # no table named: one error line
    assert "name a table preset" in capsys.readouterr().err


def test_presets_record_the_papers_numbers_and_settings():
    t1, t3, t4 = PRESETS.get("table1"), PRESETS.get("table3"), PRESETS.get("table4")
    assert {r.name: dict(r.paper) for r in t1.table_rows} == {
        "mpgd": {"white_box": 93.2, "black_box": 96.0, "clean": 98.5},
        "alp": {"white_box": 96.4, "black_box": 97.5, "clean": 98.8},
    }
    assert t3.row("alp").paper == {"wb_top1": 27.9, "wb_top5": 55.4} and t3.row("ens-adv").static == (
        "static-a",
        "static-b",
    )
    assert t4.row("ens-adv").paper == {"bb_top1": 47.1, "bb_top5": 74.3}
    assert PRESETS.get("transfer-vs-ensemble").row("ens-adv").paper == {"from_undefended": 66.6, "from_alp": 47.1}
    assert PRESETS.get("engstrom").row("alp").paper["long_top1"] == 0.6
    assert t3.training["optim"]["optimizer"] == "rmsprop-tf" and t3.training["loss"]["attack"] == "pgdll_16_2_10"
    for name in PRESETS:
        p = PRESETS.get(name)
        assert p.settings and all(src for _, src in p.settings)
        assert any(src.startswith("ours") for _, src in p.settings), f"{name}: label what is ours"
        missing = [r.name for r in p.table_rows if not r.paper]  # the paper's tables give no VAT figure
        assert p.table_rows and missing == (["vat"] if name == "alp-vs-vat" else []), name
    # the paper's attack in the official notation at the preset's eps, scaled elsewhere
    assert t3.attack.spec(16 / 255).params == {"spec": "pgdrnd_16_2_10"}
    assert t3.attack.spec(16 / 255, steps=1).params == {"spec": "pgdrnd_16_2_1"}
    scaled = t1.attack.spec(0.1)
    assert scaled.name == "pgd" and math.isclose(scaled.params["step_size"], 0.1 / 30) and scaled.params["steps"] == 40
    assert not scaled.params["keep_best"] and scaled.params["restarts"] == 1
    assert long_attack(16 / 255).params == {"steps": 1000, "step_size": 0.005, "restarts": 1}
    assert isinstance(t1.attack, PaperAttack) and t1.attack.given and not PRESETS.get("table2").attack.given


def test_small_plan_is_the_demos_budget_on_fashion_mnist():
    plan = make_plan(ReproduceOptions("table1", scale="small"))
    assert (
        plan.dataset == "fashion-mnist" and plan.eps == 0.1 and plan.n == 1000 and plan.suite_name in ("fast", "quick")
    )
    assert any("instead of the paper's mnist" in s for s in plan.substitutions)
    assert any("lenet5" in s for s in plan.substitutions)
    full = make_plan(ReproduceOptions("table3", scale="full"))
    assert full.n == 1000 and full.suite_name == "standard" and full.paper.params == {"spec": "pgdrnd_16_2_10"}
    with pytest.raises(ConfigError, match="scale"):
        ReproduceOptions("table1", scale="medium")
    with pytest.raises(ConfigError, match="unknown preset"):
        ReproduceOptions("table10")


def test_mcnemar_against_a_hand_computed_value():
    # 8 points only A gets right, 2 only B: p = 2 * (C(10,0) + C(10,1) + C(10,2)) / 2**10 = 2 * 56 / 1024
    a = torch.tensor([True] * 8 + [False] * 2 + [True] * 5 + [False] * 5)
    b = torch.tensor([False] * 8 + [True] * 2 + [True] * 5 + [False] * 5)
    res = mcnemar(a, b)
    assert (res["a_only"], res["b_only"], res["both"], res["neither"], res["n"]) == (8, 2, 5, 5, 20)
    assert res["p_value"] == pytest.approx(0.109375, abs=1e-12)
    assert res["difference"] == pytest.approx(0.3)
    assert mcnemar(b, a)["p_value"] == res["p_value"]
    assert binomial_two_sided(0, 0) == 1.0 and binomial_two_sided(5, 10) == 1.0
    assert binomial_two_sided(0, 5) == pytest.approx(2 / 32)
    assert binomial_two_sided(3000, 10000) < 1e-300  # large N stays exact (no overflow, no float sum)
    assert binomial_two_sided(4, 12) == pytest.approx(2 * sum(math.comb(12, i) for i in range(5)) / 2**12)
    with pytest.raises(ValueError, match="same points"):
        mcnemar(a, b[:5])
    sp = spread([0.5, 0.7])
    assert (
        sp["mean"] == pytest.approx(0.6) and sp["sd"] == pytest.approx(math.sqrt(0.02)) and spread([0.3])["sd"] is None
    )


def test_targeted_protocol_on_a_tiny_model(trained_model, tiny_data):
    x, y = tiny_data[0][:40], tiny_data[1][:40]
    threat = Linf(16 / 255)
    groups = {
        "paper": [AttackSpec("official", {"spec": "pgdrnd_16_2_10"})],
        "long": [long_attack(threat.eps, steps=40)],
        "suite": [AttackSpec("pgd", {"steps": 5, "restarts": 1}), AttackSpec("square", {"queries": 20})],
    }
    res = targeted_protocol(trained_model, x, y, groups, threat=threat, seed=3, batch_size=16,
                            untargeted=[AttackSpec("apgd-ce", {"steps": 5})])  # fmt: skip
    assert (res.target != y).all(), "a random class other than the label"
    for g in res.groups.values():
        assert torch.equal(g.target, res.target), "every group aims at the same targets"
    again = targeted_protocol(trained_model, x, y, {"paper": groups["paper"]}, threat=threat, seed=3, batch_size=16)
    assert torch.equal(again.target, res.target), "the targets are seeded"
    summary = res.summary()
    for name in (*groups, None):
        top1, top5, hit = res.robust(name, 1), res.robust(name, 5), res.success(name)
        assert (top1 <= top5).all() and not (hit & top1).any()
        assert (top1 <= res.clean_top1).all() and (top5 <= res.clean_top5).all()
        block = summary["worst"] if name is None else summary["groups"][name]
        assert block["top1"]["value"] <= block["top5"]["value"]
        assert block["target_success"]["value"] + block["top1"]["value"] <= 1.0
    worst = res.robust(None, 1)
    assert all((worst <= res.robust(g, 1)).all() for g in groups)
    assert summary["clean_top1"]["value"] > 0.9 and summary["groups"]["paper"]["top1"]["value"] < 0.9
    assert summary["untargeted"]["top1"]["value"] <= summary["clean_top1"]["value"]
    with pytest.raises(ConfigError, match="no attack group"):
        targeted_protocol(trained_model, x, y, {}, threat=threat)


def test_official_notation_is_an_attack_name(trained_model, tiny_data):
    specs = parse_attacks("pgdll_16_2_10, apgd-ce:steps=3")
    assert specs[0] == AttackSpec("official", {"spec": "pgdll_16_2_10"}, "pgdll_16_2_10") and specs[1].name == "apgd-ce"
    with pytest.raises(ConfigError, match="takes no options"):
        parse_attacks("pgd_16_2_10:steps=3")
    with pytest.raises(ConfigError, match="EPS must be in 1..255"):
        parse_attacks("pgdrnd_0_2_10")
    x, y = tiny_data[0][:8], tiny_data[1][:8]
    fn = ATTACKS.get("official")
    xa = fn(trained_model, x, y, threat=Linf(0.1), spec="pgdll_16_2_10", generator=torch.Generator().manual_seed(0))
    assert Linf(16 / 255).contains(x, xa).all()
    target = (y + 1) % 10
    xt = fn(trained_model, x, y, threat=Linf(16 / 255), spec="pgdrnd_16_2_10", targeted=True, target=target)
    assert Linf(16 / 255).contains(x, xt).all()
    with pytest.raises(ConfigError, match="larger than the evaluation's eps"):
        fn(trained_model, x, y, threat=Linf(8 / 255), spec="pgd_16_2_10")
    with pytest.raises(ConfigError, match="only pgdrnd"):
        fn(trained_model, x, y, threat=Linf(16 / 255), spec="pgdll_16_2_10", targeted=True, target=target)
    assert get_suite("targeted")  # the targeted suite the reproduction runs next to the paper's attack


def _train_cli(out: Path, data_dir: Path, *extra: str) -> None:
    argv = ["train", "--dataset", "fashion-mnist", "--data-dir", str(data_dir), "--model", "lenet5", "--epochs", "1",
            "--batch-size", "64", "--val-size", "100", "--val-points", "20", "--out", str(out), "--quiet", *extra]  # fmt: skip
    assert main(argv) == 0


def test_evaluate_accepts_the_official_notation(tmp_path, data_dir, capsys):
    run = tmp_path / "run"
    _train_cli(run, data_dir, "--method", "regular")
    capsys.readouterr()
    argv = ["evaluate", str(run), "--attacks", "pgdll_16_2_10", "--n", "20", "--steps", "2", "--json", "--quiet"]
    assert main(argv) == 0
    ev = json.loads(capsys.readouterr().out)
    assert [a["name"] for a in ev["white_box"]["attacks"]] == ["pgd", "official"]
    assert ev["white_box"]["attacks"][1]["params"] == {"spec": "pgdll_16_2_10"} and ev["n"] == 20


def test_test_points_use_the_runs_image_size(tmp_path):
    pytest.importorskip("PIL")
    root = write_imagenet(tmp_path / "imagenet", IMAGENET_WNIDS[:3], n_train=2, n_val=1, special={})

    run = torch.nn.Module()
    run.meta = {
        "eps": 0.1,
        "model": {"name": "resnet50"},
        "config": {"data": {"dataset": "imagenet", "data_dir": str(root), "image_size": 24}},
    }
    x, y, dataset = points_of(run, 2, None)
    assert x.shape == (2, 3, 24, 24) and y.tolist() == [0, 1] and dataset == "imagenet"
    x, _, _ = points_of(run, None, None)
    assert len(x) == 3


def test_tensorboard_writes_event_files(tmp_path, data_dir):
    pytest.importorskip("tensorboard")
    run = tmp_path / "tb"
    _train_cli(run, data_dir, "--method", "regular", "--tensorboard", "--log-every", "2")
    events = list((run / "tensorboard").glob("events.out.tfevents.*"))
    assert events and events[0].stat().st_size > 0


def test_report_states_substitutions_and_spread():
    res = {
        "table": "Table 1", "title": "t", "scale": "small", "dataset": "fashion-mnist", "paper_dataset": "mnist",
        "eps": 0.1, "n": 10, "seeds": 2, "evaluation_seed": 0, "device": "cpu",
        "columns": [{"key": "clean", "label": "Clean"}],
        "attacks": {"paper": {"label": "PGD"}, "paper_given": True, "long": None, "suite_name": "quick", "suite": []},
        "rows": [{"name": "alp", "label": "ALP", "paper": {"clean": 98.8},
                  "ours": {"clean": {"value": 0.5, "n": 10, "ci95": [0.2, 0.8]}},
                  "spread": {"clean": {"mean": 0.55, "sd": 0.07, "k": 2}}, "audit": [{"verdict": "pass", "failed": []}] * 2,
                  "train_seconds": [1.0, 2.0], "ours_settings": ["x"]}],
        "other_models": [], "comparisons": [], "settings": [{"setting": "s", "source": "ours"}],
        "substitutions": ["dataset fashion-mnist instead of the paper's mnist (ours)"], "notes": [], "protocol": "untargeted",
        "environment": {"machine": "m", "threads": 1, "torch": "t"}, "seconds": 1.0, "command": "logitpair reproduce table1",
    }  # fmt: skip
    text = report_markdown(res)
    assert "| ALP | 98.8 | 50.0 [20.0, 80.0] | pass |" in text
    assert "instead of the paper's mnist (ours)" in text and "55.0 ± 7.0" in text


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_alp_resnet50_trains_on_cuda_bf16_channels_last(tmp_path):
    pytest.importorskip("PIL")
    root = write_imagenet(tmp_path / "imagenet", IMAGENET_WNIDS, n_train=3, n_val=1, special={})
    run = tmp_path / "alp-r50"
    argv = ["train", "--dataset", "imagenet", "--data-dir", str(root), "--image-size", "224", "--model", "resnet50",
            "--method", "alp", "--train-attack", "pgdll_16_2_2", "--eps", "16/255", "--lam", "0.5", "--batch-size", "4",
            "--epochs", "1", "--val-size", "2", "--val-points", "2", "--device", "cuda", "--amp", "bf16",
            "--channels-last", "--log-every", "1", "--out", str(run), "--quiet"]  # fmt: skip
    assert main(argv) == 0
    train = json.loads((run / "train.json").read_text())
    assert train["steps"] == 4 and train["skipped_batches"] == 0
    assert all(math.isfinite(v) for k, v in train["history"][-1].items() if isinstance(v, float))
    # the reproduction's evaluation on the device (model forwards on CUDA, the protocol on the CPU)
    out = tmp_path / "t1"
    assert main(["reproduce", "table1", "--scale", "smoke", "--device", "cuda", "--out", str(out), "--quiet"]) == 0
    assert json.loads((out / "results.json").read_text())["device"] == "cuda"
    # evaluate and audit on the device: float32 attacks, the same protocol as on the CPU
    assert main(["evaluate", str(run), "--device", "cuda", "--n", "2", "--suite", "fast", "--quiet", "--json"]) == 0
    ev = json.loads((run / "evaluation.json").read_text())
    assert ev["device"] == "cuda" and ev["precision"] == "float32" and ev["n"] == 2
    assert main(["audit", str(run), "--device", "cuda", "--quick", "--n", "2", "--quiet", "--json"]) == 0
    assert json.loads((run / "audit.json").read_text())["device"] == "cuda"


@pytest.mark.slow
def test_reproduce_under_torchrun(smoke_data, tmp_path):
    """Every process trains (DistributedDataParallel, gloo) and takes its shard of the evaluation
    (2 batches of 2 points: one per rank); rank 0 alone audits and writes. The sharded white-box
    record equals the protocol run in this one process on the trained model."""
    import os
    import subprocess
    import sys

    from safetensors.torch import load_file

    from logitpair import load_model
    from logitpair.evaluation import run_protocol

    out = tmp_path / "t1"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2", "-m", "logitpair",
           "reproduce", "table1", "--scale", "smoke", "--data-dir", str(smoke_data["mnist"]), "--out", str(out),
           "--batch-size", "2", "--quiet"]  # fmt: skip
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    res = subprocess.run(cmd, check=False, env=env, capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stderr[-2000:]
    assert res.stdout.count('"rows"') == 1, "only rank 0 prints the summary"
    for name in ("mpgd", "alp", "mpgd-source"):
        assert json.loads((out / "seed-0" / name / "train.json").read_text())["world_size"] == 2
    assert json.loads((out / "results.json").read_text())["rows"][0]["name"] == "mpgd"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["t1"]
    plan = make_plan(ReproduceOptions("table1", scale="smoke", data_dir=str(smoke_data["mnist"]), batch_size=2))
    run = out / "seed-0" / "alp"
    model = load_model(run)
    x, y, _ = points_of(model, plan.n, str(smoke_data["mnist"]))
    assert len(y) == 4
    one = run_protocol(model, x, y, [plan.paper, *plan.suite], threat=Linf(plan.eps), seed=0, batch_size=2)
    sharded = load_file(str(run / "reproduce-white-box.safetensors"))
    assert not list(run.glob("*.rank*")), "the rank files are removed"
    assert torch.equal(sharded["clean1"], one.clean_correct) and torch.equal(sharded["robust1"], one.robust)
    assert torch.equal(sharded["broken_by"], one.broken_by)
    assert torch.equal(sharded["attacked"].sum(0, dtype=torch.long), one.attacked)


def test_device_paths_on_the_cpu(smoke_data, store, tmp_path):
    """What --device changes, run on the CPU: the audit of a row goes through audit_run on the
    given device and records it; an unavailable device is one clear error."""
    from dataclasses import replace

    from logitpair.experiments.reproduce import _audit, reproduce
    from logitpair.progress import null_progress

    opts = ReproduceOptions("table1", scale="smoke", data_dir=str(smoke_data["mnist"]), out=tmp_path / "o", runs=store)
    res = reproduce(opts)  # reuses the preset test's models, evaluations and audits when it ran before
    dirs = {r["name"]: Path(r["run_dirs"][0]) for r in [*res["rows"], *res["other_models"]]}
    plan = make_plan(opts)
    (dirs["alp"] / "audit.json").unlink()
    out = _audit(dirs, plan.preset.row("alp"), plan, opts.data_dir, replace(opts, seed=1), torch.device("cpu"),
                 null_progress)  # fmt: skip
    assert out["verdict"] in ("pass", "suspect") and (dirs["alp"] / "audit.json").is_file()
    audit_doc = json.loads((dirs["alp"] / "audit.json").read_text())
    assert audit_doc["device"] == "cpu" and audit_doc["precision"] == "float32"
    assert json.loads((dirs["alp"] / "reproduce-audit.json").read_text())["result"] == out


@pytest.mark.parametrize("scale", ["smoke", "small", "full"])
def test_every_preset_builds_valid_configs_at_every_scale(scale):
    from logitpair.experiments.reproduce import row_config

    for name in PRESETS:
        plan = make_plan(ReproduceOptions(name, scale=scale))
        for row in plan.preset.rows:
            cfg = row_config(
                plan, row, seed_index=1, data_dir=None, device="cpu", static_dirs=["a", "b"][: len(row.static)]
            )
            assert cfg.method == row.method and cfg.seed == row.seed + 100 and cfg.loss.eps == pytest.approx(plan.eps)
            assert cfg.static_model_dirs() == ["a", "b"][: len(row.static)]
            takes = {f.name for f in dataclasses.fields(cfg.loss)}  # the settings of the row's method
            if scale == "small":
                assert cfg.model in ("lenet5", "lenet") and cfg.data.dataset == "fashion-mnist"
                assert cfg.optim.optimizer == "adam" and ("attack" not in takes or cfg.loss.attack == "pgd")
            else:
                assert cfg.model == (row.model or dict(row.settings).get("model") or plan.preset.model)
            if scale == "full" and plan.preset.dataset == "imagenet":
                assert cfg.optim.optimizer == "rmsprop-tf" and cfg.ema_schedule == "tf" and cfg.data.image_size >= 64
                assert cfg.optim.lr_reference_batch == 32 and cfg.loss.label_smoothing == 0.1
                assert "attack" not in takes or cfg.loss.attack == "pgdll_16_2_10"
            if scale == "smoke":
                assert cfg.optim.batch_size == 2 and ("attack_steps" not in takes or cfg.loss.attack_steps == 1)
                # <= 64 px; 75 (InceptionV3's minimum) where the table has an InceptionV3 (same points for all rows)
                assert cfg.data.image_size <= (75 if plan.preset.model == "inceptionv3" else 64)
                assert "attack" not in takes or cfg.loss.attack in ("pgd", "pgdll_16_2_1")


def _files(root: Path) -> dict[str, tuple[int, bytes]]:
    return {str(p.relative_to(root)): (p.stat().st_mtime_ns, p.read_bytes()) for p in sorted(root.rglob("*"))
            if p.is_file()}  # fmt: skip


def test_more_seeds_extend_the_store_reusing_every_finished_seed(smoke_data, tmp_path, capsys):
    """Issue 24: `--seeds 2` then `--seeds 3` with the same `--runs`: the first two seeds' models,
    evaluation states and audits are reused untouched (no file of their run directories changes)
    and their per-seed results are identical; only the third seed is trained and evaluated."""
    store, out = tmp_path / "store", tmp_path / "out"
    argv = ["reproduce", "table1", "--scale", "smoke", "--data-dir", str(smoke_data["mnist"]), "--out", str(out),
            "--runs", str(store), "--quiet", "--seeds"]  # fmt: skip
    assert main([*argv, "2"]) == 0
    first = json.loads((out / "results.json").read_text())
    dirs = {Path(d) for r in first["rows"] for d in r["run_dirs"]}
    before = {d: _files(d) for d in dirs}
    assert main([*argv, "3"]) == 0
    capsys.readouterr()
    again = json.loads((out / "results.json").read_text())
    assert again["seeds"] == 3
    # each call's wall time is kept: the first call's record carried over unchanged, the second's added
    assert again["invocations"][0] == first["invocations"][0] and len(first["invocations"]) == 1
    assert [c["seeds"] for c in again["invocations"]] == [2, 3]
    assert (
        again["invocations"][1]["seconds"] == again["seconds"]
        and again["invocations"][0]["seconds"] == first["seconds"]
    )
    for r1, r3 in zip(first["rows"], again["rows"], strict=True):
        assert r3["seeds"][:2] == r1["seeds"] and r3["audit"][:2] == r1["audit"]
        assert r3["run_dirs"][:2] == r1["run_dirs"] and r3["run_dirs"][2] not in r1["run_dirs"]
    per_seed = len(first["comparisons"]) // 2
    assert again["comparisons"][: 2 * per_seed] == first["comparisons"]
    for d, files in before.items():
        now = _files(d)
        changed = sorted(k for k in files if now.get(k) != files[k])
        assert not changed, f"{d}: a finished seed's files were rewritten: {changed}"


def test_earlier_invocations_read_from_the_previous_results(tmp_path):
    """The calls recorded in OUT's previous results.json, kept when they are of the same table."""
    from logitpair.experiments.reproduce import earlier_invocations

    res = {"preset": "table1", "scale": "small", "dataset": "fashion-mnist", "n": 1000}
    assert earlier_invocations(tmp_path, res) == []  # no earlier results
    old = {**res, "seeds": 3, "seconds": 3600.0, "command": "logitpair reproduce table1 --seeds 3",
           "environment": {"commit": "abc"}}  # fmt: skip
    (tmp_path / "results.json").write_text(json.dumps(old))  # written by a version without the record
    assert earlier_invocations(tmp_path, res) == [
        {"command": old["command"], "seeds": 3, "seconds": 3600.0, "commit": "abc", "finished": None}
    ]
    calls = [{"command": "c1", "seeds": 1, "seconds": 1.0, "commit": None, "finished": "t"}] * 2
    (tmp_path / "results.json").write_text(json.dumps({**old, "invocations": calls}))
    assert earlier_invocations(tmp_path, res) == calls
    assert earlier_invocations(tmp_path, {**res, "n": 500}) == []  # another table's points: not this one's calls
    (tmp_path / "results.json").write_text("{not json")
    assert earlier_invocations(tmp_path, res) == []
