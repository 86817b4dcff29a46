"""The evaluation protocol: ordered attacks, each run only on points still robust.

For every example the protocol records whether it is classified correctly without attack,
and which attack (if any) first broke it. A point counts as robust only if it is correct
clean *and* survives every attack, so robust accuracy is the fraction of all evaluated
points that are correct under the worst case found. Attacks marked ``transfer`` are
crafted on a separate source model and only evaluated on the target (black-box transfer).
"""

from __future__ import annotations

import zlib
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from logitpair.attacks import ATTACKS, attack_info, attacks_for
from logitpair.attacks.common import model_device, predict, random_target
from logitpair.distributed import Dist
from logitpair.errors import ConfigError
from logitpair.evaluation.cache import EvalCache, Fingerprint, run_batches
from logitpair.evaluation.gates import BatchSignals, has_gates, wants_warm
from logitpair.evaluation.spec import AttackSpec, pgd_spec
from logitpair.evaluation.suites import GATES_MEASURED_FOR, get_suite
from logitpair.metrics import summarize, topk_correct
from logitpair.progress import ProgressFactory, null_progress
from logitpair.threat import Linf, Threat


@dataclass
class ProtocolResult:
    """Per-example outcome of a protocol run (CPU tensors of length N)."""

    clean_correct: Tensor  # bool
    robust: Tensor  # bool: correct clean and under every attack
    broken_by: Tensor  # int: index of the first attack that broke the point, -1 if none (or clean-wrong)
    attacks: list[AttackSpec]
    threat: Threat
    seed: int
    clean_top5: Tensor | None = None
    robust_top5: Tensor | None = None
    target: Tensor | None = None
    target_hit: Tensor | None = None
    adversarial: Tensor | None = None  # the breaking (else last) adversarial example per point
    attacked: Tensor | None = None  # (len(attacks),) points each attack ran on (after its gate; both top-k passes)

    @property
    def n(self) -> int:
        return len(self.robust)

    def summary(self) -> dict[str, Any]:
        out: dict[str, Any] = {
            "n": self.n,
            "threat": self.threat.to_dict(),
            "seed": self.seed,
            "attacks": [a.to_dict() for a in self.attacks],
            "clean": summarize(self.clean_correct),
            "robust": summarize(self.robust),
            "broken_by": {a.label: int((self.broken_by == i).sum()) for i, a in enumerate(self.attacks)},
        }
        if self.attacked is not None:
            out["attacked"] = {a.label: int(self.attacked[i]) for i, a in enumerate(self.attacks)}
        if self.robust_top5 is not None and self.clean_top5 is not None:
            out["clean_top5"] = summarize(self.clean_top5)
            out["robust_top5"] = summarize(self.robust_top5)
        if self.target_hit is not None:
            out["target_success"] = summarize(self.target_hit)
        return out


def _seed_for(seed: int, *parts: int) -> int:
    return zlib.crc32(repr((seed, *parts)).encode()) & 0x7FFF_FFFF


_STATE_FORMAT = 2  # 2: ``attacked`` counted per point (shardable); states of format 1 are recomputed


def _fingerprint(attacks: list[AttackSpec], threat: Threat, x: Tensor, y: Tensor, **settings: Any) -> str:
    """A digest of everything that determines the protocol's outcome, for resumable state (the
    number of processes of a sharded run is not part of it: it changes no result)."""
    fp = Fingerprint()
    for key in ("model", "source"):  # the target's weights and, for transfer attacks, the source's
        fp.raw_weights(settings.pop(key, None))
    fp.json([a.to_dict() for a in attacks])
    norm = {} if threat.norm == "Linf" else {"norm": threat.norm}  # L-inf states saved before L2 existed stay valid
    fp.json({"eps": threat.eps, "bounds": threat.bounds, **norm, **settings, "state": _STATE_FORMAT})
    return fp.tensors(x, y).hexdigest()


def _fresh_state(n: int, x: Tensor, attacks: list[AttackSpec], *, targeted: bool, top5: bool,
                 keep_adversarial: bool) -> dict[str, Tensor]:  # fmt: skip
    """The protocol's per-example record before any batch (``attacked``: how often each attack ran
    on each point, 0-2 with top-5's second pass; summed into the result's per-attack counts)."""
    st = {
        "clean1": torch.zeros(n, dtype=torch.bool),
        "robust1": torch.zeros(n, dtype=torch.bool),
        "broken_by": torch.full((n,), -1, dtype=torch.long),
        "attacked": torch.zeros(n, len(attacks), dtype=torch.uint8),
    }
    if top5:
        st["clean5"] = torch.zeros(n, dtype=torch.bool)
        st["robust5"] = torch.zeros(n, dtype=torch.bool)
    if targeted:
        st["target"] = torch.zeros(n, dtype=torch.long)
        st["hit"] = torch.zeros(n, dtype=torch.bool)
    if keep_adversarial:
        st["adv"] = x.detach().cpu().clone()
    return st


