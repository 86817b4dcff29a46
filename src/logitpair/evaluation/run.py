"""Evaluate a run directory: clean, white-box and black-box accuracy, written next to the run.

With ``write=True`` (the CLI) :func:`evaluate_run` writes ``evaluation.json`` and ``evaluation.md``
into the run directory (atomically) and keeps its resumable state in ``RUN/eval-state/`` (the
evaluation cache, :mod:`logitpair.evaluation.cache`); black-box accuracy comes from
:func:`~logitpair.evaluation.blackbox.black_box`.
:func:`test_points` loads a run's test points (with the run's dataset options). The paper's
targeted ImageNet protocol is :mod:`logitpair.evaluation.targeted`.
"""

from __future__ import annotations

import dataclasses
import json
import math
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from logitpair.checkpoint import RunInfo, load_model, run_info
from logitpair.config import DataConfig, build
from logitpair.data import load_dataset, take
from logitpair.data.points import load_points
from logitpair.distributed import Dist, same_on_all_ranks, setup
from logitpair.environment import parse_device
from logitpair.errors import ConfigError
from logitpair.evaluation.blackbox import black_box
from logitpair.evaluation.cache import flags_text, points_digest, weights_digest
from logitpair.evaluation.protocol import ProtocolResult, check_norm, run_protocol
from logitpair.evaluation.spec import AttackSpec, pgd_spec
from logitpair.evaluation.suites import get_suite
from logitpair.external import ExternalModel, load_subject
from logitpair.io import write_json, write_text
from logitpair.metrics import summarize
from logitpair.models.ensemble import EnsembleLogits
from logitpair.progress import ProgressFactory, null_progress
from logitpair.report import markdown_table, pct_ci, radius
from logitpair.threat import NORM_NAMES, Threat, make_threat


def check_points_options(n: int | None, eps: float | None, batch_size: int | None = None) -> None:
    """The options every run-directory command shares: ``n`` test points (None: the default),
    ``eps`` in [0, 1] (None: the run's), ``batch_size`` >= 1; one ConfigError naming the option."""
    if n is not None and n < 1:
        raise ConfigError(f"expected >= 1, got {n}", option="n")
    if eps is not None and not 0 <= eps <= 1:
        raise ConfigError(f"expected 0 <= eps <= 1, got {eps}", option="eps")
    if batch_size is not None and batch_size < 1:
        raise ConfigError(f"expected >= 1, got {batch_size}", option="batch_size")


def check_threat_options(norm: str, eps: float | None) -> None:
    """The threat model's options: ``norm`` one of :data:`~logitpair.threat.NORM_NAMES`; an L-inf
    ``eps`` in [0, 1] or None (the run's training eps); an L2 ``eps`` given (a run's training eps is an
    L-inf radius, never an L2 default), finite and >= 0. One ConfigError naming the option."""
    if str(norm).lower() not in NORM_NAMES:
        raise ConfigError(f"expected one of {', '.join(NORM_NAMES)}, got {norm!r}", option="norm")
    if str(norm).lower() == "linf":
        check_points_options(None, eps)
        return
    if eps is None:
        raise ConfigError("the L2 threat model needs an explicit `eps` (a run's training eps is an L-inf radius)")
    if not (math.isfinite(eps) and eps >= 0):
        raise ConfigError(f"expected a finite L2 radius >= 0, got {eps}", option="eps")


def eval_threat(norm: str, eps: float | None, info: RunInfo) -> Threat:
    """The threat model an evaluation of a run uses: ``eps`` in ``norm``; an L-inf radius defaults
    to the run's training eps (``info.eps``), an L2 one must be given (:func:`check_threat_options`)."""
    check_threat_options(norm, eps)
    return make_threat(norm, info.eps if eps is None else eps)


@dataclass(frozen=True)
class EvalOptions:
    n: int | None = None  # first n test points (None: all)
    eps: float | None = None  # default: the eps the model was trained for (L-inf; an L2 eps is required)
    norm: str = "linf"  # the threat model: linf or l2 (logitpair.threat.make_threat)
    steps: int = 40
    restarts: int = 2
    step_size: float | None = None  # default 2.5 * eps / steps (in the norm's units)
    targeted: bool = False
    top5: bool = False
    batch_size: int = 500
    seed: int = 0
    data_dir: str | None = None
    suite: str | None = "standard"  # strong suite run after the PGD baseline (None: baseline only)
    attacks: tuple[AttackSpec, ...] = field(default_factory=tuple)  # explicit list, replaces the suite
    save_adversarial: str | None = None  # safetensors file for the adversarial examples
    resume: bool = True  # continue an interrupted evaluation with the same settings
    device: str = "cpu"  # where the model and the attacks run (cpu | cuda | cuda:N); always float32

    def __post_init__(self) -> None:
        check_points_options(self.n, None)
        check_threat_options(self.norm, self.eps)
        if self.steps < 1:
            raise ConfigError(f"expected >= 1, got {self.steps}", option="steps")
        if self.restarts < 1:
            raise ConfigError(f"expected >= 1, got {self.restarts}", option="restarts")
        if self.step_size is not None and not self.step_size > 0:
            raise ConfigError(f"expected > 0, got {self.step_size}", option="step_size")
        if self.batch_size < 1:
            raise ConfigError(f"expected >= 1, got {self.batch_size}", option="batch_size")


