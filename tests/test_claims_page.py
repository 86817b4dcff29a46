"""The claims page (logitpair.experiments.claims, claims_page, ``logitpair claims``): every claim
declared against a registered preset, its evidence read from results.json files built the way
``reproduce`` builds them (and from one real smoke run), the verdicts end to end, and a page on
which every claim has a section and a verdict and no figure appears that is not in the inputs."""

from __future__ import annotations

import dataclasses
import json
import math
import re
from typing import Any

import numpy as np
import pytest
import torch

from logitpair.cli.main import main
from logitpair.environment import environment
from logitpair.errors import ConfigError
from logitpair.experiments.claims import CLAIMS, DELTA, K_SUPERIORITY, Claim, gather, gather_all, load_results
from logitpair.experiments.claims_page import claims_markdown, wall_seconds
from logitpair.experiments.presets import PRESETS
from logitpair.experiments.stats import FAILS, HOLDS, NOT_SEPARABLE, mcnemar, spread
from logitpair.metrics import summarize

OUTCOMES = (HOLDS, FAILS, NOT_SEPARABLE)


# --------------------------------------------------------------------------- results.json as reproduce writes it
def fake_results(preset_name: str, k: int, rates: dict[str, dict[str, float]] | None = None, *, n: int = 400,
                 seconds: dict[str, float] | None = None, scale: str = "small", dataset: str = "fashion-mnist",
                 seed: int = 0, jitter: float = 0.01) -> dict[str, Any]:  # fmt: skip
    """``results.json`` of ``reproduce`` for ``preset_name`` with ``k`` seeds on ``n`` points:
    per-example flags drawn at ``rates[row][metric]`` (default 0.5; a point's flags share a
    uniform across rows, as real models agree on easy points; each seed's rate moves by a normal
    ``jitter``), summarised and compared with the
    library's own ``summarize`` / ``mcnemar`` / ``spread``, as ``reproduce._assemble`` does."""
    preset, rates, seconds = PRESETS.get(preset_name), rates or {}, seconds or {}
    rng = np.random.default_rng(seed)
    flags: list[dict[str, dict[str, torch.Tensor]]] = []
    for s in range(k):
        shared: dict[str, np.ndarray] = {}
        per_row = {}
        for r in preset.table_rows:
            per_row[r.name] = {}
            for m in preset.metrics(r):
                u = shared.setdefault(m.key, rng.random(n))
                mixed = 0.8 * u + 0.2 * rng.random(n)
                rate = rates.get(r.name, {}).get(m.key, 0.5) + rng.normal(0, jitter)
                per_row[r.name][m.key] = torch.from_numpy(mixed < rate)
        flags.append(per_row)
    rows = []
    for r in preset.table_rows:
        seeds = [{key: summarize(v) for key, v in f[r.name].items()} for f in flags]
        rows.append({"name": r.name, "label": r.label, "method": r.method, "paper": dict(r.paper), "ours": seeds[0],
                     "seeds": seeds, "spread": {key: spread([s[key]["value"] for s in seeds]) for key in seeds[0]},
                     "audit": [], "train_seconds": [seconds.get(r.name, 10.0) + 0.5 * i for i in range(k)],
                     "passes": [_fake_passes(r.method, 100 + i) for i in range(k)],
                     "run_dirs": [], "ours_settings": list(r.ours)})  # fmt: skip
    comparisons = [{"row_a": c.a, "row_b": c.b, "metric_a": c.metric_a, "metric_b": c.other_metric,
                    **mcnemar(f[c.a][c.metric_a], f[c.b][c.other_metric]), "seed": i}
                   for i, f in enumerate(flags) for c in preset.compare]  # fmt: skip
    others = [{"name": r.name, "label": r.label, "method": r.method, "role": r.role, "ours_settings": [],
               "train_seconds": [1.0] * k, "run_dirs": []} for r in preset.rows if r.role != "row"]  # fmt: skip
    return {
        "preset": preset.name, "table": preset.table, "title": preset.title, "protocol": preset.protocol,
        "scale": scale, "dataset": dataset, "paper_dataset": preset.dataset, "eps": 0.1, "n": n, "seeds": k,
        "evaluation_seed": 0, "device": "cpu", "columns": [{"key": c.key, "label": c.label} for c in preset.columns],
        "attacks": {"paper": {"label": "PGD"}, "paper_given": True, "long": None, "suite_name": "fast", "suite": [],
                    "targeted_suite": None},
        "audit_settings": {}, "rows": rows, "other_models": others, "comparisons": comparisons, "settings": [],
        "substitutions": [], "notes": [], "transfer": None, "environment": environment(), "seconds": 123.0,
        "invocations": [{"command": "c", "seeds": k, "seconds": 123.0, "commit": None, "finished": None}],
        "command": f"logitpair reproduce {preset.name} --scale {scale} --seeds {k}",
    }  # fmt: skip