def _check_attacks(attacks: list[AttackSpec], source: nn.Module | None, targeted: bool, threat: Threat) -> None:
    if any(a.transfer for a in attacks) and source is None:
        raise ValueError("a transfer attack needs a source model")
    if targeted:
        unsupported = [a.label for a in attacks if not attack_info(a.name).targeted]
        if unsupported:
            raise ConfigError(f"targeted evaluation: attacks {', '.join(unsupported)} have no targeted mode")
    check_norm(attacks, threat.norm)


def check_norm(attacks: list[AttackSpec], norm: str) -> None:
    """Every attack supports the threat model ``norm`` (its registry entry says), and gated attacks
    run only under the norms their gates were measured on; else one ConfigError naming them."""
    unsupported = [a.label for a in attacks if norm not in attack_info(a.name).norms]
    if unsupported:
        raise ConfigError(
            f"the {norm} threat model: attack(s) {', '.join(unsupported)} do not support it; "
            f"attacks for {norm}: {', '.join(attacks_for(norm))}"
        )
    gated = [a.label for a in attacks if a.gate is not None and norm not in GATES_MEASURED_FOR]
    if gated:
        raise ConfigError(
            f"the {norm} threat model: the gates of {', '.join(gated)} were measured under "
            f"{', '.join(GATES_MEASURED_FOR)} only; use an ungated suite or attack list"
        )


def run_protocol(
    model: nn.Module,
    x: Tensor,
    y: Tensor,
    attacks: list[AttackSpec],
    *,
    threat: Threat,
    source: nn.Module | None = None,
    batch_size: int = 500,
    seed: int = 0,
    targeted: bool = False,
    top5: bool = False,
    keep_adversarial: bool = False,
    state_path: str | Path | None = None,
    progress: ProgressFactory = null_progress,
    desc: str = "evaluate",
    world: Dist | None = None,
) -> ProtocolResult:
    """Run ``attacks`` in order on ``model`` (each only on still-robust points).

    ``targeted``: draw one random target class per point (seeded), different from the
    label, and pass it to every attack as ``targeted=True, target=...``; the target
    success rate (points classified as their target, at the clean point or under some attack,
    over all N) is reported next to accuracy. Every attack runs on every point not yet at its
    target (and on the points still correct): a point whose label an earlier attack pushed out
    without reaching the target is attacked again. ``top5``: also track top-5 robustness; untargeted,
    each attack then runs a second time, with top-5 success (``k=5``), on the points whose label
    left the top 1 but not the top 5, so none is dropped at its first top-1 success. The top-1
    figures are those of the protocol without ``top5``.
    Randomness comes from generators seeded by ``(seed, attack index, batch index)``, so
    a batch's outcome does not depend on the batches before it. With ``state_path`` the
    per-example results are saved after every batch and a rerun with the same settings
    continues where the last one stopped. ``world``: the torchrun processes (every rank calls
    this with the same arguments): whole batches are sharded by rank, batch ``b`` to rank
    ``b mod N``, and every rank returns the same result, equal to one process's
    (:func:`~logitpair.evaluation.cache.run_batches`).
    """
    _check_attacks(attacks, source, targeted, threat)
    n = len(x)
    fp = _fingerprint(attacks, threat, x, y, model=model, seed=seed, batch_size=batch_size, targeted=targeted, top5=top5,
                      keep_adversarial=keep_adversarial, transfer=source is not None, source=source,
                      device=str(model_device(model)))  # fmt: skip
    cache = EvalCache(Path(state_path) if state_path is not None else None, fp)
    device = model_device(model)

    def step(b: int, start: int, stop: int, st: dict[str, Tensor]) -> None:
        xb, yb = x[start:stop].to(device), y[start:stop].to(device)
        _run_batch(model, source, xb, yb, attacks, threat, seed, b, start, st, targeted, top5)

    bar = progress(n, desc)
    fresh = partial(_fresh_state, n, x, attacks, targeted=targeted, top5=top5, keep_adversarial=keep_adversarial)
    st = run_batches(n, batch_size, cache, fresh=fresh, step=step, bar=bar, world=world)
    bar.close()
    return ProtocolResult(
        clean_correct=st["clean1"], robust=st["robust1"], broken_by=st["broken_by"], attacks=list(attacks),
        threat=threat, seed=seed, clean_top5=st.get("clean5"), robust_top5=st.get("robust5"),
        target=st.get("target"), target_hit=st.get("hit"), adversarial=st.get("adv"),
        attacked=st["attacked"].sum(0, dtype=torch.long),
    )  # fmt: skip


