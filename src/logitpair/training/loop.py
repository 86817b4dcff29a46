"""The training loop: optimiser, schedule, validation, crash-safe checkpoints, exact resume,
data-parallel training under torchrun.

Its parts: the loop's state (``state.py``: :class:`LoopState`, the JSON a checkpoint holds, and
the weight sets kept beside the model), one optimisation step (``step.py``: :func:`train_step`),
the end-of-epoch policies (``policies.py``: the overfitting guard, best-weight selection), the
data order (``batches.py``), validation (``validation.py``), restore and export (``persist.py``).
This module sets up a call and runs epochs: steps, host synchronisations, checkpoints, the end of
each epoch, the export.

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
import time
from dataclasses import dataclass, replace
from functools import partial
from pathlib import Path
from typing import Any

import torch
from torch import nn

from logitpair.checkpoint import latest_checkpoint, load_model, save_checkpoint
from logitpair.config import RunConfig, build, to_dict
from logitpair.data import Splits, load_dataset
from logitpair.errors import ConfigError, LogitpairError
from logitpair.evaluation.suites import get_suite
from logitpair.io import sha256_file, write_text
from logitpair.methods import METHODS
from logitpair.modes import attack_autocast, train_mode
from logitpair.progress import Bar, Logger, ProgressFactory, null_log, null_progress
from logitpair.training import distributed as D
from logitpair.training.batches import epoch_batches, epoch_order, micro_batches, noise_key, steps_per_epoch
from logitpair.training.ema import ema_model
from logitpair.training.finetune import start_model
from logitpair.training.optim import lr_at, make_optimizer
from logitpair.training.persist import checkpoint_payload, export_run, final_model, restore
from logitpair.training.policies import EpochEnd, EpochPolicy, epoch_policies
from logitpair.training.rundir import checked_write, prepare_run_dir
from logitpair.training.state import EpochSums, LoopState, Snapshots, clone_weights
from logitpair.training.step import NonFiniteWatch, StepEnv, StepResult, train_step
from logitpair.training.validation import validate

__all__ = ["TrainResult", "config_from_run", "epoch_order", "model_spec", "train", "validate"]


@dataclass
class TrainResult:
    run_dir: Path
    model: nn.Module
    history: list[dict[str, Any]]
    train_seconds: float


def model_spec(cfg: RunConfig, splits: Splits) -> dict[str, Any]:
    c, h, _ = splits.train.image_shape
    return {
        "name": cfg.model,
        "kwargs": {"num_classes": splits.train.num_classes, "in_channels": c, "image_size": h},
    }


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
    if not world.is_main:
        log, progress = null_log, null_progress
    run = _setup(cfg, Path(out_dir), world, device, resume, overwrite, splits, progress, log)
    run.stop_after_steps = stop_after_steps
    try:
        with attack_autocast(cfg.amp_attacks):
            return _run(run)
    finally:
        if run.writer is not None:
            run.writer.close()


@dataclass
class _Run:
    """One call of :func:`train`: what it works with, and the state it advances."""

    cfg: RunConfig
    out_dir: Path
    splits: Splits
    spec: dict[str, Any]
    env: StepEnv
    state: LoopState
    snaps: Snapshots
    policies: list[EpochPolicy]
    static_record: list[dict[str, str]]
    watch: NonFiniteWatch
    log: Logger
    progress: ProgressFactory
    writer: Any  # a TensorBoard SummaryWriter (rank 0, ``tensorboard: true``) or None
    stop_after_steps: int | None = None
    steps_this_call: int = 0

    @property
    def ckpt_root(self) -> Path:
        return self.out_dir / "checkpoints"


def _check_settings(cfg: RunConfig, world: D.Dist, device: torch.device) -> None:
    """Errors found before anything is loaded or written."""
    micro_batches(cfg, world)
    if cfg.val_suite:
        get_suite(cfg.val_suite)  # an unknown suite fails here, before anything is written
    if cfg.sync_bn and world.active and device.type != "cuda":
        raise ConfigError("sync_bn: SyncBatchNorm needs CUDA devices")


def _setup(
    cfg: RunConfig,
    out_dir: Path,
    world: D.Dist,
    device: torch.device,
    resume: bool,
    overwrite: bool,
    splits: Splits | None,
    progress: ProgressFactory,
    log: Logger,
) -> _Run:
    """Checks, data, the run directory, the model and optimiser (restored from the latest
    checkpoint when resuming), placed on the device and wrapped for DDP / compile."""
    loss_fn = METHODS.get(cfg.method)
    D.same_on_all_ranks(world, to_dict(cfg), "the training config")
    _check_settings(cfg, world, device)
    splits = splits or load_dataset(
        cfg.data.dataset, cfg.data.data_dir, cfg.data.val_size, cfg.seed, **cfg.data.options()
    )
    if cfg.data.val_size is None:  # automatic: the run records the number held out
        cfg = replace(cfg, data=replace(cfg.data, val_size=len(splits.val)))
    if getattr(splits.train, "skipped", 0):
        log(f"skipped {splits.train.skipped} unreadable training image(s)")
    steps = steps_per_epoch(len(splits.train), cfg.optim.batch_size, micro_batches(cfg, world))
    _on_rank0(world, partial(prepare_run_dir, out_dir, cfg, resume, overwrite, log))

    torch.manual_seed(cfg.seed)
    ckpt = latest_checkpoint(out_dir / "checkpoints") if resume else None
    spec, model, init = start_model(cfg, model_spec(cfg, splits), ckpt, log)  # init_weights: fine-tuning
    opt = make_optimizer(list(model.parameters()), cfg)
    state, snaps = LoopState(init=init), Snapshots(ema=clone_weights(model) if cfg.ema_decay > 0 else None)
    if ckpt is not None:
        state, snaps = restore(ckpt, model, opt, ema=cfg.ema_decay > 0, world=world)
        log(f"resumed from {ckpt.name} (epoch {state.epoch + 1}, batch {state.pos}, step {state.step})")
    model.to(device)
    _move_optimizer(opt, device)
    if snaps.ema is not None:
        snaps.ema = {k: v.to(device) for k, v in snaps.ema.items()}
    if cfg.channels_last:
        model.to(memory_format=torch.channels_last)
    static_models, static_record = _load_static(cfg, device, log)
    module, wrapped = _wrap(cfg, world, device, model)
    env = StepEnv(cfg, world, device, wrapped, module, opt, loss_fn, static_models, steps)
    writer = _tensorboard(cfg, out_dir) if world.is_main else None
    return _Run(cfg, out_dir, splits, spec, env, state, snaps, epoch_policies(cfg), static_record,
                NonFiniteWatch(device), log, progress, writer)  # fmt: skip


def _wrap(cfg: RunConfig, world: D.Dist, device: torch.device, model: nn.Module) -> tuple[nn.Module, nn.Module]:
    """``(module, what the loss calls)``: SyncBatchNorm, DDP and torch.compile as configured."""
    if cfg.sync_bn and world.active:
        model = nn.SyncBatchNorm.convert_sync_batchnorm(model)
    wrapped: nn.Module = model
    if world.active:
        wrapped = nn.parallel.DistributedDataParallel(model, device_ids=[device] if device.type == "cuda" else None)
    if cfg.compile:
        wrapped = torch.compile(wrapped)  # type: ignore[assignment]
    return model, wrapped


def _run(run: _Run) -> TrainResult:
    """Epochs until the last (or until the call's step budget runs out), then the export."""
    state = run.state
    while state.epoch < run.cfg.optim.epochs:
        sums = _train_epoch(run)
        if sums is None:
            return TrainResult(run.out_dir, run.env.module.eval(), state.history, state.train_seconds)
        _end_epoch(run, sums)
    final = final_model(run.env.module, run.snaps, state, run.cfg)
    if run.env.world.is_main:
        export_run(run.out_dir, final, state, run.cfg, spec=run.spec, ema=run.snaps.ema is not None,
                   static_record=run.static_record, world_size=run.env.world.world_size)  # fmt: skip
    D.barrier(run.env.world)
    return TrainResult(run.out_dir, final.eval(), state.history, state.train_seconds)


class _Clock:
    """Adds the time spent training to ``state.train_seconds`` (validation excluded)."""

    def __init__(self) -> None:
        self.t0 = time.perf_counter()

    def lap(self, state: LoopState) -> None:
        state.train_seconds += time.perf_counter() - self.t0
        self.t0 = time.perf_counter()


class _Shown:
    """The progress bar and TensorBoard of one epoch; step values are read at host syncs only."""

    def __init__(self, bar: Bar, writer: Any) -> None:
        self.bar, self.writer, self.pending = bar, writer, 0

    def show(self, result: StepResult, step: int) -> None:
        shown = {"loss": float(result.loss)}
        if "acc" in result.metrics:
            shown["acc"] = float(result.metrics["acc"])
        self.bar.update(self.pending, **shown)
        if self.writer is not None:
            self.writer.add_scalar("train/loss_step", shown["loss"], step)
        self.pending = 0


def _train_epoch(run: _Run) -> EpochSums | None:
    """The rest of the current epoch: its metric sums, or None when the call's step budget ran
    out (after a checkpoint)."""
    cfg, env, state = run.cfg, run.env, run.state
    batches = epoch_batches(cfg, run.splits.train, env.world, env.device, state.epoch, env.steps_per_epoch, state.pos)
    noise = noise_key(cfg.seed, state.epoch) if cfg.noise == "per-sample" else None
    sums = EpochSums(env.device, state.acc)
    shown = _Shown(
        run.progress(env.steps_per_epoch, f"{cfg.method} epoch {state.epoch + 1}/{cfg.optim.epochs}"), run.writer
    )
    shown.bar.update(state.pos)
    clock = _Clock()
    with train_mode(env.model):
        while state.pos < env.steps_per_epoch:
            result = train_step(env, batches, step=state.step, noise_key=noise, ema=run.snaps.ema, watch=run.watch)
            _count(run, result, sums)
            if _after_step(run, result, sums, shown, clock):
                return None
    shown.bar.close()
    clock.lap(state)
    return sums


def _count(run: _Run, result: StepResult, sums: EpochSums) -> None:
    state = run.state
    if result.applied:
        sums.add(result.loss, result.metrics)
    else:
        state.skipped += 1
        run.log(f"skipped batch {state.pos} of epoch {state.epoch + 1}: non-finite loss or gradient")
    state.pos += 1
    state.step += 1
    run.steps_this_call += 1


def _after_step(run: _Run, result: StepResult, sums: EpochSums, shown: _Shown, clock: _Clock) -> bool:
    """Host sync, progress and mid-epoch checkpoint when due; True when the call's step budget
    is spent (the run is checkpointed first)."""
    cfg, state, steps = run.cfg, run.state, run.env.steps_per_epoch
    shown.pending += 1
    last_step = run.stop_after_steps is not None and run.steps_this_call >= run.stop_after_steps
    due = cfg.checkpoint_every > 0 and state.step % cfg.checkpoint_every == 0
    if shown.pending >= cfg.log_every or due or last_step or state.pos == steps:
        run.watch.check(steps, run.ckpt_root)
        shown.show(result, state.step)
    if due and state.pos < steps:
        clock.lap(state)
        _checkpoint(run, sums)
    if not last_step:
        return False
    shown.bar.close()
    clock.lap(state)
    if not due:
        _checkpoint(run, sums)
    return True


def _end_epoch(run: _Run, sums: EpochSums) -> None:
    """Validation, the end-of-epoch policies, the epoch's record (history, log, metrics.jsonl,
    TensorBoard), and the checkpoint that starts the next epoch."""
    cfg, env, state = run.cfg, run.env, run.state
    epoch = state.epoch
    record: dict[str, Any] = {
        "epoch": epoch + 1,
        "step": state.step,
        "lr": lr_at(state.step - 1, env.steps_per_epoch, cfg),
    }
    record.update({f"train_{k}": v / max(sums.n, 1) for k, v in sums.reduced(env.world).items()})
    evaluated = ema_model(env.module, run.snaps.ema) if cfg.export_weights == "ema" else env.module
    with torch.no_grad():
        record.update(validate(evaluated.eval(), run.splits, cfg, env.device))
    record["skipped_batches"] = state.skipped
    record["train_seconds"] = state.train_seconds
    end = EpochEnd(epoch=epoch, record=record, model=evaluated, state=state, snaps=run.snaps, log=run.log)
    for policy in run.policies:
        policy.end_epoch(end)
    state.history.append(record)
    run.log(" ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in record.items()))
    _epoch_scalars(run.writer, record, epoch)
    state.epoch = cfg.optim.epochs if end.stop else epoch + 1
    state.pos, state.acc = 0, {}
    if env.world.is_main:
        lines = "".join(json.dumps(r) + "\n" for r in state.history)
        checked_write(write_text, run.out_dir / "metrics.jsonl", lines)
    _checkpoint(run, EpochSums(env.device))  # the next epoch starts with empty sums


def _epoch_scalars(writer: Any, record: dict[str, Any], epoch: int) -> None:
    if writer is None:
        return
    for k, v in record.items():
        if isinstance(v, (int, float)):
            writer.add_scalar(f"epoch/{k}", v, epoch + 1)
    writer.flush()


def _checkpoint(run: _Run, sums: EpochSums) -> None:
    """Write a checkpoint (rank 0; every rank takes part in summing the epoch's metrics)."""
    acc = sums.saved(run.env.world)
    if not run.env.world.is_main:
        return
    files, meta = checkpoint_payload(run.env.module, run.env.opt, run.state, run.snaps, acc, run.spec, run.cfg)
    save_checkpoint(run.ckpt_root, run.state.step, files, meta)


def _move_optimizer(opt: torch.optim.Optimizer, device: torch.device) -> None:
    for st in opt.state.values():
        for k, v in st.items():
            if isinstance(v, torch.Tensor) and v.device != device and v.dim() > 0:
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
