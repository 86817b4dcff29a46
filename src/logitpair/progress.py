"""Progress reporting passed into long-running functions (they never print themselves)."""

from __future__ import annotations

import sys
from collections.abc import Callable
from typing import Any, Protocol


class Bar(Protocol):
    def update(self, n: int = 1, **postfix: Any) -> None: ...
    def close(self) -> None: ...


ProgressFactory = Callable[[int, str], Bar]


class _NullBar:
    def update(self, n: int = 1, **postfix: Any) -> None:
        pass

    def close(self) -> None:
        pass


def null_progress(total: int, desc: str) -> Bar:
    return _NullBar()


class _TqdmBar:
    def __init__(self, total: int, desc: str) -> None:
        from tqdm.auto import tqdm

        self._bar = tqdm(total=total, desc=desc, leave=False, dynamic_ncols=True, file=sys.stderr, mininterval=0.5)

    def update(self, n: int = 1, **postfix: Any) -> None:
        if postfix:
            self._bar.set_postfix(
                {k: (f"{v:.3f}" if isinstance(v, float) else v) for k, v in postfix.items()}, refresh=False
            )
        self._bar.update(n)

    def close(self) -> None:
        self._bar.close()


def tqdm_progress(total: int, desc: str) -> Bar:
    return _TqdmBar(total, desc)


def make_progress(quiet: bool) -> ProgressFactory:
    return null_progress if quiet else tqdm_progress


Logger = Callable[[str], None]


def null_log(message: str) -> None:
    pass