@dataclass
class _Batch:
    """One protocol batch on the model's device: the points and their per-example state.

    ``r1``/``r5``: still top-1/top-5 correct under every attack so far; ``broken``: index of the
    attack that first broke top-1 (-1: none); ``target``/``hit``: the targeted protocol's
    classes and whether the prediction became the target (at the clean point or under an attack).
    """

    x: Tensor
    y: Tensor
    r1: Tensor
    broken: Tensor
    r5: Tensor | None = None
    target: Tensor | None = None
    hit: Tensor | None = None
    signals: BatchSignals | None = None

    def passes(self, num_classes: int) -> list[int]:
        """The top-``k`` criteria each attack runs with: 1, and 5 for untargeted top-5 tracking."""
        if self.r5 is not None and self.target is None and num_classes > 5:
            return [1, 5]
        return [1]

    def pool(self, k: int) -> Tensor:
        """Indices of the points the pass with top-``k`` success attacks.

        Untargeted, ``k = 1``: the points still top-1 correct. ``k = 5``: the points top-1 broken
        (or wrong clean) whose label is still in the top 5 -- they are attacked until it leaves the
        top 5, not dropped at the first top-1 success. Targeted: every point not yet classified as
        its target (or still correct): an attack keeps trying to reach the target.
        """
        if self.target is not None:
            assert self.hit is not None
            still = self.r5 if self.r5 is not None else self.r1
            return (~self.hit | still).nonzero().flatten()
        if k == 1:
            return self.r1.nonzero().flatten()
        assert self.r5 is not None
        return (self.r5 & ~self.r1).nonzero().flatten()

    def record(
        self, i: int, k: int, name: str, idx: Tensor, adv_logits: Tensor, xa: Tensor, adv: Tensor | None, start: int,
        gate: str = "all",
    ) -> None:  # fmt: skip
        """Fold attack ``i``'s outcome on the points ``idx`` (pass ``k``) into the state."""
        y = self.y[idx]
        ok1 = topk_correct(adv_logits, y, 1)
        newly = self.r1[idx] & ~ok1
        self.broken[idx[newly]] = i
        if adv is not None and k == 1:
            take = newly | (self.r1[idx] & ok1)  # the breaking example, else the latest attempt
            adv[start + idx[take].cpu()] = xa[take].to("cpu", adv.dtype)
        if self.signals is not None and k == 1:
            self.signals.update(name, idx, adv_logits, y, newly, xa, gate)
        self.r1[idx] &= ok1
        if self.r5 is not None:
            self.r5[idx] &= topk_correct(adv_logits, y, 5)
        if self.hit is not None and self.target is not None:
            self.hit[idx] |= adv_logits.argmax(1) == self.target[idx]


def _start_batch(
    model: nn.Module, xb: Tensor, yb: Tensor, sl: slice, st: dict[str, Tensor], attacks: list[AttackSpec],
    seed: int, b: int, targeted: bool, top5: bool,
) -> tuple[_Batch, int]:  # fmt: skip
    """Clean predictions of one batch into ``st`` and the batch's starting state (and the class count)."""
    dev = xb.device
    logits = predict(model, xb)
    r1 = topk_correct(logits, yb, 1)
    st["clean1"][sl] = r1.cpu()
    batch = _Batch(xb, yb, r1, st["broken_by"][sl].to(dev))
    if top5:
        batch.r5 = topk_correct(logits, yb, 5)
        st["clean5"][sl] = batch.r5.cpu()
    if targeted:
        tb = random_target(yb.cpu(), logits.shape[1], torch.Generator().manual_seed(_seed_for(seed, -1, b)))
        st["target"][sl] = tb
        batch.target = tb.to(dev)
        batch.hit = logits.argmax(1) == batch.target  # already classified as the target: nothing to attack
    if has_gates(attacks):  # gated suites only (gates.py)
        batch.signals = BatchSignals.start(logits, yb, xb if wants_warm(attacks) else None)
    return batch, logits.shape[1]


