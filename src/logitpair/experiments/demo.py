"""The demo: train regular / M-PGD / ALP / CLP / LSQ on Fashion-MNIST and compare them honestly.

An independently seeded M-PGD model is the black-box source (the paper's protocol). Every
model is evaluated on the first ``n`` test points: clean, white-box PGD-40 with 2 restarts (our
baseline, not the paper's attack), the ``fast`` suite, and transfer from the source. The demo directory is built next to ``out`` and swapped in
at the end, so an earlier demo stays intact until the new one is complete.
"""

from __future__ import annotations

import multiprocessing
import os
import shutil
import time
from collections.abc import Sequence
from concurrent.futures import FIRST_COMPLETED, ProcessPoolExecutor, wait
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from torch import Tensor, nn

from logitpair.attacks.common import predict
from logitpair.audit import AuditSettings, audit_run
from logitpair.checkpoint import load_model
from logitpair.config import RunConfig, make_config, merge
from logitpair.data import load_dataset
from logitpair.environment import environment
from logitpair.errors import ConfigError
from logitpair.evaluation import AttackSpec, get_suite, pgd_spec, run_protocol
from logitpair.evaluation.blackbox import black_box
from logitpair.evaluation.run import EvalOptions, baseline_note, evaluate_run
from logitpair.io import replace_dir, write_json, write_text
from logitpair.metrics import summarize
from logitpair.progress import Logger, ProgressFactory, null_log, null_progress
from logitpair.report import grid_captions, markdown_table, pct_ci, plot_curves, plot_histograms, plot_image_grid
from logitpair.threat import Linf
from logitpair.training import train

EPS = 0.1
CURVE_EPS = [0.0, 0.05, 0.1, 0.15, 0.2, 0.3]
CURVE_POINTS = 300
CURVE_SUITE = "fast"
GRID_IMAGES = 8

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
# `--methods all`: the comparison methods, trained and evaluated the same way. ens-adv crafts
# on two static undefended models (regular and regular-b; Tramer et al. 2018), never on the
# black-box source, so its black-box column stays a real transfer.
EXTRA_RUNS: list[tuple[str, dict[str, Any]]] = [
    ("madry", {"method": "mpgd", "loss": {"adv_fraction": 1.0}, "optim": {"epochs": 2}}),
    ("alp-100", {"method": "alp", "loss": {"lam": 0.5, "adv_fraction": 1.0}, "optim": {"epochs": 2}}),
    ("alp-kl", {"method": "alp", "loss": {"lam": 0.5, "distance": "kl"}, "optim": {"epochs": 2}}),
    ("trades", {"method": "trades", "loss": {"beta": 1.0}, "optim": {"epochs": 2}}),
    ("fgsm-rs", {"method": "fgsm-rs", "optim": {"epochs": 2}}),
    ("kurakin", {"method": "kurakin", "optim": {"epochs": 2}}),
    ("ens-adv", {"method": "ens-adv", "optim": {"epochs": 2}}),
    ("vat", {"method": "vat", "optim": {"epochs": 2}}),
    ("ls", {"method": "ls", "optim": {"epochs": 2}}),
    ("mixup", {"method": "mixup", "optim": {"epochs": 2}}),
    # certified training: the papers' step schedules shortened to the demo's two epochs (ours)
    ("ibp", {"method": "ibp", "loss": {"warmup_steps": 100, "ramp_steps": 400}, "optim": {"epochs": 2}}),
    ("crown-ibp", {"method": "crown-ibp", "loss": {"warmup_steps": 100, "ramp_steps": 400}, "optim": {"epochs": 2}}),
    ("regular-b", {"method": "regular", "seed": 2, "optim": {"epochs": 1}}),
]
STATIC_FOR_ENS = ("regular", "regular-b")
HELPERS = (SOURCE, "regular-b")  # trained for the others, not rows of the table

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
    attacks: tuple[AttackSpec, ...] = ()  # replaces the demo's suite (tests use a tiny one)
    audit_points: int = 100
    audit: AuditSettings | None = None  # default DEMO_AUDIT
    methods: str = "default"  # default: the paper's five; all: plus the comparison methods
    workers: int = 1  # independent runs side by side in this many processes (the CLI uses 2)


