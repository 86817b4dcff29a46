"""The demo: train regular / M-PGD / ALP / CLP / LSQ on Fashion-MNIST and compare them honestly.

An independently seeded M-PGD model is the black-box source (the paper's protocol). Every
model is evaluated on the first ``n`` test points: clean, white-box PGD-40 with 2 restarts,
and transfer from the source. The demo directory is built next to ``out`` and swapped in
at the end, so an earlier demo stays intact until the new one is complete.
"""

from __future__ import annotations

import os
import shutil
import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from logitpair.attacks.common import predict
from logitpair.audit import AuditSettings, audit_run
from logitpair.checkpoint import load_model
from logitpair.config import RunConfig, make_config, merge
from logitpair.data import load_dataset
from logitpair.environment import environment
from logitpair.evaluation import AttackSpec, accuracy_vs_eps, pgd_spec, run_protocol
from logitpair.evaluation.run import EvalOptions, evaluate_run
from logitpair.io import replace_dir, write_json, write_text
from logitpair.metrics import summarize
from logitpair.progress import Logger, ProgressFactory, null_log, null_progress
from logitpair.report import markdown_table, pct_ci, plot_curves, plot_histograms, plot_image_grid
from logitpair.threat import Linf
from logitpair.training import train

EPS = 0.1
CURVE_EPS = [0.0, 0.05, 0.1, 0.15, 0.2, 0.3]
CURVE_POINTS = 300

# method -> (run name, config overrides); the last one is the black-box source
DEMO_RUNS: list[tuple[str, dict[str, Any]]] = [
    ("regular", {"method": "regular", "optim": {"epochs": 2}}),
    ("mpgd", {"method": "mpgd", "optim": {"epochs": 2}}),
    ("alp", {"method": "alp", "loss": {"lam": 0.5}, "optim": {"epochs": 2}}),
    ("clp", {"method": "clp", "loss": {"lam": 0.5}, "optim": {"epochs": 2}}),
    ("lsq", {"method": "lsq", "loss": {"lam": 0.05}, "optim": {"epochs": 2}}),
    ("mpgd-source", {"method": "mpgd", "seed": 1, "optim": {"epochs": 1}}),
]
SOURCE = "mpgd-source"

# the quick audit with shorter series, sized to fit the demo's time budget
DEMO_AUDIT = AuditSettings(
    suite="quick",
    eps_factors=(0.5, 1.0, 2.0, 3.0),
    sweep_steps=10,
    steps_series=(5, 10, 20, 50),
    restarts_series=(1, 2, 4),
    restarts_steps=10,
    noise_samples=10,
    surface_points=2,
    surface_grid=11,
)


@dataclass(frozen=True)
class DemoOptions:
    out: Path = Path("runs/demo")
    n: int = 1000
    data_dir: str | None = None
    scale: float = 1.0  # fraction of the training set used per epoch (tests use a tiny one)
    seed: int = 0
    val_size: int = 5000
    epochs: int | None = None  # override every run's epochs (tests)
    attacks: tuple[AttackSpec, ...] = ()  # replaces the quick suite (tests use a tiny one)
    audit_points: int = 100
    audit: AuditSettings | None = None  # default DEMO_AUDIT


def demo_configs(opts: DemoOptions) -> dict[str, RunConfig]:
    base: dict[str, Any] = {"model": "lenet5", "loss": {"eps": EPS}, "val_points": 500}
    base["data"] = {"data_dir": opts.data_dir, "val_size": opts.val_size}
    out = {}
    for name, over in DEMO_RUNS:
        cfg = make_config(overrides=merge(base, over))
        if opts.epochs is not None:
            cfg = replace(cfg, optim=replace(cfg.optim, epochs=opts.epochs))
        out[name] = replace(cfg, seed=cfg.seed + opts.seed)
    return out


