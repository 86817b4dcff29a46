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

Scales: ``smoke`` keeps each architecture and method but runs on a few generated images per
class in the dataset's real format (written into a temporary folder and read through the real
loader), one training step of batch 2, one attack step and a shrunken suite and audit: it
checks the pipeline, its numbers mean nothing. ``small`` is the demo's budget on a CPU:
``lenet5``, Fashion-MNIST, the demo's epochs and training attack, 1,000 test points, the
``fast`` (else ``quick``) suite, the quick audit, every substitution labelled in the report.
``full`` uses the preset's settings (the paper's and the official code's where known).

Outputs are built in ``.OUT.work`` next to ``OUT`` and swapped in when complete (an earlier
``OUT`` stays intact until then). At ``full`` scale an interrupted run keeps ``.OUT.work`` and
the same command resumes it (every training and every evaluation resumes). With ``runs`` (``--runs
DIR``) the run directories live in a store shared between tables, named by a digest of the whole
training config: a model another table trained with the same config is reused (Tables 3-6 and 9
share models, as in the paper), and so are its saved evaluations and audit. Under ``torchrun``
every process trains every model (DistributedDataParallel inside :func:`train`); then rank 0
alone evaluates, audits and writes, in one process, and the other ranks exit.
"""

from __future__ import annotations

import hashlib
import json
import shutil
import tempfile
import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from logitpair.attacks import parse_official
from logitpair.attacks.common import predict
from logitpair.audit import AuditSettings, audit_run
from logitpair.checkpoint import load_model, run_info
from logitpair.config import RunConfig, loss_for, make_config, merge, migrate, to_dict
from logitpair.data import DATASETS, load_dataset
from logitpair.data.base import VAL_SIZE_MAX
from logitpair.environment import environment
from logitpair.errors import ConfigError
from logitpair.evaluation import SUITES, AttackSpec, get_suite, pgd_spec, run_protocol
from logitpair.evaluation.run import test_points
from logitpair.evaluation.targeted import targeted_protocol
from logitpair.evaluation.transfer import craft, plot_transfer, transfer_markdown, transfer_matrix
from logitpair.experiments.presets import PRESETS, Preset, Row, long_attack
from logitpair.experiments.smokedata import write_smoke_data
from logitpair.experiments.stats import mcnemar, spread
from logitpair.io import atomic_write, replace_dir, sha256_file, write_json, write_text
from logitpair.metrics import summarize, topk_correct
from logitpair.progress import Logger, ProgressFactory, null_log, null_progress
from logitpair.report import markdown_table, pct_ci
from logitpair.threat import Linf
from logitpair.training import train
from logitpair.training.distributed import env_world

SCALES = ("smoke", "small", "full")
SETTINGS_PAGE = "docs/PAPER_SETTINGS.md"  # every preset's settings with their sources (experiments.settings_page)
FOLDER_DATASETS = ("imagenet", "tiny-imagenet")

# --scale small: the demo's settings (logitpair.experiments.demo): LeNet-5, eps 0.1, training PGD
# 7 steps of 0.025 (the methods' defaults), Adam, cosine, batch 128, 2 epochs (sources: 1)
SMALL_EPS = 0.1
SMALL_BASE: dict[str, Any] = {
    "model": "lenet5", "loss": {"eps": SMALL_EPS}, "val_points": 500, "val_suite": "fast", "optim": {"epochs": 2}
}  # fmt: skip
SMALL_POINTS = 1000
SMALL_FOLDER_SIZE = 32  # a folder dataset at --scale small is read at 32x32 (ours)
AUDIT_POINTS = 200  # audit_run's default with the quick settings

# --scale smoke: one step of everything
SMOKE_POINTS = 4
SMOKE_SUITE = (
    AttackSpec("pgd", {"steps": 1, "restarts": 1}, "PGD-1 (smoke)"),
    AttackSpec("square", {"queries": 2}, "Square (2 queries, smoke)"),
)
SMOKE_AUDIT = AuditSettings(
    suite=SMOKE_SUITE, baseline=pgd_spec(1, 1), transfer=pgd_spec(1, 1, transfer=True), eps_factors=(1.0, 2.0),
    sweep_steps=1, steps_series=(1, 2), restarts_series=(1, 2), restarts_steps=1, noise_samples=2,
    surface_points=1, surface_grid=3,
)  # fmt: skip
SMOKE_AUDIT_POINTS = 2

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
        if self.seeds < 1:
            raise ConfigError(f"expected >= 1, got {self.seeds}", option="seeds")
        if self.n is not None and self.n < 1:
            raise ConfigError(f"expected >= 1, got {self.n}", option="n")
        if self.batch_size < 1:
            raise ConfigError(f"expected >= 1, got {self.batch_size}", option="batch_size")

    @property
    def out_dir(self) -> Path:
        return Path(self.out) if self.out is not None else Path("runs/reproduce") / f"{self.preset}-{self.scale}"

    @property
    def dataset_name(self) -> str:
        if self.dataset:
            return self.dataset
        return "fashion-mnist" if self.scale == "small" else PRESETS.get(self.preset).dataset


@dataclass(frozen=True)
class Plan:
    """A preset at a scale: the evaluation's settings (the configs come from :func:`row_config`)."""

    preset: Preset
    scale: str
    dataset: str
    eps: float
    n: int | None
    paper: AttackSpec
    long: AttackSpec
    suite_name: str
    suite: tuple[AttackSpec, ...]
    targeted_suite: tuple[AttackSpec, ...]
    audit: AuditSettings
    audit_points: int
    substitutions: tuple[str, ...]


