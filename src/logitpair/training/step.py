"""One optimisation step: :func:`train_step`.

The learning rate of the step; for each of its micro-batches the loss (under the bf16 autocast
with ``amp: bf16``) and its backward pass (DDP syncs the gradients on the last micro-batch only);
the non-finite check; the optimiser step and the EMA update. The step's loss and metrics stay on
the device: the loop reads them at its host synchronisations only.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from logitpair.checkpoint import latest_checkpoint
from logitpair.config import RunConfig
from logitpair.errors import TrainingDiverged
from logitpair.methods import BatchContext
from logitpair.training import distributed as D
from logitpair.training.ema import ema_decay_at, update_ema
from logitpair.training.optim import lr_at
from logitpair.training.state import Weights

LossFn = Callable[..., tuple[Tensor, dict[str, Tensor]]]


@dataclass(frozen=True)
class StepEnv:
    """What every step of one training call uses."""

    cfg: RunConfig
    world: D.Dist
    device: torch.device
    model: nn.Module  # what the loss calls: the module, or its DDP / compiled wrapper
    module: nn.Module  # the module itself: its parameters, the EMA's source, ``ctx.module``
    opt: torch.optim.Optimizer
    loss_fn: LossFn
    static_models: tuple[nn.Module, ...]
    steps_per_epoch: int

    @property
    def parts(self) -> int:
        """Micro-batches per optimisation step over all processes (W * A)."""
        return self.world.world_size * self.cfg.optim.accum_steps

    def autocast(self) -> AbstractContextManager[Any]:
        if self.cfg.amp == "bf16":
            return torch.autocast(device_type=self.device.type, dtype=torch.bfloat16)
        return nullcontext()


@dataclass
class StepResult:
    loss: Tensor  # the step's loss, a device scalar (reading it syncs with the host)
    metrics: dict[str, Tensor]  # the loss's metrics, weighted over the micro-batches
    applied: bool  # False: skipped for a non-finite loss or gradient (on_nonfinite: skip)


class NonFiniteWatch:
    """The deferred non-finite check of ``on_nonfinite: stop``: the first bad step is kept on
    the device (no sync) and read by :meth:`check` at the loop's host synchronisations."""

    def __init__(self, device: torch.device) -> None:
        self.first_bad = torch.full((), -1, dtype=torch.int64, device=device)

    def note(self, finite: Tensor, step: int) -> None:
        bad = torch.full_like(self.first_bad, step)
        self.first_bad = torch.where(~finite & (self.first_bad < 0), bad, self.first_bad)

    def check(self, steps_per_epoch: int, ckpt_root: Path) -> None:
        """:class:`TrainingDiverged` naming the first bad step and the last good checkpoint (one host sync)."""
        bad = int(self.first_bad)
        if bad >= 0:
            last = latest_checkpoint(ckpt_root)
            where = f"last good checkpoint: {last}" if last else "no checkpoint was written yet"
            raise TrainingDiverged(
                f"non-finite loss or gradient at step {bad} "
                f"(epoch {bad // steps_per_epoch + 1}, batch {bad % steps_per_epoch}); {where}"
            )


def train_step(
    env: StepEnv,
    batches: Iterator[tuple[Tensor, Tensor, Tensor]],
    *,
    step: int,
    noise_key: int | None,
    ema: Weights | None,
    watch: NonFiniteWatch,
) -> StepResult:
    """Optimisation step ``step`` (global count) on the next ``accum_steps`` micro-batches of ``batches``."""
    for group in env.opt.param_groups:
        group["lr"] = lr_at(step, env.steps_per_epoch, env.cfg)
    env.opt.zero_grad(set_to_none=True)
    loss, metrics = _gradients(env, batches, step, noise_key)
    grad_norm = torch.nn.utils.clip_grad_norm_(env.module.parameters(), float("inf"))
    finite = torch.isfinite(loss) & torch.isfinite(grad_norm)
    if env.cfg.on_nonfinite == "skip":
        if not bool(finite):  # exact skipping needs the answer now: one sync per step
            return StepResult(loss, metrics, applied=False)
    else:
        watch.note(finite, step)
    env.opt.step()
    if ema is not None:
        update_ema(ema, env.module, ema_decay_at(env.cfg.ema_decay, env.cfg.ema_schedule, step))
    return StepResult(loss, metrics, applied=True)


def _gradients(
    env: StepEnv, batches: Iterator[tuple[Tensor, Tensor, Tensor]], step: int, noise_key: int | None
) -> tuple[Tensor, dict[str, Tensor]]:
    """Forward and backward over the step's micro-batches: the gradients of the global batch's
    loss in ``.grad``; returns that loss and the metrics, weighted by each micro-batch's share."""
    accum = env.cfg.optim.accum_steps
    loss_sum = torch.zeros((), device=env.device)
    metrics: dict[str, Tensor] = {}
    for a in range(accum):
        idx, x, y = next(batches)
        x, y = _on_device(env, x, y)
        ctx = BatchContext(
            indices=idx.to(env.device),
            noise_key=noise_key,
            step=step,
            static_models=env.static_models,
            module=env.module,
        )
        loss, micro, weight = _micro_step(env, x, y, ctx, sync=a == accum - 1)
        loss_sum = loss_sum + loss.detach().float() * weight
        for k, v in micro.items():
            metrics[k] = metrics.get(k, 0.0) + v.detach().double() * weight
    return loss_sum, metrics


def _on_device(env: StepEnv, x: Tensor, y: Tensor) -> tuple[Tensor, Tensor]:
    x = x.to(env.device, non_blocking=True)
    y = y.to(env.device, non_blocking=True)
    if env.cfg.channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    return x, y


def _micro_step(
    env: StepEnv, x: Tensor, y: Tensor, ctx: BatchContext, *, sync: bool
) -> tuple[Tensor, dict[str, Tensor], float]:
    """One micro-batch's loss and backward pass; returns the loss, its metrics and its weight
    in the step. Under DDP the gradients are synced on the step's last micro-batch (``sync``)."""
    no_sync = env.world.active and not sync
    with env.model.no_sync() if no_sync else nullcontext():  # type: ignore[operator]
        with env.autocast():
            loss, metrics = env.loss_fn(env.model, x, y, env.cfg.loss, ctx)
        if env.parts == 1:
            loss.backward()
            return loss, metrics, 1.0
        # DDP averages over processes; each micro-batch is 1/parts of the global batch
        scale = env.world.world_size if env.cfg.loss.ce_reduction == "sum" else 1.0 / env.cfg.optim.accum_steps
        (loss * scale).backward()
        return loss, metrics, 1.0 / env.parts
