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
import platform
import re
import shutil
import time
from copy import deepcopy
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from logitpair import __version__
from logitpair.attacks.common import predict
from logitpair.attacks.pgd import pgd
from logitpair.checkpoint import (
    export_model,
    latest_checkpoint,
    load_checkpoint,
    optimizer_state,
    prune,
    remove_stale,
    restore_optimizer,
    save_checkpoint,
)
from logitpair.config import RunConfig, build, to_dict
from logitpair.data import Splits, load_dataset
from logitpair.errors import CheckpointError, ConfigError, TrainingDiverged
from logitpair.io import write_json, write_text
from logitpair.methods import METHODS
from logitpair.models import create_model
from logitpair.modes import train_mode
from logitpair.progress import Logger, ProgressFactory, null_log, null_progress
from logitpair.threat import Linf


@dataclass
class TrainResult:
    run_dir: Path
    model: nn.Module
    history: list[dict[str, Any]]
    train_seconds: float


def environment() -> dict[str, Any]:
    return {
        "logitpair": __version__,
        "python": platform.python_version(),
        "torch": torch.__version__,
        "platform": platform.platform(),
        "machine": platform.machine(),
        "threads": torch.get_num_threads(),
        "cuda": torch.cuda.is_available(),
    }


def make_optimizer(params: list[nn.Parameter], cfg: RunConfig) -> torch.optim.Optimizer:
    o = cfg.optim
    if o.optimizer == "sgd":
        return torch.optim.SGD(params, lr=o.lr, momentum=o.momentum, weight_decay=o.weight_decay)
    if o.optimizer == "adam":
        return torch.optim.Adam(params, lr=o.lr, weight_decay=o.weight_decay)
    return torch.optim.RMSprop(
        params,
        lr=o.lr,
        alpha=o.rmsprop_decay,
        eps=o.rmsprop_eps,
        momentum=o.momentum,
        weight_decay=o.weight_decay,
    )


def lr_at(step: int, steps_per_epoch: int, cfg: RunConfig) -> float:
    o = cfg.optim
    if o.schedule == "constant":
        return o.lr
    if o.schedule == "step":
        return o.lr * o.step_gamma ** (step // steps_per_epoch // o.step_every)
    total = steps_per_epoch * o.epochs
    return o.lr * 0.5 * (1.0 + math.cos(math.pi * min(step, total) / total))


def update_ema(ema: dict[str, Tensor], model: nn.Module, decay: float) -> None:
    """``ema <- decay * ema + (1 - decay) * weights`` for float tensors; integer buffers copied."""
    with torch.no_grad():
        for k, v in model.state_dict().items():
            if v.is_floating_point():
                ema[k].mul_(decay).add_(v, alpha=1.0 - decay)
            else:
                ema[k].copy_(v)


def ema_model(model: nn.Module, ema: dict[str, Tensor] | None) -> nn.Module:
    """The model itself without EMA, else a copy holding the EMA weights (used for validation and export)."""
    if ema is None:
        return model
    copy = deepcopy(model)
    copy.load_state_dict(ema)
    return copy


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


# what a process killed while writing leaves in a run directory: io.atomic_write's
# ``.<name>.tmp-<pid>``, export_model's ``.model.safetensors.tmp``, safetensors' ``.tmpXXXXXX``
_STALE_RE = re.compile(r"^\.(.+\.tmp-\d+|model\.safetensors\.tmp|tmp\w{6})$")


def _write(write: Any, path: Path, obj: Any) -> None:
    """``write(path, obj)``, with an OS error (disk full) as one-line :class:`CheckpointError`."""
    try:
        write(path, obj)
    except OSError as exc:
        raise CheckpointError(f"cannot write {path}: {exc.strerror or exc}") from None


def remove_leftovers(out_dir: Path) -> None:
    """Delete the temporary files of a killed run, and the old checkpoint it had no time to
    prune (only one process writes a run at a time)."""
    if out_dir.is_dir():
        for p in out_dir.iterdir():
            if _STALE_RE.match(p.name) and p.is_file():
                p.unlink(missing_ok=True)
        ckpts = out_dir / "checkpoints"
        if ckpts.is_dir():
            remove_stale(ckpts)
            prune(ckpts)


def prepare_run_dir(out_dir: Path, cfg: RunConfig, resume: bool, overwrite: bool, log: Logger = null_log) -> None:
    cfg_path = out_dir / "config.json"
    if resume:
        if cfg_path.is_file():
            try:
                stored = json.loads(cfg_path.read_text())
            except (OSError, ValueError) as exc:
                raise ConfigError(f"--resume: cannot read {cfg_path} ({exc})") from None
            new = to_dict(cfg)
            if stored != new:
                diff = _first_difference(stored, new)
                raise ConfigError(f"--resume: the config differs from the one stored in {cfg_path} ({diff})")
            remove_leftovers(out_dir)
            if not (out_dir / "env.json").is_file():  # killed right after writing config.json
                _write(write_json, out_dir / "env.json", environment())
            return
        if out_dir.exists() and any(not _STALE_RE.match(p.name) for p in out_dir.iterdir()):
            raise ConfigError(f"--resume: {out_dir} holds no run (no config.json)")
        # a run killed before it wrote config.json saved nothing: start it from the beginning
        remove_leftovers(out_dir)
        log(f"--resume: nothing saved in {out_dir} yet; starting the run from the beginning")
    elif out_dir.exists() and any(out_dir.iterdir()):
        if not overwrite:
            what = "a different run" if cfg_path.is_file() else "files"
            raise ConfigError(f"--out {out_dir}: directory holds {what}; pass --resume to continue it or --overwrite")
        shutil.rmtree(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    _write(write_json, cfg_path, to_dict(cfg))
    _write(write_json, out_dir / "env.json", environment())


def _first_difference(a: Any, b: Any, prefix: str = "") -> str:
    if isinstance(a, dict) and isinstance(b, dict):
        for k in sorted(set(a) | set(b)):
            if a.get(k) != b.get(k):
                return _first_difference(a.get(k), b.get(k), f"{prefix}{k}.")
    return f"{prefix.rstrip('.')}: stored {a!r}, now {b!r}"


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
                loss, metrics = loss_fn(model, x, y, cfg.loss)
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
        _write(write_text, out_dir / "metrics.jsonl", "".join(json.dumps(r) + "\n" for r in state["history"]))
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
    _write(write_json, out_dir / "train.json", summary)
    return TrainResult(out_dir, model.eval(), state["history"], state["train_seconds"])


def config_from_run(run_dir: str | Path) -> RunConfig:
    return build(RunConfig, json.loads((Path(run_dir) / "config.json").read_text()))