def demo_configs(opts: DemoOptions) -> dict[str, RunConfig]:
    if opts.methods not in ("default", "all"):
        raise ConfigError(f"expected default or all, got {opts.methods!r}", option="methods")
    base: dict[str, Any] = {"model": "lenet5", "loss": {"eps": EPS}, "val_points": 500, "val_suite": "fast"}
    base["data"] = {"data_dir": opts.data_dir, "val_size": opts.val_size}
    runs = DEMO_RUNS + (EXTRA_RUNS if opts.methods == "all" else [])
    out = {}
    for name, over in runs:
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


def _cost(cfg: RunConfig) -> float:
    """Rough relative training cost, for scheduling the longest runs first."""
    if cfg.method in ("mpgd", "alp", "trades"):
        return (cfg.loss.attack_steps + 1) * cfg.optim.epochs
    costs = {"vat": 3, "kurakin": 2, "ens-adv": 2, "fgsm-rs": 2, "ibp": 3, "crown-ibp": 13}
    return costs.get(cfg.method, 1) * cfg.optim.epochs


class _Pool:
    """Jobs with dependencies, run in ``workers`` processes (or in this one), longest first."""

    def __init__(self, workers: int) -> None:
        self.workers = workers
        self.executor: ProcessPoolExecutor | None = None
        if workers > 1:
            threads = max(1, (os.cpu_count() or workers) // workers)
            ctx = multiprocessing.get_context("spawn")
            self.executor = ProcessPoolExecutor(workers, mp_context=ctx, initializer=_init_worker, initargs=(threads,))

    def run(self, jobs: dict[str, tuple[float, tuple[str, ...], Any, tuple]], log: Logger) -> dict[str, Any]:
        """``jobs``: name -> (cost, dependencies, function, args); returns name -> result."""
        done: dict[str, Any] = {}
        if self.executor is None:
            while len(done) < len(jobs):
                ready = [n for n, (_, deps, _, _) in jobs.items() if n not in done and all(d in done for d in deps)]
                name = max(ready, key=lambda n: jobs[n][0])
                done[name] = jobs[name][2](*jobs[name][3])
            return done
        running: dict[Any, str] = {}
        while len(done) < len(jobs):
            ready = sorted(
                (n for n, (_, deps, _, _) in jobs.items()
                 if n not in done and n not in running.values() and all(d in done for d in deps)),
                key=lambda n: -jobs[n][0],
            )  # fmt: skip
            for name in ready:
                running[self.executor.submit(jobs[name][2], *jobs[name][3])] = name
            finished, _ = wait(list(running), return_when=FIRST_COMPLETED)
            for fut in finished:
                name = running.pop(fut)
                done[name] = fut.result()
                log(f"[demo] {name} done")
        return done

    def close(self) -> None:
        if self.executor is not None:
            self.executor.shutdown(cancel_futures=True)


def _init_worker(threads: int) -> None:
    import torch

    torch.set_num_threads(threads)


def eps_curve(
    model: nn.Module,
    x: Tensor,
    y: Tensor,
    eps_values: list[float],
    *,
    attacks: Sequence[AttackSpec] = (),
    seed: int = 0,
) -> list[dict[str, Any]]:
    """Robust accuracy at each ε under the ``fast`` suite (``attacks``, if given, instead; ε = 0: clean).

    The ε run in ascending order and each attacks only the points still robust at the one below: a point
    broken at a smaller ε is broken at every larger one (its adversarial example lies in every larger ball),
    so the curve never rises and the survivors, not all points, pay for the larger ε.
    """
    specs = list(attacks) or get_suite(CURVE_SUITE)
    robust = predict(model, x).argmax(1) == y
    rows = []
    for eps in sorted(eps_values):
        idx = robust.nonzero().squeeze(1)
        if eps > 0 and len(idx):
            res = run_protocol(model, x[idx], y[idx], specs, threat=Linf(eps), seed=seed, desc=f"eps={eps:g}")
            robust = robust.clone()
            robust[idx] = res.robust
        rows.append({"eps": eps, **summarize(robust)})
    return rows


def _grid(model: nn.Module, x: Tensor, y: Tensor, classes: Sequence[str]) -> dict[str, Any]:
    """The example grid of one model: clean and PGD-40 images with true and predicted classes under each."""
    x_adv = run_protocol(model, x, y, [pgd_spec(40, 1)], threat=Linf(EPS), keep_adversarial=True).adversarial
    captions = tuple(grid_captions(y, predict(model, images).argmax(1), classes) for images in (x, x_adv))
    return {"images": (x, x_adv), "captions": captions}


def _train_job(cfg: RunConfig, run_dir: Path, opts: DemoOptions) -> float:
    splits = _subsample(load_dataset("fashion-mnist", opts.data_dir, opts.val_size, 0), opts.scale)
    return train(cfg, run_dir, splits=splits).train_seconds


def _evaluate_job(
    name: str, run_dir: Path, source_dir: Path, opts: DemoOptions, x_transfer: Any, n: int
) -> dict[str, Any]:
    """Everything the table and the plots need about one trained model."""
    splits = load_dataset("fashion-mnist", opts.data_dir, opts.val_size, 0)
    x, y = splits.test.x[:n], splits.test.y[:n]
    eval_opts = EvalOptions(n=n, eps=EPS, data_dir=opts.data_dir, suite="fast", attacks=opts.attacks, seed=opts.seed)
    ev = evaluate_run(run_dir, eval_opts, write=True)
    model = load_model(run_dir)
    black = black_box(model, x, y, crafted=x_transfer).robust
    ev["black_box"] = {**summarize(black), "attack": "PGD-40x2 on the source"}
    curve = eps_curve(model, x[:CURVE_POINTS], y[:CURVE_POINTS], CURVE_EPS, attacks=opts.attacks, seed=opts.seed)
    grid = _grid(model, x[:GRID_IMAGES], y[:GRID_IMAGES], splits.test.classes)
    aud = audit_run(
        run_dir, source=source_dir, n=min(n, opts.audit_points), data_dir=opts.data_dir, eps=EPS,
        settings=opts.audit or DEMO_AUDIT, write=True,
    )  # fmt: skip
    return {"ev": ev, "curve": curve, "grid": grid, "norms": predict(model, x).norm(dim=1),
            "audit": aud}  # fmt: skip


def _run(opts: DemoOptions, tmp: Path, final: Path, progress: ProgressFactory, log: Logger) -> dict[str, Any]:
    t_start = time.perf_counter()
    cfgs = demo_configs(opts)
    pool = _Pool(max(1, opts.workers))
    try:
        jobs = {}
        for name, cfg in cfgs.items():
            deps = STATIC_FOR_ENS if cfg.method == "ens-adv" else ()
            if deps:  # the static models are read from the temporary directory while it is built
                cfg = replace(cfg, static_models=",".join(str(tmp / s) for s in STATIC_FOR_ENS))
                cfgs[name] = cfg
            jobs[name] = (_cost(cfg), deps, _train_job, (cfg, tmp / name, opts))
        log(f"[demo] training {len(jobs)} models ({', '.join(cfgs)}) in {pool.workers} process(es)")
        train_seconds = pool.run(jobs, log)

        splits = load_dataset("fashion-mnist", opts.data_dir, opts.val_size, 0)
        n = min(opts.n, len(splits.test))
        x, y = splits.test.x[:n], splits.test.y[:n]
        # black box: PGD-40 x2 examples crafted once on the source, then shown to every model
        log(f"[demo] crafting transfer examples on {SOURCE}")
        source = load_model(tmp / SOURCE)
        x_transfer = run_protocol(
            source, x, y, [pgd_spec(40, 2)], threat=Linf(EPS), seed=opts.seed + 99, keep_adversarial=True,
            progress=progress, desc="transfer",
        ).adversarial  # fmt: skip
        methods = [name for name in cfgs if name not in HELPERS]
        log(f"[demo] evaluating {len(methods)} models: clean, PGD-40, fast suite, transfer, ε curve, quick audit")
        evals = pool.run(
            {m: (_cost(cfgs[m]), (), _evaluate_job, (m, tmp / m, tmp / SOURCE, opts, x_transfer, n)) for m in methods},
            log,
        )
    finally:
        pool.close()

    rows, curves, grids, norms = [], {}, {}, {}
    for name in methods:
        e = evals[name]
        ev, aud = e["ev"], e["audit"]
        ev["black_box"]["source"] = str(final / SOURCE)
        curves[name], grids[name], norms[name] = e["curve"], e["grid"], e["norms"]
        rows.append(
            {
                "method": name,
                "training_method": cfgs[name].method,
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
        f"Robust accuracy vs ε, {CURVE_SUITE} suite (first {min(CURVE_POINTS, n)} test points)",
    )
    plot_image_grid(
        tmp / "adversarial_examples.png",
        {m: g["images"] for m, g in grids.items()},
        EPS,
        captions={m: g["captions"] for m, g in grids.items()},
    )
    plot_histograms(tmp / "logit_norms.png", norms, "‖logits‖₂ on clean test points", "Logit norms per method")
    results = {
        "dataset": "fashion-mnist",
        "eps": EPS,
        "n": n,
        "white_box_attack": "PGD-40x2 baseline (ours): PGD-40, step 2.5*eps/40, 2 random restarts, per-example "
        "best iterate (not the paper's attack)",
        "strong_attack": "worst case of PGD-40x2 and the fast suite (APGD-CE 10, then APGD-T and APGD-CE-50 "
        "escalating on points near the boundary, Square 100, Square 5000 on a masking signal)",
        "black_box_attack": f"PGD-40 x2 crafted on the independently seeded M-PGD model ({SOURCE})",
        "source_train_seconds": round(train_seconds[SOURCE], 2),
        "methods": opts.methods,
        "workers": pool.workers,
        "rows": rows,
        "curve_attack": f"the {CURVE_SUITE} suite at each ε on the first {min(CURVE_POINTS, n)} test points "
        "(a point broken at a smaller ε counts as broken at every larger one)",
        "curves": curves,
        "environment": environment(),
        "seconds": round(time.perf_counter() - t_start, 1),
        "command": "logitpair demo" + (" --methods all" if opts.methods == "all" else ""),
    }
    write_json(tmp / "results.json", results)
    write_text(tmp / "report.md", demo_markdown(results, cfgs))
    return results


def _baseline_sentence(results: dict[str, Any]) -> str:
    """How the white-box baseline differs from the paper's attack (from the first row's evaluation)."""
    rows = results["rows"]
    return baseline_note(rows[0]["evaluation"]["pgd"]["attack"]) if rows else ""


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
        f"White box: {results['white_box_attack']}. {_baseline_sentence(results)} "
        f"Strong: {results['strong_attack']}. Black box: {results['black_box_attack']}. "
        "A point is robust only if it is correct clean and under attack.\n\n"
    )
    text += markdown_table(
        ["method", "White box: PGD-40×2 baseline (ours)", "White box: worst case of strong suite", "Black box", "Clean",
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
    text += f"\n## Accuracy vs ε\n\nRobust accuracy under {results['curve_attack']}.\n\n"
    text += "![accuracy vs eps](accuracy_vs_eps.png)\n"
    text += "\n## Clean, adversarial and perturbation images (PGD-40)\n\n"
    text += "Under each image its true class and the model's prediction (red: wrong).\n\n"
    text += "![examples](adversarial_examples.png)\n"
    text += "\n## Logit norms\n\n![logit norms](logit_norms.png)\n"
    text += "\nCLP and LSQ shrink logits; small logits can make gradient attacks with few steps fail without "
    text += "real robustness (Mosbach et al. 2018), so compare the curves and run `logitpair audit`.\n"
    text += f"\nReproduce: `{results['command']}` ({results['seconds']:.0f} s on {results['environment']['machine']}, "
    text += f"{results['environment']['threads']} threads, torch {results['environment']['torch']}).\n"
    return text
