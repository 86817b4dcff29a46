"""The training loop: optimiser, schedule, validation, crash-safe checkpoints, exact resume.

``train(cfg, out_dir)`` trains ``cfg.model`` with the loss ``METHODS[cfg.method]`` and
writes into ``out_dir``: ``config.json`` (resolved config), ``env.json``, ``metrics.jsonl``
(one line per epoch), ``checkpoints/``, ``model.safetensors`` + ``model.json`` and
``train.json``. Everything that affects the result (weights, optimiser, global RNG, epoch
and position in the epoch, history) is in each checkpoint, so a resumed run ends with
the same weights as an uninterrupted one. Data order is a pure function of (seed, epoch).
"""

from __future__ import annotations

import json
import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from logitpair._version import __version__
from logitpair.attacks.common import predict
from logitpair.attacks.pgd import pgd
from logitpair.checkpoint import (
    export_model,
    latest_checkpoint,
    load_checkpoint,
    optimizer_state,
    restore_optimizer,
    save_checkpoint,
)
from logitpair.config import RunConfig, build, to_dict
from logitpair.data import Splits, load_dataset
from logitpair.errors import TrainingDiverged
from logitpair.io import write_json, write_text
from logitpair.methods import METHODS, BatchContext
from logitpair.models import create_model
from logitpair.modes import train_mode
from logitpair.progress import Logger, ProgressFactory, null_log, null_progress
from logitpair.threat import Linf
from logitpair.training.ema import ema_model, update_ema
from logitpair.training.optim import lr_at, make_optimizer
from logitpair.training.rundir import checked_write, prepare_run_dir


@dataclass
class TrainResult:
    run_dir: Path
    model: nn.Module
    history: list[dict[str, Any]]
    train_seconds: float


def epoch_order(n: int, seed: int, epoch: int) -> Tensor:
    return torch.randperm(n, generator=torch.Generator().manual_seed(seed * 100_003 + epoch))


def model_spec(cfg: RunConfig, splits: Splits) -> dict[str, Any]:
    c, h, _ = splits.train.image_shape
    return {
        "name": cfg.model,
        "kwargs": {"num_classes": splits.train.num_classes, "in_channels": c, "image_size": h},
    }


def validate(model: nn.Module, splits: Splits, cfg: RunConfig) -> dict[str, float]:
    """Clean accuracy on the validation split and PGD accuracy on its first ``val_points``."""
    val = splits.val
    if len(val) == 0:
        return {}
    out: dict[str, float] = {}
    with torch.no_grad():
        out["val_clean"] = float((predict(model, val.x).argmax(1) == val.y).float().mean())
    n = min(cfg.val_points, len(val))
    if n and cfg.loss.eps > 0:
        x, y = val.x[:n], val.y[:n]
        gen = torch.Generator().manual_seed(cfg.seed + 17)
        correct = 0
        for i in range(0, n, 500):
            xa = pgd(
                model,
                x[i : i + 500],
                y[i : i + 500],
                threat=Linf(cfg.loss.eps),
                steps=cfg.val_attack_steps,
                generator=gen,
            )
            correct += int((predict(model, xa).argmax(1) == y[i : i + 500]).sum())
        out["val_pgd"] = correct / n
    return out


