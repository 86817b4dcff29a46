"""What every subcommand shares: number parsing, quiet mode, the log line printer."""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Callable

from logitpair.errors import LogitpairError
from logitpair.threat import parse_fraction


def fraction(text: str) -> float:
    try:
        return parse_fraction(text)
    except LogitpairError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def quiet(args: argparse.Namespace) -> bool:
    return bool(getattr(args, "quiet", False) or os.environ.get("CI"))


def logger(args: argparse.Namespace) -> Callable[[str], None]:
    quiet = bool(getattr(args, "quiet", False))
    return (lambda msg: None) if quiet else (lambda msg: print(msg, file=sys.stderr, flush=True))
