"""The evaluation protocol: ordered attacks, each run only on points still robust.

For every example the protocol records whether it is classified correctly without attack,
and which attack (if any) first broke it. A point counts as robust only if it is correct
clean *and* survives every attack, so robust accuracy is the fraction of all evaluated
points that are correct under the worst case found. Attacks marked ``transfer`` are
crafted on a separate source model and only evaluated on the target (black-box transfer).
"""

from __future__ import annotations

import hashlib
import inspect
import json
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch import Tensor, nn

from logitpair.attacks import ATTACKS
from logitpair.attacks.common import model_device, predict, random_target
from logitpair.errors import ConfigError
from logitpair.evaluation.gates import BatchSignals, has_gates, split_params
from logitpair.evaluation.spec import AttackSpec, pgd_spec
from logitpair.evaluation.suites import get_suite
from logitpair.metrics import summarize, topk_correct
from logitpair.progress import ProgressFactory, null_progress
from logitpair.threat import Linf


@dataclass
class ProtocolResult:
    """Per-example outcome of a protocol run (CPU tensors of length N)."""

    clean_correct: Tensor  # bool
    robust: Tensor  # bool: correct clean and under every attack
    broken_by: Tensor  # int: index of the first attack that broke the point, -1 if none (or clean-wrong)
    attacks: list[AttackSpec]
    threat: Linf
    seed: int
    clean_top5: Tensor | None = None
    robust_top5: Tensor | None = None
    target: Tensor | None = None
    target_hit: Tensor | None = None
    adversarial: Tensor | None = None  # the breaking (else last) adversarial example per point

    @property
    def n(self) -> int:
        return len(self.robust)

    def summary(self) -> dict[str, Any]:
        out: dict[str, Any] = {
            "n": self.n,
            "threat": {"norm": "Linf", "eps": self.threat.eps, "bounds": list(self.threat.bounds)},
            "seed": self.seed,
            "attacks": [a.to_dict() for a in self.attacks],
            "clean": summarize(self.clean_correct),
            "robust": summarize(self.robust),
            "broken_by": {a.label: int((self.broken_by == i).sum()) for i, a in enumerate(self.attacks)},
        }
        if self.robust_top5 is not None and self.clean_top5 is not None:
            out["clean_top5"] = summarize(self.clean_top5)
            out["robust_top5"] = summarize(self.robust_top5)
        if self.target_hit is not None:
            out["target_success"] = summarize(self.target_hit)
        return out


def _seed_for(seed: int, *parts: int) -> int:
    return zlib.crc32(repr((seed, *parts)).encode()) & 0x7FFF_FFFF


