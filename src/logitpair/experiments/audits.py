"""The gradient-masking audit of a ``reproduce`` table row, kept next to its run.

:func:`row_audit` runs the quick audit (:func:`~logitpair.audit.audit_run`) of one row with its
black-box source and keeps the verdict in ``reproduce-audit.json`` in the run directory, keyed by
the audit settings, points, ε, seed, source, data folder and the model's weights, so a rerun (or
another table auditing the same model the same way) reuses it and anything else audits again.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Protocol

import torch

from logitpair.audit import audit_run
from logitpair.experiments.presets import Row
from logitpair.experiments.scales import Plan
from logitpair.io import sha256_file, write_json
from logitpair.progress import ProgressFactory


class _Seeded(Protocol):
    seed: int  # the evaluation seed (``ReproduceOptions.seed``)


def _saved(cache: Path, key: dict[str, Any]) -> dict[str, Any] | None:
    try:
        saved = json.loads(cache.read_text())
    except (OSError, ValueError):
        return None
    return saved["result"] if saved.get("key") == key else None


def row_audit(dirs: dict[str, Path], row: Row, plan: Plan, data_dir: str | None, opts: _Seeded,
              device: torch.device | None, progress: ProgressFactory) -> dict[str, Any]:  # fmt: skip
    """The quick gradient-masking audit of one row (with its black-box source for the transfer
    check): verdict, failed checks, reasons; reused from ``reproduce-audit.json`` for the same key."""
    run_dir = dirs[row.name]
    source = dirs[row.source] if row.source else None
    key = {"settings": plan.audit.to_dict(), "n": plan.audit_points, "eps": plan.eps, "seed": opts.seed,
           "source": str(source), "data_dir": data_dir, "weights": sha256_file(run_dir / "model.safetensors")}  # fmt: skip
    key = json.loads(json.dumps(key))  # as saved: tuples become lists, or the saved key never matches
    cache = run_dir / "reproduce-audit.json"
    saved = _saved(cache, key)
    if saved is not None:
        return saved
    aud = audit_run(run_dir, source=source, n=plan.audit_points, seed=opts.seed, data_dir=data_dir,
                    eps=plan.eps, settings=plan.audit, progress=progress, device=str(device or "cpu"), write=True)  # fmt: skip
    result = {"verdict": aud["verdict"], "failed": [c["name"] for c in aud["checks"] if c["passed"] is False],
              "reasons": aud.get("reasons", [])}  # fmt: skip
    write_json(cache, {"key": key, "result": result})
    return result
