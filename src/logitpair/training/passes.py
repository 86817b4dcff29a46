"""Model passes of a training run, counted: how many images its steps push forward and backward.

Seconds depend on the machine and its load; passes do not. :func:`step_passes` runs one real
training step of a config (its loss, on a batch of its configured size, at a given global step,
in train mode, then the backward pass; no optimiser step) with hooks on the trained model and on
the static source models, and counts the images each forward and each backward pass carries —
the attack's input-gradient steps, the training forward and backward, a static model's crafting
passes. The methods' steps do not depend on the pixel values (fixed-step attacks, no early
stop), so a batch of random images of the model's input shape counts the same as real data.
:func:`run_passes` does this for a trained run directory at its first and last step and
multiplies by the run's step count (``train.json``); when the two differ (a schedule that changes
the step, e.g. a warm-up), both are reported and no total is claimed.
"""

from __future__ import annotations

import json
import warnings
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from logitpair.checkpoint import load_model
from logitpair.config import RunConfig, build
from logitpair.methods import METHODS, BatchContext
from logitpair.modes import train_mode
from logitpair.training.batches import noise_key


@dataclass
class PassCount:
    """Images carried by forward and backward passes of the counted models."""

    forward: int = 0
    backward: int = 0


@contextmanager
def counting(models: Sequence[nn.Module]) -> Iterator[PassCount]:
    """Count the images of every forward and backward pass of ``models`` inside the block."""
    count = PassCount()

    def fwd(_m: nn.Module, _i: Any, out: Any) -> None:
        count.forward += int(out.shape[0])

    def bwd(_m: nn.Module, _gi: Any, go: Any) -> None:
        count.backward += int(go[0].shape[0])

    handles = [h for m in models for h in (m.register_forward_hook(fwd), m.register_full_backward_hook(bwd))]
    try:
        with warnings.catch_warnings():  # "firing ... with respect to module outputs": what we count
            warnings.filterwarnings("ignore", message="Full backward hook is firing")
            yield count
    finally:
        for h in handles:
            h.remove()


def step_passes(
    cfg: RunConfig, model: nn.Module, static_models: Sequence[nn.Module], input_shape: tuple[int, int, int],
    num_classes: int, *, step: int = 0,
) -> dict[str, float]:  # fmt: skip
    """Forward and backward images per training image of one step of ``cfg`` at global ``step``
    (one batch of ``cfg.optim.batch_size`` random images), for the trained model and the static ones."""
    b = cfg.optim.batch_size
    gen = torch.Generator().manual_seed(0)
    x = torch.rand((b, *input_shape), generator=gen)
    y = torch.randint(0, num_classes, (b,), generator=gen)
    key = noise_key(cfg.seed, 0) if cfg.noise == "per-sample" else None
    ctx = BatchContext(indices=torch.arange(b), noise_key=key, step=step, static_models=tuple(static_models),
                       module=model)  # fmt: skip
    loss_fn = METHODS.get(cfg.method)
    with counting([model]) as own, counting(static_models) as static, train_mode(model):
        loss, _ = loss_fn(model, x, y, cfg.loss, ctx)
        loss.backward()
    return {"forward": own.forward / b, "backward": own.backward / b,
            "static_forward": static.forward / b, "static_backward": static.backward / b}  # fmt: skip


def run_passes(run_dir: str | Path) -> dict[str, Any]:
    """The passes of the trained run in ``run_dir``: per training image of its first and last
    step, and in all (per-step images x steps, when the first and last step agree)."""
    run_dir = Path(run_dir)
    cfg = build(RunConfig, json.loads((run_dir / "config.json").read_text()))
    meta = json.loads((run_dir / "model.json").read_text())
    steps = int(json.loads((run_dir / "train.json").read_text())["steps"])
    kw = meta["model"]["kwargs"]
    shape = (int(kw["in_channels"]), int(kw["image_size"]), int(kw["image_size"]))
    model = load_model(run_dir)
    statics = [load_model(p).eval().requires_grad_(False) for p in cfg.static_model_dirs()]
    first = step_passes(cfg, model, statics, shape, int(kw["num_classes"]), step=0)
    last = step_passes(cfg, model, statics, shape, int(kw["num_classes"]), step=max(steps - 1, 0))
    out: dict[str, Any] = {"per_image_first_step": first, "per_image_last_step": last, "steps": steps,
                           "batch_size": cfg.optim.batch_size}  # fmt: skip
    if first == last:
        images = steps * cfg.optim.batch_size
        out["total"] = {k: round(v * images) for k, v in first.items()}
    return out
