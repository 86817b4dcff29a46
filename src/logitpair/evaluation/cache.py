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
its finished examples so before this module existed).

**Sharded under torchrun** (``run_batches(..., world=...)`` with an active
:class:`~logitpair.distributed.Dist`): whole batches are dealt out, batch ``b`` (the same batch
size, boundaries and global index ``b`` as in one process, so the same seeds and batch-level
gates) to rank ``b mod N``; the result does not depend on N. Each rank keeps its state in a file
of its own next to the plain one (``NAME.rankR-of-N.safetensors``, metadata ``batches``: the
global batches finished), saved after each of its batches, so a process killed and restarted by
torchrun continues from its saved batches. When every rank is done the ranks exchange the rows of
their batches (``all_gather_object``: no shared filesystem needed, and every rank gets the same
full state back, so what follows runs the same on every rank); rank 0 writes the complete plain
file and the rank files are removed. A restart with another number of processes takes every
finished batch it finds (the plain file and any rank files with the same fingerprint), since a
batch's rows do not depend on who computed them. Sharded state must be per-example (every
tensor's first dimension N). Example::

    cache = EvalCache(path, Fingerprint().json({"seed": 0}).tensors(x, y).hexdigest())
    state = run_batches(len(x), 100, cache, fresh=lambda: {"ok": torch.zeros(len(x), dtype=torch.bool)},
                        step=lambda b, start, stop, st: st["ok"][start:stop].fill_(True))
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch import Tensor, nn

from logitpair.distributed import Dist, all_gather, barrier, wait_for_all
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


def _done(meta: dict[str, str]) -> int | None:
    """The points a plain state file holds finished (``done``; ``n`` in older files), or None."""
    try:
        return int(meta["done"] if "done" in meta else meta["n"])
    except (KeyError, ValueError):
        return None