def test_points(
    run: RunInfo | nn.Module, n: int | None, data_dir: str | None = None, where: str = "the model"
) -> tuple[Tensor, Tensor, str]:
    """The first ``n`` test points (all if None) of the dataset a run was trained on, as
    ``(x, y, dataset)`` tensors with the evaluation transform. ``run`` is its :class:`RunInfo` (or
    a model loaded by ``load_model``, whose RunInfo is resolved, naming ``where`` in errors). The
    run's dataset options (``image_size``, ``skip_bad``) and its decoding ``workers`` are used, so a
    folder dataset gives images of the size the model was trained at; ``data_dir`` overrides the run's.
    A run whose ``points`` names a file (a model from elsewhere) takes its points from that file."""
    info = run if isinstance(run, RunInfo) else run_info(run, where=where)
    if info.points:
        x, y = load_points(info.points)
        return x[:n], y[:n], info.dataset
    known = {f.name for f in dataclasses.fields(DataConfig)}
    dcfg = build(DataConfig, {k: v for k, v in info.data.items() if k in known})
    splits = load_dataset(info.dataset, data_dir or dcfg.data_dir, val_size=0, **dcfg.options())
    test = splits.test
    x, y = take(test, len(test) if n is None else n, workers=dcfg.workers)
    return x, y, info.dataset


def source_runs(source: str | Path | Sequence[str | Path]) -> list[str]:
    """The runs named by a transfer source: a path, a comma-separated ``RUN,RUN`` string, or a sequence."""
    if isinstance(source, Path) or (isinstance(source, str) and Path(source).exists()):
        parts = [str(source)]
    elif isinstance(source, str):
        parts = [p.strip() for p in source.split(",")]
    else:
        parts = [str(p).strip() for p in source]
    if not parts or not all(parts):
        raise ConfigError(f"expected RUN or RUN,RUN,..., got {source!r}", option="source")
    return parts


def load_source(source: str | Path | Sequence[str | Path], device: str | torch.device = "cpu") -> nn.Module:
    """A transfer source model: one run, or several runs attacked as one ensemble
    (:class:`~logitpair.models.ensemble.EnsembleLogits`, the mean of their logits)."""
    models = [load_model(p, device=device) for p in source_runs(source)]
    return models[0] if len(models) == 1 else EnsembleLogits(models)


def strong_attacks(opts: EvalOptions, norm: str | None = None) -> list[AttackSpec]:
    """The attacks after the PGD baseline: the explicit list, else the suite (the targeted one for
    ``targeted`` with quick, standard or thorough); with ``norm`` a suite must support that threat model."""
    if opts.attacks:
        return list(opts.attacks)
    if opts.suite is None:
        return []
    if opts.targeted and opts.suite in ("quick", "standard", "thorough"):
        return get_suite("targeted", norm)
    return get_suite(opts.suite, norm)


