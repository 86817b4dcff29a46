"""Processes under ``torchrun``: the world, joining the process group, and a few collectives.

``torchrun --nproc-per-node N -m logitpair train|evaluate|transfer|reproduce ...`` sets
``WORLD_SIZE``, ``RANK`` and ``LOCAL_RANK``; :func:`env_world` is the one place that reads them,
and :func:`setup` joins the process group (NCCL on CUDA, gloo on CPU). Training
(:mod:`logitpair.training.distributed`, DistributedDataParallel) and sharded evaluation
(:func:`logitpair.evaluation.cache.run_batches`) both use it; only rank 0 writes files.
Collective helpers here are no-ops in a single process.
"""

from __future__ import annotations

import atexit
import hashlib
import itertools
import json
import os
import time
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist

from logitpair.errors import ConfigError


@dataclass(frozen=True)
class Dist:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def active(self) -> bool:
        return self.world_size > 1


def env_world() -> Dist:
    """Rank and world size from torchrun's environment (single process when unset)."""
    return Dist(
        rank=int(os.environ.get("RANK", "0")),
        world_size=int(os.environ.get("WORLD_SIZE", "1")),
        local_rank=int(os.environ.get("LOCAL_RANK", "0")),
    )


def setup(device: str) -> tuple[Dist, torch.device]:
    """Join the process group when launched by torchrun; returns the world and this process's device."""
    w = env_world()
    dev = torch.device(device)
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise ConfigError("device: cuda requested but no CUDA device is available")
        dev = torch.device("cuda", w.local_rank) if w.active and dev.index is None else dev
        torch.cuda.set_device(dev)
    if w.active and not dist.is_initialized():
        backend = "nccl" if dev.type == "cuda" else "gloo"
        _STORE["store"] = store = _store(w)
        dist.init_process_group(backend=backend, store=store, rank=w.rank, world_size=w.world_size)
        # one group per process, kept for every later train() call (experiments train several
        # models); re-creating it would meet the first group's keys in torchrun's store
        atexit.register(teardown)
    return w, dev


_STORE: dict[str, dist.Store] = {}  # the store the process group was joined through (by setup)
_WAITS = itertools.count()  # wait_for_all calls so far: the same sequence on every rank


def _store(w: Dist) -> dist.Store:
    """torchrun's key-value store, under a prefix per restart attempt: after an elastic restart
    the new workers must not read the addresses the killed ones published (a stale gloo
    address makes ``connectFullMesh`` fail with "connection refused")."""
    store = dist.TCPStore(
        os.environ["MASTER_ADDR"],
        int(os.environ["MASTER_PORT"]),
        world_size=w.world_size,
        is_master=False,
        wait_for_workers=False,
        use_libuv=True,
    )
    attempt = os.environ.get("TORCHELASTIC_RESTART_COUNT", "0")
    return dist.PrefixStore(f"logitpair/attempt-{attempt}", store)


def teardown() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def same_on_all_ranks(w: Dist, value: Any, what: str) -> None:
    """Raise :class:`ConfigError` on every rank if ``value`` (JSON-able) differs between ranks."""
    if not w.active:
        return
    digest = hashlib.sha256(json.dumps(value, sort_keys=True, default=str).encode()).hexdigest()
    gathered: list[Any] = [None] * w.world_size
    dist.all_gather_object(gathered, digest)
    bad = [r for r, d in enumerate(gathered) if d != gathered[0]]
    if bad:
        raise ConfigError(f"{what} differs between processes (rank 0 vs rank{'s' if len(bad) > 1 else ''} {bad})")


def all_reduce_sum(t: torch.Tensor, w: Dist) -> torch.Tensor:
    if w.active:
        dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return t


def barrier(w: Dist) -> None:
    if w.active:
        dist.barrier()


def wait_for_all(w: Dist, poll_s: float = 1.0) -> None:
    """Block until every rank has called this (as often): a barrier through torchrun's key-value
    store, polled, so that a rank that finished its share long before the others never runs into a
    collective's timeout (NCCL's watchdog: 10 minutes by default; gloo's: 30) while it waits.
    Every rank must call it the same number of times, in the same order. A process group joined
    other than by :func:`setup` falls back to ``dist.barrier``."""
    if not w.active:
        return
    store = _STORE.get("store")
    if store is None:
        dist.barrier()
        return
    key = f"wait-for-all/{next(_WAITS)}"
    store.add(key, 1)
    delay = 0.01
    while store.add(key, 0) < w.world_size:
        time.sleep(delay)
        delay = min(2 * delay, poll_s)


def all_gather(w: Dist, value: Any) -> list[Any]:
    """Every rank's ``value`` (picklable; CPU tensors are fine), in rank order, on every rank."""
    if not w.active:
        return [value]
    gathered: list[Any] = [None] * w.world_size
    dist.all_gather_object(gathered, value)
    return gathered


def all_true(w: Dist, flag: bool) -> bool:
    """True on every rank when ``flag`` is true on every rank (one decision all ranks follow)."""
    return all(all_gather(w, bool(flag)))
