"""Each method owns its settings: per-method ``loss`` sections, old names, the migration of
version-1 configs and the cost class in the registry (the generated flags: test_flags.py)."""

from __future__ import annotations

import dataclasses
import importlib.util
import json
import sys
from pathlib import Path
from typing import Any

import pytest
import torch
from torch import Tensor, nn

from logitpair.config import V1_IGNORED, RunConfig, build, loss_for, make_config, migrate, to_dict
from logitpair.errors import ConfigError
from logitpair.methods import METHODS, BatchContext, LossSettings, StepCost
from logitpair.settings import alias_map
from logitpair.training.rundir import prepare_run_dir

ROOT = Path(__file__).resolve().parents[1]
V1 = json.loads((ROOT / "tests" / "data" / "config_v1.json").read_text())  # saved by the v1 code, 7a836c8
# field -> the v1 key it was read from, where the name changed (v1's ls read `smoothing`)
V1_NAMES = {"ls": {"label_smoothing": "smoothing"}, "mixup": {"alpha": "mixup_alpha"}}


# --------------------------------------------------------------------------- version-1 configs
@pytest.mark.parametrize("name", sorted(V1))
def test_v1_config_loads_with_the_same_settings(name):
    """Every setting the v1 method read has the value v1 saved; the other sections are unchanged."""
    old = V1[name]
    cfg = build(RunConfig, old)
    assert type(cfg.loss) is METHODS.settings(old["method"])
    renames = V1_NAMES.get(old["method"], {})
    for f in dataclasses.fields(cfg.loss):
        if f.name in V1_IGNORED.get(old["method"], ()):  # v1 ignored it: the default (regular's noise_std 0)
            assert getattr(cfg.loss, f.name) == f.default, f.name
            continue
        assert getattr(cfg.loss, f.name) == old["loss"][renames.get(f.name, f.name)], f.name
    new = to_dict(cfg)
    assert {k: v for k, v in new.items() if k != "loss"} == {k: v for k, v in old.items() if k != "loss"}
    assert migrate(old) == new, "a resumed v1 run compares equal to its migrated config"
    assert build(RunConfig, json.loads(json.dumps(new))) == cfg and migrate(new) == new


def test_v1_values_that_changed_name_or_were_ignored():
    assert build(RunConfig, V1["ls"]).loss.label_smoothing == 0.2, "v1's ls delta was `smoothing`"
    assert build(RunConfig, V1["ls-default"]).loss.label_smoothing == 0.1
    assert build(RunConfig, V1["mixup"]).loss.alpha == 0.2 and build(RunConfig, V1["mixup"]).loss.label_smoothing == 0.1
    assert build(RunConfig, V1["alp"]).loss.label_smoothing == 0.1, "alp read label_smoothing, not smoothing (0.1)"
    regular = build(RunConfig, V1["regular"]).loss
    assert regular == METHODS.settings("regular")(eps=0.3), "regular's v1 lam 0.9 (and noise_std 0.5) had no effect"
    assert regular.noise_std == 0.0
    assert build(RunConfig, V1["vat"]).loss.vat_xi == 1e-6
    assert build(RunConfig, V1["fgsm-rs"]).guard_points() == 10.0 and build(RunConfig, V1["mpgd"]).guard_points() == 20


def test_v1_config_file_and_run_dir(tmp_path):
    """``--config`` with a v1 config.json (also with another --method), and --resume of a v1 run."""
    path = tmp_path / "config.json"
    path.write_text(json.dumps(V1["alp"]))
    cfg = make_config(path)
    assert cfg == build(RunConfig, V1["alp"])
    clp = make_config(path, {"method": "clp", "loss": {"noise_std": 0.2}})
    assert clp.loss.lam == 0.7 and clp.loss.noise_std == 0.2 and clp.loss.distance == "kl"
    run = tmp_path / "run"
    run.mkdir()
    (run / "config.json").write_text(json.dumps(V1["alp"]))
    prepare_run_dir(run, cfg, resume=True, overwrite=False)  # no "config differs"
    with pytest.raises(ConfigError, match="config differs.*loss.lam: stored 0.7, now 0.5"):
        prepare_run_dir(run, make_config(path, {"loss": {"lam": 0.5}}), resume=True, overwrite=False)


# --------------------------------------------------------------------------- per-method loss sections
def test_loss_keys_depend_on_the_method():
    with pytest.raises(ConfigError, match=r"loss.beta \(a setting of trades\); valid keys for method 'alp'"):
        make_config(overrides={"method": "alp", "loss": {"beta": 1.0}})
    with pytest.raises(ConfigError, match=r"unknown config key loss.gamma; valid keys for method 'regular': ce_r"):
        make_config(overrides={"method": "regular", "loss": {"gamma": 1.0}})
    assert make_config(overrides={"method": "trades", "loss": {"beta": "1/2"}}).loss.beta == 0.5
    assert loss_for("regular", {"eps": 0.2, "lam": 1.0, "smoothing": 0.1}) == {"eps": 0.2, "smoothing": 0.1}


def test_run_config_needs_the_methods_settings_class():
    alp = METHODS.settings("alp")()
    assert RunConfig(method="alp", loss=alp).loss is alp
    with pytest.raises(ConfigError, match="loss: method 'trades' takes TRADESSettings, got ALPSettings"):
        RunConfig(method="trades", loss=alp)
    with pytest.raises(ConfigError, match="loss: method 'mpgd' takes MPGDSettings, got ALPSettings"):
        dataclasses.replace(make_config(), method="mpgd")


