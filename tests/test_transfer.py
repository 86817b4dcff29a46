"""Transfer studies: the source x target matrix, ensemble sources, resumable crafting, the CLI."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from conftest import small_cnn, train_small_cnn

from logitpair import load_model
from logitpair.attacks import ATTACKS, EnsembleLogits, predict
from logitpair.cli import main
from logitpair.evaluation import EvalOptions, evaluate_run, parse_attacks, pgd_spec, run_protocol, transfer_matrix
from logitpair.evaluation.transfer import craft
from logitpair.threat import Linf

THREAT = Linf(0.1)


@pytest.fixture(scope="module")
def models(trained_model, tiny_data):
    """Two independently trained small CNNs and an untrained (unrelated) one."""
    x, y = tiny_data
    torch.manual_seed(5)
    return {"a": trained_model, "b": train_small_cnn(x, y, seed=1), "random": small_cnn().eval()}


def _counting(monkeypatch, name: str) -> dict[str, int]:
    real = ATTACKS._items[name]
    calls = {"n": 0}

    def counting(*args, **kwargs):
        calls["n"] += 1
        return real(*args, **kwargs)

    monkeypatch.setitem(ATTACKS._items, name, counting)
    return calls


@pytest.mark.parametrize("attack", [pgd_spec(2, 1), parse_attacks("mi-fgsm:steps=2")[0]], ids=["pgd", "mi-fgsm"])
def test_diagonal_is_white_box_and_plain_bounds_robust(models, tiny_data, attack):
    # noisy points, a small eps and a weak attack: some points are wrong clean and about half survive, so a
    # different seed, or crafting on all points of a batch instead of the clean-correct ones, changes the diagonal
    g = torch.Generator().manual_seed(0)
    x = (tiny_data[0][:200] + 0.6 * (2 * torch.rand(200, 1, 28, 28, generator=g) - 1)).clamp(0, 1)
    y = tiny_data[1][:200]
    threat = Linf(0.04)
    ab = {k: models[k] for k in ("a", "b")}
    res = transfer_matrix(ab, x, y, attack=attack, threat=threat, seed=3, batch_size=64)
    for name, model in ab.items():
        wb = run_protocol(model, x, y, [attack], threat=threat, seed=3, batch_size=64)
        assert torch.equal(res.robust[name][name], wb.robust), name
        assert torch.equal(res.clean[name], wb.clean_correct)
        assert res.relation[name][name] == "white-box"
    for s in res.sources:
        for t in res.targets:
            assert not (res.robust[s][t] & ~res.plain[s][t]).any(), "robust must imply correct on the example"
            assert not (res.robust[s][t] & ~res.clean[t]).any()
            assert bool(threat.contains(x, res.adversarial[s]).all())
    d = res.to_dict()
    assert d["n"] == 200 and d["sources"] == ["a", "b"] and d["relation"]["a"]["b"] == "transfer"
    assert not res.clean["a"].all() and 0.1 < d["robust"]["a"]["a"]["value"] < 0.9
    entry = d["robust"]["b"]["a"]
    assert entry["n"] == 200 and entry["ci95"][0] <= entry["value"] <= entry["ci95"][1]
    assert res.matrix("plain")[0][1] == pytest.approx(d["plain"]["a"]["b"]["value"])


def test_transfer_from_unrelated_model_hurts_less_than_white_box(models, tiny_data):
    x, y = tiny_data[0][:200], tiny_data[1][:200]
    res = transfer_matrix(models, x, y, attack=pgd_spec(10, 1), threat=THREAT, seed=0)
    m = res.to_dict()["robust"]
    white = m["a"]["a"]["value"]
    assert m["random"]["a"]["value"] > white + 0.3, (m["random"]["a"], white)
    assert m["b"]["a"]["value"] >= white, "an independently trained source is no stronger than white-box"
    assert res.to_dict()["plain"]["random"]["a"]["value"] > res.to_dict()["plain"]["a"]["a"]["value"]


def test_ensemble_source_equals_crafting_on_ensemble_logits(models, tiny_data):
    x, y = tiny_data[0][:100], tiny_data[1][:100]
    a, b = models["a"], models["b"]
    res = transfer_matrix({"a": a, "random": models["random"]}, x, y, attack=pgd_spec(5, 2), threat=THREAT, seed=1,
                          sources={"ens": EnsembleLogits([a, b])})  # fmt: skip
    direct, _ = craft(EnsembleLogits([a, b]), x, y, pgd_spec(5, 2), threat=THREAT, seed=1)
    assert torch.equal(res.adversarial["ens"], direct)
    alone, _ = craft(a, x, y, pgd_spec(5, 2), threat=THREAT, seed=1)
    assert not torch.equal(direct, alone), "the ensemble's examples differ from those of one member"
    ok = predict(models["random"], direct).argmax(1) == y
    assert torch.equal(res.plain["ens"]["random"], ok)
    assert torch.equal(res.robust["ens"]["random"], res.clean["random"] & ok)
    assert res.relation["ens"] == {"a": "member", "random": "transfer"}
    assert res.sources == ["a", "random", "ens"] and res.targets == ["a", "random"]


def test_crafted_examples_are_reused_and_recrafted_on_request(models, tiny_data, tmp_path, monkeypatch):
    x, y = tiny_data[0][:60], tiny_data[1][:60]
    ab = {k: models[k] for k in ("a", "b")}
    calls = _counting(monkeypatch, "pgd")
    kw = {"attack": pgd_spec(3, 1), "threat": THREAT, "seed": 2, "state_dir": tmp_path}
    first = transfer_matrix(ab, x, y, **kw)
    assert calls["n"] > 0 and len(list(tmp_path.glob("*.safetensors"))) == 2
    assert not list(tmp_path.glob("*.partial.*")), "the partial crafting state is removed once complete"
    calls["n"] = 0
    again = transfer_matrix(ab, x, y, **kw)
    assert calls["n"] == 0 and all(c["reused"] for c in again.crafted.values())
    assert again.to_dict()["robust"] == first.to_dict()["robust"]
    fresh = transfer_matrix(ab, x, y, **kw, resume=False)
    assert calls["n"] > 0 and not any(c["reused"] for c in fresh.crafted.values())
    assert all(torch.equal(fresh.adversarial[k], first.adversarial[k]) for k in ab), "seeded crafting is deterministic"
    calls["n"] = 0
    other = transfer_matrix(ab, x, y, **{**kw, "seed": 3})
    assert calls["n"] > 0 and not any(c["reused"] for c in other.crafted.values()), "other settings: craft again"


# --------------------------------------------------------------------------- run directories and the CLI
TRAIN = ["--dataset", "fashion-mnist", "--model", "lenet5", "--method", "regular", "--epochs", "1",
         "--batch-size", "100", "--val-size", "50", "--quiet"]  # fmt: skip


@pytest.fixture(scope="module")
def runs(tmp_path_factory, data_dir):
    root = tmp_path_factory.mktemp("transfer-runs")
    for name, seed, eps in (("r0", "0", "0.1"), ("r1", "1", "0.1"), ("r2", "2", "0.2")):
        args = ["train", *TRAIN, "--data-dir", str(data_dir), "--seed", seed, "--eps", eps, "--out", str(root / name)]
        assert main(args) == 0
    shutil.copytree(root / "r1", root / "mnist")
    meta_path = root / "mnist" / "model.json"
    meta = json.loads(meta_path.read_text())
    meta["dataset"] = meta["config"]["data"]["dataset"] = "mnist"
    meta_path.write_text(json.dumps(meta))
    return root


def test_cli_writes_matrix_and_resumes(runs, tmp_path, monkeypatch, capsys):
    out = tmp_path / "study"
    args = ["transfer", str(runs / "r0"), str(runs / "r1"), "--ensemble", f"ens={runs / 'r0'}+{runs / 'r1'}",
            "--n", "40", "--attack", "mi-fgsm:steps=3", "--seed", "4", "--out", str(out), "--json", "--quiet"]  # fmt: skip
    calls = _counting(monkeypatch, "mi-fgsm")
    assert main(args) == 0
    doc = json.loads(capsys.readouterr().out)
    assert calls["n"] > 0
    assert json.loads((out / "transfer.json").read_text()) == doc
    assert (out / "transfer.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    md = (out / "transfer.md").read_text()
    assert "(white-box)" in md and "(member)" in md and "95% Wilson" in md
    assert doc["sources"] == ["r0", "r1", "ens"] and doc["targets"] == ["r0", "r1"]
    assert doc["n"] == 40 and doc["eps"] == pytest.approx(0.1) and doc["attack"]["params"] == {"steps": 3}
    assert doc["ensembles"] == {"ens": [str(runs / "r0"), str(runs / "r1")]}
    for s in doc["sources"]:
        for t in doc["targets"]:
            assert doc["plain"][s][t]["value"] >= doc["robust"][s][t]["value"] and doc["robust"][s][t]["n"] == 40
    # the ensemble row is the one crafted on EnsembleLogits of the two runs
    r0, r1 = load_model(runs / "r0"), load_model(runs / "r1")
    x, y = _points(r0, 40)
    lib = transfer_matrix({"r0": r0, "r1": r1}, x, y, attack=parse_attacks("mi-fgsm:steps=3")[0], threat=THREAT,
                          seed=4, sources={"ens": EnsembleLogits([r0, r1])}).to_dict()  # fmt: skip
    assert lib["robust"] == doc["robust"] and lib["plain"] == doc["plain"]
    crafted = sorted((out / "crafted").glob("*.safetensors"))
    assert len(crafted) == 3
    stamps = [p.stat().st_mtime_ns for p in crafted]
    calls["n"] = 0
    assert main([*args[:-2], "--quiet"]) == 0
    assert calls["n"] == 0, "a rerun reuses the crafted examples"
    assert "reused from an earlier run" in capsys.readouterr().out
    assert [p.stat().st_mtime_ns for p in crafted] == stamps
    assert main([*args, "--no-resume"]) == 0
    assert calls["n"] > 0, "--no-resume crafts again"
    assert json.loads(capsys.readouterr().out)["robust"] == doc["robust"]


def _points(model, n):
    from logitpair.evaluation import test_points

    x, y, _ = test_points(model, n, None)
    return x, y


def test_evaluate_source_list_is_one_ensemble(runs, tmp_path):
    opts = EvalOptions(n=30, steps=3, restarts=1, suite=None, seed=1)
    ev = evaluate_run(runs / "r0", opts, source=f"{runs / 'r1'},{runs / 'r2'}", write=False)
    assert ev["black_box"]["ensemble"] == [str(runs / "r1"), str(runs / "r2")]
    target, ens = load_model(runs / "r0"), EnsembleLogits([load_model(runs / "r1"), load_model(runs / "r2")])
    x, y = _points(target, 30)
    ref = run_protocol(target, x, y, [pgd_spec(3, 1, transfer=True)], source=ens, threat=THREAT, seed=1)
    assert ev["black_box"]["robust"] == ref.summary()["robust"]
    single = evaluate_run(runs / "r0", opts, source=str(runs / "r1"), write=False)
    assert "ensemble" not in single["black_box"] and single["black_box"]["source"] == str(runs / "r1")


def test_eps_option_overrides_differing_training_eps(runs, tmp_path, capsys):
    out = tmp_path / "o"
    args = ["transfer", str(runs / "r0"), str(runs / "r2"), "--n", "10", "--attack", "fgsm", "--out", str(out)]
    assert main([*args, "--eps", "0.05", "--json", "--quiet"]) == 0
    assert json.loads(capsys.readouterr().out)["threat"]["eps"] == pytest.approx(0.05)


@pytest.mark.parametrize(
    "extra, message",
    [
        (["{runs}/missing"], "no such run directory"),
        (["{runs}/mnist"], "different datasets (r0: fashion-mnist, r1: fashion-mnist, mnist: mnist)"),
        (["{runs}/r2"], "trained for different eps (r0: 0.1, r1: 0.1, r2: 0.2); give the eps explicitly"),
        (["--attack", "cw:steps=3"], "unknown attack 'cw'; valid names: apgd-ce"),
        (["--attack", "pgd:stepz=3"], "attack 'pgd' has no option 'stepz'; its options: steps"),
        (["--attack", "pgd,fgsm"], "--attack: expected one attack, got 2"),
        (["--attack", "mi-fgsm:steps=0"], "steps must be >= 1"),
        (["--ensemble", "ens"], "--ensemble: expected NAME=RUN+RUN, got 'ens'"),
        (["--ensemble", "r0={runs}/r0"], "name 'r0' is also a run's name"),
        (["--n", "0"], "--n: expected >= 1"),
    ],
    ids=lambda v: v[0] if isinstance(v, list) else None,
)
def test_bad_input_one_clear_error_nothing_written(runs, tmp_path, capsys, extra, message):
    out = tmp_path / "never"
    extra = [e.format(runs=runs) for e in extra]
    more_runs = [e for e in extra if e.startswith(str(runs))]
    options = [e for e in extra if e not in more_runs]
    rc = main(["transfer", str(runs / "r0"), str(runs / "r1"), *more_runs, "--n", "5", "--out", str(out), "--quiet",
               *options])  # fmt: skip
    err = capsys.readouterr().err
    assert rc == 2 and message in err and err.count("\n") == 1, err
    assert not out.exists(), "nothing may be written for bad input"
