"""The measurements of ``benchmarks/run.py``, each run in its own process (benchmarks only).

A measurement is a *task*: a dict with a ``kind`` (a key of :data:`BUILDERS`) and its
settings. :func:`worker` builds it in a fresh (forked) process, runs it once untimed with the
pass counter on (warm-up; its passes are the ones reported), calibrates how many
iterations make one timed sample, then answers ``"run"`` with the seconds of one iteration
until ``"stop"``, when it reports its peak memory: ``ru_maxrss`` on CPU, and
``torch.cuda.max_memory_allocated`` on CUDA. Tasks marked ``once`` (the evaluations) are
run and counted in one go, without warm-up.

The floors are minimal reference loops written here, never library code:

- ``pgd_floor``: k x (forward + ``torch.autograd.grad`` of the summed cross-entropy w.r.t.
  the input), model in eval mode, parameters not requiring grad;
- ``train_floor``: that loop (``attack_steps`` times, on ``attack_rows`` of the batch), then
  one plain forward + backward with parameter gradients on ``train_rows`` rows (the
  clean + adversarial batch of M-PGD and ALP: 2 B) in train mode, and an optimizer step.
  With no attack steps it is a plain regular training step.
"""

from __future__ import annotations

import math
import os
import resource
import time
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from _certify import build_bounds, build_certify
from _counting import CountingModel
from torch import Tensor, nn

MIB = 1024 * 1024


# --------------------------------------------------------------------------- helpers
def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _rss_now_mib() -> float:
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / MIB
    except (OSError, ValueError):
        return float("nan")


def _peak_rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux


def _model(task: dict[str, Any], device: torch.device) -> nn.Module:
    from logitpair.models import create_model

    torch.manual_seed(task.get("seed", 0))
    c, s = task["shape"][0], task["shape"][1]
    return create_model(task["model"], num_classes=10, in_channels=c, image_size=s).to(device)


def _batch(task: dict[str, Any], rows: int, device: torch.device) -> Tensor:
    g = torch.Generator().manual_seed(task.get("seed", 0) + 1)
    return torch.rand(rows, *task["shape"], generator=g).to(device)


def _frozen(model: nn.Module) -> nn.Module:
    for p in model.parameters():
        p.requires_grad_(False)
    return model


# --------------------------------------------------------------------------- attack tasks
def build_attack(task: dict[str, Any], device: torch.device) -> tuple[Callable[[], Any], CountingModel]:
    """``which``: pgd_floor, pgd (library default, keep_best), pgd_last (keep_best=False), apgd (APGD-CE), art."""
    from logitpair.attacks import apgd_ce, pgd
    from logitpair.threat import Linf

    net = _model(task, device).eval()
    model = CountingModel(net)
    x = _batch(task, task["batch"], device)
    with torch.no_grad():
        y = net(x).argmax(1)  # the model's own predictions: every example is attacked the whole run
    k, eps = task["steps"], task["eps"]
    threat = Linf(eps)
    step = 2.5 * eps / k
    which = task["which"]

    def gen() -> torch.Generator:
        return torch.Generator(device).manual_seed(0)

    if which == "pgd_floor":
        _frozen(net)

        def fn() -> None:
            for _ in range(k):
                xr = x.detach().requires_grad_(True)
                loss = F.cross_entropy(model(xr), y, reduction="sum")
                torch.autograd.grad(loss, xr)

        return fn, model
    if which == "pgd":
        return lambda: pgd(model, x, y, threat=threat, steps=k, step_size=step, generator=gen()), model
    if which == "pgd_last":
        return (
            lambda: pgd(
                model, x, y, threat=threat, steps=k, step_size=step, restarts=1, keep_best=False, generator=gen()
            ),
            model,
        )
    if which == "apgd":
        return lambda: apgd_ce(model, x, y, threat=threat, steps=k, generator=gen()), model
    if which == "art":
        return _art_pgd(model, x, y, eps, step, k, task["batch"], device), model
    raise ValueError(f"unknown attack task {which!r}")


def _art_pgd(model: nn.Module, x: Tensor, y: Tensor, eps: float, step: float, k: int, batch: int, device):
    import numpy as np
    from art.attacks.evasion import ProjectedGradientDescentPyTorch
    from art.estimators.classification import PyTorchClassifier

    clf = PyTorchClassifier(
        model=model, loss=nn.CrossEntropyLoss(), input_shape=tuple(x.shape[1:]), nb_classes=10,
        clip_values=(0.0, 1.0), device_type="gpu" if device.type == "cuda" else "cpu",
    )  # fmt: skip
    attack = ProjectedGradientDescentPyTorch(
        clf, norm=np.inf, eps=eps, eps_step=step, max_iter=k, targeted=False, num_random_init=1,
        batch_size=batch, verbose=False,
    )  # fmt: skip
    xn, yn = x.cpu().numpy().astype(np.float32), y.cpu().numpy()
    return lambda: attack.generate(xn, yn)


