"""The ``logitpair`` command: the parser and the entry point. One module per subcommand
(``train``, ``evaluate``, ``certify``, ``audit``, ``demo``, ``list``, ...), each with ``add_parser`` and ``run``."""

from __future__ import annotations

import argparse
import re
import sys

from logitpair._version import __version__
from logitpair.cli import audit, certify, claims, demo, evaluate, listing, reproduce, train, transfer
from logitpair.distributed import env_world
from logitpair.errors import ConfigError, LogitpairError

SUBCOMMANDS = (train, evaluate, certify, audit, demo, listing, transfer, reproduce, claims)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="logitpair", description="Train and honestly evaluate adversarially robust image classifiers."
    )
    parser.add_argument("--version", action="version", version=f"logitpair {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)
    for module in SUBCOMMANDS:
        module.add_parser(sub)
    return parser


def _flags(parser: argparse.ArgumentParser) -> set[str]:
    """The ``dest`` names of every option of the parser and its subcommands, and the field names
    of the config flags named after their field."""
    names: set[str] = set()
    for action in parser._actions:
        if action.option_strings:
            names.add(action.dest)
            key = action.dest.split(":")[-1].rpartition(".")[2]  # a config field's dest: ``config:[<section>.]<field>``
            if "--" + key.replace("_", "-") in action.option_strings:
                names.add(key)  # its flag is named after the field
        for sub in (action.choices or {}).values() if isinstance(action, argparse._SubParsersAction) else ():
            names |= _flags(sub)
    return names


def describe(exc: LogitpairError, flags: set[str]) -> str:
    """The error as the command line says it: options the library names (``ConfigError.option``,
    or an option written in backticks in its message) appear as their flags."""
    text = f"`{exc.option}`: {exc.message}" if isinstance(exc, ConfigError) and exc.option else str(exc)

    def flag(m: re.Match[str]) -> str:
        return "--" + m.group(1).replace("_", "-") if m.group(1) in flags else m.group(0)

    return re.sub(r"`([a-z][a-z0-9_]*)`", flag, text)


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return args.func(args)
    except LogitpairError as exc:
        if env_world().is_main:  # under torchrun every rank fails; rank 0 says why
            print(f"logitpair: error: {describe(exc, _flags(parser))}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("logitpair: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
