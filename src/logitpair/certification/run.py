"""Certify a run directory: certified accuracy on its first N test points, against attacks.

:func:`certify_run` certifies the run's first ``n`` test points at its ε (or ``opts.eps``) with
one bound method, then at each ε of a small curve certifies and attacks them with the ``fast``
suite (the evaluation protocol), and compares both with ``evaluation.json`` when ``logitpair
evaluate`` evaluated the same points at the same ε (its per-example record): the sandwich
(:mod:`.sandwich`). With ``write=True`` it writes ``certify.json``, ``certify.md`` and
``certify.png`` into the run, each atomically and only once everything is computed. The
resumable state (certification and attacks, per batch) is kept in ``RUN/certify-state/`` unless
``opts.resume`` is False. Under torchrun the bound methods' batches and the curve's attacks are
sharded by rank (batch ``b`` to rank ``b mod N``, the same result as one process) and rank 0
writes; ``milp`` runs in one process only.
"""

from __future__ import annotations

import io
import json
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from torch import Tensor, nn

from logitpair.certification.certify import CertifyResult, certify, check_method
from logitpair.certification.result import DECIDERS, nan_to_none
from logitpair.certification.sandwich import sandwich
from logitpair.distributed import Dist, env_world, setup
from logitpair.environment import environment, parse_device
from logitpair.errors import ConfigError
from logitpair.evaluation.cache import points_digest, text_flags
from logitpair.evaluation.protocol import run_protocol
from logitpair.evaluation.run import check_points_options, test_points
from logitpair.evaluation.suites import get_suite
from logitpair.external import ExternalModel, load_subject
from logitpair.io import write_bytes, write_json, write_text
from logitpair.progress import ProgressFactory, null_progress
from logitpair.report import markdown_table, pct_ci, plot_curves
from logitpair.threat import Linf

CURVE_SUITE = "fast"


@dataclass(frozen=True)
class CertifyOptions:
    method: str = "crown"  # ibp | crown-ibp | crown | alpha-crown | milp
    eps: float | None = None  # default: the eps the model was trained for
    n: int | None = None  # first n test points (None: all)
    batch_size: int = 100
    eps_curve: tuple[float, ...] | None = None  # None: (0, eps/2, eps); (): no curve; the run's eps is always added
    device: str = "cpu"
    data_dir: str | None = None
    resume: bool = True  # keep and reuse the per-batch state in RUN/certify-state/
    seed: int = 0  # the curve's attacks (and milp's)
    time_limit: float = 60.0  # milp: seconds per point the solver decides

    def __post_init__(self) -> None:
        check_method(self.method)
        if not self.time_limit > 0:
            raise ConfigError(f"expected > 0 seconds, got {self.time_limit}", option="time_limit")
        check_points_options(self.n, self.eps, self.batch_size)
        if any(not 0 <= e <= 1 for e in self.eps_curve or ()):
            raise ConfigError(f"expected values 0 <= eps <= 1, got {list(self.eps_curve or ())}", option="eps_curve")

    def curve(self, eps: float) -> list[float]:
        """The ε values of the curve, ascending, with ``eps`` among them (none for an empty curve)."""
        if self.eps_curve == ():
            return []
        values = (0.0, eps / 2) if self.eps_curve is None else self.eps_curve
        return sorted({float(e) for e in values} | {eps})


@dataclass(frozen=True)
class _Points:
    """The model and its points, where the state lives, and how to report progress."""

    model: nn.Module
    x: Tensor
    y: Tensor
    opts: CertifyOptions
    state_dir: Path | None
    progress: ProgressFactory
    world: Dist

    def state(self, name: str, eps: float) -> Path | None:
        return self.state_dir / f"{name}-eps{eps:.6g}.safetensors" if self.state_dir is not None else None

    def certify(self, eps: float) -> CertifyResult:
        o = self.opts
        options = {"time_limit": o.time_limit, "seed": o.seed} if o.method == "milp" else None
        return certify(self.model, self.x, self.y, threat=Linf(eps), method=o.method, batch_size=o.batch_size,
                       options=options, state_path=self.state(o.method, eps), progress=self.progress,
                       desc=f"certify eps={eps:g}", world=self.world)  # fmt: skip

    def attacked(self, eps: float) -> Tensor:
        """Per point: correct clean and under every attack of the curve's suite at ``eps``."""
        attacks = get_suite(CURVE_SUITE) if eps > 0 else []
        res = run_protocol(self.model, self.x, self.y, attacks, threat=Linf(eps), batch_size=self.opts.batch_size,
                           seed=self.opts.seed, state_path=self.state(CURVE_SUITE, eps), progress=self.progress,
                           desc=f"{CURVE_SUITE} eps={eps:g}", world=self.world)  # fmt: skip
        return res.robust


