"""The release artefact: the wheel ``python -m build`` makes holds the whole package and, installed into a
fresh virtual environment, runs ``logitpair list`` with the source tree nowhere on ``sys.path``.

No network: the wheel is built without build isolation (the test environment's setuptools), and the
fresh environment gets the dependencies (torch, numpy, ...) from this one's site-packages through a
``.pth`` file while the wheel itself is installed with ``--no-deps``. About 20 s on a 2-core CPU.
"""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import subprocess
import sys
import sysconfig
import zipfile
from email.parser import Parser
from pathlib import Path

import pytest

from logitpair._version import __version__

ROOT = Path(__file__).resolve().parents[1]
SOURCE = ROOT / "src" / "logitpair"


def _run(cmd: list[str], cwd: Path, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    proc = subprocess.run(cmd, check=False, cwd=cwd, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, f"{' '.join(cmd)} failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    return proc


def _clean_env() -> dict[str, str]:
    """This environment without the variables that would put the source tree on ``sys.path``."""
    return {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONHOME", "PYTHONSTARTUP")}


def _has_build() -> bool:
    """Whether the ``build`` front end is installed (a stray ``build/`` folder in the cwd does not count)."""
    try:
        return importlib.util.find_spec("build.__main__") is not None
    except ModuleNotFoundError:
        return False


def _build_wheel(tmp: Path) -> Path:
    """``python -m build --wheel`` on a copy of the project (so no build/ or egg-info lands in the
    checkout); pip's own front end where ``build`` is not installed (it is in the test extra)."""
    project = tmp / "project"
    project.mkdir()
    for name in ("pyproject.toml", "README.md", "LICENSE"):
        shutil.copy2(ROOT / name, project / name)
    shutil.copytree(ROOT / "src", project / "src", ignore=shutil.ignore_patterns("__pycache__", "*.egg-info"))
    dist = tmp / "dist"
    if _has_build():
        cmd = [sys.executable, "-m", "build", "--wheel", "--no-isolation", "--outdir", str(dist), str(project)]
    else:
        cmd = [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-w", str(dist), str(project)]
    _run(cmd, cwd=tmp)
    (wheel,) = dist.glob("logitpair-*.whl")
    return wheel


def _fresh_venv(tmp: Path) -> Path:
    """A new virtual environment (no pip of its own) that sees this environment's packages as a
    plain path entry: their .pth files, such as an editable install of logitpair, are not run."""
    venv = tmp / "venv"
    _run([sys.executable, "-m", "venv", "--without-pip", str(venv)], cwd=tmp, env=_clean_env())
    python = venv / ("Scripts/python.exe" if os.name == "nt" else "bin/python")
    where = "import sysconfig; print(sysconfig.get_paths()['purelib'])"
    purelib = _run([str(python), "-c", where], cwd=tmp, env=_clean_env())
    ours = {sysconfig.get_paths()["purelib"], sysconfig.get_paths()["platlib"]}
    (Path(purelib.stdout.strip()) / "_test_dependencies.pth").write_text("\n".join(sorted(ours)) + "\n")
    return python


@pytest.fixture(scope="module")
def wheel(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return _build_wheel(tmp_path_factory.mktemp("wheel"))


def test_wheel_holds_the_package_its_data_licence_and_entry_point(wheel):
    assert wheel.name == f"logitpair-{__version__}-py3-none-any.whl"
    names = set(zipfile.ZipFile(wheel).namelist())
    sources = {p.relative_to(SOURCE.parent).as_posix() for p in SOURCE.rglob("*") if p.is_file()}
    sources = {s for s in sources if "__pycache__" not in s}
    assert sources - names == set(), "every file of src/logitpair is in the wheel"
    assert "logitpair/py.typed" in names and "logitpair/cli/listing.py" in names
    info = f"logitpair-{__version__}.dist-info"
    (licence_file,) = [
        n for n in names if n.startswith(f"{info}/") and n.endswith("/LICENSE") or n == f"{info}/LICENSE"
    ]
    with zipfile.ZipFile(wheel) as z:
        meta = Parser().parsestr(z.read(f"{info}/METADATA").decode())
        entry_points = z.read(f"{info}/entry_points.txt").decode()
        licence = z.read(licence_file).decode()
    assert meta["Name"] == "logitpair" and meta["Version"] == __version__
    assert "Apache-2.0" in (meta["License-Expression"], meta["License"])
    assert "Apache License" in licence and "Version 2.0" in licence
    assert "logitpair = logitpair.cli:main" in entry_points


def test_wheel_installs_into_a_fresh_venv_and_runs_logitpair_list(wheel, tmp_path):
    python = _fresh_venv(tmp_path)
    env = _clean_env()
    _run([str(python), "-m", "pip", "install", "-q", "--no-deps", "--no-index", "--ignore-installed",
          "--disable-pip-version-check", str(wheel)], cwd=tmp_path, env=env)  # fmt: skip
    work = tmp_path / "elsewhere"
    work.mkdir()
    where = _run([str(python), "-c", "import logitpair, sys; print(logitpair.__file__); print(sys.path)"], work, env)
    location, path = where.stdout.splitlines()
    assert Path(location).is_relative_to(python.parent.parent), f"logitpair imported from {location}"
    assert str(ROOT / "src") not in path, "the source tree is on sys.path"
    script = python.parent / ("logitpair.exe" if os.name == "nt" else "logitpair")
    listing = json.loads(_run([str(script), "list", "--json"], work, env).stdout)
    assert set(listing) == {"models", "datasets", "methods", "attacks", "suites", "presets"}
    assert "lenet5" in {m["name"] for m in listing["models"]} and all(m["description"] for m in listing["models"])
    version = _run([str(script), "--version"], work, env).stdout
    assert version.strip() == f"logitpair {__version__}"
