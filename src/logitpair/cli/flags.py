"""``logitpair train``'s config flags, generated from the config dataclasses: the flag is the field.

Every field of :class:`~logitpair.config.RunConfig`, its ``data`` and ``optim`` sections and of
every registered method's settings is one flag named after it (``--batch-size`` sets
``optim.batch_size``, ``--beta`` sets ``loss.beta``), with its help line and its default in
``--help``, grouped by concern: the run's groups, then one group per settings class that
declares method settings, titled with the methods that take them. Old names are further option
strings of the same flag (``--train-attack`` for ``--attack``, ``--smoothing`` for
``--label-smoothing``) and keep their own config key, which the method's settings resolve.
Booleans take ``--x`` / ``--no-x``. A given flag is stored as ``args.__dict__["config:optim.lr"]``;
flags not given store nothing, so the config file's values stand. A method setting whose name
is taken by a run-level flag becomes ``--loss-<name>``.
"""

from __future__ import annotations

import argparse
import dataclasses
import typing
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

from logitpair.cli.common import fraction
from logitpair.config import DataConfig, OptimConfig, RunConfig
from logitpair.methods import METHODS
from logitpair.settings import aliases_of, group_of, help_of, owner, title

PREFIX = "config:"
SECTIONS: tuple[tuple[str, type], ...] = (("", RunConfig), ("data", DataConfig), ("optim", OptimConfig))


@dataclass
class Flag:
    """One generated flag: its config ``section`` and ``key``, type hint, help and old names."""

    section: str
    key: str
    hint: Any
    help: str
    group: str
    aliases: list[str] = field(default_factory=list)

    def path(self, key: str | None = None) -> str:
        return f"{self.section}.{key or self.key}" if self.section else (key or self.key)


class _Store(argparse.Action):
    """Stores the value under the config key of the option string used (old names keep theirs);
    ``--no-x`` stores False."""

    def __init__(self, option_strings: list[str], dest: str, keys: dict[str, tuple[str, Any]], **kw: Any) -> None:
        super().__init__(option_strings, dest, **kw)
        self.keys = keys

    def __call__(
        self, parser: argparse.ArgumentParser, namespace: argparse.Namespace, values: Any, option: str | None = None
    ) -> None:
        key, const = self.keys[option or self.option_strings[0]]
        setattr(namespace, PREFIX + key, const if self.nargs == 0 else values)


def add_config_flags(parser: argparse.ArgumentParser, reserved: Iterable[str] = ()) -> None:
    """Add one flag per config field to ``parser``, in argument groups by concern; ``reserved``:
    option strings the command uses itself."""
    taken = set(reserved)
    groups: dict[str, Any] = {}
    for flag in run_flags() + method_flags():
        if flag.group not in groups:
            groups[flag.group] = parser.add_argument_group(flag.group)
        _add(groups[flag.group], flag, taken)


def config_overrides(args: argparse.Namespace) -> dict[str, Any]:
    """The nested config mapping of the flags given on the command line."""
    out: dict[str, Any] = {}
    for name, value in vars(args).items():
        if not name.startswith(PREFIX) or value is None:
            continue
        node = out
        *parents, leaf = name[len(PREFIX) :].split(".")
        for p in parents:
            node = node.setdefault(p, {})
        node[leaf] = value
    return out


def run_flags() -> list[Flag]:
    """The run's own fields and its ``data`` and ``optim`` sections."""
    flags = []
    for section, cls in SECTIONS:
        hints = typing.get_type_hints(cls)
        for f in dataclasses.fields(cls):
            if section == "" and f.name in ("data", "optim", "loss"):
                continue
            help_ = f"{help_of(f)} (default: {_shown(f.default)})"
            flags.append(Flag(section, f.name, hints[f.name], help_, group_of(f) or title(cls), list(aliases_of(f))))
    return flags


def method_flags() -> list[Flag]:
    """Every registered method's settings: one flag per field name, in the group of the class that
    declares it, naming the methods that take it and their defaults."""
    seen: dict[str, list[tuple[str, type, dataclasses.Field]]] = {}
    for method in METHODS.names():
        cls = METHODS.settings(method)
        for f in dataclasses.fields(cls):
            seen.setdefault(f.name, []).append((method, cls, f))
    return [_method_flag(name, uses) for name, uses in seen.items()]


def _method_flag(name: str, uses: list[tuple[str, type, dataclasses.Field]]) -> Flag:
    owners: dict[type, list[tuple[str, type, dataclasses.Field]]] = {}
    for use in uses:
        owners.setdefault(owner(use[1], name), []).append(use)
    parts = [_owner_help(group, len(owners) > 1) for group in owners.values()]
    first = next(iter(owners))
    hints = {typing.get_type_hints(cls)[name] for _, cls, _ in uses}
    aliases = sorted({a for _, _, f in uses for a in aliases_of(f)})
    return Flag("loss", name, hints.pop() if len(hints) == 1 else str, "; ".join(parts), _group(first), aliases)


def _owner_help(uses: list[tuple[str, type, dataclasses.Field]], named: bool) -> str:
    """Help of one declaring class's field: its line, the default (and methods with another)."""
    _, cls, f = uses[0]
    declared = owner(cls, f.name).__dataclass_fields__[f.name]
    other = [f"; {m}: {_shown(g.default)}" for m, _, g in uses if g.default != declared.default]
    who = f"{', '.join(m for m, _, _ in uses)}: " if named else ""
    return f"{who}{help_of(declared)} (default: {_shown(declared.default)}{''.join(other)})"


def _group(cls: type) -> str:
    methods = [m for m in METHODS.names() if issubclass(METHODS.settings(m), cls)]
    who = "every method" if len(methods) == len(METHODS.names()) else ", ".join(methods)
    return f"Method settings: {title(cls)} ({who})"


def _add(group: Any, flag: Flag, taken: set[str]) -> None:
    keys: dict[str, tuple[str, Any]] = {}
    boolean = flag.hint is bool
    for i, key in enumerate([flag.key, *flag.aliases]):
        option = _option(key, flag.section if i == 0 else "", taken)
        if option is None:
            continue
        keys[option] = (flag.path(key), True)
        if boolean:
            keys["--no-" + option[2:]] = (flag.path(key), False)
    if not keys:
        raise ValueError(f"config field {flag.path()}: its flag --{flag.key.replace('_', '-')} is taken")
    taken.update(keys)
    kw: dict[str, Any] = {"nargs": 0} if boolean else {"type": _converter(flag.hint), "metavar": flag.key.upper()}
    dest = PREFIX + flag.path()
    group.add_argument(
        *keys, action=_Store, dest=dest, keys=keys, default=None, help=flag.help.replace("%", "%%"), **kw
    )


def _option(key: str, section: str, taken: set[str]) -> str | None:
    """``--key`` (``-`` for ``_``); if taken, ``--<section>-key`` for a field, None for an old name."""
    option = "--" + key.replace("_", "-")
    if option not in taken:
        return option
    if not section:
        return None
    return f"--{section}-{key.replace('_', '-')}"


def _converter(hint: Any) -> Callable[[str], Any]:
    if hint is float or hint == float | None:
        return fraction
    return int if hint is int else str


def _shown(value: Any) -> str:
    if value is None:
        return "none"
    return repr(value) if value == "" else str(value)