def run_demo(opts: DemoOptions, *, progress: ProgressFactory = null_progress, log: Logger = null_log) -> dict[str, Any]:
    out = Path(opts.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.tmp-{os.getpid()}")
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir()
    try:
        results = _run(opts, tmp, out, progress, log)
        replace_dir(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return results


def _subsample(splits, scale: float):
    if scale >= 1.0:
        return splits
    k = max(int(len(splits.train) * scale), 64)
    return replace(splits, train=splits.train.subset(slice(0, k)))


def _run(opts: DemoOptions, tmp: Path, final: Path, progress: ProgressFactory, log: Logger) -> dict[str, Any]:
    t_start = time.perf_counter()
    cfgs = demo_configs(opts)
    splits = load_dataset("fashion-mnist", opts.data_dir, opts.val_size, 0)
    train_splits = _subsample(splits, opts.scale)
    train_seconds: dict[str, float] = {}
    for name, cfg in cfgs.items():
        log(f"[demo] training {name} ({cfg.method}, {cfg.optim.epochs} epochs)")
        res = train(cfg, tmp / name, splits=train_splits, progress=progress, log=log)
        train_seconds[name] = res.train_seconds

    n = min(opts.n, len(splits.test))
    x, y = splits.test.x[:n], splits.test.y[:n]
    # black box: PGD-40 x2 examples crafted once on the source, then shown to every model
    log(f"[demo] crafting transfer examples on {SOURCE}")
    source = load_model(tmp / SOURCE)
    x_transfer = run_protocol(
        source, x, y, [pgd_spec(40, 2)], threat=Linf(EPS), seed=opts.seed + 99, keep_adversarial=True,
        progress=progress, desc="transfer",
    ).adversarial  # fmt: skip
    eval_opts = EvalOptions(n=n, eps=EPS, data_dir=opts.data_dir, suite="quick", attacks=opts.attacks, seed=opts.seed)
    rows, curves, grids, norms = [], {}, {}, {}
    methods = [name for name in cfgs if name != SOURCE]
    for name in methods:
        log(f"[demo] evaluating {name}: clean, PGD-40, quick suite, transfer")
        ev = evaluate_run(tmp / name, eval_opts, progress=progress)
        model = load_model(tmp / name)
        clean_ok = predict(model, x).argmax(1) == y
        black = clean_ok & (predict(model, x_transfer).argmax(1) == y)
        ev["black_box"] = {
            **summarize(black),
            "source": str(final / SOURCE),
            "attack": "PGD-40x2 on the source",
        }
        curves[name] = accuracy_vs_eps(
            model, x[:CURVE_POINTS], y[:CURVE_POINTS], CURVE_EPS, steps=20, progress=progress
        )
        grid = run_protocol(model, x[:8], y[:8], [pgd_spec(40, 1)], threat=Linf(EPS), keep_adversarial=True)
        grids[name] = (x[:8], grid.adversarial)
        norms[name] = predict(model, x).norm(dim=1)
        log(f"[demo] quick gradient-masking audit of {name}")
        aud = audit_run(
            tmp / name, source=tmp / SOURCE, n=min(n, opts.audit_points), data_dir=opts.data_dir, eps=EPS,
            settings=opts.audit or DEMO_AUDIT, progress=progress,
        )  # fmt: skip
        rows.append(
            {
                "method": name,
                "clean": ev["clean"]["value"],
                "white_box": ev["pgd"]["value"],
                "strong": ev["white_box"]["robust"]["value"],
                "black_box": ev["black_box"]["value"],
                "n": n,
                "clean_ci95": ev["clean"]["ci95"],
                "white_box_ci95": ev["pgd"]["ci95"],
                "strong_ci95": ev["white_box"]["robust"]["ci95"],
                "black_box_ci95": ev["black_box"]["ci95"],
                "train_seconds": round(train_seconds[name], 2),
                "median_logit_norm": float(norms[name].median()),
                "epochs": cfgs[name].optim.epochs,
                "run_dir": str(final / name),
                "audit": aud["verdict"],
                "audit_failed": [c["name"] for c in aud["checks"] if c["passed"] is False],
                "audit_reasons": aud.get("reasons", []),
                "evaluation": ev,
            }
        )

    plot_curves(
        tmp / "accuracy_vs_eps.png",
        curves,
        "eps",
        "L∞ ε",
        f"PGD-20 accuracy vs ε (first {min(CURVE_POINTS, n)} test points)",
    )
    plot_image_grid(tmp / "adversarial_examples.png", grids, EPS)
    plot_histograms(tmp / "logit_norms.png", norms, "‖logits‖₂ on clean test points", "Logit norms per method")
    results = {
        "dataset": "fashion-mnist",
        "eps": EPS,
        "n": n,
        "white_box_attack": "PGD-40, step 2.5*eps/40, 2 random restarts, per-example worst case",
        "strong_attack": "worst case of PGD-40x2 and the quick suite (APGD-CE 100, APGD-T 3 targets, Square 1000)",
        "black_box_attack": f"PGD-40 x2 crafted on the independently seeded M-PGD model ({SOURCE})",
        "source_train_seconds": round(train_seconds[SOURCE], 2),
        "rows": rows,
        "curves": curves,
        "environment": environment(),
        "seconds": round(time.perf_counter() - t_start, 1),
        "command": "logitpair demo",
    }
    write_json(tmp / "results.json", results)
    write_text(tmp / "report.md", demo_markdown(results, cfgs))
    return results


def demo_markdown(results: dict[str, Any], cfgs: dict[str, RunConfig]) -> str:
    rows = []
    for r in results["rows"]:
        ev = r["evaluation"]
        rows.append(
            [
                r["method"],
                pct_ci(ev["pgd"]),
                pct_ci(ev["white_box"]["robust"]),
                pct_ci(ev["black_box"]),
                pct_ci(ev["clean"]),
                f"{r['train_seconds']:.0f}",
                f"{r['median_logit_norm']:.1f}",
                r["audit"] + (" (" + ", ".join(r["audit_failed"]) + ")" if r["audit_failed"] else ""),
            ]
        )
    text = "# logitpair demo: logit pairing on Fashion-MNIST\n\n"
    text += (
        f"L∞ ε = {results['eps']}, first {results['n']} test points, accuracy in % with 95% Wilson intervals. "
        f"White box (what the paper reports): {results['white_box_attack']}. "
        f"Strong: {results['strong_attack']}. Black box: {results['black_box_attack']}. "
        "A point is robust only if it is correct clean and under attack.\n\n"
    )
    text += markdown_table(
        ["method", "White box: PGD-40 (paper)", "White box: worst case of strong suite", "Black box", "Clean",
         "train s", "median ‖logits‖", "audit (quick)"],
        rows,
    )  # fmt: skip
    text += "\nTraining settings (model lenet5, Adam, cosine schedule, batch 128):\n\n"
    for name, cfg in cfgs.items():
        extra = ""
        if cfg.method in ("mpgd", "alp"):
            extra = f", PGD-{cfg.loss.attack_steps} step {cfg.loss.attack_step_size}"
        if cfg.method in ("alp", "clp", "lsq"):
            extra += f", λ {cfg.loss.lam}"
        if cfg.method in ("clp", "lsq"):
            extra += f", noise σ {cfg.loss.noise_std}"
        text += f"- `{name}`: {cfg.method}, {cfg.optim.epochs} epochs, seed {cfg.seed}{extra}\n"
    text += "\n## Accuracy vs ε\n\n![accuracy vs eps](accuracy_vs_eps.png)\n"
    text += "\n## Clean, adversarial and perturbation images (PGD-40)\n\n![examples](adversarial_examples.png)\n"
    text += "\n## Logit norms\n\n![logit norms](logit_norms.png)\n"
    text += "\nCLP and LSQ shrink logits; small logits can make gradient attacks with few steps fail without "
    text += "real robustness (Mosbach et al. 2018), so compare the curves and run `logitpair audit`.\n"
    text += f"\nReproduce: `{results['command']}` ({results['seconds']:.0f} s on {results['environment']['machine']}, "
    text += f"{results['environment']['threads']} threads, torch {results['environment']['torch']}).\n"
    return text
