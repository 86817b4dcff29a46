"""The ``logitpair`` command: the parser and the entry point. One module per subcommand
(``train``, ``evaluate``, ``audit``, ``demo``, ``list``), each with ``add_parser`` and ``run``."""

from __future__ import annotations

import argparse
import os
import sys

from logitpair._version import __version__
from logitpair.cli import audit, demo, evaluate, listing, reproduce, train, transfer
from logitpair.errors import LogitpairError

SUBCOMMANDS = (train, evaluate, audit, demo, listing, transfer, reproduce)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="logitpair", description="Train and honestly evaluate adversarially robust image classifiers."
    )
    parser.add_argument("--version", action="version", version=f"logitpair {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)
    for module in SUBCOMMANDS:
        module.add_parser(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return args.func(args)
    except LogitpairError as exc:
        if int(os.environ.get("RANK", "0")) == 0:  # under torchrun every rank fails; rank 0 says why
            print(f"logitpair: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("logitpair: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
