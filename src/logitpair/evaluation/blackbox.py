"""Black-box evaluation: a target's accuracy on adversarial examples crafted on another model.

One function, :func:`black_box`, used by ``logitpair evaluate`` (:mod:`~logitpair.evaluation.run`),
the transfer matrix (:mod:`~logitpair.evaluation.transfer`), ``logitpair reproduce`` and the demo.
The paper's black-box protocol (Kannan et al. 2018, https://arxiv.org/abs/1803.06373, Tables 1,
2, 4, 6) crafts the attack on an independently trained source and measures the target on the
results; a point counts as robust only if the target is correct on the clean point *and* on the
transferred example. The examples come one of two ways:

- **crafted once** (``crafted=``): examples made on the source for every point (:func:`craft`)
  and shown to every target as they are. Reports ``plain`` (correct on the transferred
  example, the paper's figure) and ``robust``.
- **per target** (``source=``, ``attack=``): the protocol
  (:func:`~logitpair.evaluation.protocol.run_protocol`) crafts the attack on the source for the
  points the target still classifies correctly, batch by batch with the protocol's seeds;
  targeted (the protocol's random targets, their success rate) and top-5 as the protocol does,
  resumable through the evaluation cache (``state_path``).

Example::

    x_adv, _ = craft(source, x, y, pgd_spec(40, 2), threat=Linf(0.1), seed=0)
    res = black_box(target, x, y, crafted=x_adv)
    res.summary()["robust"]     # {"value": ..., "n": ..., "ci95": [...]}
"""

from __future__ import annotations

import zlib
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from logitpair.attacks import ATTACKS, predict
from logitpair.distributed import Dist
from logitpair.evaluation.cache import EvalCache, Fingerprint, run_batches
from logitpair.evaluation.protocol import ProtocolResult, run_protocol
from logitpair.evaluation.spec import AttackSpec
from logitpair.metrics import summarize, topk_correct
from logitpair.progress import ProgressFactory, null_progress
from logitpair.threat import Threat


@dataclass
class BlackBoxResult:
    """Per-example black-box outcome on the target (CPU tensors of length N).

    ``plain``: correct on the transferred example (examples crafted once; None per target);
    ``protocol``: the protocol's full record when the attack was crafted per target (top-5,
    targets, success) and None otherwise."""

    clean: Tensor
    robust: Tensor
    plain: Tensor | None = None
    protocol: ProtocolResult | None = None

    @property
    def n(self) -> int:
        return len(self.robust)

    def summary(self) -> dict[str, Any]:
        """The protocol's summary (per target), else clean, plain and robust accuracy."""
        if self.protocol is not None:
            return self.protocol.summary()
        out = {"n": self.n, "clean": summarize(self.clean), "robust": summarize(self.robust)}
        if self.plain is not None:
            out["plain"] = summarize(self.plain)
        return out


def _rest_seed(seed: int, b: int) -> int:
    return zlib.crc32(repr(("transfer: clean-wrong points", seed, b)).encode()) & 0x7FFF_FFFF


def rest_state_path(state_path: Path | None) -> Path | None:
    """Where :func:`craft` keeps the state of the clean-misclassified points beside ``state_path``."""
    return None if state_path is None else state_path.with_name(f"{state_path.stem}.rest{state_path.suffix}")


def _craft_rest(
    source: nn.Module, x: Tensor, y: Tensor, attack: AttackSpec, threat: Threat, seed: int, batch_size: int,
    state_path: Path | None, world: Dist | None,
) -> Tensor:  # fmt: skip
    """``attack`` on ``source`` for the points ``x, y`` (those it misclassifies clean), in batches
    of their own seeded by the batch index, through the evaluation cache (resumable, sharded)."""
    fn = ATTACKS.get(attack.name)

    def step(b: int, start: int, stop: int, st: dict[str, Tensor]) -> None:
        gen = torch.Generator().manual_seed(_rest_seed(seed, b))
        xb = x[start:stop]
        xa = fn(source, xb, y[start:stop], threat=threat, generator=gen, **attack.params)
        if not bool(threat.contains(xb, xa).all()):
            raise RuntimeError(f"attack {attack.label} left the threat model")
        st["x_adv"][start:stop] = xa.detach().to("cpu", x.dtype)

    settings = {"attack": attack.to_dict(), "threat": threat.to_dict(), "seed": seed, "batch_size": batch_size}
    fp = Fingerprint("craft: clean-wrong points").raw_weights(source).json(settings).tensors(x, y).hexdigest()
    st = run_batches(len(x), batch_size, EvalCache(state_path, fp), fresh=lambda: {"x_adv": x.detach().cpu().clone()},
                     step=step, world=world)  # fmt: skip
    return st["x_adv"]