def _attack_pass(
    model: nn.Module, source: nn.Module | None, batch: _Batch, spec: AttackSpec, i: int, k: int, threat: Threat,
    seed_parts: tuple[int, ...], st: dict[str, Tensor], start: int,
) -> None:  # fmt: skip
    """Attack ``i`` with top-``k`` success on the batch's pool for ``k`` (after its gate, if any)."""
    idx = batch.pool(k)
    kwargs, gate, info = dict(spec.params), spec.gate, attack_info(spec.name)
    if batch.signals is not None:
        idx = batch.signals.select(gate, idx)
        if gate is not None and gate.warm and len(idx):  # start at, and rank targets by, the lowest-margin point
            kwargs.update({key: batch.signals.warm_start(idx) for key in info.warm})
    if len(idx) == 0:
        return
    st["attacked"][start + idx.cpu(), i] += 1
    if batch.target is not None:
        kwargs.update(targeted=True, target=batch.target[idx])
    if k > 1 and info.topk:
        kwargs["k"] = k
    xb, yb = batch.x[idx], batch.y[idx]
    gen = torch.Generator(device=xb.device).manual_seed(_seed_for(*seed_parts))
    attacker = source if spec.transfer else model
    xa = ATTACKS.get(spec.name)(attacker, xb, yb, threat=threat, generator=gen, **kwargs)
    if not bool(threat.contains(xb, xa).all()):
        raise RuntimeError(f"attack {spec.label} left the threat model")
    batch.record(i, k, spec.name, idx, predict(model, xa), xa, st.get("adv"), start, gate.kind if gate else "all")


def _run_batch(
    model: nn.Module,
    source: nn.Module | None,
    xb: Tensor,
    yb: Tensor,
    attacks: list[AttackSpec],
    threat: Threat,
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
    they are the same on every device. With untargeted top-5 tracking every attack runs twice:
    with top-1 success on the top-1 correct points (exactly the top-1-only protocol), then with
    top-5 success (``k=5``, where the attack takes it) on the points whose label is still in the
    top 5 although top-1 is broken.
    """
    sl = slice(start, start + len(yb))
    batch, num_classes = _start_batch(model, xb, yb, sl, st, attacks, seed, b, targeted, top5)
    for i, spec in enumerate(attacks):
        ks = batch.passes(num_classes)
        if not any(len(batch.pool(k)) for k in ks):
            break
        for k in ks:  # the pool of a later pass is taken after the earlier pass of the same attack
            _attack_pass(
                model, source, batch, spec, i, k, threat, (seed, i, b) if k == 1 else (seed, i, b, k), st, start
            )
    st["broken_by"][sl] = batch.broken.cpu()
    st["robust1"][sl] = batch.r1.cpu()
    if batch.r5 is not None:
        st["robust5"][sl] = batch.r5.cpu()
    if batch.hit is not None:
        st["hit"][sl] = batch.hit.cpu()


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
    threat: Threat,
    suite: str | list[AttackSpec] = "standard",
    baseline: bool = False,
    **kwargs: Any,
) -> ProtocolResult:
    """Robust accuracy of any classifier mapping [0, 1] images to logits under an attack suite.

    ``threat``: :class:`~logitpair.threat.Linf` or :class:`~logitpair.threat.L2` (a suite must
    support it, :func:`~logitpair.evaluation.suites.suite_norms`: under L2 every suite but ``fast``).
    ``suite`` is a preset name (``quick``, ``standard``, ``fast``, ``thorough``, ``pgd40``; see
    :mod:`logitpair.evaluation.suites`) or a list of :class:`AttackSpec`. With ``baseline=True`` the
    paper-style PGD-40 (2 restarts) runs first, so ``broken_by`` also tells how many points
    only the stronger attacks broke. Other keyword arguments go to :func:`run_protocol`.

    Example::

        res = logitpair.evaluate(model, x, y, threat=Linf(8 / 255), suite="standard")
        print(res.summary()["robust"])   # {"value": ..., "n": ..., "ci95": [...]}
        res = logitpair.evaluate(model, x, y, threat=L2(0.5), suite="standard")   # AutoAttack's L2 version
    """
    attacks = get_suite(suite, threat.norm) if isinstance(suite, str) else list(suite)
    if baseline:
        attacks = [pgd_spec(40, 2), *attacks]
    return run_protocol(model, x, y, attacks, threat=threat, **kwargs)