def evaluate_run(
    run_dir: str | Path,
    opts: EvalOptions,
    *,
    source: str | Path | None = None,
    external: ExternalModel | None = None,
    progress: ProgressFactory = null_progress,
    write: bool,
) -> dict[str, Any]:
    """Clean accuracy, our PGD baseline (not the paper's attack), the worst case over the baseline and the
    strong suite (each attack only on points still robust) and, with ``source``, black-box
    transfer accuracy, on the first ``opts.n`` test points. With ``write`` (and ``opts.resume``)
    per-example results are saved in ``RUN/eval-state/`` after every batch (an interrupted
    evaluation continues), and ``evaluation.json`` / ``evaluation.md`` are written into the run.
    ``external``: evaluate this model from elsewhere instead; ``run_dir`` is then only where the
    results go (:func:`~logitpair.external.load_subject`).

    Under torchrun (every process runs the same command) the protocol batches are sharded, batch
    ``b`` to rank ``b mod N`` (:func:`~logitpair.evaluation.cache.run_batches`; on CUDA each process
    uses ``cuda:LOCAL_RANK``): every process returns the same document, equal to one process's,
    and rank 0 alone writes files."""
    run_dir = Path(run_dir)
    world, device = setup(str(parse_device(opts.device)))  # joins the process group under torchrun
    linf = make_threat(opts.norm, 0.0).norm == "Linf"
    eps = opts.eps if linf else None  # a run's eps is an L-inf one
    model, info = load_subject(run_dir, external, device=device, eps=eps, write=write)
    threat = eval_threat(opts.norm, opts.eps, info)
    check_norm(strong_attacks(opts, threat.norm), threat.norm)  # attacks that do not support it: before any work
    src = load_source(source, device) if source is not None else None  # before any work: a bad source fails fast
    x, y, dataset = test_points(info, opts.n, opts.data_dir)
    if world.active:  # every rank evaluates the same model on the same points
        same_on_all_ranks(world, {"opts": opts, "source": source, "points": points_digest(x, y),
                                  "model": weights_digest(model)}, "the evaluation (options, test points or weights)")  # fmt: skip
    state_dir = run_dir / "eval-state" if (write and opts.resume and run_dir.is_dir()) else None
    if state_dir is not None:
        state_dir.mkdir(exist_ok=True)
    t0 = time.perf_counter()
    wb, baseline, white = _white_box(model, x, y, opts, threat, state_dir, progress, world)
    summary = wb.summary()
    out: dict[str, Any] = {
        "run": str(run_dir),
        "dataset": dataset,
        "method": info.method,
        "n": len(y),
        "eps": threat.eps,
        "threat": threat.to_dict(),
        "suite": None if opts.attacks else opts.suite,
        "device": str(device),
        "processes": world.world_size,
        "precision": "float32",  # attacks and evaluation never run under autocast
        "clean": summary["clean"],
        "pgd": {**summarize(wb.clean_correct & (wb.broken_by != 0)), "attack": baseline.to_dict()},
        "white_box": summary,
        "per_example": per_example(x, y, wb),
    }
    if external is not None:
        out["external"] = {"model": external.label, **model.meta["external"]}
    if src is not None:
        out["black_box"] = _black_box(model, src, source_runs(source), x, y, opts, threat, state_dir, progress, world)
    out["seconds"] = time.perf_counter() - t0
    if opts.save_adversarial:
        if world.is_main:
            _save_adversarial(Path(opts.save_adversarial), wb, y, threat, run_dir, white)
        out["adversarial_file"] = str(opts.save_adversarial)
    if write and world.is_main:
        write_json(run_dir / "evaluation.json", out)
        write_text(run_dir / "evaluation.md", evaluation_markdown(out))
    return out


def per_example(x: Tensor, y: Tensor, wb: ProtocolResult) -> dict[str, str]:
    """The white-box record per point, for comparisons on the same points (``certify``'s sandwich):
    the points' digest, and clean and worst-case correctness as ``0``/``1`` strings."""
    return {"points": points_digest(x, y), "clean": flags_text(wb.clean_correct), "robust": flags_text(wb.robust)}


def _common(opts: EvalOptions, threat: Threat, world: Dist) -> dict[str, Any]:
    return {"threat": threat, "batch_size": opts.batch_size, "seed": opts.seed, "targeted": opts.targeted,
            "top5": opts.top5, "world": world}  # fmt: skip


def _white_box(
    model: nn.Module, x: Tensor, y: Tensor, opts: EvalOptions, threat: Threat, state_dir: Path | None,
    progress: ProgressFactory, world: Dist,
) -> tuple[ProtocolResult, AttackSpec, list[AttackSpec]]:  # fmt: skip
    """The PGD baseline then the strong attacks, in order; the result, the baseline and the list."""
    baseline = pgd_spec(opts.steps, opts.restarts, opts.step_size)
    white = [baseline, *strong_attacks(opts, threat.norm)]
    wb = run_protocol(
        model, x, y, white, progress=progress, desc="white-box", keep_adversarial=opts.save_adversarial is not None,
        state_path=state_dir / "white-box.safetensors" if state_dir else None, **_common(opts, threat, world),
    )  # fmt: skip
    return wb, baseline, white


def _black_box(
    model: nn.Module, src: nn.Module, runs: list[str], x: Tensor, y: Tensor, opts: EvalOptions, threat: Threat,
    state_dir: Path | None, progress: ProgressFactory, world: Dist,
) -> dict[str, Any]:  # fmt: skip
    """The baseline PGD crafted on the source per point the target gets right (:func:`black_box`)."""
    # the state file is keyed by the source's weights: the protocol's fingerprint covers the target only
    bb_state = state_dir / f"black-box-{weights_digest(src)[:16]}.safetensors" if state_dir else None
    bb = black_box(
        model, x, y, source=src, attack=pgd_spec(opts.steps, opts.restarts, opts.step_size, transfer=True),
        progress=progress, desc="black-box", state_path=bb_state, **_common(opts, threat, world),
    )  # fmt: skip
    out = {**bb.summary(), "source": ",".join(runs)}
    if len(runs) > 1:
        out["ensemble"] = runs
    return out


