"""The demo pipeline end to end on tiny generated data (the real demo runs in README command 1)."""

from __future__ import annotations

import json

from logitpair.audit import AuditSettings
from logitpair.evaluation import AttackSpec
from logitpair.experiments.demo import DemoOptions, run_demo


def test_demo_writes_results_and_replaces_atomically(tmp_path, data_dir):
    out = tmp_path / "runs" / "demo"
    tiny_suite = (AttackSpec("apgd-ce", {"steps": 10}), AttackSpec("square", {"queries": 50}))
    tiny_audit = AuditSettings(
        suite=tiny_suite, eps_factors=(1.0, 2.0), sweep_steps=3, steps_series=(3, 6), restarts_series=(1, 2),
        restarts_steps=3, noise_samples=2, surface_points=1, surface_grid=5,
    )  # fmt: skip
    opts = DemoOptions(out=out, n=40, data_dir=str(data_dir), scale=0.35, val_size=100, epochs=1, attacks=tiny_suite,
                       audit_points=20, audit=tiny_audit)  # fmt: skip
    run_demo(opts)
    results = json.loads((out / "results.json").read_text())
    rows = {r["method"]: r for r in results["rows"]}
    assert set(rows) == {"regular", "mpgd", "alp", "clp", "lsq"}
    for r in rows.values():
        for key in ("clean", "white_box", "strong", "black_box"):
            assert 0.0 <= r[key] <= 1.0
        assert r["strong"] <= r["white_box"] <= r["clean"] and r["black_box"] <= r["clean"]
        assert r["n"] == 40 and r["train_seconds"] > 0
        assert r["audit"] in ("pass", "suspect") and (r["audit"] == "suspect") == bool(r["audit_failed"])
        assert (out / r["method"] / "audit.json").is_file()
        assert (out / r["method"] / "model.safetensors").is_file() and r["run_dir"] == str(out / r["method"])
    for name in ("report.md", "accuracy_vs_eps.png", "adversarial_examples.png", "logit_norms.png"):
        assert (out / name).stat().st_size > 0, name
    report = (out / "report.md").read_text()
    assert (
        "| method | White box: PGD-40×2 baseline (ours) | White box: worst case of strong suite | Black box | Clean |"
        in report
    )
    assert "(paper)" not in report and "what the paper reports" not in report
    assert (
        "The PGD-40x2 baseline is ours, not the paper's attack: 40 steps of 2.5·ε/40 from 2 random restarts" in report
    )
    assert results["white_box_attack"].startswith("PGD-40x2 baseline (ours)")
    first = (out / "results.json").read_text()
    run_demo(opts)  # rerunning replaces the old demo
    assert (out / "results.json").is_file() and (out / "results.json").read_text() != "" and first
    assert [p.name for p in out.parent.iterdir()] == ["demo"], "no temporary directories left behind"


def test_all_methods_configs_and_dependency_order():
    from logitpair.experiments.demo import HELPERS, STATIC_FOR_ENS, _Pool, demo_configs
    from logitpair.methods import METHODS

    cfgs = demo_configs(DemoOptions(methods="all"))
    trained = {c.method for c in cfgs.values()}
    assert trained == set(METHODS.names()), "--methods all trains every registered method"
    assert set(HELPERS) <= set(cfgs) and set(STATIC_FOR_ENS) <= set(cfgs)
    order: list[str] = []
    jobs = {
        "a": (1.0, (), order.append, ("a",)),
        "b": (5.0, ("a",), order.append, ("b",)),
        "c": (3.0, (), order.append, ("c",)),
    }
    _Pool(1).run(jobs, lambda _: None)
    assert order == ["c", "a", "b"], "longest ready job first, dependencies respected"