def as_loaded(res: dict[str, Any], path: str = "runs/x") -> dict[str, Any]:
    return {**res, "_path": path}


def claim(key: str) -> Claim:
    return next(c for c in CLAIMS if c.key == key)


# --------------------------------------------------------------------------- the declarations
def test_claims_cover_the_issue_and_read_the_presets():
    kinds = {c.key: c.kind for c in CLAIMS}
    for table in ("table1", "table2"):
        for side in ("wb", "bb"):
            assert kinds[f"{table}-alp-mpgd-{side}"] == "superiority"
            assert claim(f"{table}-alp-mpgd-{side}").k_min == K_SUPERIORITY == 5
    assert kinds["alp-vs-vat"] == "superiority"
    for key in ("table7-lsq-mpgd-wb", "table7-lsq-mpgd-bb", "table8-clp-mpgd-wb", "table8-clp-mpgd-bb"):
        c = claim(key)
        assert c.kind == "noninferiority" and c.delta == DELTA == 0.05 and c.max_cost == 0.5 and c.k_min == 3
    for key in ("table9-ls-bound", "table9-mixup-bound"):
        assert claim(key).kind == "bound" and claim(key).bound == 0.10
    t = claim("transfer-alp-ens-adv")
    assert t.direction == -1 and t.kind == "superiority"
    # the paper's figures are the presets' (none typed in the declarations)
    assert sorted(v for _, _, v in t.paper()) == [47.1, 66.6]
    assert ("ALP", "White box: the paper's attack", 96.4) in claim("table1-alp-mpgd-wb").paper()
    for c in CLAIMS:
        for label, _, value in c.paper():
            assert value is None or value in {v for r in c.table.rows for v in r.paper.values()}, (c.key, label)
        assert c.strong or c.no_strong


def test_a_claim_must_be_a_comparison_its_preset_records():
    with pytest.raises(ConfigError, match="not a comparison of table1"):
        dataclasses.replace(claim("table1-alp-mpgd-wb"), metric="clean")
    with pytest.raises(ConfigError, match="strong worst case"):
        dataclasses.replace(claim("table1-alp-mpgd-wb"), no_strong="also")
    with pytest.raises(ConfigError, match="k_min must be >= 2"):
        dataclasses.replace(claim("table1-alp-mpgd-wb"), k_min=1)
    with pytest.raises(ConfigError, match="kind"):
        dataclasses.replace(claim("table1-alp-mpgd-wb"), kind="bigger")


# --------------------------------------------------------------------------- verdicts end to end
def _t1(k: int, alp: float, mpgd: float, **kw: Any) -> dict[str, Any]:
    rates = {"alp": {"white_box": alp, "strong": alp - 0.05, "black_box": alp},
             "mpgd": {"white_box": mpgd, "strong": mpgd - 0.05, "black_box": mpgd}}  # fmt: skip
    return {"table1": as_loaded(fake_results("table1", k, rates, **kw))}


def test_superiority_verdicts_from_results():
    assert gather(claim("table1-alp-mpgd-wb"), _t1(5, 0.60, 0.45)).verdict.outcome == HOLDS
    assert gather(claim("table1-alp-mpgd-bb"), _t1(5, 0.60, 0.45)).verdict.outcome == HOLDS
    assert gather(claim("table1-alp-mpgd-wb"), _t1(5, 0.40, 0.55)).verdict.outcome == FAILS
    noise = gather(claim("table1-alp-mpgd-wb"), _t1(5, 0.50, 0.50, seed=3)).verdict
    assert noise.outcome == NOT_SEPARABLE and "neither" in noise.reason
    few = gather(claim("table1-alp-mpgd-wb"), _t1(3, 0.60, 0.45)).verdict
    assert few.outcome == NOT_SEPARABLE and "K = 3 seeds < 5" in few.reason


