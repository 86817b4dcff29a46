"""``logitpair reproduce TABLE``: train and evaluate what a paper table needs, report ours next to the paper's.

For a preset (:mod:`logitpair.experiments.presets`) and a scale, :func:`reproduce`

1. trains every model of the table (table rows, black-box sources, the static models of
   ensemble adversarial training) with :func:`logitpair.training.train`, once per seed;
2. evaluates each table row on the same first N test points: clean accuracy, the paper's
   attack, the worst case over the paper's attack and a strong suite (untargeted tables), or
   the targeted ImageNet protocol (:func:`~logitpair.evaluation.targeted.targeted_protocol`: the
   paper's attack, a long targeted PGD after Engstrom et al. 2018 and the ``targeted`` suite,
   all towards the same random targets; top-1, top-5, success rate; untargeted as an extra),
   black-box transfer from the row's source, or a transfer matrix
   (:func:`~logitpair.evaluation.transfer.transfer_matrix`);
3. audits every table row for gradient masking (:func:`~logitpair.audit.audit_run`, quick);
4. compares the rows the paper compares with McNemar's exact test on the same points;
5. writes ``report.md``, ``results.json`` and ``comparison.png`` (the paper's numbers and ours
   side by side, N, 95% Wilson intervals, the spread over seeds) and the run directories.

The parts: the scales (``smoke``, ``small``, ``full``: :mod:`logitpair.experiments.scales`, one
object each, deciding the evaluation, the training configs and the substitutions the report
lists), the protocols (``untargeted``, ``targeted``, ``transfer``:
:mod:`logitpair.experiments.protocols`, one interface, each declaring its metrics), the row audit
(:mod:`logitpair.experiments.audits`) and the report (:mod:`logitpair.experiments.report`). This
module trains, runs those parts per seed and assembles ``results.json``.

Outputs are built in ``.OUT.work`` next to ``OUT`` and swapped in when complete (an earlier
``OUT`` stays intact until then). At ``full`` scale an interrupted run keeps ``.OUT.work`` and
the same command resumes it (every training and every evaluation resumes). With ``runs`` (``--runs
DIR``) the run directories live in a store shared between tables, named by a digest of the whole
training config: a model another table trained with the same config is reused (Tables 3-6 and 9
share models, as in the paper), and so are its saved evaluations and audit. Under ``torchrun``
every process trains every model (DistributedDataParallel inside :func:`train`), then takes its
shard of every evaluation (whole protocol batches, batch ``b`` to rank ``b mod N``: the same
result as one process, :func:`~logitpair.evaluation.cache.run_batches`); then the other ranks
exit and rank 0 alone audits (the audit's checks share attack runs; it stays in one process)
and writes.
"""

from __future__ import annotations

import hashlib
import json
import shutil
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from logitpair.config import RunConfig, loss_for, make_config, migrate, to_dict
from logitpair.data import DATASETS
from logitpair.data.base import VAL_SIZE_MAX
from logitpair.distributed import Dist, env_world, setup
from logitpair.environment import environment, source_commit
from logitpair.errors import ConfigError
from logitpair.evaluation.transfer import plot_transfer, transfer_markdown
from logitpair.experiments.audits import row_audit as _audit
from logitpair.experiments.presets import PRESETS, Preset, Row
from logitpair.experiments.protocols import PROTOCOLS, Flags, ProtocolOutcome, SeedRuns, check_outcome
from logitpair.experiments.report import plot_comparison, report_markdown
from logitpair.experiments.scales import FOLDER_DATASETS, SCALES, Plan, plan_for
from logitpair.experiments.smokedata import write_smoke_data
from logitpair.experiments.stats import mcnemar, spread
from logitpair.io import atomic_write, replace_dir, write_json, write_text
from logitpair.metrics import summarize
from logitpair.progress import Logger, ProgressFactory, null_log, null_progress
from logitpair.training import train
from logitpair.training.passes import run_passes

DATA_NEEDS = {
    "mnist": "MNIST: the four IDX files (train-images-idx3-ubyte[.gz], ...) via --data-dir",
    "fashion-mnist": "Fashion-MNIST: Debian package dataset-fashion-mnist (/usr/share/datasets/fashion-mnist) "
    "or --data-dir with the four IDX files",
    "svhn": "SVHN format 2: train_32x32.mat and test_32x32.mat via --data-dir (scipy: pip install 'logitpair[svhn]')",
    "cifar10": "CIFAR-10: cifar-10-batches-bin/ or cifar-10-batches-py/ via --data-dir",
    "imagenet": "ImageNet ILSVRC-2012: train/<wnid>/*.JPEG and val/<wnid>/*.JPEG via --data-dir "
    "(Pillow: pip install 'logitpair[images]')",
    "tiny-imagenet": "Tiny ImageNet: tiny-imagenet-200/ via --data-dir (Pillow: pip install 'logitpair[images]')",
}


