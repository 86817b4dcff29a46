"""The training loop: optimiser, schedule, validation, crash-safe checkpoints, exact resume,
data-parallel training under torchrun.

``train(cfg, out_dir)`` trains ``cfg.model`` with the loss ``METHODS[cfg.method]`` and
writes into ``out_dir``: ``config.json`` (resolved config), ``env.json``, ``metrics.jsonl``
(one line per epoch), ``checkpoints/``, ``model.safetensors`` + ``model.json`` and
``train.json``. Everything that affects the result (weights, optimiser, global RNG, epoch
and position in the epoch, history) is in each checkpoint, so a resumed run ends with
the same weights as an uninterrupted one. Data order is a pure function of (seed, epoch).

**Global batch.** ``optim.batch_size`` is the global batch of one optimisation step. Under
torchrun with W processes and ``optim.accum_steps`` A, each process forwards A micro-batches
of ``batch_size / (W * A)`` (an error if that does not divide) and DDP averages the gradients,
so the step equals one step on the whole batch (BatchNorm statistics excepted: they are per
micro-batch). With W * A > 1 the last incomplete global batch of an epoch is dropped. The
global batch ``order[s*B:(s+1)*B]`` is cut into W * A equal chunks; process r takes chunks
r*A .. r*A + A - 1. Randomness of the losses is keyed per sample (``noise: per-sample``),
so a sample's random start and noise do not depend on W or A. CLP pairs example i with
i + m/2 *within each micro-batch*: still random pairs (the order is a random permutation),
but which pairs form depends on W * A.

**Host synchronisation.** The loop syncs with the host once per ``log_every`` steps (progress,
the non-finite check) and at checkpoints and epoch ends; ``on_nonfinite: skip`` needs a sync
every step. With ``stop``, a non-finite loss or gradient is detected at the next sync point;
the error names the first bad step and no checkpoint is written after it.
"""

from __future__ import annotations

import json
import math
import time
from contextlib import nullcontext
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
    load_model,
    optimizer_state,
    restore_optimizer,
    save_checkpoint,
)
from logitpair.config import RunConfig, build, to_dict
from logitpair.data import Splits, iterate_batches, load_dataset, take
from logitpair.data.base import Dataset
from logitpair.errors import ConfigError, LogitpairError, TrainingDiverged
from logitpair.evaluation.protocol import run_protocol
from logitpair.evaluation.suites import get_suite
from logitpair.io import sha256_file, write_json, write_text
from logitpair.methods import METHODS, BatchContext
from logitpair.models import create_model
from logitpair.modes import ATTACK_AUTOCAST, train_mode
from logitpair.progress import Logger, ProgressFactory, null_log, null_progress
from logitpair.threat import Linf
from logitpair.training import distributed as D
from logitpair.training.ema import ema_decay_at, ema_model, update_ema
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


def _accuracy(model: nn.Module, data: Dataset, device: torch.device, batch_size: int = 1000) -> float:
    """Clean top-1 accuracy over a whole dataset (evaluation transform)."""
    correct = 0
    for _, x, y in iterate_batches(data, torch.arange(len(data)), batch_size):
        correct += int((predict(model, x.to(device)).argmax(1) == y.to(device)).sum())
    return correct / max(len(data), 1)


def validate(model: nn.Module, splits: Splits, cfg: RunConfig, device: torch.device | None = None) -> dict[str, float]:
    """Clean accuracy on the validation split, PGD accuracy on its first ``val_points``
    (``val_pgd``, which the overfitting guard watches) and, with ``val_suite``, the robust
    accuracy under that suite on the same points (``val_robust``: correct on clean and under
    every attack of the suite, the evaluation protocol's rule)."""
    val = splits.val
    device = device or torch.device("cpu")
    if len(val) == 0:
        return {}
    out: dict[str, float] = {}
    with torch.no_grad():
        out["val_clean"] = _accuracy(model, val, device)
    n = min(cfg.val_points, len(val))
    if n and cfg.loss.eps > 0:
        x, y = take(val, n)
        x, y = x.to(device), y.to(device)
        gen = torch.Generator(device=device).manual_seed(cfg.seed + 17)
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
        if cfg.val_suite:
            res = run_protocol(
                model, x, y, get_suite(cfg.val_suite), threat=Linf(cfg.loss.eps), seed=cfg.seed + 17, batch_size=500
            )
            out["val_robust"] = float(res.robust.float().mean())
    return out