def test_table2_at_small_scale_is_not_separate_evidence():
    res = {"table2": as_loaded(fake_results("table2", 5, {"alp": {"white_box": 0.6, "strong": 0.6}}))}
    v = gather(claim("table2-alp-mpgd-wb"), res).verdict
    assert v.outcome == NOT_SEPARABLE and "not separate evidence" in v.reason and "Table 1" in v.reason
    full = {"table2": as_loaded(fake_results("table2", 5, {"alp": {"white_box": 0.6, "strong": 0.6}}, scale="full",
                                             dataset="svhn"))}  # fmt: skip
    assert gather(claim("table2-alp-mpgd-wb"), full).verdict.outcome == HOLDS


def test_noninferiority_needs_the_margin_and_the_cost():
    close = {"lsq": {"white_box": 0.50, "strong": 0.49}, "mpgd": {"white_box": 0.51, "strong": 0.50}}
    kw: dict[str, Any] = {"n": 4000, "jitter": 0.002}  # with K = 3 (t quantile 4.3) the seeds must agree closely
    cheap = {"table7": as_loaded(fake_results("table7", 3, close, seconds={"lsq": 10.0, "mpgd": 40.0}, **kw))}
    ev = gather(claim("table7-lsq-mpgd-wb"), cheap)
    assert ev.verdict.outcome == HOLDS and ev.cost_ratio == pytest.approx(10.5 / 40.5)
    costly = {"table7": as_loaded(fake_results("table7", 3, close, seconds={"lsq": 30.0, "mpgd": 40.0}, **kw))}
    assert gather(claim("table7-lsq-mpgd-wb"), costly).verdict.outcome == FAILS
    far = {"lsq": {"white_box": 0.30, "strong": 0.29}, "mpgd": {"white_box": 0.51, "strong": 0.50}}
    worse = {"table7": as_loaded(fake_results("table7", 3, far, seconds={"lsq": 10.0, "mpgd": 40.0}, **kw))}
    assert gather(claim("table7-lsq-mpgd-wb"), worse).verdict.outcome == FAILS
    noisy = {"table7": as_loaded(fake_results("table7", 3, close, seconds={"lsq": 10.0, "mpgd": 40.0}))}
    assert gather(claim("table7-lsq-mpgd-wb"), noisy).verdict.outcome == NOT_SEPARABLE


def test_bound_and_transfer_verdicts():
    little = {"ls": {"wb_top1": 0.03, "worst_top1": 0.01}, "mixup": {"wb_top1": 0.35, "worst_top1": 0.30}}
    res = {"table9": as_loaded(fake_results("table9", 3, little)),
           "transfer-vs-ensemble": as_loaded(fake_results("transfer-vs-ensemble", 3, {
               "ens-adv": {"from_alp": 0.40, "from_undefended": 0.60}}))}  # fmt: skip
    assert gather(claim("table9-ls-bound"), res).verdict.outcome == HOLDS
    assert gather(claim("table9-mixup-bound"), res).verdict.outcome == FAILS
    assert gather(claim("transfer-alp-ens-adv"), res).verdict.outcome == HOLDS


def test_missing_strong_measure_is_not_separable():
    res = _t1(5, 0.60, 0.45)
    res["table1"]["comparisons"] = [c for c in res["table1"]["comparisons"] if c["metric_a"] != "strong"]
    v = gather(claim("table1-alp-mpgd-wb"), res).verdict
    assert v.outcome == NOT_SEPARABLE and "the strong worst case not measured" in v.reason


# --------------------------------------------------------------------------- the page
def _sections(page: str) -> list[str]:
    return re.split(r'\n<a id="claim-\d+"></a>\n\n', page)[1:]


NUMBER = re.compile(r"(?<![\w.])[-+]?\d+\.\d+(?:e[-+]\d+)?")


def _interval_figures(values: list[float], fmt: str) -> set[str]:
    """The mean of ``values`` and its 95% t-interval (SciPy), x100, in format ``fmt``."""
    st = pytest.importorskip("scipy.stats")
    m = float(np.mean(values))
    if len(values) < 2:
        return {fmt.format(100 * m)}
    lo, hi = st.t.interval(0.95, len(values) - 1, loc=m, scale=st.sem(values))
    return {fmt.format(100 * m), fmt.format(100 * lo), fmt.format(100 * hi)}