@dataclass(frozen=True)
class ReproduceOptions:
    """What ``logitpair reproduce`` was asked for (see the module docstring for the scales)."""

    preset: str
    scale: str = "small"
    dataset: str | None = None  # default: fashion-mnist at small, the paper's otherwise
    data_dir: str | None = None  # smoke without it: generated data in a temporary folder
    device: str = "cpu"
    seeds: int = 1
    out: Path | None = None  # default runs/reproduce/<preset>-<scale>
    n: int | None = None  # test points (default: 4 smoke, 1,000 small, the preset's at full)
    batch_size: int = 500  # evaluation batch
    seed: int = 0  # evaluation seed (random starts and targets)
    runs: Path | None = None  # a store of run directories shared between presets (None: inside OUT)

    def __post_init__(self) -> None:
        PRESETS.get(self.preset)
        if self.scale not in SCALES:
            raise ConfigError(f"expected one of {', '.join(SCALES)}, got {self.scale!r}", option="scale")
        if self.dataset is not None:
            DATASETS.get(self.dataset)
        for option in ("seeds", "n", "batch_size"):
            value = getattr(self, option)
            if value is not None and value < 1:
                raise ConfigError(f"expected >= 1, got {value}", option=option)

    @property
    def out_dir(self) -> Path:
        return Path(self.out) if self.out is not None else Path("runs/reproduce") / f"{self.preset}-{self.scale}"

    @property
    def dataset_name(self) -> str:
        return self.dataset or SCALES[self.scale].default_dataset(PRESETS.get(self.preset))


def make_plan(opts: ReproduceOptions) -> Plan:
    """The preset at the scale of ``opts`` (:func:`~logitpair.experiments.scales.plan_for`)."""
    return plan_for(PRESETS.get(opts.preset), SCALES[opts.scale], opts.dataset, opts.n, opts.seeds)


def row_config(
    plan: Plan, row: Row, *, seed_index: int, data_dir: str | None, device: str, static_dirs: list[str]
) -> RunConfig:
    """The training config of ``row`` at the plan's scale (see the module docstring). The
    ``loss`` settings shared by the table (or the scale) go to the rows whose method takes them;
    a row's own must all be settings of its method."""
    values, data = plan.scale.row_values(plan.preset, row, plan.dataset in FOLDER_DATASETS)
    data.update(dataset=plan.dataset, data_dir=data_dir)
    # the automatic split of the paper's datasets (>= 50,000 training images), written out so that a
    # stored run's config (which records the number) and its store digest compare equal before training
    data.setdefault("val_size", VAL_SIZE_MAX)
    values.update(data=data, method=row.method, seed=row.seed + 100 * seed_index, device=device)
    if row.static:
        values["static_models"] = ",".join(static_dirs)
    loss = values.get("loss") or {}
    keep = loss_for(row.method, loss).keys() | set(plan.scale.own_settings(row).get("loss") or {})
    values["loss"] = {k: v for k, v in loss.items() if k in keep}
    return make_config(overrides=values)


# --------------------------------------------------------------------------- the run
def reproduce(
    opts: ReproduceOptions, *, progress: ProgressFactory = null_progress, log: Logger = null_log
) -> dict[str, Any] | None:
    """Train, evaluate, audit and report one preset; returns ``results.json``'s content (None on
    ranks other than 0 under torchrun). See the module docstring."""
    plan = make_plan(opts)
    rank, world = env_world().rank, env_world().world_size
    if plan.scale.generates_data and world > 1 and opts.data_dir is None:
        raise ConfigError("`scale` smoke under torchrun: pass `data_dir` (the generated data is per process)")
    out = opts.out_dir.resolve()
    work = out.with_name(f".{out.name}.work")
    keep = plan.scale.resumes  # full scale resumes an interrupted run; the others start afresh
    if rank == 0:
        out.parent.mkdir(parents=True, exist_ok=True)
        if work.exists() and not keep:
            shutil.rmtree(work)
        work.mkdir(exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="logitpair-smoke-data-") as tmp:
        data_dir = opts.data_dir
        if plan.scale.generates_data and data_dir is None:
            data_dir = str(write_smoke_data(plan.dataset, Path(tmp)))
            log(f"[reproduce] generated {plan.dataset} images in its real format in {data_dir}")
        try:
            results = _run(opts, plan, work, out, data_dir, rank, progress, log)
            if rank != 0:
                return None
            replace_dir(work, out)
        except BaseException:
            if rank == 0 and not keep:
                shutil.rmtree(work, ignore_errors=True)
            raise
    return results