@dataclass(frozen=True)
class EvalCache:
    """One state file (``path``; None: nothing is stored) for the evaluation with ``fingerprint``."""

    path: Path | None
    fingerprint: str

    def _read(self) -> tuple[dict[str, str], dict[str, Tensor]] | None:
        """The file's metadata and tensors, or None (no file, another fingerprint, unreadable)."""
        if self.path is None or not self.path.is_file():
            return None
        try:
            with safe_open(str(self.path), framework="pt") as f:
                meta = f.metadata() or {}
                if meta.get("fingerprint") != self.fingerprint:
                    return None
                return meta, {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118 - safe_open is not a mapping
        except Exception:  # noqa: BLE001 - an unreadable state file just means starting over
            return None

    def load(self) -> tuple[dict[str, Tensor], int] | None:
        """The saved tensors and the number of points done, or None (no file, another
        fingerprint, unreadable)."""
        read = self._read()
        if read is None:
            return None
        meta, tensors = read
        done = _done(meta)
        return None if done is None else (tensors, done)

    def save(self, tensors: Mapping[str, Tensor], done: int, **meta: str) -> None:
        """Write ``tensors`` (CPU) with ``done`` points finished, atomically (the folder created);
        no-op without a path."""
        self._write(tensors, {"done": str(done), **meta})

    def _write(self, tensors: Mapping[str, Tensor], meta: dict[str, str]) -> None:
        if self.path is None:
            return
        metadata = {"fingerprint": self.fingerprint, **meta}
        data = {k: v.detach().cpu().contiguous() for k, v in tensors.items()}
        self.path.parent.mkdir(parents=True, exist_ok=True)
        atomic_write(self.path, lambda p: save_file(data, str(p), metadata=metadata))

    def clear(self) -> None:
        if self.path is not None:
            self.path.unlink(missing_ok=True)

    def for_rank(self, rank: int, world_size: int) -> EvalCache:
        """The state file of one rank of a sharded run: ``NAME.rankR-of-N.safetensors`` beside this one."""
        if self.path is None:
            return self
        return EvalCache(self.path.with_name(f"{self.path.stem}.rank{rank}-of-{world_size}{self.path.suffix}"),
                         self.fingerprint)  # fmt: skip

    def rank_files(self) -> list[EvalCache]:
        """Every rank file of this state (any number of processes) found beside it."""
        if self.path is None:
            return []
        found = sorted(self.path.parent.glob(f"{self.path.stem}.rank*-of-*{self.path.suffix}"))
        return [EvalCache(p, self.fingerprint) for p in found]

    def save_batches(self, tensors: Mapping[str, Tensor], batches: Iterable[int], batch_size: int) -> None:
        """Write a rank's state: ``tensors`` with the global ``batches`` (of ``batch_size``) finished."""
        self._write(tensors, {"batches": ",".join(map(str, sorted(batches))), "batch_size": str(batch_size)})

    def load_batches(self, bounds: list[tuple[int, int]], batch_size: int) -> tuple[dict[str, Tensor], set[int]] | None:
        """The saved tensors and the global batches they hold finished (``bounds``: every batch's
        ``(start, stop)``), from a rank file or a plain one (its first ``done`` points), or None."""
        read = self._read()
        if read is None:
            return None
        meta, tensors = read
        if "batches" in meta:
            try:
                if int(meta["batch_size"]) != batch_size:
                    return None
                return tensors, {int(b) for b in meta["batches"].split(",") if b}
            except (KeyError, ValueError):  # malformed metadata: start over
                return None
        done = _done(meta)
        return None if done is None else (tensors, {b for b, (_, stop) in enumerate(bounds) if stop <= done})


def run_batches(
    n: int,
    batch_size: int,
    cache: EvalCache,
    *,
    fresh: Callable[[], dict[str, Tensor]],
    step: Callable[[int, int, int, dict[str, Tensor]], None],
    bar: Bar | None = None,
    world: Dist | None = None,
) -> dict[str, Tensor]:
    """Fill the per-example state batch by batch: ``step(b, start, stop, state)`` for every batch
    ``b`` not yet done, the state saved after each. The state comes from ``cache`` when its
    fingerprint matches, else from ``fresh()``. Returns the state of all ``n`` points.

    With ``world`` active (every rank of a torchrun job calls this with the same arguments), the
    batches are sharded as the module docstring says and every rank returns the same full state."""
    if world is not None and world.active:
        return _run_sharded(n, batch_size, cache, fresh, step, bar, world)
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


def batch_bounds(n: int, batch_size: int) -> list[tuple[int, int]]:
    """``(start, stop)`` of every batch of ``n`` points, in order (the last one may be short)."""
    return [(start, min(start + batch_size, n)) for start in range(0, n, batch_size)]


def _rows(bounds: list[tuple[int, int]], batches: Iterable[int]) -> Tensor:
    """The point indices of ``batches``, in batch order."""
    parts = [torch.arange(*bounds[b]) for b in sorted(batches)]
    return torch.cat(parts) if parts else torch.zeros(0, dtype=torch.long)


def _check_per_example(state: Mapping[str, Tensor], n: int) -> None:
    bad = [k for k, v in state.items() if v.dim() == 0 or v.shape[0] != n]
    if bad:
        raise ValueError(f"sharded evaluation: state {', '.join(bad)} is not per-example (first dimension {n})")


def _resume_shard(
    cache: EvalCache, bounds: list[tuple[int, int]], batch_size: int, mine: list[int], fresh: dict[str, Tensor]
) -> tuple[dict[str, Tensor], set[int]]:
    """This rank's state: ``fresh`` with the rows of every batch of ``mine`` that a saved file (the
    plain one, any rank file with the same fingerprint) holds finished, and those batches."""
    state, done = fresh, set()
    for source in [cache, *cache.rank_files()]:
        loaded = source.load_batches(bounds, batch_size)
        if loaded is None:
            continue
        tensors, batches = loaded
        new = (batches & set(mine)) - done
        same = tensors.keys() == state.keys() and all(tensors[k].shape == v.shape for k, v in state.items())
        if not new or not same:
            continue
        idx = _rows(bounds, new)
        for k, v in state.items():
            v[idx] = tensors[k][idx].to(v.dtype)
        done |= new
    return state, done


def _run_sharded(
    n: int,
    batch_size: int,
    cache: EvalCache,
    fresh: Callable[[], dict[str, Tensor]],
    step: Callable[[int, int, int, dict[str, Tensor]], None],
    bar: Bar | None,
    world: Dist,
) -> dict[str, Tensor]:
    """:func:`run_batches` on one rank of a torchrun job: its batches ``b`` with ``b mod N == rank``,
    saved in its rank file after each, then the rows of every rank's batches exchanged."""
    bounds = batch_bounds(n, batch_size)
    mine = [b for b in range(len(bounds)) if b % world.world_size == world.rank]
    initial = fresh()
    _check_per_example(initial, n)
    state, done = _resume_shard(cache, bounds, batch_size, mine, initial)
    own = cache.for_rank(world.rank, world.world_size)
    if bar is not None:
        bar.update(len(_rows(bounds, done)))
    for b in mine:
        if b in done:
            continue
        start, stop = bounds[b]
        step(b, start, stop, state)
        done.add(b)
        own.save_batches(state, done, batch_size)
        if bar is not None:
            bar.update(stop - start)
    idx = _rows(bounds, mine)
    merged = fresh()
    wait_for_all(world)  # ranks finish their shares at different times: wait outside the collective's timeout
    for batches, rows in all_gather(world, (mine, {k: v[idx] for k, v in state.items()})):
        at = _rows(bounds, batches)
        for k, v in merged.items():
            v[at] = rows[k]
    if bar is not None:
        bar.update(n - len(idx))
    if world.is_main:
        cache.save(merged, n)
    barrier(world)  # the complete file is written: the rank files are no longer needed
    for stale in [own, *(cache.rank_files() if world.is_main else [])]:
        stale.clear()
    return merged
