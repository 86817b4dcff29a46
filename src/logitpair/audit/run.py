"""Auditing a run directory: load the model and its test points, run :func:`audit`, write
``audit.json``, ``audit.md`` and the plots."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

from logitpair.audit.checks import AuditSettings, audit
from logitpair.audit.report import audit_markdown, plot_audit
from logitpair.checkpoint import load_model
from logitpair.environment import parse_device
from logitpair.errors import ConfigError
from logitpair.evaluation.run import test_points
from logitpair.external import ExternalModel, load_subject
from logitpair.io import write_json, write_text
from logitpair.progress import ProgressFactory, null_progress
from logitpair.threat import Linf


def _jsonable(obj: Any) -> Any:
    """Non-finite floats become None (strict JSON)."""
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, dict):
        return {str(k): _jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_jsonable(v) for v in obj]
    return obj


def audit_run(
    run_dir: str | Path,
    *,
    source: str | Path | None = None,
    quick: bool = False,
    n: int | None = None,
    seed: int = 0,
    data_dir: str | None = None,
    progress: ProgressFactory = null_progress,
    write: bool,
    eps: float | None = None,
    settings: AuditSettings | None = None,
    device: str = "cpu",
    external: ExternalModel | None = None,
) -> dict[str, Any]:
    """Audit a run directory on its first ``n`` test points (default 200 with ``quick``, else 500).

    The eps is the one the model was trained for unless given. With ``write``, puts
    ``audit.json``, ``audit.md`` and the plots ``audit_eps.png``, ``audit_steps.png``,
    ``audit_restarts.png`` and ``audit_surface.png`` into the run directory (atomically).
    Returns the JSON document (top-level ``verdict``, ``checks``, ``settings``, ...).
    ``external``: audit this model from elsewhere instead; ``run_dir`` is then where the results go.
    """
    if n is not None and n < 1:
        raise ConfigError(f"expected >= 1, got {n}", option="n")
    run_dir = Path(run_dir)
    dev = parse_device(device)
    model, info = load_subject(run_dir, external, device=dev, eps=eps, write=write)
    src = load_model(source, device=dev) if source is not None else None
    threat = Linf(info.eps)
    x, y, dataset = test_points(info, n if n is not None else (200 if quick else 500), data_dir)
    rep = audit(model, x, y, threat=threat, source=src, quick=quick, seed=seed, progress=progress, settings=settings)
    out: dict[str, Any] = {
        "run": str(run_dir),
        "dataset": dataset,
        "method": info.method,  # for the reader only: the checks never look at it
        "source": None if source is None else str(source),
        "n": len(y),
        "eps": threat.eps,
        "device": str(dev),
        "precision": "float32",  # the audit never runs under autocast
        **{k: v for k, v in rep.to_dict().items() if k != "surfaces"},
    }
    out = _jsonable(out)
    if write:
        out["plots"] = plot_audit(rep, run_dir)
        write_json(run_dir / "audit.json", out)
        write_text(run_dir / "audit.md", audit_markdown(out))
    return out