def _load_static(
    cfg: RunConfig, device: torch.device, log: Logger
) -> tuple[tuple[nn.Module, ...], list[dict[str, str]]]:
    """The frozen source models of ``cfg.static_models`` (never updated, never saved in this run)."""
    models, record = [], []
    for path in cfg.static_model_dirs():
        m = load_model(path, device=device).eval()
        m.requires_grad_(False)
        models.append(m)
        weights = Path(path) / "model.safetensors"
        record.append({"path": path, "sha256": sha256_file(weights) if weights.is_file() else ""})
    if models:
        log(f"static source models: {', '.join(r['path'] for r in record)}")
    elif cfg.method == "ens-adv":
        log("ens-adv without static_models: every batch is crafted on the current model (= kurakin)")
    return tuple(models), record


def _on_rank0(world: D.Dist, fn: Any) -> None:
    """Run ``fn`` on rank 0 only; an error there is raised on every rank (nobody waits forever)."""
    error: LogitpairError | None = None
    if world.is_main:
        try:
            fn()
        except LogitpairError as exc:
            error = exc
    if world.active:
        shared: list[Any] = [None if error is None else str(error)]
        torch.distributed.broadcast_object_list(shared, src=0)
        if shared[0] is not None and error is None:
            error = ConfigError(shared[0])
    if error is not None:
        raise error


