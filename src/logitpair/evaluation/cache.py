"""The evaluation cache: per-example tensors in one safetensors file, keyed by a fingerprint,
written after every batch, so an interrupted evaluation continues where it stopped.

Both the protocol (:func:`~logitpair.evaluation.protocol.run_protocol`: its per-example record)
and the transfer matrix (:func:`~logitpair.evaluation.transfer.transfer_matrix`: the examples
crafted on each source) keep their state here. A file is used only when its fingerprint, a
digest of everything that determines the outcome (:class:`Fingerprint`: weights, attacks,
threat, points, seed, batch size ...), equals the caller's; any other file, an unreadable one or
one from other settings, is ignored and overwritten, never mixed with new results.

A file's metadata holds ``fingerprint`` and ``done`` (the points finished, a multiple of the
batch size or N); a file without ``done`` but with ``n`` is complete (the transfer matrix wrote
its finished examples so before this module existed). Example::

    cache = EvalCache(path, Fingerprint().json({"seed": 0}).tensors(x, y).hexdigest())
    state = run_batches(len(x), 100, cache, fresh=lambda: {"ok": torch.zeros(len(x), dtype=torch.bool)},
                        step=lambda b, start, stop, st: st["ok"][start:stop].fill_(True))
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch import Tensor, nn

from logitpair.io import atomic_write
from logitpair.progress import Bar


class Fingerprint:
    """A SHA-256 digest built from the parts that determine an evaluation's outcome, in order."""

    def __init__(self, salt: str = "") -> None:
        self._h = hashlib.sha256(salt.encode())

    def text(self, value: str) -> Fingerprint:
        self._h.update(value.encode())
        return self

    def json(self, value: Any) -> Fingerprint:
        """A JSON value, keys sorted (non-JSON values by ``str``)."""
        return self.text(json.dumps(value, sort_keys=True, default=str))

    def tensors(self, *values: Tensor) -> Fingerprint:
        for t in values:
            self._h.update(t.detach().cpu().contiguous().numpy().tobytes())
        return self

    def raw_weights(self, module: nn.Module | None) -> Fingerprint:
        """The bytes of every tensor of ``module``'s state dict (nothing for None)."""
        for v in module.state_dict().values() if module is not None else ():
            self._h.update(v.detach().cpu().contiguous().view(-1).view(torch.uint8).numpy().tobytes())
        return self

    def hexdigest(self) -> str:
        return self._h.hexdigest()


def weights_digest(model: nn.Module) -> str:
    """SHA-256 of a model's class, parameter names, shapes, dtypes and bytes (an ensemble's weights too)."""
    h = hashlib.sha256(type(model).__qualname__.encode())
    for k, v in model.state_dict().items():
        t = v.detach().cpu().contiguous()
        h.update(f"{k}:{t.dtype}:{tuple(t.shape)}".encode())
        h.update(t.view(-1).view(torch.uint8).numpy().tobytes())
    h.update(repr(getattr(model, "weights", None)).encode())
    return h.hexdigest()


def points_digest(x: Tensor, y: Tensor) -> str:
    """SHA-256 of the points and labels: two records describe the same points when it is equal."""
    return Fingerprint("points").json([list(x.shape), str(x.dtype)]).tensors(x, y).hexdigest()


def flags_text(flags: Tensor) -> str:
    """A boolean vector as a string of ``0``/``1`` (per-example records in JSON reports)."""
    return "".join("1" if f else "0" for f in flags.tolist())


def text_flags(text: str) -> Tensor:
    """The inverse of :func:`flags_text`."""
    return torch.tensor([c == "1" for c in text], dtype=torch.bool)


@dataclass(frozen=True)
class EvalCache:
    """One state file (``path``; None: nothing is stored) for the evaluation with ``fingerprint``."""

    path: Path | None
    fingerprint: str

    def load(self) -> tuple[dict[str, Tensor], int] | None:
        """The saved tensors and the number of points done, or None (no file, another
        fingerprint, unreadable)."""
        if self.path is None or not self.path.is_file():
            return None
        try:
            with safe_open(str(self.path), framework="pt") as f:
                meta = f.metadata() or {}
                if meta.get("fingerprint") != self.fingerprint:
                    return None
                done = int(meta["done"] if "done" in meta else meta["n"])
                return {k: f.get_tensor(k) for k in f.keys()}, done  # noqa: SIM118 - safe_open is not a mapping
        except Exception:  # noqa: BLE001 - an unreadable state file just means starting over
            return None

    def save(self, tensors: Mapping[str, Tensor], done: int, **meta: str) -> None:
        """Write ``tensors`` (CPU) with ``done`` points finished, atomically (the folder created);
        no-op without a path."""
        if self.path is None:
            return
        metadata = {"fingerprint": self.fingerprint, "done": str(done), **meta}
        data = {k: v.detach().cpu().contiguous() for k, v in tensors.items()}
        self.path.parent.mkdir(parents=True, exist_ok=True)
        atomic_write(self.path, lambda p: save_file(data, str(p), metadata=metadata))

    def clear(self) -> None:
        if self.path is not None:
            self.path.unlink(missing_ok=True)


def run_batches(
    n: int,
    batch_size: int,
    cache: EvalCache,
    *,
    fresh: Callable[[], dict[str, Tensor]],
    step: Callable[[int, int, int, dict[str, Tensor]], None],
    bar: Bar | None = None,
) -> dict[str, Tensor]:
    """Fill the per-example state batch by batch: ``step(b, start, stop, state)`` for every batch
    ``b`` not yet done, the state saved after each. The state comes from ``cache`` when its
    fingerprint matches, else from ``fresh()``. Returns the state of all ``n`` points."""
    loaded = cache.load()
    state, done = loaded if loaded is not None else (fresh(), 0)
    if bar is not None:
        bar.update(done)
    for b, start in enumerate(range(0, n, batch_size)):
        stop = min(start + batch_size, n)
        if stop <= done:
            continue
        step(b, start, stop, state)
        done = stop
        cache.save(state, done)
        if bar is not None:
            bar.update(stop - start)
    return state