def _fake_passes(method: str, steps: int) -> dict[str, Any]:
    """``run_passes``'s record: PGD-7 training 9 + 9 passes per image, the others 1 + 1."""
    per = 9.0 if method in ("mpgd", "alp") else 1.0
    step = {"forward": per, "backward": per, "static_forward": 0.0, "static_backward": 0.0}
    return {"per_image_first_step": step, "per_image_last_step": step, "steps": steps, "batch_size": 128,
            "total": {k: round(v * steps * 128) for k, v in step.items()}}  # fmt: skip


def _pair_figures(cs: list[dict[str, Any]]) -> set[str]:
    """Per seed A %, B % and the exact p-values; over seeds the mean difference, its interval, the
    pooled exact test and the Mantel-Haenszel chi-square (SciPy)."""
    st = pytest.importorskip("scipy.stats")
    out = {f"{100 * x[k]:.1f}" for x in cs for k in ("a", "b")}
    tests = [(x["a_only"], x["b_only"]) for x in cs] + [(sum(x["a_only"] for x in cs), sum(x["b_only"] for x in cs))]
    for b, c in tests:
        for alt in ("two-sided", "greater", "less"):
            out.add(f"{st.binomtest(b, b + c, 0.5, alternative=alt).pvalue:.3g}" if b + c else "1")
    big_b, big_c = tests[-1]
    chi2 = (big_b - big_c) ** 2 / (big_b + big_c)
    out |= {f"{chi2:.3g}", f"{st.chi2.sf(chi2, 1):.3g}"}
    return out | _interval_figures([x["a"] - x["b"] for x in cs], "{:+.2f}")


def _allowed(res: dict[str, Any], c: Claim) -> set[str]:
    """Every figure the page may print for claim ``c`` from ``res``, computed here independently,
    in the page's formats."""
    out = {f"{v:.1f}" for _, _, v in c.paper() if v is not None}
    out |= {f"{c.max_cost:g}", f"{100 * c.bound:g}", f"{100 * c.delta:g}"}  # the claim's declared limits
    rows = {r["name"]: r for r in res["rows"]}
    for name, metrics in c.row_metrics().items():
        for m in metrics:
            values = [s[m]["value"] for s in rows[name]["seeds"]]
            out |= {f"{100 * v:.1f}" for v in values} | _interval_figures(values, "{:.1f}")
            out |= _interval_figures(values, "{:.2f}")  # a bound's verdict line gives its interval to 0.01%
    for ma, mb in c.pairs.values():
        cs = [x for x in res["comparisons"] if (x["row_a"], x["row_b"], x["metric_a"], x["metric_b"]) ==
              (c.a, c.b, ma, mb)]  # fmt: skip
        out |= _pair_figures(cs) if cs else set()
    for name in c.rows:
        secs = rows[name]["train_seconds"]
        out |= {f"{s:.1f}" for s in secs} | {f"{np.mean(secs):.1f}"}
        totals = [p["total"]["forward"] + p["total"]["backward"] for p in rows[name]["passes"]]
        out |= {f"{t / 1e6:.2f}" for t in totals}
        out |= {f"{p['per_image_last_step'][k]:g}" for p in rows[name]["passes"] for k in ("forward", "backward")}
    if c.kind == "noninferiority":
        out.add(f"{np.mean(rows[c.a]['train_seconds']) / np.mean(rows[c.b]['train_seconds']):.2f}")
        passes = [np.mean([p["total"]["forward"] + p["total"]["backward"] for p in rows[r]["passes"]]) for r in c.rows]
        out.add(f"{passes[0] / passes[1]:.2f}")
    return out