def _rank_order(order: Tensor, steps: int, batch: int, world: D.Dist, accum: int) -> Tensor:
    """This process's samples, micro-batch after micro-batch: chunks r*A .. r*A+A-1 of each global batch."""
    parts = world.world_size * accum
    if parts == 1:
        return order
    chunks = order[: steps * batch].view(steps, parts, batch // parts)
    return chunks[:, world.rank * accum : (world.rank + 1) * accum].reshape(-1)


def _noise_key(seed: int, epoch: int) -> int:
    return (seed * 1_000_003 + epoch) * 2 + 1


def _aug_key(seed: int, epoch: int) -> int:
    return seed * 1_000_003 + epoch


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
    (after checkpointing), which the tests use to simulate an interrupted run. Under
    torchrun every process calls this; only rank 0 writes.
    """
    world, device = D.setup(cfg.device)
    return _train(cfg, Path(out_dir), world, device, resume, overwrite, splits, progress, log, stop_after_steps)


def _train(
    cfg: RunConfig,
    out_dir: Path,
    world: D.Dist,
    device: torch.device,
    resume: bool,
    overwrite: bool,
    splits: Splits | None,
    progress: ProgressFactory,
    log: Logger,
    stop_after_steps: int | None,
) -> TrainResult:
    if not world.is_main:
        log, progress = null_log, null_progress
    loss_fn = METHODS.get(cfg.method)
    D.same_on_all_ranks(world, to_dict(cfg), "the training config")
    accum = cfg.optim.accum_steps
    parts = world.world_size * accum
    batch = cfg.optim.batch_size
    if batch % parts:
        raise ConfigError(
            f"`batch_size` {batch}: the global batch must divide into {world.world_size} process(es) x "
            f"{accum} accumulation step(s) = {parts} equal micro-batches"
        )
    if cfg.val_suite:
        get_suite(cfg.val_suite)  # an unknown suite fails here, before anything is written
    if cfg.sync_bn and world.active and device.type != "cuda":
        raise ConfigError("sync_bn: SyncBatchNorm needs CUDA devices")
    splits = splits or load_dataset(
        cfg.data.dataset, cfg.data.data_dir, cfg.data.val_size, cfg.seed, **cfg.data.options()
    )
    train_set = splits.train
    if getattr(train_set, "skipped", 0):
        log(f"skipped {train_set.skipped} unreadable training image(s)")
    steps_per_epoch = math.ceil(len(train_set) / batch) if parts == 1 else len(train_set) // batch
    if steps_per_epoch < 1:
        raise ConfigError(f"`batch_size` {batch}: larger than the {len(train_set)} training images")
    _on_rank0(world, lambda: prepare_run_dir(out_dir, cfg, resume, overwrite, log))
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
    prev_weights: dict[str, Tensor] | None = None
    ema: dict[str, Tensor] | None = None
    if cfg.ema_decay > 0:
        ema = {k: v.detach().clone() for k, v in model.state_dict().items()}
    if resume and (ckpt := latest_checkpoint(ckpt_root)) is not None:
        files, saved = load_checkpoint(ckpt)
        model.load_state_dict(files["model"])
        restore_optimizer(opt, files["train_state"], saved["optimizer"])
        torch.set_rng_state(files["train_state"]["rng"])
        best_weights = files.get("best")
        prev_weights = files.get("prev")
        if ema is not None:
            ema = files["ema"]
        state = saved["loop"]
        if not world.is_main:
            state["acc"] = {}  # rank 0 carries the epoch's partial sums (reduced over ranks at the checkpoint)
        log(f"resumed from {ckpt.name} (epoch {state['epoch'] + 1}, batch {state['pos']}, step {state['step']})")
    model.to(device)
    _move_optimizer(opt, device)
    if ema is not None:
        ema = {k: v.to(device) for k, v in ema.items()}
    if cfg.channels_last:
        model.to(memory_format=torch.channels_last)
    static_models, static_record = _load_static(cfg, device, log)
    guard = cfg.guard_points()
    raw = model
    if cfg.sync_bn and world.active:
        raw = model = nn.SyncBatchNorm.convert_sync_batchnorm(model)
    train_model: nn.Module = model
    if world.active:
        train_model = nn.parallel.DistributedDataParallel(model, device_ids=[device] if device.type == "cuda" else None)
    if cfg.compile:
        train_model = torch.compile(train_model)  # type: ignore[assignment]
    autocast = (
        (lambda: torch.autocast(device_type=device.type, dtype=torch.bfloat16)) if cfg.amp == "bf16" else nullcontext
    )
    ATTACK_AUTOCAST.set(cfg.amp_attacks)
    writer = _tensorboard(cfg, out_dir) if world.is_main else None

    def reduced_acc() -> dict[str, float]:
        """The epoch's metric sums so far, summed over processes (a host sync)."""
        keys = sorted(k for k in acc_t)
        if not keys:
            return {}
        vec = torch.stack([acc_t[k] for k in keys])
        D.all_reduce_sum(vec, world)
        return {k: float(v) for k, v in zip(keys, vec.tolist(), strict=True)}

    def checkpoint() -> None:
        sums = reduced_acc()
        if not world.is_main:
            return
        tensors, opt_meta = optimizer_state(opt)
        files = {"model": raw.state_dict(), "train_state": {**tensors, "rng": torch.get_rng_state()}}
        if best_weights is not None:
            files["best"] = best_weights
        if prev_weights is not None:
            files["prev"] = prev_weights
        if ema is not None:
            files["ema"] = ema
        loop_state = {**state, "acc": {**sums, "n": n_steps}}
        save_checkpoint(
            ckpt_root,
            state["step"],
            files,
            {
                "loop": loop_state,
                "optimizer": opt_meta,
                "model_spec": spec,
                "config": to_dict(cfg),
                "version": __version__,
            },
        )

    first_bad = torch.full((), -1, dtype=torch.int64, device=device)

    def check_finite() -> None:
        """The deferred non-finite check (``on_nonfinite: stop``): one host sync."""
        bad = int(first_bad)
        if bad >= 0:
            last = latest_checkpoint(ckpt_root)
            where = f"last good checkpoint: {last}" if last else "no checkpoint was written yet"
            raise TrainingDiverged(
                f"non-finite loss or gradient at step {bad} "
                f"(epoch {bad // steps_per_epoch + 1}, batch {bad % steps_per_epoch}); {where}"
            )

    steps_this_call = 0
    while state["epoch"] < cfg.optim.epochs:
        epoch = state["epoch"]
        order = _rank_order(epoch_order(len(train_set), cfg.seed, epoch), steps_per_epoch, batch, world, accum)
        micro = batch // parts
        stream = iterate_batches(
            train_set,
            order,
            micro,
            start=state["pos"] * accum,
            train=True,
            key=_aug_key(cfg.seed, epoch),
            workers=cfg.data.workers,
            pin_memory=device.type == "cuda",
        )
        noise_key = _noise_key(cfg.seed, epoch) if cfg.noise == "per-sample" else None
        saved_acc = state["acc"]
        n_steps = int(saved_acc.get("n", 0))
        acc_t = {k: torch.tensor(v, dtype=torch.float64, device=device) for k, v in saved_acc.items() if k != "n"}
        bar = progress(steps_per_epoch, f"{cfg.method} epoch {epoch + 1}/{cfg.optim.epochs}")
        bar.update(state["pos"])
        pending = 0
        t0 = time.perf_counter()
        with train_mode(train_model):
            while state["pos"] < steps_per_epoch:
                for group in opt.param_groups:
                    group["lr"] = lr_at(state["step"], steps_per_epoch, cfg)
                opt.zero_grad(set_to_none=True)
                loss_sum = torch.zeros((), device=device)
                step_metrics: dict[str, Tensor] = {}
                for a in range(accum):
                    idx, x, y = next(stream)
                    x = x.to(device, non_blocking=True)
                    y = y.to(device, non_blocking=True)
                    if cfg.channels_last:
                        x = x.contiguous(memory_format=torch.channels_last)
                    ctx = BatchContext(
                        indices=idx.to(device),
                        noise_key=noise_key,
                        step=state["step"],
                        static_models=static_models,
                        module=raw,
                    )
                    no_sync = world.active and a < accum - 1
                    with train_model.no_sync() if no_sync else nullcontext():  # type: ignore[operator]
                        with autocast():
                            loss, metrics = loss_fn(train_model, x, y, cfg.loss, ctx)
                        if parts == 1:
                            loss.backward()
                            weight = 1.0
                        else:
                            # DDP averages over processes; each micro-batch is 1/parts of the global batch
                            weight = 1.0 / parts
                            scale = world.world_size if cfg.loss.ce_reduction == "sum" else 1.0 / accum
                            (loss * scale).backward()
                    loss_sum = loss_sum + loss.detach().float() * weight
                    for k, v in metrics.items():
                        step_metrics[k] = step_metrics.get(k, 0.0) + v.detach().double() * weight
                grad_norm = torch.nn.utils.clip_grad_norm_(raw.parameters(), float("inf"))
                finite_t = torch.isfinite(loss_sum) & torch.isfinite(grad_norm)
                if cfg.on_nonfinite == "skip":
                    finite = bool(finite_t)  # exact skipping needs the answer now: one sync per step
                else:
                    first_bad = torch.where(
                        ~finite_t & (first_bad < 0), torch.full_like(first_bad, state["step"]), first_bad
                    )
                    finite = True
                if not finite:
                    state["skipped"] += 1
                    log(f"skipped batch {state['pos']} of epoch {epoch + 1}: non-finite loss or gradient")
                else:
                    opt.step()
                    if ema is not None:
                        update_ema(ema, raw, ema_decay_at(cfg.ema_decay, cfg.ema_schedule, state["step"]))
                    n_steps += 1
                    for k, v in {"loss": loss_sum.double(), **step_metrics}.items():
                        acc_t[k] = acc_t[k] + v if k in acc_t else v
                state["pos"] += 1
                state["step"] += 1
                steps_this_call += 1
                pending += 1
                last_step = stop_after_steps is not None and steps_this_call >= stop_after_steps
                due = cfg.checkpoint_every and state["step"] % cfg.checkpoint_every == 0
                if pending >= cfg.log_every or due or last_step or state["pos"] == steps_per_epoch:
                    check_finite()
                    shown = {"loss": float(loss_sum)}
                    if "acc" in step_metrics:
                        shown["acc"] = float(step_metrics["acc"])
                    bar.update(pending, **shown)
                    if writer is not None:
                        writer.add_scalar("train/loss_step", shown["loss"], state["step"])
                    pending = 0
                if due and state["pos"] < steps_per_epoch:
                    state["train_seconds"] += time.perf_counter() - t0
                    t0 = time.perf_counter()
                    checkpoint()
                if last_step:
                    bar.close()
                    state["train_seconds"] += time.perf_counter() - t0
                    if not due:
                        checkpoint()
                    return TrainResult(out_dir, raw.eval(), state["history"], state["train_seconds"])
        bar.close()
        state["train_seconds"] += time.perf_counter() - t0
        sums = reduced_acc()
        n = max(n_steps, 1)
        record = {
            "epoch": epoch + 1,
            "step": state["step"],
            "lr": lr_at(state["step"] - 1, steps_per_epoch, cfg),
        }
        record.update({f"train_{k}": v / n for k, v in sums.items()})
        evaluated = ema_model(raw, ema) if cfg.export_weights == "ema" else raw
        with torch.no_grad():
            record.update(validate(evaluated.eval(), splits, cfg, device))
        record["skipped_batches"] = state["skipped"]
        record["train_seconds"] = state["train_seconds"]
        collapsed = False
        if guard > 0 and state["history"] and "val_pgd" in record and "val_pgd" in state["history"][-1]:
            drop = 100.0 * (state["history"][-1]["val_pgd"] - record["val_pgd"])
            if drop > guard and prev_weights is not None:
                collapsed = True
                record["overfit_guard"] = f"val_pgd fell {drop:.1f} points (> {guard:g}): stopped, epoch {epoch} kept"
                log(
                    f"catastrophic overfitting guard: PGD accuracy on the held-out batch fell {drop:.1f} points "
                    f"in epoch {epoch + 1} (> {guard:g}); training stops and the weights of epoch {epoch} are kept"
                )
        state["history"].append(record)
        log(" ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in record.items()))
        if writer is not None:
            for k, v in record.items():
                if isinstance(v, (int, float)):
                    writer.add_scalar(f"epoch/{k}", v, epoch + 1)
            writer.flush()
        key = {"best-robust": "val_robust" if cfg.val_suite else "val_pgd", "best-clean": "val_clean"}.get(cfg.select)
        if not collapsed and key and key in record and (state["best"] is None or record[key] > state["best"][1]):
            state["best"] = [epoch + 1, record[key]]
            best_weights = {k: v.detach().clone() for k, v in evaluated.state_dict().items()}
        if collapsed:
            state["stopped"] = epoch  # the epoch whose weights are kept
            state["epoch"] = cfg.optim.epochs
        else:
            if guard > 0:
                prev_weights = {k: v.detach().clone() for k, v in evaluated.state_dict().items()}
            state["epoch"] = epoch + 1
        state.update(pos=0, acc={})
        acc_t, n_steps = {}, 0  # the checkpoint below starts the next epoch with empty sums
        if world.is_main:
            checked_write(
                write_text, out_dir / "metrics.jsonl", "".join(json.dumps(r) + "\n" for r in state["history"])
            )
        checkpoint()

    final = ema_model(raw, ema) if cfg.export_weights == "ema" else raw
    if state.get("stopped") is not None and prev_weights is not None:
        final = ema_model(raw, prev_weights)
    elif best_weights is not None:
        final = ema_model(raw, best_weights)
    if writer is not None:
        writer.close()
    if world.is_main:
        meta = {
            "model": spec,
            "dataset": cfg.data.dataset,
            "method": cfg.method,
            "eps": cfg.loss.eps,
            "config": to_dict(cfg),
            "metrics": state["history"][-1] if state["history"] else {},
            "selected": {
                "rule": cfg.select,
                "epoch": state["best"][0] if state["best"] else state.get("stopped") or len(state["history"]),
            },
            "weights": "ema" if ema is not None and cfg.export_weights == "ema" else "raw",
            "static_models": static_record,
            "train_seconds": state["train_seconds"],
            "version": __version__,
        }
        export_model(out_dir, final.to("cpu"), meta)
        summary = {"train_seconds": state["train_seconds"], "history": state["history"],
                   "steps": state["step"], "skipped_batches": state["skipped"], "world_size": world.world_size}  # fmt: skip
        checked_write(write_json, out_dir / "train.json", summary)
    D.barrier(world)
    return TrainResult(out_dir, final.eval(), state["history"], state["train_seconds"])


def _move_optimizer(opt: torch.optim.Optimizer, device: torch.device) -> None:
    for st in opt.state.values():
        for k, v in st.items():
            if isinstance(v, Tensor) and v.device != device and v.dim() > 0:
                st[k] = v.to(device)


def _tensorboard(cfg: RunConfig, out_dir: Path) -> Any:
    if not cfg.tensorboard:
        return None
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:
        raise ConfigError("tensorboard: install the extra: pip install 'logitpair[tensorboard]'") from None
    return SummaryWriter(log_dir=str(out_dir / "tensorboard"))


def config_from_run(run_dir: str | Path) -> RunConfig:
    return build(RunConfig, json.loads((Path(run_dir) / "config.json").read_text()))
