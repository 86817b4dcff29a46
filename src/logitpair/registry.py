"""A tiny name -> object registry shared by models, datasets, attacks and methods.

A new component is one file plus one decorator::

    @MODELS.register("lenet5")
    def lenet5(num_classes: int = 10, in_channels: int = 1) -> nn.Module: ...

Its one-line description (what ``logitpair list`` shows) is the first line of the registered
function's or class's docstring, or ``register(name, description=...)`` for anything else.
"""

from __future__ import annotations

import inspect
import re
from collections.abc import Callable, Iterator
from typing import Any, Generic, TypeVar

from logitpair.errors import ConfigError

T = TypeVar("T")


def plain(text: str) -> str:
    """reStructuredText markup as plain text: a role (``:func:`apgd```) and double backquotes become
    single backquotes."""
    return re.sub(r":[a-z]+:`~?([^`]+)`", r"`\1`", text).replace("``", "`")


def summary(obj: Any) -> str:
    """The first line of the docstring of a function or class (PEP 257's summary line) as plain
    text; "" for anything else (an instance would show its class's docstring)."""
    if not (inspect.isroutine(obj) or inspect.isclass(obj)):
        return ""
    doc = inspect.getdoc(obj) or ""
    return plain(doc.strip().split("\n", 1)[0].strip())


class Registry(Generic[T]):
    def __init__(self, kind: str) -> None:
        self.kind = kind
        self._items: dict[str, T] = {}
        self._descriptions: dict[str, str] = {}

    def register(self, name: str, *, description: str | None = None) -> Callable[[T], T]:
        """Register under ``name``; ``description`` replaces the docstring's first line in ``describe``."""

        def decorator(obj: T) -> T:
            if name in self._items:
                raise ValueError(f"{self.kind} {name!r} is registered twice")
            self._items[name] = obj
            if description is not None:
                self._descriptions[name] = description
            return obj

        return decorator

    def unregister(self, name: str) -> None:
        """Remove ``name`` (tests that register a component for their own use clean up with it)."""
        self.get(name)
        del self._items[name]
        self._descriptions.pop(name, None)

    def describe(self, name: str) -> str:
        """One line saying what ``name`` is: its registered description, else :func:`summary` of it."""
        obj = self.get(name)
        return self._descriptions.get(name) or summary(obj)

    def get(self, name: str) -> T:
        try:
            return self._items[name]
        except KeyError:
            valid = ", ".join(sorted(self._items))
            raise ConfigError(f"unknown {self.kind} {name!r}; valid names: {valid}") from None

    def names(self) -> list[str]:
        return sorted(self._items)

    def __contains__(self, name: object) -> bool:
        return name in self._items

    def __iter__(self) -> Iterator[str]:
        return iter(self.names())