def _fingerprint(attacks: list[AttackSpec], threat: Linf, x: Tensor, y: Tensor, **settings: Any) -> str:
    """A digest of everything that determines the protocol's outcome, for resumable state."""
    h = hashlib.sha256()
    for key in ("model", "source"):  # the target's weights and, for transfer attacks, the source's
        module = settings.pop(key, None)
        for v in module.state_dict().values() if module is not None else ():
            h.update(v.detach().cpu().contiguous().view(-1).view(torch.uint8).numpy().tobytes())
    h.update(json.dumps([a.to_dict() for a in attacks], sort_keys=True, default=str).encode())
    h.update(json.dumps({"eps": threat.eps, "bounds": threat.bounds, **settings}, sort_keys=True, default=str).encode())
    h.update(x.detach().cpu().contiguous().numpy().tobytes())
    h.update(y.detach().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()


def _load_state(path: Path | None, fingerprint: str) -> tuple[dict[str, Tensor], int]:
    if path is None or not path.is_file():
        return {}, 0
    try:
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
            if meta.get("fingerprint") != fingerprint:
                return {}, 0
            tensors = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118 - safe_open is not a mapping
            return tensors, int(meta["done"])
    except Exception:  # noqa: BLE001 - an unreadable state file just means starting over
        return {}, 0


def _save_state(path: Path, tensors: dict[str, Tensor], fingerprint: str, done: int) -> None:
    from logitpair.io import atomic_write

    meta = {"fingerprint": fingerprint, "done": str(done)}
    atomic_write(path, lambda p: save_file({k: v.contiguous() for k, v in tensors.items()}, str(p), metadata=meta))


def run_protocol(
    model: nn.Module,
    x: Tensor,
    y: Tensor,
    attacks: list[AttackSpec],
    *,
    threat: Linf,
    source: nn.Module | None = None,
    batch_size: int = 500,
    seed: int = 0,
    targeted: bool = False,
    top5: bool = False,
    keep_adversarial: bool = False,
    state_path: str | Path | None = None,
    progress: ProgressFactory = null_progress,
    desc: str = "evaluate",
) -> ProtocolResult:
    """Run ``attacks`` in order on ``model`` (each only on still-robust points).

    ``targeted``: draw one random target class per point (seeded), different from the
    label, and pass it to every attack as ``targeted=True, target=...``; the target
    success rate is reported next to accuracy. ``top5``: also track top-5 robustness
    (attacks then also run on points that are top-5 but not top-1 robust).
    Randomness comes from generators seeded by ``(seed, attack index, batch index)``, so
    a batch's outcome does not depend on the batches before it. With ``state_path`` the
    per-example results are saved after every batch and a rerun with the same settings
    continues where the last one stopped.
    """
    if any(a.transfer for a in attacks) and source is None:
        raise ValueError("a transfer attack needs a source model")
    if targeted:
        unsupported = [a.label for a in attacks if "targeted" not in inspect.signature(ATTACKS.get(a.name)).parameters]
        if unsupported:
            raise ConfigError(f"targeted evaluation: attacks {', '.join(unsupported)} have no targeted mode")
    n = len(x)
    state_path = Path(state_path) if state_path is not None else None
    fp = _fingerprint(attacks, threat, x, y, model=model, seed=seed, batch_size=batch_size, targeted=targeted, top5=top5,
                      keep_adversarial=keep_adversarial, transfer=source is not None, source=source,
                      device=str(model_device(model)))  # fmt: skip
    st, done = _load_state(state_path, fp)
    if not st:
        st = {
            "clean1": torch.zeros(n, dtype=torch.bool),
            "robust1": torch.zeros(n, dtype=torch.bool),
            "broken_by": torch.full((n,), -1, dtype=torch.long),
        }
        if top5:
            st["clean5"] = torch.zeros(n, dtype=torch.bool)
            st["robust5"] = torch.zeros(n, dtype=torch.bool)
        if targeted:
            st["target"] = torch.zeros(n, dtype=torch.long)
            st["hit"] = torch.zeros(n, dtype=torch.bool)
        if keep_adversarial:
            st["adv"] = x.detach().cpu().clone()
    device = model_device(model)
    bar = progress(n, desc)
    bar.update(done)
    for b, start in enumerate(range(0, n, batch_size)):
        stop = min(start + batch_size, n)
        if stop <= done:
            continue
        xb, yb = x[start:stop].to(device), y[start:stop].to(device)
        _run_batch(model, source, xb, yb, attacks, threat, seed, b, start, st, targeted, top5)
        done = stop
        if state_path is not None:
            _save_state(state_path, st, fp, done)
        bar.update(stop - start)
    bar.close()
    return ProtocolResult(
        clean_correct=st["clean1"], robust=st["robust1"], broken_by=st["broken_by"], attacks=list(attacks),
        threat=threat, seed=seed, clean_top5=st.get("clean5"), robust_top5=st.get("robust5"),
        target=st.get("target"), target_hit=st.get("hit"), adversarial=st.get("adv"),
    )  # fmt: skip


def _run_batch(
    model: nn.Module,
    source: nn.Module | None,
    xb: Tensor,
    yb: Tensor,
    attacks: list[AttackSpec],
    threat: Linf,
    seed: int,
    b: int,
    start: int,
    st: dict[str, Tensor],
    targeted: bool,
    top5: bool,
) -> None:
    """Attack one batch in order; write its per-example outcome into ``st`` at ``start``.

    ``xb``/``yb`` are on the model's device, where the attacks run and their generators live;
    ``st`` stays on the CPU (written once per batch). Target classes are drawn on the CPU, so
    they are the same on every device.
    """
    sl = slice(start, start + len(yb))
    dev = xb.device
    logits = predict(model, xb)
    r1 = topk_correct(logits, yb, 1)
    st["clean1"][sl] = r1.cpu()
    r5 = None
    if top5:
        r5 = topk_correct(logits, yb, 5)
        st["clean5"][sl] = r5.cpu()
    tb = hit = None
    if targeted:
        tb = random_target(yb.cpu(), logits.shape[1], torch.Generator().manual_seed(_seed_for(seed, -1, b)))
        st["target"][sl] = tb
        tb, hit = tb.to(dev), st["hit"][sl].to(dev)
    broken = st["broken_by"][sl].to(dev)
    signals = BatchSignals.start(logits, yb) if has_gates(attacks) else None  # gated suites only (gates.py)
    for i, spec in enumerate(attacks):
        idx = (r5 if r5 is not None else r1).nonzero().flatten()
        if len(idx) == 0:
            break
        kwargs = dict(spec.params)
        if signals is not None:
            kwargs, gate = split_params(kwargs)
            idx = signals.select(gate, idx)
            if len(idx) == 0:
                continue
        if tb is not None:
            kwargs.update(targeted=True, target=tb[idx])
        gen = torch.Generator(device=dev).manual_seed(_seed_for(seed, i, b))
        attacker = source if spec.transfer else model
        xa = ATTACKS.get(spec.name)(attacker, xb[idx], yb[idx], threat=threat, generator=gen, **kwargs)
        if not bool(threat.contains(xb[idx], xa).all()):
            raise RuntimeError(f"attack {spec.label} left the threat model")
        adv_logits = predict(model, xa)
        ok1 = topk_correct(adv_logits, yb[idx], 1)
        newly = r1[idx] & ~ok1
        broken[idx[newly]] = i
        if "adv" in st:
            take = newly | (r1[idx] & ok1)  # the breaking example, else the latest attempt
            st["adv"][start + idx[take].cpu()] = xa[take].to("cpu", st["adv"].dtype)
        if signals is not None:
            signals.update(spec.name, idx, adv_logits, yb[idx], newly)
        r1[idx] &= ok1
        if r5 is not None:
            r5[idx] &= topk_correct(adv_logits, yb[idx], 5)
        if hit is not None:
            hit[idx] |= adv_logits.argmax(1) == tb[idx]
    st["broken_by"][sl] = broken.cpu()
    st["robust1"][sl] = r1.cpu()
    if r5 is not None:
        st["robust5"][sl] = r5.cpu()
    if hit is not None:
        st["hit"][sl] = hit.cpu()


def accuracy_vs_eps(
    model: nn.Module,
    x: Tensor,
    y: Tensor,
    eps_values: list[float],
    *,
    steps: int = 20,
    restarts: int = 1,
    seed: int = 0,
    progress: ProgressFactory = null_progress,
) -> list[dict[str, Any]]:
    """Robust accuracy under PGD at each eps (eps = 0 is clean accuracy)."""
    rows = []
    for eps in eps_values:
        attacks = [pgd_spec(steps, restarts)] if eps > 0 else []
        res = run_protocol(model, x, y, attacks, threat=Linf(eps), seed=seed, progress=progress, desc=f"eps={eps:g}")
        rows.append({"eps": eps, **summarize(res.robust)})
    return rows


def evaluate(
    model: nn.Module,
    x: Tensor,
    y: Tensor,
    *,
    threat: Linf,
    suite: str | list[AttackSpec] = "standard",
    baseline: bool = False,
    **kwargs: Any,
) -> ProtocolResult:
    """Robust accuracy of any classifier mapping [0, 1] images to logits under an attack suite.

    ``suite`` is a preset name (``quick``, ``standard``, ``fast``, ``thorough``, ``pgd40``; see
    :mod:`logitpair.evaluation.suites`) or a list of :class:`AttackSpec`. With ``baseline=True`` the
    paper-style PGD-40 (2 restarts) runs first, so ``broken_by`` also tells how many points
    only the stronger attacks broke. Other keyword arguments go to :func:`run_protocol`.

    Example::

        res = logitpair.evaluate(model, x, y, threat=Linf(8 / 255), suite="standard")
        print(res.summary()["robust"])   # {"value": ..., "n": ..., "ci95": [...]}
    """
    attacks = get_suite(suite) if isinstance(suite, str) else list(suite)
    if baseline:
        attacks = [pgd_spec(40, 2), *attacks]
    return run_protocol(model, x, y, attacks, threat=threat, **kwargs)