def store_dir(store: Path, cfg: RunConfig) -> Path:
    """A run's directory in a shared store: model, method and a digest of the whole config, so
    a model another table trained with the same config is found again."""
    digest = hashlib.sha256(json.dumps(to_dict(cfg), sort_keys=True).encode()).hexdigest()[:12]
    return store / f"{cfg.model}-{cfg.method}-{digest}"


def finished_run(run_dir: Path, cfg: RunConfig) -> bool:
    """True when ``run_dir`` holds an exported model trained with exactly ``cfg``."""
    try:
        stored = migrate(json.loads((run_dir / "config.json").read_text()))
        return (run_dir / "model.json").is_file() and stored == to_dict(cfg)
    except (OSError, ValueError):
        return False


def _train_all(opts: ReproduceOptions, plan: Plan, seed_dir: Path, k: int, data_dir: str | None,
               progress: ProgressFactory, log: Logger) -> tuple[dict[str, float], dict[str, Path]]:  # fmt: skip
    """Train every model of the preset for seed ``k``; returns training seconds and run directories."""
    seconds: dict[str, float] = {}
    dirs: dict[str, Path] = {}
    for row in plan.preset.rows:
        cfg = row_config(plan, row, seed_index=k, data_dir=data_dir, device=opts.device,
                         static_dirs=[str(dirs[s]) for s in row.static])  # fmt: skip
        run_dir = store_dir(Path(opts.runs).resolve(), cfg) if opts.runs is not None else seed_dir / row.name
        dirs[row.name] = run_dir
        if opts.runs is not None and finished_run(run_dir, cfg):
            log(f"[reproduce] seed {k}: {row.name}: reusing {run_dir} (trained with the same config)")
            seconds[row.name] = round(float(json.loads((run_dir / "train.json").read_text())["train_seconds"]), 2)
            continue
        splits = plan.scale.training_splits(cfg)
        log(f"[reproduce] seed {k}: training {row.name} ({row.method}, {cfg.model}, {cfg.optim.epochs} epochs)")
        resume = plan.scale.resumes or opts.runs is not None
        res = train(cfg, run_dir, resume=resume, splits=splits, progress=progress, log=log)
        seconds[row.name] = round(res.train_seconds, 2)
    return seconds, dirs


def _run(opts: ReproduceOptions, plan: Plan, work: Path, final: Path, data_dir: str | None, rank: int,
         progress: ProgressFactory, log: Logger) -> dict[str, Any]:  # fmt: skip
    t0 = time.perf_counter()
    train_seconds, run_dirs = [], []
    for k in range(opts.seeds):
        seconds, dirs = _train_all(opts, plan, work / f"seed-{k}", k, data_dir, progress, log)
        train_seconds.append(seconds)
        run_dirs.append(dirs)
    world, device = setup(opts.device)  # joined by train() already under torchrun; every rank takes its shard
    outcomes = []
    for k in range(opts.seeds):
        log(f"[reproduce] seed {k}: evaluating")
        outcomes.append(_evaluate_seed(opts, plan, run_dirs[k], work / f"seed-{k}", data_dir, world, device,
                                       progress, log))  # fmt: skip
    if rank != 0:
        return {}
    per_seed = [_audit_seed(opts, plan, run_dirs[k], data_dir, device, outcomes[k], progress, log)
                for k in range(opts.seeds)]  # fmt: skip
    # the run directories inside the work folder move with it to OUT
    shown = [{name: final / d.relative_to(work) if d.is_relative_to(work) else d for name, d in dirs.items()}
             for dirs in run_dirs]  # fmt: skip
    # model passes counted on each trained run (seconds depend on the machine and its load, passes do not)
    passes = [{name: run_passes(d) for name, d in dirs.items()} for dirs in run_dirs]
    results = _assemble(opts, plan, per_seed, train_seconds, passes, shown, time.perf_counter() - t0)
    results["invocations"] = [*earlier_invocations(final, results), _invocation(results)]
    _write(work, results, per_seed[0].transfer)
    return results


