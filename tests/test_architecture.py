"""The layered architecture holds: imports point down the stages, no module import cycles,
and the import-linter contract really fails on an upward import."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
LINT = Path(sys.executable).with_name("lint-imports")

pytestmark = pytest.mark.skipif(not LINT.exists(), reason="import-linter not installed (pip install -e .[test])")


def _lint(tree: Path) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "PYTHONPATH": str(tree / "src")}
    return subprocess.run(
        [str(LINT), "--no-cache"], check=False, cwd=tree, env=env, capture_output=True, text=True, timeout=120
    )


def _copy_tree(tmp_path: Path) -> Path:
    tree = tmp_path / "tree"
    shutil.copytree(ROOT / "src", tree / "src", ignore=shutil.ignore_patterns("__pycache__", "*.egg-info"))
    shutil.copy(ROOT / "pyproject.toml", tree / "pyproject.toml")
    return tree


def test_contract_kept_on_the_tree(tmp_path):
    res = _lint(_copy_tree(tmp_path))
    assert res.returncode == 0, res.stdout + res.stderr
    assert "1 kept, 0 broken" in res.stdout


def test_upward_import_breaks_the_contract(tmp_path):
    tree = _copy_tree(tmp_path)
    victim = tree / "src" / "logitpair" / "attacks" / "fgsm.py"
    victim.write_text(victim.read_text() + "\nimport logitpair.cli  # noqa: E402,F401\n")
    res = _lint(tree)
    assert res.returncode != 0
    assert "BROKEN" in res.stdout and "logitpair.attacks.fgsm -> logitpair.cli" in res.stdout


def test_no_import_cycles_between_modules():
    """No two logitpair modules import each other, directly or through others (function-level
    imports included): every package reads bottom-up."""
    grimp = pytest.importorskip("grimp")
    graph = grimp.build_graph("logitpair", cache_dir=None)
    modules = sorted(m for m in graph.modules if m.startswith("logitpair"))
    package_inits = {m for m in modules if any(o.startswith(m + ".") for o in modules)}
    edges = {
        m: {
            d
            for d in graph.find_modules_directly_imported_by(m)
            # importing a package runs its __init__; an __init__ importing its own submodules is
            # how packages re-export, not a cycle
            if d.startswith("logitpair") and not (m in package_inits and d.startswith(m + "."))
        }
        for m in modules
    }
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(m: str) -> None:
        state[m] = 1
        stack.append(m)
        for d in sorted(edges.get(m, ())):
            if state.get(d) == 1:
                cycle = stack[stack.index(d) :] + [d]
                pytest.fail("import cycle: " + " -> ".join(cycle))
            if d not in state:
                visit(d)
        stack.pop()
        state[m] = 2

    for m in modules:
        if m not in state:
            visit(m)