def _curve(pts: _Points, eps: float, main: CertifyResult) -> list[dict[str, Any]]:
    """Per ε of the curve: certified, attacked and clean accuracy and the sandwich's check."""
    rows = []
    for e in pts.opts.curve(eps):
        cert = main if e == eps else pts.certify(e)
        sw = sandwich(cert.certified, cert.clean_correct, pts.attacked(e), attack=f"the {CURVE_SUITE} suite")
        rows.append({"eps": e, **sw})
    return rows


def _evaluation_sandwich(
    run_dir: Path, ev: dict[str, Any] | None, x: Tensor, y: Tensor, eps: float, main: CertifyResult
) -> dict[str, Any] | None:  # fmt: skip
    """The sandwich with the evaluation's worst case, when it evaluated these points at this ε
    (``ev``, else the run's ``evaluation.json``); a note why not, else None (no evaluation)."""
    if ev is None:
        path = run_dir / "evaluation.json"
        if not path.is_file():
            return None
        ev = json.loads(path.read_text())
    rec = ev.get("per_example")
    if not rec:
        return {"note": "evaluation.json has no per-example record (written before certify existed): evaluate again"}
    norm = (ev.get("threat") or {}).get("norm", "Linf")  # evaluations written before L2 name no threat
    if norm != "Linf":
        return {"note": f"evaluation.json is of the {norm} threat model; the bounds are L∞: evaluate under L∞"}
    if rec.get("points") != points_digest(x, y) or abs(float(ev["eps"]) - eps) > 1e-12:
        return {"note": f"evaluation.json is of other points or another ε (n {ev['n']}, ε {ev['eps']:g})"}
    attacks = " + ".join(a["label"] for a in ev["white_box"]["attacks"])
    return sandwich(main.certified, text_flags(rec["clean"]), text_flags(rec["robust"]),
                    attack=f"the evaluation's attacks ({attacks})")  # fmt: skip


def certify_run(
    run_dir: str | Path,
    opts: CertifyOptions,
    *,
    evaluation: dict[str, Any] | None = None,
    external: ExternalModel | None = None,
    progress: ProgressFactory = null_progress,
    write: bool,
) -> dict[str, Any]:
    """Certify the run's first ``opts.n`` test points (see the module's docstring); ``evaluation``:
    an evaluation of the run just computed (else ``evaluation.json`` is read, when there is one).
    ``external``: certify this model from elsewhere instead; ``run_dir`` is then where the results
    go. Returns what ``certify.json`` holds. Raises :class:`~.sandwich.Contradiction` if a point is
    both certified and broken by an attack."""
    run_dir = Path(run_dir)
    if env_world().active and opts.method == "milp":
        raise ConfigError("`method` milp under torchrun: the exact verification is not sharded; run it in one process")
    world, device = setup(str(parse_device(opts.device)))  # joins the process group under torchrun
    model, info = load_subject(run_dir, external, device=device, eps=opts.eps, write=write)
    x, y, dataset = test_points(info, opts.n, opts.data_dir)
    state_dir = run_dir / "certify-state" if opts.resume and run_dir.is_dir() else None
    if state_dir is not None:
        state_dir.mkdir(exist_ok=True)
    pts = _Points(model.eval(), x, y, opts, state_dir, progress, world)
    t0 = time.perf_counter()
    main = pts.certify(info.eps)
    curve = _curve(pts, info.eps, main)
    doc: dict[str, Any] = {
        "run": str(run_dir), "dataset": dataset, "model": info.model, "training_method": info.method,
        "settings": {**asdict(opts), "eps": info.eps, "n": len(y), "eps_curve": [r["eps"] for r in curve]},
        "environment": environment(),
        "certify": main.summary(),
        "sandwich": [r for r in curve if r["eps"] == info.eps],
        "curve": curve,
    }  # fmt: skip
    ev_sw = _evaluation_sandwich(run_dir, evaluation, x, y, info.eps, main)
    if ev_sw is not None:
        doc["sandwich"].append(ev_sw)
    doc["points"] = {"digest": points_digest(x, y), "status": main.status, "margin": nan_to_none(main.margin)}
    if main.decided_by is not None and main.milp_seconds is not None:
        doc["points"]["decided_by"] = [DECIDERS[int(d)] for d in main.decided_by]
        doc["points"]["milp_seconds"] = nan_to_none(main.milp_seconds)
    doc["seconds"] = time.perf_counter() - t0
    doc["processes"] = world.world_size
    if write and world.is_main:
        _write(run_dir, doc)
    return doc