def _write(work: Path, results: dict[str, Any], transfer: dict[str, Any] | None) -> None:
    """``comparison.png``, the transfer matrix's page and plot (if any), ``results.json``, ``report.md``."""
    plot_comparison(work / "comparison.png", results)
    if transfer:
        write_text(work / "transfer.md", transfer_markdown(transfer))
        atomic_write(work / "transfer.png", lambda p: plot_transfer(p, transfer))
    write_json(work / "results.json", results)
    write_text(work / "report.md", report_markdown(results))


# --------------------------------------------------------------------------- evaluation of one seed
@dataclass
class SeedResult:
    """One seed's evaluation: per-example flags per row and metric, audits, paired tests."""

    n: int
    flags: dict[str, Flags]
    audits: dict[str, dict[str, Any]]
    comparisons: list[dict[str, Any]]
    transfer: dict[str, Any] | None


def _evaluate_seed(opts: ReproduceOptions, plan: Plan, dirs: dict[str, Path], seed_dir: Path, data_dir: str | None,
                   world: Dist, device: torch.device, progress: ProgressFactory,
                   log: Logger) -> tuple[int, ProtocolOutcome]:  # fmt: skip
    """Evaluate the table rows of one seed (run directories ``dirs``) with the preset's protocol,
    sharded over ``world`` under torchrun; the number of points and the outcome. Protocol states
    are saved in the run directories, so a rerun (or another table evaluating the same model the
    same way) continues or reuses them."""
    runs = SeedRuns(plan, dirs, seed_dir, data_dir, device if device.type != "cpu" else None, opts.seed,
                    opts.batch_size, progress, log, world)  # fmt: skip
    protocol = PROTOCOLS.get(plan.preset.protocol)
    outcome = check_outcome(protocol, plan.preset, protocol.evaluate(runs))
    return runs.n_points, outcome  # the points are known once evaluated


def _audit_seed(opts: ReproduceOptions, plan: Plan, dirs: dict[str, Path], data_dir: str | None,
                device: torch.device, evaluated: tuple[int, ProtocolOutcome], progress: ProgressFactory,
                log: Logger) -> SeedResult:  # fmt: skip
    """Audit the table rows of one seed (in one process) and compare the rows the paper compares."""
    n, outcome = evaluated
    audits = {}
    for r in plan.preset.table_rows:
        log(f"[reproduce] {r.name}: gradient-masking audit")
        audits[r.name] = _audit(dirs, r, plan, data_dir, opts, device if device.type != "cpu" else None, progress)
    return SeedResult(n, outcome.flags, audits, _comparisons(plan.preset, outcome.flags),
                      outcome.transfer or None)  # fmt: skip


def _comparisons(preset: Preset, flags: dict[str, Flags]) -> list[dict[str, Any]]:
    """McNemar's exact test for every comparison of the preset (the metrics were checked at registration)."""
    out = []
    for c in preset.compare:
        fa, fb = flags[c.a].get(c.metric_a), flags[c.b].get(c.other_metric)
        if fa is None or fb is None:  # a metric this run did not measure (e.g. no untargeted suite)
            continue
        out.append({"row_a": c.a, "row_b": c.b, "metric_a": c.metric_a, "metric_b": c.other_metric, **mcnemar(fa, fb)})
    return out


# --------------------------------------------------------------------------- results
def _row_result(r: Row, per_seed: list[SeedResult], train_seconds: list[dict[str, float]],
                passes: list[dict[str, Any]], run_dirs: list[dict[str, Path]]) -> dict[str, Any]:  # fmt: skip
    seeds = [{key: summarize(v) for key, v in s.flags[r.name].items()} for s in per_seed]
    return {
        "name": r.name,
        "label": r.label,
        "method": r.method,
        "paper": dict(r.paper),
        "ours": seeds[0],
        "seeds": seeds,
        "spread": {key: spread([s[key]["value"] for s in seeds]) for key in seeds[0]},
        "audit": [s.audits[r.name] for s in per_seed],
        "train_seconds": [t[r.name] for t in train_seconds],
        "passes": [p[r.name] for p in passes],
        "run_dirs": [str(d[r.name]) for d in run_dirs],
        "ours_settings": list(r.ours),
    }


def _attacks(plan: Plan) -> dict[str, Any]:
    targeted = PROTOCOLS.get(plan.preset.protocol).targeted
    return {
        "paper": plan.paper.to_dict(),
        "paper_given": plan.preset.attack.given,
        "long": plan.long.to_dict() if targeted else None,
        "suite_name": plan.suite_name,
        "suite": [a.to_dict() for a in plan.suite],
        "targeted_suite": [a.to_dict() for a in plan.targeted_suite] if targeted else None,
    }