def small_suite_name() -> str:
    """The strong suite at ``--scale small``: ``fast`` where it exists, else ``quick``."""
    return "fast" if "fast" in SUITES else "quick"


def make_plan(opts: ReproduceOptions) -> Plan:
    preset = PRESETS.get(opts.preset)
    dataset = opts.dataset_name
    subs: list[str] = []
    if dataset != preset.dataset:
        subs.append(f"dataset {dataset} instead of the paper's {preset.dataset} (ours)")
    if opts.scale == "small":
        eps = SMALL_EPS
        models = sorted({r.small_model or "lenet5" for r in preset.rows})
        subs.append(f"architecture {' / '.join(models)} instead of {preset.model} (ours; the demo's network)")
        subs.append(
            f"training as the demo: L∞ ε = {SMALL_EPS}, PGD 7 steps of 0.025 from a random start for M-PGD / ALP, "
            "Adam lr 1e-3, cosine schedule, batch 128, 2 epochs (black-box sources 1 epoch), the demo's λ "
            "(ALP / CLP 0.5, LSQ 0.05) (ours)"
        )
        if preset.eps != SMALL_EPS:
            subs.append(f"the paper's attack with its step scaled from ε = {preset.eps:.4g} to {SMALL_EPS} (ours)")
        if dataset in FOLDER_DATASETS:
            subs.append(f"images at {SMALL_FOLDER_SIZE}x{SMALL_FOLDER_SIZE} (ours)")
        n = SMALL_POINTS if opts.n is None else opts.n
        suite_name = small_suite_name()
        suite, targeted = tuple(get_suite(suite_name)), tuple(get_suite("targeted"))
        audit, audit_points = AuditSettings.preset(quick=True), AUDIT_POINTS
        paper, long = preset.attack.spec(eps), long_attack(eps)
        subs.append(
            f"evaluation on the first {n} test points, strong suite `{suite_name}`, quick audit on {audit_points} "
            f"points, {opts.seeds} seed(s) (ours)"
        )
    elif opts.scale == "smoke":
        eps = preset.eps
        n = SMOKE_POINTS if opts.n is None else opts.n
        suite_name, suite, targeted = "smoke", SMOKE_SUITE, SMOKE_SUITE
        audit, audit_points = SMOKE_AUDIT, SMOKE_AUDIT_POINTS
        paper, long = preset.attack.spec(eps, steps=1), long_attack(eps, steps=2)
        subs.append(
            "smoke: generated noise images in the dataset's real format (unless --data-dir), one training step of "
            f"batch 2, one attack step, {n} test points, a two-attack suite and a minimal audit; checks the "
            "pipeline only, the numbers mean nothing"
        )
    else:
        eps = preset.eps
        n = preset.full_points if opts.n is None else opts.n
        suite_name = "standard"
        suite, targeted = tuple(get_suite("standard")), tuple(get_suite("targeted"))
        audit, audit_points = AuditSettings.preset(quick=True), AUDIT_POINTS
        paper, long = preset.attack.spec(eps), long_attack(eps)
    return Plan(preset, opts.scale, dataset, eps, n, paper, long, suite_name, suite, targeted, audit, audit_points,
                tuple(subs))  # fmt: skip


def _smoke_attack(name: str) -> str:
    """The official notation with one step (``pgdll_16_2_10`` -> ``pgdll_16_2_1``); other names unchanged."""
    spec = parse_official(name)
    return name if spec is None else f"{spec.kind}_{round(spec.eps * 255)}_{round(spec.step * 255)}_1"


