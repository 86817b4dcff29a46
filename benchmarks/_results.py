"""Shared by run.py and masking_sweep.py: write a result JSON with the machine it was measured on."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from logitpair.environment import environment
from logitpair.io import write_json


def write_result(path: str | Path, result: dict[str, Any]) -> None:
    """``result`` plus :func:`logitpair.environment.environment` (python, torch, machine, threads, ...),
    written atomically to ``path`` (parent folders created)."""
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    write_json(path, {**result, "environment": environment()})