def _assemble(opts: ReproduceOptions, plan: Plan, per_seed: list[SeedResult], train_seconds: list[dict[str, float]],
              passes: list[dict[str, Any]], run_dirs: list[dict[str, Path]], seconds: float) -> dict[str, Any]:  # fmt: skip
    preset = plan.preset
    others = [
        {"name": r.name, "label": r.label, "method": r.method, "role": r.role, "ours_settings": list(r.ours),
         "train_seconds": [t[r.name] for t in train_seconds], "passes": [p[r.name] for p in passes],
         "run_dirs": [str(d[r.name]) for d in run_dirs]}
        for r in preset.rows if r.role != "row"
    ]  # fmt: skip
    return {
        "preset": preset.name,
        "table": preset.table,
        "title": preset.title,
        "protocol": preset.protocol,
        "scale": plan.scale.name,
        "dataset": plan.dataset,
        "paper_dataset": preset.dataset,
        "eps": plan.eps,
        "n": per_seed[0].n,
        "seeds": opts.seeds,
        "evaluation_seed": opts.seed,
        "device": opts.device,
        "columns": [{"key": c.key, "label": c.label} for c in preset.columns],
        "attacks": _attacks(plan),
        "audit_settings": {"points": plan.audit_points, **plan.audit.to_dict()},
        "rows": [_row_result(r, per_seed, train_seconds, passes, run_dirs) for r in preset.table_rows],
        "other_models": others,
        "comparisons": [{**c, "seed": k} for k, s in enumerate(per_seed) for c in s.comparisons],
        "settings": [{"setting": s, "source": src} for s, src in preset.settings],
        "substitutions": list(plan.substitutions),
        "notes": list(preset.notes),
        "transfer": per_seed[0].transfer,
        "environment": {**environment(), "commit": source_commit()},
        "seconds": round(seconds, 1),
        "command": command_line(opts),
    }


def _invocation(res: dict[str, Any]) -> dict[str, Any]:
    return {"command": res["command"], "seeds": res["seeds"], "seconds": res["seconds"],
            "commit": res["environment"].get("commit"), "finished": time.strftime("%Y-%m-%dT%H:%M:%S%z")}  # fmt: skip


def earlier_invocations(out: Path, res: dict[str, Any]) -> list[dict[str, Any]]:
    """The calls that wrote ``out``'s previous ``results.json`` for the same preset, scale, dataset
    and points (seeds grown over several calls with ``--runs``: each call's wall time is kept);
    none when there is no such file or it is unreadable or of another table."""
    try:
        old = json.loads((out / "results.json").read_text())
        same = all(old.get(k) == res[k] for k in ("preset", "scale", "dataset", "n"))
    except (OSError, ValueError, AttributeError):
        return []
    if not same:
        return []
    if "invocations" in old:
        return list(old["invocations"])
    return [_invocation({**old, "environment": old.get("environment") or {}}) | {"finished": None}]


def command_line(opts: ReproduceOptions) -> str:
    flags = [("--dataset", opts.dataset), ("--data-dir", opts.data_dir),
             ("--device", opts.device if opts.device != "cpu" else None),
             ("--seeds", opts.seeds if opts.seeds != 1 else None), ("--n", opts.n), ("--out", opts.out),
             ("--runs", opts.runs)]  # fmt: skip
    parts = ["logitpair", "reproduce", opts.preset, "--scale", opts.scale]
    for flag, value in flags:
        if value:
            parts += [flag, str(value)]
    return " ".join(parts)


# --------------------------------------------------------------------------- --list
def describe_presets() -> str:
    """``logitpair reproduce --list``: every preset, what it trains and evaluates, and the data it needs."""
    lines = ["Presets (logitpair reproduce NAME [--scale smoke|small|full]; small runs on Fashion-MNIST):", ""]
    for name in PRESETS:
        p: Preset = PRESETS.get(name)
        lines.append(f"{name:<22} {p.table}: {p.title}")
        lines.append(f"{'':<22} trains {len(p.rows)} model(s): {', '.join(r.name for r in p.rows)}")
        lines.append(f"{'':<22} evaluates: {PROTOCOLS.get(p.protocol).describe(p)}; audit per row")
        lines.append(f"{'':<22} data (full): {DATA_NEEDS.get(p.dataset, p.dataset)}")
        if p.datasets:
            lines.append(f"{'':<22} also accepts: {', '.join(p.datasets)}")
        lines.append("")
    lines.append("--scale small needs Fashion-MNIST (or --dataset NAME --data-dir DIR); --scale smoke needs nothing.")
    return "\n".join(lines) + "\n"