def row_config(
    plan: Plan, row: Row, *, seed_index: int, data_dir: str | None, device: str, static_dirs: list[str]
) -> RunConfig:
    """The training config of ``row`` at the plan's scale (see the module docstring). The
    ``loss`` settings shared by the table (or the scale) go to the rows whose method takes them;
    a row's own must all be settings of its method."""
    preset, folder = plan.preset, plan.dataset in FOLDER_DATASETS
    own = row.small if plan.scale == "small" else row.settings
    if plan.scale == "small":
        values = merge(SMALL_BASE, dict(row.small))
        values["model"] = row.small_model or "lenet5"
        data: dict[str, Any] = {"image_size": SMALL_FOLDER_SIZE} if folder else {}
    else:
        values = merge(dict(preset.training), dict(row.settings))
        values["model"] = row.model or values.get("model") or preset.model
        data = dict(values.get("data") or {})
        if not folder:
            data.pop("image_size", None)
        if plan.scale == "smoke":
            values = merge(
                values,
                {"optim": {"epochs": 1, "batch_size": 2, "accum_steps": 1}, "val_points": 2, "val_attack_steps": 1,
                 "log_every": 1, "loss": {"attack_steps": 1}},
            )  # fmt: skip
            if "attack" in values.get("loss", {}):
                values["loss"]["attack"] = _smoke_attack(values["loss"]["attack"])
            data.update(val_size=2, workers=0)
            if folder:
                data["image_size"] = preset.smoke_size
    data.update(dataset=plan.dataset, data_dir=data_dir)
    # the automatic split of the paper's datasets (>= 50,000 training images), written out so that a
    # stored run's config (which records the number) and its store digest compare equal before training
    data.setdefault("val_size", VAL_SIZE_MAX)
    values.update(data=data, method=row.method, seed=row.seed + 100 * seed_index, device=device)
    if row.static:
        values["static_models"] = ",".join(static_dirs)
    loss = values.get("loss") or {}
    keep = loss_for(row.method, loss).keys() | set(own.get("loss") or {})
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
    if plan.scale == "smoke" and world > 1 and opts.data_dir is None:
        raise ConfigError("`scale` smoke under torchrun: pass `data_dir` (the generated data is per process)")
    out = opts.out_dir.resolve()
    work = out.with_name(f".{out.name}.work")
    keep = plan.scale == "full"  # full scale resumes an interrupted run; the others start afresh
    if rank == 0:
        out.parent.mkdir(parents=True, exist_ok=True)
        if work.exists() and not keep:
            shutil.rmtree(work)
        work.mkdir(exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="logitpair-smoke-data-") as tmp:
        data_dir = opts.data_dir
        if plan.scale == "smoke" and data_dir is None:
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
        splits = None
        if plan.scale == "smoke":  # one step: a training set of one batch
            splits = load_dataset(
                cfg.data.dataset, cfg.data.data_dir, cfg.data.val_size, cfg.seed, **cfg.data.options()
            )
            splits = replace(splits, train=splits.train.subset(slice(0, cfg.optim.batch_size)))
        log(f"[reproduce] seed {k}: training {row.name} ({row.method}, {cfg.model}, {cfg.optim.epochs} epochs)")
        resume = plan.scale == "full" or opts.runs is not None
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
    if rank != 0:
        return {}
    per_seed = []
    for k in range(opts.seeds):
        log(f"[reproduce] seed {k}: evaluating")
        per_seed.append(_evaluate_seed(opts, plan, run_dirs[k], work / f"seed-{k}", data_dir, progress, log))
    # the run directories inside the work folder move with it to OUT
    shown = [{name: final / d.relative_to(work) if d.is_relative_to(work) else d for name, d in dirs.items()}
             for dirs in run_dirs]  # fmt: skip
    results = _assemble(opts, plan, per_seed, train_seconds, shown, time.perf_counter() - t0)
    _plot(work / "comparison.png", results)
    if plan.preset.protocol == "transfer":
        doc = per_seed[0]["transfer"]
        write_text(work / "transfer.md", transfer_markdown(doc))
        atomic_write(work / "transfer.png", lambda p: plot_transfer(p, doc))
    write_json(work / "results.json", results)
    write_text(work / "report.md", report_markdown(results))
    return results


