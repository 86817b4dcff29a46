"""Restore and export: what the loop reads back from a checkpoint and what it writes at the end.

:func:`checkpoint_payload` is the content of one checkpoint (the model, the optimiser, torch's
global RNG state, the :class:`~logitpair.training.state.Snapshots` and the JSON state);
:func:`restore` puts it back; :func:`final_model` picks the weights a run exports and
:func:`export_run` writes ``model.safetensors``, ``model.json`` and ``train.json``.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

import torch
from torch import nn

from logitpair._version import __version__
from logitpair.checkpoint import export_model, load_checkpoint, optimizer_state, restore_optimizer
from logitpair.config import RunConfig, to_dict
from logitpair.io import write_json
from logitpair.training import distributed as D
from logitpair.training.ema import ema_model
from logitpair.training.rundir import checked_write
from logitpair.training.state import LoopState, Snapshots, Weights


def checkpoint_payload(
    module: nn.Module,
    opt: torch.optim.Optimizer,
    state: LoopState,
    snaps: Snapshots,
    acc: dict[str, float],
    spec: dict[str, Any],
    cfg: RunConfig,
) -> tuple[dict[str, Weights], dict[str, Any]]:
    """``(files, state)`` of a checkpoint (``save_checkpoint``'s arguments); ``acc``: the epoch's
    metric sums so far, over all processes."""
    tensors, opt_meta = optimizer_state(opt)
    files = {"model": module.state_dict(), "train_state": {**tensors, "rng": torch.get_rng_state()}, **snaps.files()}
    meta = {
        "loop": dataclasses.replace(state, acc=acc).to_dict(),
        "optimizer": opt_meta,
        "model_spec": spec,
        "config": to_dict(cfg),
        "version": __version__,
    }
    return files, meta


def restore(
    ckpt: Path, model: nn.Module, opt: torch.optim.Optimizer, *, ema: bool, world: D.Dist
) -> tuple[LoopState, Snapshots]:
    """Load checkpoint ``ckpt`` into ``model``, ``opt`` and torch's global RNG; returns the
    loop's state and the weight sets (the EMA only with ``ema``)."""
    files, saved = load_checkpoint(ckpt)
    model.load_state_dict(files["model"])
    restore_optimizer(opt, files["train_state"], saved["optimizer"])
    torch.set_rng_state(files["train_state"]["rng"])
    snaps = Snapshots(ema=files["ema"] if ema else None, best=files.get("best"), prev=files.get("prev"))
    state = LoopState.from_dict(saved["loop"])
    if not world.is_main:
        state.acc = {}  # rank 0 carries the epoch's partial sums (reduced over ranks at the checkpoint)
    return state, snaps


def final_model(module: nn.Module, snaps: Snapshots, state: LoopState, cfg: RunConfig) -> nn.Module:
    """The weights a run exports: the previous epoch's when the overfitting guard stopped it,
    else the best epoch's under ``select``, else the last (the EMA unless ``export_weights: raw``)."""
    if state.stopped is not None and snaps.prev is not None:
        return ema_model(module, snaps.prev)
    if snaps.best is not None:
        return ema_model(module, snaps.best)
    return ema_model(module, snaps.ema) if cfg.export_weights == "ema" else module


def export_run(
    out_dir: Path,
    final: nn.Module,
    state: LoopState,
    cfg: RunConfig,
    *,
    spec: dict[str, Any],
    ema: bool,
    static_record: list[dict[str, str]],
    world_size: int,
) -> None:
    """Write ``model.safetensors`` + ``model.json`` (the exported weights, moved to the CPU) and ``train.json``."""
    meta = {
        "model": spec,
        "dataset": cfg.data.dataset,
        "method": cfg.method,
        "eps": cfg.loss.eps,
        "config": to_dict(cfg),
        "metrics": state.history[-1] if state.history else {},
        "selected": {
            "rule": cfg.select,
            "epoch": state.best[0] if state.best else state.stopped or len(state.history),
        },
        "weights": "ema" if ema and cfg.export_weights == "ema" else "raw",
        "static_models": static_record,
        **({"init_weights": state.init} if state.init is not None else {}),
        "train_seconds": state.train_seconds,
        "version": __version__,
    }
    export_model(out_dir, final.to("cpu"), meta)
    summary = {"train_seconds": state.train_seconds, "history": state.history, "steps": state.step,
               "skipped_batches": state.skipped, "world_size": world_size}  # fmt: skip
    checked_write(write_json, out_dir / "train.json", summary)
