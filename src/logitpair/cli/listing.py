"""``logitpair list``: every registered model, dataset, method, attack, suite and preset, one line each.

The lines come from the registries themselves (:meth:`Registry.describe`: a docstring's first
line or an explicit ``description=``; a suite's attack labels; a preset's title), so a new
component shows up, described, with its one file and one registry line. ``--json`` prints
``{"models": [{"name": ..., "description": ...}, ...], "datasets": [...], ...}``.
"""

from __future__ import annotations

import argparse
import json
import re
from collections.abc import Sequence
from typing import Any

from logitpair.attacks import ATTACKS
from logitpair.data import DATASETS
from logitpair.evaluation.spec import AttackSpec
from logitpair.evaluation.suites import SUITES
from logitpair.experiments.presets import PRESETS
from logitpair.methods import METHODS
from logitpair.models import MODELS

KINDS = ("models", "datasets", "methods", "attacks", "suites", "presets")


def describe_suite(specs: Sequence[AttackSpec]) -> str:
    """A suite in one line: its attacks' labels in order; a gated attack's label keeps its settings
    and names its gate as the ``--attacks`` syntax does (``[gate=near]``) instead of explaining it
    (the part of the label after ``;``)."""
    parts = []
    for spec in specs:
        if spec.gate is None:
            parts.append(spec.label)
        else:
            parts.append(f"{re.sub(r';[^)]*', '', spec.label)} [gate={spec.gate.kind}]")
    return ", ".join(parts) if parts else "no attacks (clean accuracy only)"


def catalogue() -> dict[str, list[dict[str, str]]]:
    """Every registered name of each kind with its one-line description, sorted by name."""
    described: dict[str, list[tuple[str, str]]] = {
        "models": [(n, MODELS.describe(n)) for n in MODELS.names()],
        "datasets": [(n, DATASETS.describe(n)) for n in DATASETS.names()],
        "methods": [(n, METHODS.describe(n)) for n in METHODS.names()],
        "attacks": [(n, ATTACKS.describe(n)) for n in ATTACKS.names()],
        "suites": [(n, describe_suite(SUITES[n])) for n in sorted(SUITES)],
        "presets": [(n, f"{PRESETS.get(n).table}: {PRESETS.get(n).title}") for n in PRESETS.names()],
    }
    return {kind: [{"name": n, "description": d} for n, d in described[kind]] for kind in KINDS}


def render(cat: dict[str, list[dict[str, str]]]) -> str:
    """The catalogue as text: a heading per kind, then ``name  description`` lines."""
    width = max(len(item["name"]) for items in cat.values() for item in items)
    blocks = []
    for kind, items in cat.items():
        lines = [f"  {item['name']:<{width}}  {item['description']}" for item in items]
        blocks.append("\n".join([f"{kind}:", *lines]))
    return "\n\n".join(blocks)


def run(args: argparse.Namespace) -> int:
    cat = catalogue()
    print(json.dumps(cat, indent=2, ensure_ascii=False) if args.json else render(cat))
    return 0


def add_parser(subparsers: Any) -> argparse.ArgumentParser:
    p = subparsers.add_parser(
        "list",
        help="list the registered models, datasets, methods, attacks, suites and presets, one line each",
        description="Every registered model, dataset, training method, attack, evaluation suite and paper "
        "preset, with a one-line description.",
    )
    p.add_argument("--json", action="store_true", help="print JSON: {kind: [{name, description}, ...]}")
    p.set_defaults(func=run)
    return p