# --------------------------------------------------------------------------- evaluation of one seed
def _evaluate_seed(opts: ReproduceOptions, plan: Plan, dirs: dict[str, Path], seed_dir: Path, data_dir: str | None,
                   progress: ProgressFactory, log: Logger) -> dict[str, Any]:  # fmt: skip
    """Evaluate and audit the table rows of one seed (run directories ``dirs``); per-example flags,
    audit verdicts and McNemar tests. Protocol states are saved in the run directories, so a
    rerun (or another table evaluating the same model the same way) continues or reuses them."""
    preset = plan.preset
    device = torch.device(opts.device) if opts.device != "cpu" else None
    loaded: dict[str, nn.Module] = {}

    def model(name: str) -> nn.Module:
        if name not in loaded:
            loaded[name] = load_model(dirs[name], device=device or "cpu")  # the protocol runs where the model is
        return loaded[name]

    points: dict[str, tuple[Tensor, Tensor]] = {}

    def data_of(name: str) -> tuple[Tensor, Tensor]:
        m = model(name)
        key = repr(run_info(m, where=str(dirs[name])).data.get("image_size"))
        if key not in points:
            x, y, _ = test_points(m, plan.n, data_dir)
            points[key] = (x, y)
        return points[key]

    threat = Linf(plan.eps)
    common = {"threat": threat, "seed": opts.seed, "batch_size": opts.batch_size}
    rows = preset.table_rows
    flags: dict[str, dict[str, Tensor]] = {r.name: {} for r in rows}
    doc: dict[str, Any] = {}
    if preset.protocol == "untargeted":
        crafted: dict[str, Tensor] = {}
        for r in rows:
            x, y = data_of(r.name)
            log(f"[reproduce] {r.name}: clean, the paper's attack, the {plan.suite_name} suite")
            res = run_protocol(model(r.name), x, y, [plan.paper, *plan.suite], progress=progress, desc=r.name,
                               state_path=dirs[r.name] / "reproduce-white-box.safetensors", **common)  # fmt: skip
            f = flags[r.name]
            f["clean"] = res.clean_correct
            f["white_box"] = res.clean_correct & (res.broken_by != 0)
            f["strong"] = res.robust
            if r.source:
                if r.source not in crafted:
                    log(f"[reproduce] crafting the paper's attack on {r.source} (black box)")
                    crafted[r.source], _ = craft(
                        model(r.source), x, y, plan.paper, progress=progress, desc=f"craft on {r.source}",
                        state_path=dirs[r.source] / "reproduce-crafted.partial.safetensors", **common,
                    )  # fmt: skip
                f["black_box"] = topk_correct(predict(model(r.name), crafted[r.source]), y, 1).cpu()
                f["black_box_robust"] = f["clean"] & f["black_box"]
    elif preset.protocol == "targeted":
        for r in rows:
            x, y = data_of(r.name)
            log(f"[reproduce] {r.name}: targeted protocol (paper's attack, long PGD, targeted suite), untargeted extra")
            tr = targeted_protocol(
                model(r.name), x, y, {"paper": [plan.paper], "long": [plan.long], "suite": list(plan.targeted_suite)},
                untargeted=plan.suite, state_dir=dirs[r.name] / "reproduce-targeted", progress=progress,
                **common,
            )  # fmt: skip
            f = flags[r.name]
            f["clean_top1"], f["clean_top5"] = tr.clean_top1, tr.clean_top5
            for key, group in (("wb", "paper"), ("long", "long"), ("suite", "suite"), ("worst", None)):
                f[f"{key}_top1"], f[f"{key}_top5"] = tr.robust(group, 1), tr.robust(group, 5)
                f[f"{key}_success"] = tr.success(group)
            if tr.untargeted is not None:
                f["untargeted_top1"], f["untargeted_top5"] = tr.untargeted.robust, tr.untargeted.robust_top5  # type: ignore[assignment]
            if r.source:
                log(f"[reproduce] {r.name}: black box, the paper's attack crafted on {r.source} (same targets)")
                bb = run_protocol(
                    model(r.name), x, y, [replace(plan.paper, transfer=True, label=plan.paper.label + " (transfer)")],
                    source=model(r.source), targeted=True, top5=True, progress=progress, desc=f"{r.name} black box",
                    state_path=dirs[r.name] / f"reproduce-black-box-{dirs[r.source].name}.safetensors", **common,
                )  # fmt: skip
                if not torch.equal(bb.target, tr.target):  # type: ignore[arg-type]
                    raise RuntimeError("black box: the targets differ from the white-box protocol's")
                f["bb_top1"], f["bb_top5"], f["bb_success"] = bb.robust, bb.robust_top5, bb.target_hit  # type: ignore[assignment]
    else:  # transfer matrix
        names = [r.name for r in preset.rows]
        x, y = data_of(names[0])
        log(f"[reproduce] transfer matrix over {', '.join(names)}")
        t1 = time.perf_counter()
        tm = transfer_matrix(
            {n: model(n) for n in names}, x, y, attack=plan.paper, progress=progress,
            state_dir=seed_dir / "transfer-crafted", **common,
        )  # fmt: skip
        doc = {"dataset": plan.dataset, "eps": plan.eps, "runs": {n: str(dirs[n]) for n in names},
               "ensembles": {}, **tm.to_dict(), "seconds": round(time.perf_counter() - t1, 2)}  # fmt: skip
        for r in rows:
            f = flags[r.name]
            f["clean"] = tm.clean[r.name]
            for s in names:
                f[f"from_{s}"] = tm.plain[s][r.name]
                f[f"from_{s}_robust"] = tm.robust[s][r.name]
    audits = {}
    for r in rows:
        log(f"[reproduce] {r.name}: gradient-masking audit")
        audits[r.name] = _audit(dirs, r, plan, data_dir, opts, device, progress)
    n_points = len(next(iter(points.values()))[1])
    comparisons = []
    for c in preset.compare:
        fa, fb = flags[c.a].get(c.metric_a), flags[c.b].get(c.other_metric)
        if fa is None or fb is None:
            continue
        comparisons.append(
            {"row_a": c.a, "row_b": c.b, "metric_a": c.metric_a, "metric_b": c.other_metric, **mcnemar(fa, fb)}
        )
    return {"n": n_points, "flags": flags, "audits": audits, "comparisons": comparisons, "transfer": doc}