def craft(
    source: nn.Module,
    x: Tensor,
    y: Tensor,
    attack: AttackSpec,
    *,
    threat: Threat,
    seed: int = 0,
    batch_size: int = 500,
    state_path: Path | None = None,
    progress: ProgressFactory = null_progress,
    desc: str = "craft",
    world: Dist | None = None,
) -> tuple[Tensor, Tensor]:
    """Adversarial examples for all points on ``source``; returns ``(x_adv, source_clean_correct)``.

    The points ``source`` classifies correctly are attacked by ``run_protocol`` itself (same
    batches and seeds as a white-box evaluation, resumable through ``state_path``); the others
    afterwards in batches of their own (resumable beside it, :func:`rest_state_path`), so a
    target never sees a clean image in place of a transferred one. ``world`` (torchrun): both
    parts sharded by whole batches, the list of clean-misclassified points taken from the
    gathered first part, so it is the same on every rank and the result equals one process's.
    """
    res = run_protocol(source, x, y, [attack], threat=threat, seed=seed, batch_size=batch_size,
                       keep_adversarial=True, state_path=state_path, progress=progress, desc=desc,
                       world=world)  # fmt: skip
    x_adv = res.adversarial.to(x.device, copy=True)
    wrong = (~res.clean_correct).nonzero().flatten()
    rest = _craft_rest(source, x[wrong], y[wrong], attack, threat, seed, batch_size,
                       rest_state_path(Path(state_path) if state_path is not None else None), world)  # fmt: skip
    x_adv[wrong] = rest.to(x_adv.device, x_adv.dtype)
    return x_adv, res.clean_correct


def _on_crafted(target: nn.Module, x: Tensor, y: Tensor, crafted: Tensor, clean: Tensor | None) -> BlackBoxResult:
    if clean is None:
        clean = topk_correct(predict(target, x), y, 1).cpu()
    plain = topk_correct(predict(target, crafted), y, 1).cpu()
    return BlackBoxResult(clean=clean, robust=clean & plain, plain=plain)


def black_box(
    target: nn.Module,
    x: Tensor,
    y: Tensor,
    *,
    crafted: Tensor | None = None,
    clean: Tensor | None = None,
    source: nn.Module | None = None,
    attack: AttackSpec | None = None,
    threat: Threat | None = None,
    seed: int = 0,
    batch_size: int = 500,
    targeted: bool = False,
    top5: bool = False,
    state_path: str | Path | None = None,
    progress: ProgressFactory = null_progress,
    desc: str = "black-box",
    world: Dist | None = None,
) -> BlackBoxResult:
    """The target's black-box accuracy on ``x, y`` (see the module docstring).

    Either ``crafted`` (examples made on a source for every point, e.g. by :func:`craft`; with
    ``clean`` the target's clean flags when already known, else computed here), or ``source``,
    ``attack`` and ``threat``: the attack (its ``transfer`` flag set here) crafted on the source
    per target by the protocol with ``seed``, ``batch_size``, ``targeted``, ``top5`` and the
    evaluation cache at ``state_path`` (keyed by the target's and the source's weights), sharded
    over ``world`` under torchrun.
    """
    if (crafted is None) == (source is None):
        raise ValueError("black_box: give either crafted examples or a source model")
    if crafted is not None:
        return _on_crafted(target, x, y, crafted, clean)
    if attack is None or threat is None:
        raise ValueError("black_box: crafting on a source needs an attack and a threat")
    spec = attack if attack.transfer else replace(attack, transfer=True)
    res = run_protocol(target, x, y, [spec], source=source, threat=threat, seed=seed, batch_size=batch_size,
                       targeted=targeted, top5=top5, state_path=state_path, progress=progress, desc=desc,
                       world=world)  # fmt: skip
    return BlackBoxResult(clean=res.clean_correct, robust=res.robust, protocol=res)