# --------------------------------------------------------------------------- training tasks
def build_train(task: dict[str, Any], device: torch.device) -> tuple[Callable[[], Any], CountingModel]:
    """One optimisation step: a registered method (``method``) or the reference ``floor``."""
    net = _model(task, device).train()
    model = CountingModel(net)
    b = task["batch"]
    x = _batch(task, b, device)
    y = torch.randint(0, 10, (b,), generator=torch.Generator().manual_seed(2)).to(device)
    opt = torch.optim.SGD(net.parameters(), lr=1e-3, momentum=0.9)
    if "floor" in task:
        return _train_floor(model, net, x, y, opt, **task["floor"]), model
    from logitpair.methods import METHODS, BatchContext

    loss_fn, cfg = METHODS.get(task["method"]), METHODS.settings(task["method"])(**task.get("config", {}))
    # A certified method (measured mid-ramp, ``step`` given) bounds the bare network: the bounds
    # trace its layers, which the pass-counting wrapper would hide (their cost is not in passes).
    bare = net if "step" in task else None
    ctx = BatchContext(generator=torch.Generator(device).manual_seed(0), step=task.get("step", 0), module=bare)

    def fn() -> None:
        loss, _ = loss_fn(model, x, y, cfg, ctx)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    return fn, model


def _train_floor(
    model: nn.Module, net: nn.Module, x: Tensor, y: Tensor, opt: torch.optim.Optimizer, *,
    attack_steps: int, attack_rows: int, train_rows: int,
) -> Callable[[], None]:  # fmt: skip
    params = list(net.parameters())
    xa, ya = x[:attack_rows], y[:attack_rows]
    reps = -(-train_rows // len(x))
    xt, yt = x.repeat(reps, 1, 1, 1)[:train_rows], y.repeat(reps)[:train_rows]

    def fn() -> None:
        if attack_steps:
            net.eval()
            for p in params:
                p.requires_grad_(False)
            for _ in range(attack_steps):
                xr = xa.detach().requires_grad_(True)
                torch.autograd.grad(F.cross_entropy(model(xr), ya, reduction="sum"), xr)
            for p in params:
                p.requires_grad_(True)
            net.train()
        loss = F.cross_entropy(model(xt), yt)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    return fn


# --------------------------------------------------------------------------- data tasks
def build_idx(task: dict[str, Any], device: torch.device) -> tuple[Callable[[], Any], None]:
    """Read the Fashion-MNIST IDX files (train and test) into tensors."""
    from logitpair.data import DATASETS

    loader = DATASETS.get("fashion-mnist")
    root = Path(task["data_dir"]) if task.get("data_dir") else None

    def fn() -> dict[str, Any]:
        train, test, _ = loader(root)
        return {"images": len(train) + len(test)}

    return fn, None


def build_folder(task: dict[str, Any], device: torch.device) -> tuple[Callable[[], Any], None]:
    """Decode and transform every image of a generated ``imagenet`` folder, in batches."""
    from logitpair.data import iterate_batches, load_dataset

    splits = load_dataset("imagenet", task["root"], val_size=0, image_size=task["image_size"])
    split = splits.train if task["train"] else splits.test
    order = torch.arange(len(split))

    def fn() -> dict[str, Any]:
        n = 0
        for _, xb, _ in iterate_batches(split, order, task["batch"], train=task["train"], key=1):
            n += len(xb)
        return {"images": n}

    return fn, None


# --------------------------------------------------------------------------- evaluation tasks
def _load_points(task: dict[str, Any], device: torch.device) -> tuple[nn.Module, Tensor, Tensor, float]:
    from _masked import load

    from logitpair.checkpoint import run_info
    from logitpair.evaluation import test_points

    net = load(task["run"], device=device)  # a run, or RUN+WRAPPER (_masked.py)
    info = run_info(net, where=task["run"], eps=task.get("eps"))
    x, y, _ = test_points(info, task["n"], task.get("data_dir"))
    eps = info.eps
    return net, x.to(device), y.to(device), eps


def build_suite(task: dict[str, Any], device: torch.device) -> tuple[Callable[[], Any], CountingModel]:
    """One evaluation of a run on its first ``n`` test points: a suite of ours (``suite``), the
    reference AutoAttack (``suite="autoattack"``), or with ``individual`` every attack of the
    suite separately on all points (the cost without the survivors-only protocol)."""
    from dataclasses import replace

    from logitpair.evaluation import get_suite, run_protocol
    from logitpair.metrics import summarize
    from logitpair.threat import Linf

    net, x, y, eps = _load_points(task, device)
    model = CountingModel(net)
    batch, seed = task["batch"], task.get("seed", 0)

    def flags_text(robust: Tensor) -> str:
        return "".join("1" if r else "0" for r in robust.tolist())

    if task["suite"] == "autoattack":
        from pyautoattack import AutoAttack

        def fn() -> dict[str, Any]:
            adversary = AutoAttack(model, eps=eps, version="standard", device=device, seed=seed)
            _, y_adv = adversary.run_standard_evaluation(x, y, batch_size=batch)
            robust = (y_adv == y).cpu()
            return {"eps": eps, "robust": summarize(robust), "robust_points": flags_text(robust)}

        return fn, model

    specs = get_suite(task["suite"])
    threat = Linf(eps)

    def fn() -> dict[str, Any]:
        if task.get("individual"):
            # every attack on all points: a gate needs the margins of the attacks before it, so
            # here the gated attacks run ungated (what they would cost without the protocol)
            alone = [replace(s, gate=None) for s in specs]
            res = [run_protocol(model, x, y, [s], threat=threat, batch_size=batch, seed=seed) for s in alone]
            robust = torch.stack([r.robust for r in res]).all(0)
            return {"eps": eps, "robust": summarize(robust)}
        res = run_protocol(model, x, y, specs, threat=threat, batch_size=batch, seed=seed)
        s = res.summary()
        return {
            "eps": eps, "clean": s["clean"], "robust": s["robust"], "broken_by": s["broken_by"], "attacked": s["attacked"],
            "robust_points": flags_text(res.robust),
        }  # fmt: skip

    return fn, model


BUILDERS: dict[str, Callable[[dict[str, Any], torch.device], tuple[Callable[[], Any], CountingModel | None]]] = {
    "attack": build_attack,
    "train": build_train,
    "idx": build_idx,
    "folder": build_folder,
    "suite": build_suite,
    "bounds": build_bounds,
    "certify": build_certify,
}


# --------------------------------------------------------------------------- the worker process
def _timed(fn: Callable[[], Any], device: torch.device, inner: int = 1) -> tuple[float, Any]:
    _sync(device)
    t = time.perf_counter()
    out = None
    for _ in range(inner):
        out = fn()
    _sync(device)
    return (time.perf_counter() - t) / inner, out


def worker(conn: Any, task: dict[str, Any], threads: int, device_name: str) -> None:
    """Build ``task`` in this process and serve ``"run"`` / ``"stop"`` requests on ``conn``."""
    try:
        torch.set_num_threads(threads)
        device = torch.device(device_name)
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
        rss_start = _rss_now_mib()
        fn, counter = BUILDERS[task["kind"]](task, device)
        ready: dict[str, Any] = {"rss_start_mib": rss_start}
        inner = 1
        if not task.get("once"):
            seconds, _ = _timed(fn, device)  # first call: allocations, lazy initialisation, counting
            if counter is not None:
                ready["passes"] = counter.snapshot()
                counter.active = False
            seconds, _ = _timed(fn, device)
            inner = max(1, math.ceil(task.get("min_seconds", 0.0) / max(seconds, 1e-9)))
        ready["inner"] = inner
        conn.send(ready)
        while conn.recv() == "run":
            if counter is not None and task.get("once"):
                counter.reset()
            seconds, out = _timed(fn, device, inner)
            msg: dict[str, Any] = {"seconds": seconds}
            if isinstance(out, dict):
                msg.update(out)
            if counter is not None and task.get("once"):
                msg["passes"] = counter.snapshot()
            conn.send(msg)
        final = {"peak_rss_mib": _peak_rss_mib()}
        if device.type == "cuda":
            final["cuda_peak_mib"] = torch.cuda.max_memory_allocated(device) / MIB
        conn.send(final)
    except Exception as exc:  # noqa: BLE001 - reported to the parent as the measurement's result
        conn.send({"error": f"{type(exc).__name__}: {exc}", "traceback": traceback.format_exc(limit=6)})
    finally:
        conn.close()