def _audit(dirs: dict[str, Path], row: Row, plan: Plan, data_dir: str | None, opts: ReproduceOptions,
           device: torch.device | None, progress: ProgressFactory) -> dict[str, Any]:  # fmt: skip
    """The quick gradient-masking audit of one row (with its black-box source for the transfer
    check); the verdict is kept in ``reproduce-audit.json`` and reused for the same settings."""
    run_dir = dirs[row.name]
    source = dirs[row.source] if row.source else None
    key = {"settings": plan.audit.to_dict(), "n": plan.audit_points, "eps": plan.eps, "seed": opts.seed,
           "source": str(source), "data_dir": data_dir, "weights": sha256_file(run_dir / "model.safetensors")}  # fmt: skip
    cache = run_dir / "reproduce-audit.json"
    try:
        saved = json.loads(cache.read_text())
        if saved.get("key") == key:
            return saved["result"]
    except (OSError, ValueError):
        pass
    aud = audit_run(run_dir, source=source, n=plan.audit_points, seed=opts.seed, data_dir=data_dir,
                    eps=plan.eps, settings=plan.audit, progress=progress, device=str(device or "cpu"))  # fmt: skip
    result = {"verdict": aud["verdict"], "failed": [c["name"] for c in aud["checks"] if c["passed"] is False],
              "reasons": aud.get("reasons", [])}  # fmt: skip
    write_json(cache, {"key": key, "result": result})
    return result


# --------------------------------------------------------------------------- results and report
def _assemble(opts: ReproduceOptions, plan: Plan, per_seed: list[dict[str, Any]], train_seconds: list[dict[str, float]],
              run_dirs: list[dict[str, Path]], seconds: float) -> dict[str, Any]:  # fmt: skip
    preset = plan.preset
    rows = []
    for r in preset.table_rows:
        seeds = [{key: summarize(v) for key, v in s["flags"][r.name].items()} for s in per_seed]
        keys = list(seeds[0])
        rows.append(
            {
                "name": r.name,
                "label": r.label,
                "method": r.method,
                "paper": dict(r.paper),
                "ours": seeds[0],
                "seeds": seeds,
                "spread": {key: spread([s[key]["value"] for s in seeds]) for key in keys},
                "audit": [s["audits"][r.name] for s in per_seed],
                "train_seconds": [t[r.name] for t in train_seconds],
                "run_dirs": [str(d[r.name]) for d in run_dirs],
                "ours_settings": list(r.ours),
            }
        )
    others = [
        {"name": r.name, "label": r.label, "method": r.method, "role": r.role, "ours_settings": list(r.ours),
         "train_seconds": [t[r.name] for t in train_seconds], "run_dirs": [str(d[r.name]) for d in run_dirs]}
        for r in preset.rows if r.role != "row"
    ]  # fmt: skip
    comparisons = [{**c, "seed": k} for k, s in enumerate(per_seed) for c in s["comparisons"]]
    env = environment()
    results: dict[str, Any] = {
        "preset": preset.name,
        "table": preset.table,
        "title": preset.title,
        "protocol": preset.protocol,
        "scale": plan.scale,
        "dataset": plan.dataset,
        "paper_dataset": preset.dataset,
        "eps": plan.eps,
        "n": per_seed[0]["n"],
        "seeds": opts.seeds,
        "evaluation_seed": opts.seed,
        "device": opts.device,
        "columns": [{"key": c.key, "label": c.label} for c in preset.columns],
        "attacks": {
            "paper": plan.paper.to_dict(),
            "paper_given": preset.attack.given,
            "long": plan.long.to_dict() if preset.protocol == "targeted" else None,
            "suite_name": plan.suite_name,
            "suite": [a.to_dict() for a in plan.suite],
            "targeted_suite": [a.to_dict() for a in plan.targeted_suite] if preset.protocol == "targeted" else None,
        },
        "audit_settings": {"points": plan.audit_points, **plan.audit.to_dict()},
        "rows": rows,
        "other_models": others,
        "comparisons": comparisons,
        "settings": [{"setting": s, "source": src} for s, src in preset.settings],
        "substitutions": list(plan.substitutions),
        "notes": list(preset.notes),
        "transfer": per_seed[0]["transfer"] or None,
        "environment": env,
        "seconds": round(seconds, 1),
        "command": command_line(opts),
    }
    return results