def train(
    cfg: RunConfig,
    out_dir: str | Path,
    *,
    resume: bool = False,
    overwrite: bool = False,
    splits: Splits | None = None,
    progress: ProgressFactory = null_progress,
    log: Logger = null_log,
    stop_after_steps: int | None = None,
) -> TrainResult:
    """Train one model; see the module docstring for what is written.

    ``stop_after_steps`` ends the call early after that many optimisation steps in total
    (after checkpointing), which the tests use to simulate an interrupted run.
    """
    out_dir = Path(out_dir)
    loss_fn = METHODS.get(cfg.method)
    splits = splits or load_dataset(cfg.data.dataset, cfg.data.data_dir, cfg.data.val_size, cfg.seed)
    prepare_run_dir(out_dir, cfg, resume, overwrite, log)
    ckpt_root = out_dir / "checkpoints"

    torch.manual_seed(cfg.seed)
    spec = model_spec(cfg, splits)
    model = create_model(cfg.model, **spec["kwargs"])
    opt = make_optimizer(list(model.parameters()), cfg)
    state: dict[str, Any] = {
        "epoch": 0, "pos": 0, "step": 0, "history": [], "train_seconds": 0.0,
        "skipped": 0, "acc": {}, "best": None,
    }  # fmt: skip
    best_weights: dict[str, Tensor] | None = None
    ema: dict[str, Tensor] | None = None
    if cfg.ema_decay > 0:
        ema = {k: v.detach().clone() for k, v in model.state_dict().items()}
    if resume and (ckpt := latest_checkpoint(ckpt_root)) is not None:
        files, saved = load_checkpoint(ckpt)
        model.load_state_dict(files["model"])
        restore_optimizer(opt, files["train_state"], saved["optimizer"])
        torch.set_rng_state(files["train_state"]["rng"])
        best_weights = files.get("best")
        if ema is not None:
            ema = files["ema"]
        state = saved["loop"]
        log(f"resumed from {ckpt.name} (epoch {state['epoch'] + 1}, batch {state['pos']})")

    def checkpoint() -> None:
        tensors, opt_meta = optimizer_state(opt)
        files = {"model": model.state_dict(), "train_state": {**tensors, "rng": torch.get_rng_state()}}
        if best_weights is not None:
            files["best"] = best_weights
        if ema is not None:
            files["ema"] = ema
        save_checkpoint(
            ckpt_root,
            state["step"],
            files,
            {
                "loop": state,
                "optimizer": opt_meta,
                "model_spec": spec,
                "config": to_dict(cfg),
                "version": __version__,
            },
        )

    train = splits.train
    bs = cfg.optim.batch_size
    steps_per_epoch = math.ceil(len(train) / bs)
    steps_this_call = 0
    while state["epoch"] < cfg.optim.epochs:
        epoch = state["epoch"]
        order = epoch_order(len(train), cfg.seed, epoch)
        bar = progress(steps_per_epoch, f"{cfg.method} epoch {epoch + 1}/{cfg.optim.epochs}")
        bar.update(state["pos"])
        t0 = time.perf_counter()
        with train_mode(model):
            while state["pos"] < steps_per_epoch:
                idx = order[state["pos"] * bs : (state["pos"] + 1) * bs]
                x, y = train.x[idx], train.y[idx]
                for group in opt.param_groups:
                    group["lr"] = lr_at(state["step"], steps_per_epoch, cfg)
                ctx = BatchContext(indices=idx, epoch=epoch, step=state["step"])
                loss, metrics = loss_fn(model, x, y, cfg.loss, ctx)
                opt.zero_grad(set_to_none=True)
                finite = bool(torch.isfinite(loss))
                if finite:
                    loss.backward()
                    grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), float("inf"))
                    finite = bool(torch.isfinite(grad_norm))
                if not finite:
                    if cfg.on_nonfinite == "stop":
                        state["train_seconds"] += time.perf_counter() - t0
                        bar.close()
                        last = latest_checkpoint(ckpt_root)
                        where = f"last good checkpoint: {last}" if last else "no checkpoint was written yet"
                        raise TrainingDiverged(
                            f"non-finite loss or gradient at step {state['step']} "
                            f"(epoch {epoch + 1}, batch {state['pos']}); {where}"
                        )
                    state["skipped"] += 1
                    log(f"skipped batch {state['pos']} of epoch {epoch + 1}: non-finite loss or gradient")
                else:
                    opt.step()
                    if ema is not None:
                        update_ema(ema, model, cfg.ema_decay)
                    acc = state["acc"]
                    acc["n"] = acc.get("n", 0) + 1
                    for k, v in {"loss": loss.detach(), **metrics}.items():
                        acc[k] = acc.get(k, 0.0) + float(v)
                state["pos"] += 1
                state["step"] += 1
                steps_this_call += 1
                bar.update(1, loss=float(loss.detach()), acc=float(metrics.get("acc", float("nan"))))
                due = cfg.checkpoint_every and state["step"] % cfg.checkpoint_every == 0
                if due and state["pos"] < steps_per_epoch:
                    state["train_seconds"] += time.perf_counter() - t0
                    t0 = time.perf_counter()
                    checkpoint()
                if stop_after_steps is not None and steps_this_call >= stop_after_steps:
                    bar.close()
                    state["train_seconds"] += time.perf_counter() - t0
                    if not due:
                        checkpoint()
                    return TrainResult(out_dir, model.eval(), state["history"], state["train_seconds"])
        bar.close()
        state["train_seconds"] += time.perf_counter() - t0
        acc = state["acc"]
        n = max(acc.pop("n", 0), 1)
        record = {
            "epoch": epoch + 1,
            "step": state["step"],
            "lr": lr_at(state["step"] - 1, steps_per_epoch, cfg),
        }
        record.update({f"train_{k}": v / n for k, v in acc.items()})
        evaluated = ema_model(model, ema)
        with torch.no_grad():
            record.update(validate(evaluated.eval(), splits, cfg))
        record["skipped_batches"] = state["skipped"]
        record["train_seconds"] = state["train_seconds"]
        state["history"].append(record)
        log(" ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in record.items()))
        key = {"best-robust": "val_pgd", "best-clean": "val_clean"}.get(cfg.select)
        if key and key in record and (state["best"] is None or record[key] > state["best"][1]):
            state["best"] = [epoch + 1, record[key]]
            best_weights = {k: v.clone() for k, v in evaluated.state_dict().items()}
        state.update(epoch=epoch + 1, pos=0, acc={})
        checked_write(write_text, out_dir / "metrics.jsonl", "".join(json.dumps(r) + "\n" for r in state["history"]))
        checkpoint()

    model = ema_model(model, ema)
    if best_weights is not None:
        model.load_state_dict(best_weights)
    meta = {
        "model": spec,
        "dataset": cfg.data.dataset,
        "method": cfg.method,
        "eps": cfg.loss.eps,
        "config": to_dict(cfg),
        "metrics": state["history"][-1] if state["history"] else {},
        "selected": {
            "rule": cfg.select,
            "epoch": state["best"][0] if state["best"] else len(state["history"]),
        },
        "train_seconds": state["train_seconds"],
        "version": __version__,
    }
    export_model(out_dir, model, meta)
    summary = {"train_seconds": state["train_seconds"], "history": state["history"],
               "steps": state["step"], "skipped_batches": state["skipped"]}  # fmt: skip
    checked_write(write_json, out_dir / "train.json", summary)
    return TrainResult(out_dir, model.eval(), state["history"], state["train_seconds"])


def config_from_run(run_dir: str | Path) -> RunConfig:
    return build(RunConfig, json.loads((Path(run_dir) / "config.json").read_text()))
