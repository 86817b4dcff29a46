"""Settings dataclasses that describe themselves: each field has a default, one line of help,
an optional check and optional old names.

Every config section (``DataConfig``, ``OptimConfig``, ``RunConfig`` and each training method's
settings) declares its fields with :func:`setting`::

    @dataclass(frozen=True, kw_only=True)
    class TRADESSettings(StepSettings):
        beta: float = setting(6.0, "weight β of the KL term", check=at_least(0))

The config layer validates with :func:`check_fields` and resolves old names with
:func:`canonical_keys`; the command line generates one flag per field from the same metadata
(help, default, old names as alias flags, the concern it is grouped under), so nothing keeps a
second list of the fields.
"""

from __future__ import annotations

import dataclasses
import inspect
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

from logitpair.errors import ConfigError


@dataclass(frozen=True)
class Check:
    """A condition on one value; ``expect`` completes "expected ..." in the error message;
    ``choices``: the valid values when they are a list of names."""

    test: Callable[[Any], bool]
    expect: str
    choices: tuple[str, ...] = ()


def at_least(low: float) -> Check:
    return Check(lambda v: v >= low, f">= {low:g}")


def above(low: float) -> Check:
    return Check(lambda v: v > low, f"> {low:g}")


def between(
    low: float, high: float, *, open_low: bool = False, open_high: bool = False, symbol: str = "value"
) -> Check:
    """``low <= value <= high``; ``open_low`` / ``open_high`` make that end strict; ``symbol``
    names the value in the message."""
    lo, hi = ("<" if open_low else "<="), ("<" if open_high else "<=")

    def test(v: Any) -> bool:
        return (low < v if open_low else low <= v) and (v < high if open_high else v <= high)

    return Check(test, f"{low:g} {lo} {symbol} {hi} {high:g}")


def one_of(*choices: str) -> Check:
    expect = " or ".join(choices) if len(choices) == 2 else f"one of {', '.join(choices)}"
    return Check(lambda v: v in choices, expect, choices)


def setting(
    default: Any, help: str, *, check: Check | None = None, aliases: Iterable[str] = (), group: str = ""
) -> Any:
    """A dataclass field with its ``help`` line, ``check``, old names (``aliases``: accepted as
    config keys and as command-line flags) and, optionally, the ``group`` (concern) the command
    line lists it under (default: its class's)."""
    meta = {"help": help, "check": check, "aliases": tuple(aliases), "group": group}
    return field(default=default, metadata=meta)


def help_of(f: dataclasses.Field) -> str:
    return str(f.metadata.get("help", ""))


def aliases_of(f: dataclasses.Field) -> tuple[str, ...]:
    return tuple(f.metadata.get("aliases", ()))


def group_of(f: dataclasses.Field) -> str:
    return str(f.metadata.get("group", ""))


def check_fields(obj: Any, prefix: str = "") -> None:
    """Raise :class:`ConfigError` naming the first field of ``obj`` whose value fails its check."""
    for f in dataclasses.fields(obj):
        check: Check | None = f.metadata.get("check")
        value = getattr(obj, f.name)
        if check is not None and value is not None and not check.test(value):
            shown = repr(value) if isinstance(value, str) else value
            raise ConfigError(f"{prefix}{f.name}: expected {check.expect}, got {shown}")


def alias_map(cls: type) -> dict[str, str]:
    """Old name -> field name for the fields of dataclass ``cls``."""
    return {alias: f.name for f in dataclasses.fields(cls) for alias in aliases_of(f)}


def accepted_keys(cls: type) -> frozenset[str]:
    """The keys a mapping for ``cls`` may hold: its field names and their old names."""
    return frozenset({f.name for f in dataclasses.fields(cls)} | set(alias_map(cls)))


def canonical_keys(cls: type, values: Mapping[Any, Any], prefix: str = "") -> dict[Any, Any]:
    """``values`` with old names replaced by field names; an old name given together with its
    field is an error unless both hold the same value."""
    aliases = alias_map(cls)
    out = {k: v for k, v in values.items() if k not in aliases}
    for key, value in values.items():
        if key not in aliases:
            continue
        name = aliases[key]
        if name in out and out[name] != value:
            raise ConfigError(
                f"{prefix}{key} is an old name of {prefix}{name}; they differ ({value!r} and {out[name]!r}): give one"
            )
        out[name] = value
    return out


def owner(cls: type, name: str) -> type:
    """The class in ``cls``'s MRO that declares field ``name`` (a redefinition that only changes
    the default does not count: see :func:`declares`)."""
    for klass in reversed(cls.__mro__):
        if declares(klass, name):
            return klass
    raise KeyError(name)


def declares(klass: type, name: str) -> bool:
    """True when ``klass`` itself (not a base) annotates field ``name`` first in its hierarchy."""
    if name not in inspect.get_annotations(klass):
        return False
    return not any(name in getattr(base, "__dataclass_fields__", {}) for base in klass.__bases__)


def title(cls: type) -> str:
    """The first line of ``cls``'s docstring (the concern its fields belong to)."""
    return (cls.__doc__ or cls.__name__).strip().splitlines()[0].rstrip(".")
