"""``certify``: per-point verified robustness from bound propagation, batched and resumable.

A point is **certified** when it is classified correctly and the certified lower bound of every
margin ``f_y - f_j`` (:func:`logitpair.bounds.margin_bounds`) over the threat ball is positive: no
input in the ball changes the prediction. For every method but ``ibp`` the bound used is the larger
of the method's and IBP's (both are sound; on IBP-trained models CROWN's linear relaxation can be
looser than IBP's interval, so certifying with CROWN must never certify less than IBP does). A point classified wrongly without attack is
``wrong_clean`` and never certified; the rest is ``not_certified`` (robust or not, the bound
cannot tell). Certified accuracy is a lower bound on the accuracy under *any* attack, so it sits
below every attacked accuracy on the same points (the "sandwich", :mod:`.sandwich`).

``method="milp"`` decides every point exactly (MIPVerify, Tjeng et al. 2019,
https://arxiv.org/abs/1711.07356; :mod:`.exact`): ``verified``, ``counterexample`` (a real one,
checked by a forward pass), ``timeout`` (never counted robust) or ``wrong_clean``, trying the
clean prediction, the ``fast`` attacks and α-CROWN before the solver.

The per-point record is kept in the evaluation cache (:mod:`logitpair.evaluation.cache`), keyed
by the model's weights, the points, the threat, the method and its options, the batch size and
the device:
with ``state_path`` an interrupted call continues at the first batch not yet done. Example::

    res = logitpair.certify(model, x, y, threat=Linf(0.1), method="crown")
    print(res.summary()["certified"])   # {"value": ..., "n": ..., "ci95": [...]}
"""

from __future__ import annotations

import time
from collections.abc import Mapping
from functools import partial
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from logitpair import bounds
from logitpair.attacks.common import model_device, predict
from logitpair.certification.exact import certify_milp
from logitpair.certification.result import STATUSES, CertifyResult, certify_fingerprint
from logitpair.distributed import Dist
from logitpair.errors import ConfigError
from logitpair.evaluation.cache import EvalCache, run_batches
from logitpair.modes import eval_mode
from logitpair.progress import ProgressFactory, null_progress
from logitpair.threat import Linf

METHODS = (*bounds.METHODS, "milp")
__all__ = ["METHODS", "STATUSES", "CertifyResult", "certify", "check_method"]


def check_method(method: str, option: str = "method") -> str:
    """``method`` if :func:`certify` takes it (a bound method or ``milp``), else a ConfigError naming ``option``."""
    if method not in METHODS:
        raise ConfigError(f"expected one of {', '.join(METHODS)}, got {method!r}", option=option)
    return method


def _fresh(n: int) -> dict[str, Tensor]:
    return {
        "clean": torch.zeros(n, dtype=torch.bool),
        "certified": torch.zeros(n, dtype=torch.bool),
        "margin": torch.full((n,), float("nan"), dtype=torch.float64),
        "seconds": torch.zeros(n, dtype=torch.float64),
    }


def _certify_batch(
    model: nn.Module, xb: Tensor, yb: Tensor, threat: Linf, method: str, options: Mapping[str, Any]
) -> tuple[Tensor, Tensor, Tensor]:  # fmt: skip
    """Clean correctness, certified flags and lowest margin bounds of one batch (on its device)."""
    correct = predict(model, xb).argmax(1) == yb
    margin = torch.full((len(yb),), float("nan"), dtype=torch.float64, device=xb.device)
    idx = correct.nonzero().flatten()
    if len(idx):  # bounds only where the clean prediction is right: a wrong point is never certified
        with eval_mode(model):
            lower = bounds.margin_bounds(model, xb[idx], yb[idx], threat=threat, method=method, **options)
            if method != "ibp":  # both bounds are sound: keep the tighter (IBP wins on IBP-trained models)
                rtol = options.get("rtol", bounds.ROUNDOFF_RTOL)
                ibp = bounds.margin_bounds(model, xb[idx], yb[idx], threat=threat, method="ibp", rtol=rtol)
                lower = torch.maximum(lower, ibp)
        margin[idx] = lower.min(1).values.to(torch.float64)
    certified = correct & (margin > 0)  # NaN compares False
    return correct, certified, margin


def certify(
    model: nn.Module,
    x: Tensor,
    y: Tensor,
    *,
    threat: Linf,
    method: str = "crown",
    batch_size: int = 100,
    options: Mapping[str, Any] | None = None,
    state_path: str | Path | None = None,
    progress: ProgressFactory = null_progress,
    desc: str = "certify",
    world: Dist | None = None,
) -> CertifyResult:
    """Certify ``model`` (logits of [0, 1] images ``x``, N×…; labels ``y``) against ``threat`` with
    the bound ``method`` (``ibp``, ``crown-ibp``, ``crown``, ``alpha-crown``; ``options`` go to
    :func:`logitpair.bounds.margin_bounds`), ``batch_size`` points at a time, or decide every point
    exactly with ``method="milp"`` (:func:`~logitpair.certification.exact.certify_milp`, options
    ``time_limit`` (60 s per point), ``formulation``, ``cheap``, ``suite``, ``seed``, ``iterations``).
    With ``state_path`` the per-point record is saved after every batch (the MILP's after every
    point) and a rerun with the same settings continues where the last one stopped. The model is
    used as it is (call ``.eval()`` first). ``world`` (torchrun, bound methods only): the batches
    are sharded by rank as the evaluation's are (:func:`~logitpair.evaluation.cache.run_batches`),
    every rank gets the same result."""
    check_method(method)
    if batch_size < 1:
        raise ConfigError(f"expected >= 1, got {batch_size}", option="batch_size")
    if len(x) != len(y):
        raise ConfigError(f"{len(x)} points but {len(y)} labels")
    opts = dict(options or {})
    device = model_device(model)
    if method == "milp":
        if world is not None and world.active:
            raise ConfigError(
                "`method` milp under torchrun: the exact verification is not sharded; run it in one process"
            )
        return certify_milp(model, x, y, threat=threat, options=opts, batch_size=batch_size, state_path=state_path,
                            progress=progress, desc=desc)  # fmt: skip
    fp = certify_fingerprint(
        model, x, y, threat, method, {"options": opts, "batch_size": batch_size, "device": str(device)}
    )
    cache = EvalCache(Path(state_path) if state_path is not None else None, fp)

    def step(b: int, start: int, stop: int, st: dict[str, Tensor]) -> None:
        t0 = time.perf_counter()
        xb, yb = x[start:stop].to(device), y[start:stop].to(device)
        correct, cert, margin = _certify_batch(model, xb, yb, threat, method, opts)
        st["clean"][start:stop] = correct.cpu()
        st["certified"][start:stop] = cert.cpu()
        st["margin"][start:stop] = margin.cpu()
        st["seconds"][start:stop] = (time.perf_counter() - t0) / (stop - start)

    bar = progress(len(x), desc)
    st = run_batches(len(x), batch_size, cache, fresh=partial(_fresh, len(x)), step=step, bar=bar, world=world)
    bar.close()
    return CertifyResult(
        clean_correct=st["clean"], certified=st["certified"], margin=st["margin"], seconds=st["seconds"],
        threat=threat, method=method, options=opts,
    )  # fmt: skip