def command_line(opts: ReproduceOptions) -> str:
    parts = ["logitpair", "reproduce", opts.preset, "--scale", opts.scale]
    if opts.dataset:
        parts += ["--dataset", opts.dataset]
    if opts.data_dir:
        parts += ["--data-dir", str(opts.data_dir)]
    if opts.device != "cpu":
        parts += ["--device", opts.device]
    if opts.seeds != 1:
        parts += ["--seeds", str(opts.seeds)]
    if opts.n is not None:
        parts += ["--n", str(opts.n)]
    if opts.out is not None:
        parts += ["--out", str(opts.out)]
    if opts.runs is not None:
        parts += ["--runs", str(opts.runs)]
    return " ".join(parts)


def eps_label(eps: float) -> str:
    """``16/255 (0.0627)`` for a whole number of 255ths, else ``0.1``."""
    k = round(eps * 255)
    return f"{k}/255 ({eps:.4g})" if abs(eps * 255 - k) < 1e-6 and k not in (0, 255) else f"{eps:.4g}"


def _paper(value: float | None) -> str:
    return "—" if value is None else f"{value:.1f}"


def _verdict(audits: list[dict[str, Any]]) -> str:
    out = []
    for a in audits:
        out.append(a["verdict"] + (" (" + ", ".join(a["failed"]) + ")" if a["failed"] else ""))
    return "; ".join(out)


METRIC_LABELS = {
    "clean": "Clean",
    "white_box": "White box: the paper's attack",
    "strong": "White box: worst case, the paper's attack + strong suite",
    "black_box": "Black box (accuracy on the transferred examples)",
    "black_box_robust": "Black box, robust (correct clean and transferred)",
    "clean_top1": "Clean top-1",
    "clean_top5": "Clean top-5",
    "wb_top1": "Paper's attack top-1",
    "wb_top5": "Paper's attack top-5",
    "wb_success": "Paper's attack success",
    "long_top1": "Long targeted PGD top-1",
    "long_top5": "Long targeted PGD top-5",
    "long_success": "Long targeted PGD success",
    "suite_top1": "Targeted suite top-1",
    "suite_top5": "Targeted suite top-5",
    "suite_success": "Targeted suite success",
    "worst_top1": "Worst case top-1",
    "worst_top5": "Worst case top-5",
    "worst_success": "Targeted success, any attack",
    "untargeted_top1": "Untargeted worst case top-1 (extra)",
    "untargeted_top5": "Untargeted worst case top-5 (extra)",
    "bb_top1": "Black box top-1",
    "bb_top5": "Black box top-5",
    "bb_success": "Black box success",
}


def _label(key: str) -> str:
    if key.startswith("from_"):
        src = key[5:].removesuffix("_robust")
        return f"transferred from {src}" + (" (robust)" if key.endswith("_robust") else "")
    return METRIC_LABELS.get(key, key)


