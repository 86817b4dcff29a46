"""``logitpair list``: the registered models, datasets, methods and attacks."""

from __future__ import annotations

import argparse
from typing import Any

from logitpair.attacks import ATTACKS
from logitpair.data import DATASETS
from logitpair.methods import METHODS
from logitpair.models import list_models


def run(args: argparse.Namespace) -> int:
    for title, names in [
        ("models", list_models()),
        ("datasets", DATASETS.names()),
        ("methods", METHODS.names()),
        ("attacks", ATTACKS.names()),
    ]:
        print(f"{title}: {', '.join(names)}")
    return 0


def add_parser(subparsers: Any) -> argparse.ArgumentParser:
    p = subparsers.add_parser("list", help="list registered models, datasets, methods and attacks")
    p.set_defaults(func=run)
    return p