def _save_adversarial(
    path: Path, wb: ProtocolResult, y: Tensor, threat: Threat, run_dir: Path, white: list[AttackSpec]
) -> None:
    from safetensors.torch import save_file

    from logitpair.io import atomic_write

    tensors = {"x_adv": wb.adversarial, "y": y, "robust": wb.robust, "broken_by": wb.broken_by}
    meta = {"eps": str(threat.eps), "norm": threat.norm, "run": str(run_dir), "attacks": str([a.label for a in white])}
    atomic_write(path, lambda p: save_file({k: v.contiguous() for k, v in tensors.items()}, str(p), metadata=meta))


def baseline_note(attack: dict[str, Any]) -> str:
    """One sentence: how the PGD baseline ``attack`` (an :class:`AttackSpec` dict) differs from the
    paper's MNIST attack (Kannan et al. 2018: 40 steps of 0.01 at ε 0.3, one random start, last iterate)."""
    p = attack["params"]
    steps, restarts = int(p.get("steps", 40)), int(p.get("restarts", 1))
    step = f"{p['step_size']:.4g}" if p.get("step_size") is not None else f"2.5·ε/{steps}"
    starts = f"{restarts} random restarts" if restarts > 1 else "one random start"
    return (
        f"The {attack['label']} baseline is ours, not the paper's attack: {steps} steps of {step} from {starts}, "
        "keeping each point's best iterate, where the paper's MNIST attack is 40 steps of 0.01 (ε/30 at ε = 0.3) "
        "from one random start, keeping the last iterate."
    )


def external_line(ext: dict[str, Any]) -> str:
    """One sentence on a model from elsewhere: its architecture, weights and input normalisation."""
    weights = (
        f", weights `{ext['weights']}` (SHA-256 {ext['sha256'][:16]}…, {ext['layout']} layout)"
        if ext["weights"]
        else ""
    )
    norm = ext.get("normalization")
    shown = "none" if not norm else f"mean {[round(v, 4) for v in norm[0]]}, std {[round(v, 4) for v in norm[1]]}"
    return f"Model from elsewhere: `{ext['model']}`{weights}; input normalisation {shown}.\n\n"


def evaluation_markdown(ev: dict[str, Any]) -> str:
    wb = ev["white_box"]
    n = str(ev["n"])
    rows = [["clean", pct_ci(ev["clean"]), n]]
    base = ev["pgd"]["attack"]
    rows.append([f"white-box {base['label']} baseline (ours)", pct_ci(ev["pgd"]), n])
    if len(wb["attacks"]) > 1:
        rows.append(["white-box worst case over all attacks below", pct_ci(wb["robust"]), n])
    if "robust_top5" in wb:
        rows.append(["white-box worst case, top-5", pct_ci(wb["robust_top5"]), n])
    if "target_success" in wb:
        rows.append(["targeted attack success rate", pct_ci(wb["target_success"]), n])
    if "black_box" in ev:
        bb = ev["black_box"]
        src = f"the ensemble (mean logits) of {', '.join(bb['ensemble'])}" if bb.get("ensemble") else bb["source"]
        rows.append([f"black-box: PGD transferred from {src}", pct_ci(bb["robust"]), n])
    text = f"# Evaluation of `{ev['run']}`\n\n"
    threat = ev.get("threat") or {"norm": "Linf", "eps": ev["eps"]}  # evaluations written before L2 name no threat
    text += f"Dataset {ev['dataset']}, method {ev['method']}, {radius(threat)}, first {ev['n']} test points, seed {wb['seed']}"
    text += f", suite `{ev['suite']}`" if ev.get("suite") else ""
    text += f"; {ev.get('precision', 'float32')} on {ev.get('device', 'cpu')}.\n\n"
    text += external_line(ev["external"]) if ev.get("external") else ""
    text += markdown_table(["", "accuracy % [95% CI]", "N"], rows)
    text += "\n" + baseline_note(base) + "\n"
    text += "\nAttacks in order (each runs only on the points still robust; a point is robust only if it is "
    text += "correct clean and under every attack):\n\n"
    attack_rows = [
        [a["label"], a["name"], json.dumps(a["params"]), str(wb.get("attacked", {}).get(a["label"], "–")),
         str(wb["broken_by"][a["label"]])]
        for a in wb["attacks"]
    ]  # fmt: skip
    text += markdown_table(["attack", "function", "settings", "points it ran on", "points it broke"], attack_rows)
    return text