def report_markdown(res: dict[str, Any]) -> str:
    """The report: the paper's numbers and ours side by side, our full evaluation, paired tests, settings."""
    cols = res["columns"]
    k = res["seeds"]
    text = f"# Reproducing {res['table']}: {res['title']}\n\n"
    text += (
        f"Scale `{res['scale']}`, dataset {res['dataset']} (the paper's: {res['paper_dataset']}), L∞ ε = "
        f"{eps_label(res['eps'])}, first {res['n']} test points, {k} seed(s), evaluation seed {res['evaluation_seed']}. "
        "Accuracy in %: the paper's as printed, ours with 95% Wilson intervals (N per entry = the number of test "
        "points); a point counts as robust only if it is correct clean and under the attack. "
        f"Ours from seed 0{' (spread over seeds below)' if k > 1 else ''}.\n\n"
    )
    if res["substitutions"]:
        text += "**Substitutions at this scale (ours):**\n\n" + "".join(f"- {s}\n" for s in res["substitutions"]) + "\n"
    text += "## Side by side with the paper\n\n"
    header = ["model"]
    for c in cols:
        header += [f"{c['label']}: paper", f"{c['label']}: ours"]
    header.append("audit")
    table = []
    for r in res["rows"]:
        line = [r["label"]]
        for c in cols:
            line += [_paper(r["paper"].get(c["key"])), pct_ci(r["ours"].get(c["key"]))]
        line.append(_verdict(r["audit"][:1]))
        table.append(line)
    text += markdown_table(header, table)
    if k > 1:
        text += f"\nSpread over {k} seeds (mean ± sample sd of our values, %):\n\n"
        table = []
        for r in res["rows"]:
            line = [r["label"]]
            for c in cols:
                sp = r["spread"].get(c["key"])
                line.append(
                    "—" if not sp or sp["mean"] is None else f"{100 * sp['mean']:.1f} ± {100 * (sp['sd'] or 0):.1f}"
                )
            line.append(_verdict(r["audit"]))
            table.append(line)
        text += markdown_table(["model", *(c["label"] for c in cols), "audit per seed"], table)
    text += "\n## Our full evaluation (seed 0)\n\n"
    attacks = res["attacks"]
    text += f"- the paper's attack: {attacks['paper']['label']}"
    text += (
        f" (as the paper gives it, {res['table']})\n"
        if attacks["paper_given"]
        else " (ours where the paper gives no setting)\n"
    )
    if attacks.get("long"):
        text += f"- the long attack: {attacks['long']['label']}\n"
        text += "- the targeted suite: " + ", ".join(a["label"] for a in attacks["targeted_suite"]) + "\n"
        text += (
            "- every targeted attack aims at the same random target class per point (≠ label, seeded); the worst case "
            "is per point over all of them; the untargeted worst case (strong suite `"
            + attacks["suite_name"] + "`) is an extra, not the paper's protocol\n"
        )  # fmt: skip
    elif res["protocol"] == "transfer":
        text += "- crafted once on every model (the statics, ens-adv, the sources) and shown to every model; "
        text += "a model's own column is white box\n"
    else:
        suite = ", ".join(a["label"] for a in attacks["suite"])
        text += f"- the strong suite `{attacks['suite_name']}`: {suite}\n"
    text += "\n"
    keys = [key for key in res["rows"][0]["ours"]]
    if res["protocol"] == "targeted":
        for group, title in (
            ("top1", "Top-1 accuracy"),
            ("top5", "Top-5 accuracy"),
            ("success", "Targeted success rate"),
        ):
            sel = [key for key in keys if key.endswith(group)]
            text += f"**{title}:**\n\n"
            text += markdown_table(["model", *(_label(s) for s in sel)],
                                   [[r["label"], *(pct_ci(r["ours"].get(s)) for s in sel)] for r in res["rows"]])  # fmt: skip
            text += "\n"
    else:
        sel = [key for key in keys if not key.endswith("_robust")] + [key for key in keys if key.endswith("_robust")]
        text += markdown_table(["model", *(_label(s) for s in sel)],
                               [[r["label"], *(pct_ci(r["ours"].get(s)) for s in sel)] for r in res["rows"]])  # fmt: skip
        text += "\n"
        if res["protocol"] == "transfer":
            text += "The full source x target matrices: [transfer.md](transfer.md), ![transfer](transfer.png)\n\n"
    train_rows = [[r["label"], ", ".join(f"{s:.0f}" for s in r["train_seconds"]), _verdict(r["audit"])]
                  for r in res["rows"]]  # fmt: skip
    train_rows += [[o["label"], ", ".join(f"{s:.0f}" for s in o["train_seconds"]), f"({o['role']})"]
                   for o in res["other_models"]]  # fmt: skip
    text += "Training seconds per seed and the quick gradient-masking audit (`logitpair audit`; `suspect` = some check failed):\n\n"
    text += markdown_table(["model", "train s", "audit"], train_rows)
    if res["comparisons"]:
        text += "\n## Paired comparisons (McNemar's exact test on the same points)\n\n"
        text += (
            "A only / B only: points only A / only B gets right; p: exact two-sided binomial test on these "
            "discordant points (the null hypothesis: equally accurate).\n\n"
        )
        names = {r["name"]: r["label"] for r in res["rows"]}
        table = []
        for c in res["comparisons"]:
            a = f"{names.get(c['row_a'], c['row_a'])}: {_label(c['metric_a'])}"
            b = f"{names.get(c['row_b'], c['row_b'])}: {_label(c['metric_b'])}"
            table.append([str(c["seed"]), a, b, f"{100 * c['a']:.1f}", f"{100 * c['b']:.1f}", str(c["a_only"]),
                          str(c["b_only"]), f"{c['p_value']:.3g}", str(c["n"])])  # fmt: skip
        text += markdown_table(["seed", "A", "B", "A %", "B %", "A only", "B only", "p", "N"], table)
    text += "\n## Settings\n\n"
    text += f"Each with its source; {SETTINGS_PAGE} in the logitpair repository lists every preset's settings.\n\n"
    text += "".join(f"- {s['setting']} — *{s['source']}*\n" for s in res["settings"])
    for r in [*res["rows"], *res["other_models"]]:
        for s in r["ours_settings"]:
            text += f"- {r['label']}: {s} — *ours*\n"
    if res["scale"] != "full":
        text += f"\nThe list above is the full-scale recipe; at scale `{res['scale']}` the substitutions at the top apply.\n"
    if res["notes"]:
        text += "\n## Notes\n\n" + "".join(f"- {n}\n" for n in res["notes"])
    text += "\n![paper vs ours](comparison.png)\n"
    env = res["environment"]
    text += (
        f"\nReproduce: `{res['command']}` ({res['seconds']:.0f} s on {env.get('machine')}, {env.get('threads')} "
        f"threads, torch {env.get('torch')}, device {res['device']}).\n"
    )
    return text


