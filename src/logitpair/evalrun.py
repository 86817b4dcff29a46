"""Evaluate a run directory: clean, white-box and black-box accuracy, written next to the run.

Writes ``evaluation.json`` and ``evaluation.md`` into the run directory (atomically).
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from torch import nn

from logitpair.checkpoint import load_model
from logitpair.data import load_dataset
from logitpair.errors import ConfigError
from logitpair.evaluate import AttackSpec, pgd_spec, run_protocol
from logitpair.io import write_json, write_text
from logitpair.progress import ProgressFactory, null_progress
from logitpair.report import markdown_table, pct_ci
from logitpair.threat import Linf


@dataclass(frozen=True)
class EvalOptions:
    n: int | None = None  # first n test points (None: all)
    eps: float | None = None  # default: the eps the model was trained for
    steps: int = 40
    restarts: int = 2
    step_size: float | None = None  # default 2.5 * eps / steps
    targeted: bool = False
    top5: bool = False
    batch_size: int = 500
    seed: int = 0
    data_dir: str | None = None
    extra_attacks: tuple[AttackSpec, ...] = field(default_factory=tuple)

    def __post_init__(self) -> None:
        if self.n is not None and self.n < 1:
            raise ConfigError(f"--n: expected >= 1, got {self.n}")
        if self.eps is not None and not 0 <= self.eps <= 1:
            raise ConfigError(f"--eps: expected 0 <= eps <= 1, got {self.eps}")
        if self.steps < 1:
            raise ConfigError(f"--steps: expected >= 1, got {self.steps}")
        if self.restarts < 1:
            raise ConfigError(f"--restarts: expected >= 1, got {self.restarts}")
        if self.step_size is not None and not self.step_size > 0:
            raise ConfigError(f"--step-size: expected > 0, got {self.step_size}")
        if self.batch_size < 1:
            raise ConfigError(f"--batch-size: expected >= 1, got {self.batch_size}")


def test_points(model: nn.Module, n: int | None, data_dir: str | None):  # noqa: ANN201
    meta = model.meta
    cfg = meta.get("config") or {}
    dataset = meta.get("dataset") or cfg.get("data", {}).get("dataset", "fashion-mnist")
    splits = load_dataset(dataset, data_dir or cfg.get("data", {}).get("data_dir"), val_size=0)
    test = splits.test
    k = len(test) if n is None else min(n, len(test))
    return test.x[:k], test.y[:k], dataset


def evaluate_run(
    run_dir: str | Path,
    opts: EvalOptions,
    *,
    source: str | Path | None = None,
    progress: ProgressFactory = null_progress,
    write: bool = True,
) -> dict[str, Any]:
    """Clean, white-box (PGD, per-example worst case over restarts) and, with ``source``,
    black-box transfer accuracy on the first ``opts.n`` test points."""
    run_dir = Path(run_dir)
    model = load_model(run_dir)
    eps = opts.eps if opts.eps is not None else float(model.meta.get("eps", 0.1))
    threat = Linf(eps)
    x, y, dataset = test_points(model, opts.n, opts.data_dir)
    white = [pgd_spec(opts.steps, opts.restarts, opts.step_size), *opts.extra_attacks]
    common = dict(threat=threat, batch_size=opts.batch_size, seed=opts.seed, targeted=opts.targeted, top5=opts.top5)
    t0 = time.perf_counter()
    wb = run_protocol(model, x, y, white, progress=progress, desc="white-box", **common)
    out: dict[str, Any] = {
        "run": str(run_dir),
        "dataset": dataset,
        "method": model.meta.get("method"),
        "n": len(y),
        "eps": eps,
        "clean": wb.summary()["clean"],
        "white_box": wb.summary(),
    }
    if source is not None:
        src = load_model(source)
        bb = run_protocol(
            model, x, y, [pgd_spec(opts.steps, opts.restarts, opts.step_size, transfer=True)],
            source=src, progress=progress, desc="black-box", **common,
        )  # fmt: skip
        out["black_box"] = {**bb.summary(), "source": str(source)}
    out["seconds"] = time.perf_counter() - t0
    if write:
        write_json(run_dir / "evaluation.json", out)
        write_text(run_dir / "evaluation.md", evaluation_markdown(out))
    return out


def evaluation_markdown(ev: dict[str, Any]) -> str:
    wb = ev["white_box"]
    attacks = ", ".join(f"{a['label']} {a['params']}" for a in wb["attacks"])
    rows = [["clean", pct_ci(ev["clean"]), str(ev["n"])], ["white-box: " + attacks, pct_ci(wb["robust"]), str(ev["n"])]]
    if "robust_top5" in wb:
        rows.append(["white-box top-5", pct_ci(wb["robust_top5"]), str(ev["n"])])
    if "target_success" in wb:
        rows.append(["targeted attack success rate", pct_ci(wb["target_success"]), str(ev["n"])])
    if "black_box" in ev:
        rows.append([f"black-box: transfer from {ev['black_box']['source']}", pct_ci(ev["black_box"]["robust"]), str(ev["n"])])
    text = f"# Evaluation of `{ev['run']}`\n\n"
    text += f"Dataset {ev['dataset']}, method {ev['method']}, L∞ ε = {ev['eps']:g}, first {ev['n']} test points, seed {wb['seed']}.\n\n"
    text += markdown_table(["", "accuracy % [95% CI]", "N"], rows)
    text += "\nA point counts as robust only if it is classified correctly clean and under every attack.\n"
    return text
