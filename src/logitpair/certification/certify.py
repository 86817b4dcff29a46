"""``certify``: per-point verified robustness from bound propagation, batched and resumable.

A point is **certified** when it is classified correctly and the certified lower bound of every
margin ``f_y - f_j`` (:func:`logitpair.bounds.margin_bounds`) over the threat ball is positive: no
input in the ball changes the prediction. For every method but ``ibp`` the bound used is the larger
of the method's and IBP's (both are sound; on IBP-trained models CROWN's linear relaxation can be
looser than IBP's interval, so certifying with CROWN must never certify less than IBP does). A point classified wrongly without attack is
``wrong_clean`` and never certified; the rest is ``not_certified`` (robust or not, the bound
cannot tell). Certified accuracy is a lower bound on the accuracy under *any* attack, so it sits
below every attacked accuracy on the same points (the "sandwich", :mod:`.sandwich`).

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
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from logitpair import bounds
from logitpair.attacks.common import model_device, predict
from logitpair.bounds import METHODS
from logitpair.errors import ConfigError
from logitpair.evaluation.cache import EvalCache, Fingerprint, run_batches, weights_digest
from logitpair.metrics import summarize
from logitpair.modes import eval_mode
from logitpair.progress import ProgressFactory, null_progress
from logitpair.threat import Linf

STATUSES = ("not_certified", "certified", "wrong_clean")


def check_method(method: str, option: str = "method") -> str:
    """``method`` if it is a bound method :func:`certify` takes, else a ConfigError naming ``option``."""
    if method not in METHODS:
        raise ConfigError(f"expected one of {', '.join(METHODS)}, got {method!r}", option=option)
    return method


@dataclass
class CertifyResult:
    """Per-point outcome of :func:`certify` (CPU tensors of length N).

    ``margin``: the lowest certified margin bound ``min_j (f_y - f_j)`` over the ball (NaN for a
    point wrong clean: no bound is computed for it); ``seconds``: each point's share of its
    batch's time (clean prediction and bounds).
    """

    clean_correct: Tensor  # bool
    certified: Tensor  # bool: correct clean and every margin bound > 0
    margin: Tensor  # float64
    seconds: Tensor  # float64
    threat: Linf
    method: str
    options: dict[str, Any] = field(default_factory=dict)

    @property
    def n(self) -> int:
        return len(self.certified)

    @property
    def status(self) -> list[str]:
        """``certified`` / ``not_certified`` / ``wrong_clean`` per point."""
        codes = torch.where(
            self.clean_correct, self.certified.long(), torch.full_like(self.certified, 2, dtype=torch.long)
        )
        return [STATUSES[int(c)] for c in codes]

    def summary(self) -> dict[str, Any]:
        status = self.status
        return {
            "n": self.n,
            "threat": self.threat.to_dict(),
            "method": self.method,
            "options": dict(self.options),
            "clean": summarize(self.clean_correct),
            "certified": summarize(self.certified),
            "counts": {s: status.count(s) for s in STATUSES},
            "seconds_per_point": float(self.seconds.sum()) / self.n if self.n else float("nan"),
        }


def _fingerprint(model: nn.Module, x: Tensor, y: Tensor, threat: Linf, method: str, settings: Mapping[str, Any]) -> str:
    fp = Fingerprint("certify").text(weights_digest(model))
    fp.json({"eps": threat.eps, "bounds": threat.bounds, "method": method, "ibp_floor": True, **settings})
    return fp.tensors(x, y).hexdigest()


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
) -> CertifyResult:
    """Certify ``model`` (logits of [0, 1] images ``x``, N×…; labels ``y``) against ``threat`` with
    the bound ``method`` (``ibp``, ``crown-ibp``, ``crown``, ``alpha-crown``; ``options`` go to
    :func:`logitpair.bounds.margin_bounds`), ``batch_size`` points at a time. With ``state_path``
    the per-point record is saved after every batch and a rerun with the same settings continues
    where the last one stopped. The model is used as it is (call ``.eval()`` first)."""
    check_method(method)
    if batch_size < 1:
        raise ConfigError(f"expected >= 1, got {batch_size}", option="batch_size")
    if len(x) != len(y):
        raise ConfigError(f"{len(x)} points but {len(y)} labels")
    opts = dict(options or {})
    device = model_device(model)
    fp = _fingerprint(model, x, y, threat, method, {"options": opts, "batch_size": batch_size, "device": str(device)})
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
    st = run_batches(len(x), batch_size, cache, fresh=partial(_fresh, len(x)), step=step, bar=bar)
    bar.close()
    return CertifyResult(
        clean_correct=st["clean"], certified=st["certified"], margin=st["margin"], seconds=st["seconds"],
        threat=threat, method=method, options=opts,
    )  # fmt: skip