def _plot(path: Path, res: dict[str, Any]) -> None:
    """Grouped bars: the paper's number and ours (with its 95% interval) per row and paper column."""

    def draw(p: Path) -> None:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        cols = res["columns"]
        fig, axes = plt.subplots(1, len(cols), figsize=(4.2 * len(cols), 3.6), squeeze=False)
        for ax, c in zip(axes[0], cols, strict=True):
            labels = [r["name"] for r in res["rows"]]
            xs = range(len(labels))
            paper = [r["paper"].get(c["key"]) for r in res["rows"]]
            ours = [r["ours"].get(c["key"]) for r in res["rows"]]
            ax.bar([i - 0.2 for i in xs], [v if v is not None else 0 for v in paper], 0.4, label="paper",
                   color="#999999")  # fmt: skip
            vals = [100 * o["value"] if o else 0 for o in ours]
            err = [[100 * (o["value"] - o["ci95"][0]) if o else 0 for o in ours],
                   [100 * (o["ci95"][1] - o["value"]) if o else 0 for o in ours]]  # fmt: skip
            ax.bar([i + 0.2 for i in xs], vals, 0.4, yerr=err, capsize=3, label="ours", color="#1f77b4")
            ax.set_xticks(list(xs), labels, rotation=30, ha="right", fontsize=8)
            ax.set_ylim(0, 100)
            ax.set_title(c["label"], fontsize=9)
            ax.set_ylabel("accuracy %")
        axes[0][0].legend(fontsize=8)
        fig.suptitle(f"{res['table']} ({res['scale']}, {res['dataset']}, N={res['n']})", fontsize=10)
        fig.tight_layout()
        fig.savefig(p, format="png", dpi=110)
        plt.close(fig)

    atomic_write(path, draw)


# --------------------------------------------------------------------------- --list
def describe_presets() -> str:
    """``logitpair reproduce --list``: every preset, what it trains and evaluates, and the data it needs."""
    lines = ["Presets (logitpair reproduce NAME [--scale smoke|small|full]; small runs on Fashion-MNIST):", ""]
    for name in PRESETS:
        p: Preset = PRESETS.get(name)
        lines.append(f"{name:<22} {p.table}: {p.title}")
        what = {
            "untargeted": "white box (the paper's attack), worst case with the strong suite, black box, clean",
            "targeted": "targeted protocol: the paper's attack, long targeted PGD, targeted suite; top-1/top-5",
            "transfer": "source x target transfer matrix",
        }[p.protocol]
        if any(r.source for r in p.table_rows) and p.protocol == "targeted":
            what += "; black box"
        lines.append(f"{'':<22} trains {len(p.rows)} model(s): {', '.join(r.name for r in p.rows)}")
        lines.append(f"{'':<22} evaluates: {what}; audit per row")
        lines.append(f"{'':<22} data (full): {DATA_NEEDS.get(p.dataset, p.dataset)}")
        if p.datasets:
            lines.append(f"{'':<22} also accepts: {', '.join(p.datasets)}")
        lines.append("")
    lines.append("--scale small needs Fashion-MNIST (or --dataset NAME --data-dir DIR); --scale smoke needs nothing.")
    return "\n".join(lines) + "\n"