def _write(run_dir: Path, doc: dict[str, Any]) -> None:
    """``certify.png`` (with a curve), ``certify.json`` and ``certify.md``, each atomically."""
    if doc["curve"]:
        buf = io.BytesIO()
        plot_curves(buf, curve_series(doc), "eps", "L∞ ε", f"certified vs attacked: {doc['run']}")
        write_bytes(run_dir / "certify.png", buf.getvalue())
    write_json(run_dir / "certify.json", doc)
    write_text(run_dir / "certify.md", certify_markdown(doc))


def curve_series(doc: dict[str, Any]) -> dict[str, list[dict[str, Any]]]:
    """The plot's lines: clean, attacked (the curve's suite) and certified accuracy against ε."""
    method = doc["settings"]["method"]
    return {
        key_label: [{"eps": r["eps"], **r[key]} for r in doc["curve"]]
        for key, key_label in (("clean", "clean"), ("attacked", f"attacked ({CURVE_SUITE} suite)"),
                               ("certified", f"certified ({method})"))
    }  # fmt: skip


def sandwich_markdown(sandwiches: list[dict[str, Any]], method: str) -> str:
    """The sandwich rows (certified ≤ attacked ≤ clean, undecided points) and notes."""
    rows, notes = [], []
    for s in sandwiches:
        if "note" in s:
            notes.append(s["note"])
            continue
        rows.append([s["attack"], pct_ci(s["certified"]), pct_ci(s["attacked"]), pct_ci(s["clean"]),
                     str(s["undecided"]), str(s["n"])])  # fmt: skip
    text = ""
    if rows:
        head = ["attacked by", f"certified ({method}) %", "attacked %", "clean %", "undecided", "N"]
        text += markdown_table(head, rows)
        text += ("\nNo point is both certified and broken by an attack (checked; a contradiction is an error). "
                 "Undecided: robust to the attacks but not certified.\n")  # fmt: skip
    text += "".join(f"\nNo sandwich with the evaluation: {n}.\n" for n in notes)
    return text


def _milp_counts(c: dict[str, Any]) -> str:
    """The exact verification's states, who decided them and the solver's seconds per point."""
    k, by, sec = c["counts"], c["decided_by"], c["milp_seconds"]
    text = (f"\nPoints: {k['verified']} verified, {k['counterexample']} with a counterexample, "
            f"{k['timeout']} timed out (not counted robust), {k['wrong_clean']} wrong clean. Decided by: the clean "
            f"prediction {by['clean']}, an attack {by['attack']}, α-CROWN {by['alpha-crown']}, "
            f"the MILP solver {by['milp']}")  # fmt: skip
    if sec["n"]:
        text += (
            f" ({sec['median']:.3g} s median, {sec['max']:.3g} s max per point, {c['options']['time_limit']:g} s limit)"
        )
    return text + ".\n"


def certify_markdown(doc: dict[str, Any]) -> str:
    s, c = doc["settings"], doc["certify"]
    text = f"# Certification of `{doc['run']}`\n\n"
    text += (f"Dataset {doc['dataset']}, model {doc['model']}, trained with {doc['training_method']}; "
             f"bound method `{s['method']}`, L∞ ε = {s['eps']:g}, first {s['n']} test points, "
             f"{c['seconds_per_point']:.3g} s per point on {s['device']}.\n\n")  # fmt: skip
    counts = c["counts"]
    rows = [
        ["clean", pct_ci(c["clean"]), str(c["n"])],
        [f"certified ({s['method']})", pct_ci(c["certified"]), str(c["n"])],
    ]
    if "not_broken" in c:
        rows.append(["not broken (upper bound on robust accuracy)", pct_ci(c["not_broken"]), str(c["n"])])
    text += markdown_table(["", "accuracy % [95% CI]", "N"], rows)
    text += _milp_counts(c) if "decided_by" in c else (
        f"\nPoints: {counts['certified']} certified, {counts['not_certified']} not certified, "
        f"{counts['wrong_clean']} wrong clean (never certified).\n")  # fmt: skip
    if doc["sandwich"]:
        text += f"\n## The sandwich at ε = {s['eps']:g}\n\n" + sandwich_markdown(doc["sandwich"], s["method"])
    if doc["curve"]:
        text += "\n## Against ε\n\n"
        rows = [[f"{r['eps']:g}", pct_ci(r["certified"]), pct_ci(r["attacked"]), pct_ci(r["clean"]), str(r["undecided"])]
                for r in doc["curve"]]  # fmt: skip
        text += markdown_table(["ε", "certified %", f"attacked ({CURVE_SUITE}) %", "clean %", "undecided"], rows)
        text += "\n![certified and attacked accuracy against ε](certify.png)\n"
    return text
