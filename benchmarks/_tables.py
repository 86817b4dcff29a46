"""Shared by the resumable tables (smoothing_table.py, milp_table.py): independent tasks run in a
process pool, the result JSON written after every finished task, a rerun with the same settings
running only the tasks not finished yet.

A task's key is ``(spec, kind, value)``: its result lands at ``result["runs"][spec][kind][f"{value:g}"]``.
"""

from __future__ import annotations

import json
import multiprocessing as mp
import sys
import time
from collections.abc import Callable
from functools import partial
from pathlib import Path
from typing import Any

from _results import write_result

Key = tuple[str, str, float]


def _finished(out: str, settings: dict[str, Any]) -> dict[str, Any]:
    """The per-task results of ``out`` when it was written with the same settings, else nothing."""
    path = Path(out)
    if not path.is_file():
        return {}
    old = json.loads(path.read_text())

    def same(a: dict[str, Any]) -> dict[str, Any]:  # how many jobs ran them does not change the results
        return {k: v for k, v in a.items() if k != "jobs"}

    return old.get("runs", {}) if same(old.get("settings") or {}) == same(settings) else {}


def _indexed(
    fn: Callable[[dict[str, Any]], dict[str, Any]], item: tuple[int, dict[str, Any]]
) -> tuple[int, dict[str, Any]]:
    return item[0], fn(item[1])


def run_table(
    *, what: str, script: str, argv: list[str] | None, settings: dict[str, Any], kinds: tuple[str, ...],
    tasks: dict[Key, dict[str, Any]], fn: Callable[[dict[str, Any]], dict[str, Any]], out: str, jobs: int,
) -> dict[str, Any]:  # fmt: skip
    """Run ``fn`` on every task of ``tasks`` not already in ``out`` (same ``settings``), ``jobs`` at
    a time (fork), writing ``out`` after each; ``seconds`` adds the tasks' own seconds ÷ ``jobs``."""
    t0 = time.perf_counter()
    runs = _finished(out, settings)  # resume: the tasks an earlier call with the same settings finished
    todo = {key: task for key, task in tasks.items() if f"{key[2]:g}" not in runs.get(key[0], {}).get(key[1], {})}
    result: dict[str, Any] = {
        "what": what,
        "command": f"python benchmarks/{script} " + " ".join(argv if argv is not None else sys.argv[1:]),
        "settings": settings,
        "runs": runs,
        "complete": not todo,
    }
    with mp.get_context("fork").Pool(jobs) as pool:
        keys = list(todo)
        for i, res in pool.imap_unordered(partial(_indexed, fn), list(enumerate(todo.values())), chunksize=1):
            spec, kind, value = keys[i]
            runs.setdefault(spec, {k: {} for k in kinds})[kind][f"{value:g}"] = res
            result["seconds"] = result.get("seconds", 0.0) + res["seconds"] / jobs
            write_result(out, result)  # after every task: an interrupted call resumes from here
    result["complete"] = True
    result["wall_seconds_this_call"] = time.perf_counter() - t0
    write_result(out, result)
    return result