def test_page_every_claim_has_a_section_and_a_verdict_and_only_input_figures(tmp_path, capsys):
    results = {"table1": fake_results("table1", 5, {"alp": {"white_box": 0.6, "strong": 0.55}}),
               "table7": fake_results("table7", 3, seconds={"lsq": 4.0, "mpgd": 20.0}),
               "table9": fake_results("table9", 3, {"ls": {"wb_top1": 0.02, "worst_top1": 0.01}})}  # fmt: skip
    for name, res in results.items():  # reproduce output folders, as `logitpair claims` reads them
        (tmp_path / "runs" / name).mkdir(parents=True)
        (tmp_path / "runs" / name / "results.json").write_text(json.dumps(res))
    out = tmp_path / "CLAIMS.md"
    assert main(["claims", str(tmp_path / "runs"), "--out", str(out)]) == 0
    assert "table1-alp-mpgd-wb: holds" in capsys.readouterr().err
    page = out.read_text()
    sections = _sections(page)
    assert len(sections) == len(CLAIMS)
    loaded = load_results([tmp_path / "runs"])
    for c, text in zip(CLAIMS, sections, strict=True):
        assert text.startswith(f"## {CLAIMS.index(c) + 1}. {c.title}\n")
        verdicts = re.findall(r"\*\*Verdict\*\*: \*\*(.+?)\*\*: ", text)
        assert len(verdicts) == 1 and verdicts[0] in OUTCOMES, c.key
        figures = set(NUMBER.findall(text))
        if c.preset in loaded:
            allowed = _allowed(loaded[c.preset], c)
            stray = {f for f in figures if f.lstrip("+") not in {a.lstrip("+") for a in allowed}}
            assert not stray, (c.key, sorted(stray))
        else:  # no runs: the paper's figures and the command that produces ours, nothing else
            assert "**No results**" in text and f"logitpair reproduce {c.preset} --scale small" in text
            declared = {f"{c.max_cost:g}", f"{100 * c.bound:g}", f"{100 * c.delta:g}"}
            assert figures <= {f"{v:.1f}" for _, _, v in c.paper() if v is not None} | declared, c.key
    assert page.count("| **holds**") + page.count("| **does not hold**") + page.count("| **not separable**") == len(
        CLAIMS
    )
    assert "Generated by `logitpair claims " in page and "not recorded" in page  # no commit in results.json
    lsq = next(t for c, t in zip(CLAIMS, sections, strict=True) if c.preset == "table7")
    assert "| 1 + 1 |" in lsq and "| 9 + 9 |" in lsq  # passes per training image: LSQ's clean step, PGD-7's
    assert "Model passes A / B: 0.11" in lsq  # (1 + 1) / (9 + 9) per image, the same steps
    assert main(["claims", str(tmp_path / "runs" / "table1")]) == 0
    assert capsys.readouterr().out.startswith("# The paper's claims, tested")


def test_two_results_of_one_preset_are_refused(tmp_path):
    for name in ("a", "b"):
        (tmp_path / name).mkdir()
        (tmp_path / name / "results.json").write_text(json.dumps(fake_results("table1", 1, n=10)))
    with pytest.raises(ConfigError, match="two results for preset table1"):
        load_results([tmp_path])
    with pytest.raises(ConfigError, match="no results.json"):
        load_results([tmp_path / "a" / "nothing"])


def test_a_real_smoke_run_renders(tmp_path, data_dir):
    """One smoke ``reproduce`` (2 seeds): the claims read its results.json, and the schema the fake
    results above follow is the one reproduce writes."""
    out = tmp_path / "t1"
    argv = ["reproduce", "table1", "--scale", "smoke", "--seeds", "2", "--data-dir", str(data_dir), "--out", str(out),
            "--quiet"]  # fmt: skip
    assert main(argv) == 0
    real = json.loads((out / "results.json").read_text())
    fake = fake_results("table1", 2, n=4)
    assert set(fake) == set(real)
    assert set(fake["rows"][0]) == set(real["rows"][0]) and set(fake["comparisons"][0]) == set(real["comparisons"][0])
    assert set(fake["rows"][0]["seeds"][0]) == set(real["rows"][0]["seeds"][0])
    evidence = gather_all(load_results([out]))
    page = claims_markdown(evidence, command="logitpair claims t1", commit="abc")
    assert "Smoke-scale inputs (table1)" in page and "at commit `abc`" in page
    t1 = evidence[0]
    assert t1.claim.key == "table1-alp-mpgd-wb" and t1.results is not None
    assert [m.interval["k"] for m in t1.measures] == [2, 2]
    assert t1.verdict.outcome == NOT_SEPARABLE and "K = 2 seeds < 5" in t1.verdict.reason
    pooled = t1.measures[0].pooled
    assert pooled is not None and pooled["a_only"] == sum(
        c["a_only"] for c in real["comparisons"] if c["metric_a"] == "white_box"
    )
    assert not math.isnan(t1.measures[0].interval["mean"])


def test_wall_seconds_sum_the_calls_that_grew_the_seeds():
    assert wall_seconds({"seconds": 7.0}) == "7"  # results of a version without the record
    assert wall_seconds({"seconds": 50.4, "invocations": [{"seconds": 50.4}]}) == "50"
    assert wall_seconds({"seconds": 50.4, "invocations": [{"seconds": 100.2}, {"seconds": 50.4}]}) == "151 (100 + 50)"
