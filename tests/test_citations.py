"""Citations: every preset setting names a source a reader can check, docs/PAPER_SETTINGS.md is what
the presets generate, and no shipped file points at a file outside the repository."""

from __future__ import annotations

import re
import subprocess
from pathlib import Path

import pytest

from logitpair.experiments.presets import PRESETS
from logitpair.experiments.settings_page import MARK_BEGIN, MARK_END, render_page, settings_markdown

ROOT = Path(__file__).resolve().parents[1]
PAGE = ROOT / "docs" / "PAPER_SETTINGS.md"
OFFICIAL_FILES = ("`README.md`", "`model_lib.py`", "`train.py`", "`adversarial_attack.py`")
SHIPPED = ("src", "docs", "README.md", "benchmarks", "scripts")


def all_settings() -> list[tuple[str, str, str]]:
    """(preset, setting, source) for every (setting, source) pair of every preset."""
    return [(name, s, src) for name in PRESETS for s, src in PRESETS.get(name).settings]


@pytest.mark.parametrize(("preset", "setting", "source"), all_settings())
def test_every_setting_names_a_checkable_source(preset: str, setting: str, source: str) -> None:
    """The paper with a table, the official code with one of its files, Engstrom et al., or ours with a reason."""
    if source.startswith("paper"):
        assert re.match(r"paper, Tables? \d", source), f"{preset}: {setting!r} cites the paper without a table"
    elif source.startswith("official code"):
        assert any(f in source for f in OFFICIAL_FILES), f"{preset}: {setting!r} cites the official code, no file"
    elif source.startswith("Engstrom et al. 2018"):
        assert "1807.10272" in source
    else:
        assert re.match(r"ours \(.+\)$", source), f"{preset}: {setting!r} has source {source!r}: ours, with a reason"


def test_settings_page_is_what_the_presets_generate() -> None:
    text = PAGE.read_text()
    assert MARK_BEGIN in text and MARK_END in text
    assert render_page(text) == text, "docs/PAPER_SETTINGS.md is stale: python -m logitpair.experiments.settings_page"
    generated = settings_markdown()
    for name in PRESETS:
        preset = PRESETS.get(name)
        assert f"### `{name}`: {preset.table}" in generated
        for setting, source in preset.settings:
            assert f"| {setting} | {source} |" in generated, (name, setting)
        for row in preset.rows:
            for own in row.ours:
                assert f"| row `{row.name}`: {own} | ours |" in generated, (name, row.name)


def test_render_page_keeps_the_hand_written_part() -> None:
    page = f"# head\n\nprose\n\n{MARK_BEGIN}\nold\n{MARK_END}\n\ntail\n"
    new = render_page(page)
    assert new.startswith("# head\n\nprose\n\n" + MARK_BEGIN) and new.endswith(MARK_END + "\n\ntail\n")
    assert "old" not in new and "### `table1`" in new
    assert render_page("# head\n").startswith("# head\n" + MARK_BEGIN)


def shipped_files() -> list[Path]:
    """Tracked files under src/, docs/, benchmarks/, scripts/ and README.md (every file there when not in git)."""
    try:
        out = subprocess.run(["git", "ls-files", "-z", *SHIPPED], cwd=ROOT, capture_output=True, check=True).stdout
        files = [ROOT / p for p in out.decode().split("\0") if p]
    except (OSError, subprocess.CalledProcessError):
        files = [p for top in SHIPPED for p in ((ROOT / top).rglob("*") if (ROOT / top).is_dir() else [ROOT / top])]
    return [p for p in files if p.is_file()]


def test_no_shipped_file_cites_a_file_outside_the_repository() -> None:
    files = shipped_files()
    assert any(p.name == "presets.py" for p in files) and any(p.name == "README.md" for p in files)
    bad = []
    for path in files:
        try:
            text = path.read_text()
        except UnicodeDecodeError:
            continue
        if "PAPER.md" in text.replace("PAPER_SETTINGS.md", "") or "/work/shared" in text:
            bad.append(str(path.relative_to(ROOT)))
    assert not bad, f"cite the paper, the official code or docs/PAPER_SETTINGS.md instead: {bad}"