@pytest.mark.parametrize("method", METHODS.names())
def test_smoothing_is_an_old_name_of_label_smoothing(method):
    """One knob: ``smoothing`` sets ``label_smoothing`` for every method; ``ls`` only changes the default."""
    cfg = make_config(overrides={"method": method, "loss": {"smoothing": 0.2}})
    assert cfg.loss.label_smoothing == 0.2 and "smoothing" not in to_dict(cfg)["loss"]
    assert make_config(overrides={"method": method, "loss": {"smoothing": 0.2, "label_smoothing": 0.2}}) == cfg
    with pytest.raises(ConfigError, match="smoothing is an old name of loss.label_smoothing"):
        make_config(overrides={"method": method, "loss": {"smoothing": 0.2, "label_smoothing": 0.1}})
    assert make_config(overrides={"method": method}).loss.label_smoothing == (0.1 if method == "ls" else 0.0)


def test_ls_is_regular_with_label_smoothing(tiny_data):
    x, y = tiny_data[0][:16], tiny_data[1][:16]
    model = nn.Sequential(nn.Flatten(), nn.Linear(784, 10))
    ls, _ = METHODS.get("ls")(model, x, y, METHODS.settings("ls")(), BatchContext())
    regular, _ = METHODS.get("regular")(model, x, y, LossSettings(label_smoothing=0.1), BatchContext())
    assert torch.equal(ls, regular)


def test_every_setting_has_help_and_a_default_and_inherits_its_checks():
    for cls in {METHODS.settings(m) for m in METHODS.names()}:
        for f in dataclasses.fields(cls):
            assert f.metadata.get("help") and f.default is not dataclasses.MISSING, (cls.__name__, f.name)
    with pytest.raises(ConfigError, match="eps: expected 0 <= eps <= 1, got 2"):
        METHODS.settings("alp")(eps=2.0)
    with pytest.raises(ConfigError, match="lam: expected >= 0"):
        METHODS.settings("lsq")(lam=-1.0)


def test_fgsm_rs_guard_follows_the_settings():
    assert make_config(overrides={"method": "fgsm-rs"}).guard_points() == 20.0
    assert make_config(overrides={"method": "mpgd", "loss": {"attack": "fgsm-rs"}}).guard_points() == 20.0
    assert make_config(overrides={"method": "alp"}).guard_points() == 0.0
    assert make_config(overrides={"method": "kurakin"}).guard_points() == 0.0


def _bench() -> Any:
    sys.path.insert(0, str(ROOT / "benchmarks"))
    try:
        spec = importlib.util.spec_from_file_location("bench_run_for_tests", ROOT / "benchmarks" / "run.py")
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
    finally:
        sys.path.remove(str(ROOT / "benchmarks"))
    return module


OLD_FLOORS = {  # benchmarks/run.py's hand-kept FLOORS of v1 (7a836c8): attack steps, attack rows / B, training rows / B
    "regular": (0, 0, 1), "ls": (0, 0, 1), "mixup": (0, 0, 1), "clp": (0, 0, 1), "lsq": (0, 0, 1), "mpgd": (7, 1, 2),
    "alp": (7, 1, 2), "trades": (7, 1, 2), "vat": (1, 1, 2), "fgsm-rs": (1, 1, 1), "kurakin": (1, 0.5, 1),
    "ens-adv": (1, 0.5, 1),
}  # fmt: skip


def _regular_like(model: nn.Module, x: Tensor, y: Tensor, cfg: LossSettings, ctx: BatchContext) -> tuple[Tensor, dict]:
    return METHODS.get("regular")(model, x, y, cfg, ctx)


def test_benchmark_floors_come_from_the_registry():
    bench = _bench()
    committed = json.loads((ROOT / "benchmarks" / "results" / "bench.json").read_text())["floors"]
    for method, (steps, rows, train_rows) in OLD_FLOORS.items():
        name, floor = bench.floor_for(method)
        assert name == committed[method]
        assert (floor["attack_steps"], floor["attack_frac"], floor["train_mult"]) == (steps, rows, train_rows)
    METHODS.register("toy", settings=LossSettings, cost=StepCost("toy step", 2, 0.5, 3))(_regular_like)
    try:
        assert bench.floor_for("toy") == ("toy step", {"attack_steps": 2, "attack_frac": 0.5, "train_mult": 3})
    finally:
        METHODS.unregister("toy")
    METHODS.register("toy", settings=LossSettings)(_regular_like)
    try:
        assert bench.floor_for("toy")[0] == "regular step (no method-specific floor)"
    finally:
        METHODS.unregister("toy")
    assert "toy" not in METHODS


def test_register_needs_a_settings_class():
    with pytest.raises(TypeError, match="settings must be a LossSettings subclass"):
        METHODS.register("bad", settings=dict)(_regular_like)  # type: ignore[arg-type]
    assert "bad" not in METHODS
    assert alias_map(METHODS.settings("mixup")) == {"smoothing": "label_smoothing", "mixup_alpha": "alpha"}
    assert alias_map(METHODS.settings("alp"))["train_attack"] == "attack"
