"""Transfer studies: adversarial examples crafted once on every source, shown to every target.

The paper's black-box protocol (Kannan et al. 2018, https://arxiv.org/abs/1803.06373, Tables 1,
2, 4, 6) crafts adversarial examples on an independently trained source model and measures the
target's accuracy on them. :func:`transfer_matrix` does this for every (source, target) pair at
once and reports two matrices, each entry with N and a 95% Wilson interval:

- **plain**: accuracy of the target on the transferred examples (the paper's figure);
- **robust**: correct on the clean point *and* on the transferred example (the rule of our
  protocol, :func:`~logitpair.evaluation.protocol.run_protocol`), never above ``plain``.

The diagonal is white-box (the source attacking itself) and equals ``run_protocol(model, x, y,
[attack], threat=..., seed=..., batch_size=...)`` exactly: the examples of the points the source
classifies correctly are crafted by that very call. Points the source misclassifies clean are
attacked as well (other seeds), so a target never sees a clean image in place of a transferred
one. A source may be any module, e.g. :class:`~logitpair.models.ensemble.EnsembleLogits` (mean logits
of several models, the ensemble of Dong et al. 2018 and Tramèr et al. 2018).

With ``state_dir`` the crafted examples are stored per source (safetensors, written
atomically) under a fingerprint of the source's weights, the attack, the threat, the points, the
seed and the batch size, and reused by a later call with the same settings. Example::

    res = transfer_matrix({"alp": alp, "mpgd": mpgd}, x, y, attack=pgd_spec(40, 2), threat=Linf(0.1), seed=0)
    res.to_dict()["robust"]["mpgd"]["alp"]   # {"value": ..., "n": ..., "ci95": [lo, hi]}

:func:`transfer_runs` backs ``logitpair transfer`` (run directories in, ``transfer.json``,
``transfer.md`` and ``transfer.png`` out).
"""

from __future__ import annotations

import hashlib
import json
import math
import shutil
import time
import zlib
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch import Tensor, nn

from logitpair.attacks import ATTACKS, attack_info, predict
from logitpair.checkpoint import load_model, run_info
from logitpair.errors import ConfigError, LogitpairError
from logitpair.evaluation.protocol import run_protocol
from logitpair.evaluation.run import test_points, weights_digest
from logitpair.evaluation.spec import AttackSpec, pgd_spec
from logitpair.io import atomic_write, write_json, write_text
from logitpair.metrics import summarize, topk_correct
from logitpair.models.ensemble import EnsembleLogits
from logitpair.progress import ProgressFactory, null_progress
from logitpair.report import markdown_table, pct_ci, plot_heatmaps
from logitpair.threat import Linf

FORMAT = "logitpair-transfer-1"


@dataclass
class TransferResult:
    """Per-example outcome of a transfer study (CPU tensors of length N)."""

    sources: list[str]
    targets: list[str]
    clean: dict[str, Tensor]  # target -> correct on the clean point
    plain: dict[str, dict[str, Tensor]]  # source -> target -> correct on the transferred example
    robust: dict[str, dict[str, Tensor]]  # source -> target -> clean and transferred correct
    relation: dict[str, dict[str, str]]  # "white-box", "member" (target inside an ensemble source) or "transfer"
    attack: AttackSpec
    threat: Linf
    seed: int
    batch_size: int
    adversarial: dict[str, Tensor] = field(default_factory=dict)  # source -> crafted examples
    crafted: dict[str, dict[str, Any]] = field(default_factory=dict)  # source -> fingerprint, reused, seconds

    @property
    def n(self) -> int:
        return len(next(iter(self.clean.values())))

    def matrix(self, kind: str = "robust") -> list[list[float]]:
        """Rows: sources, columns: targets; ``kind`` is ``plain`` or ``robust``."""
        table = {"plain": self.plain, "robust": self.robust}[kind]
        return [[float(table[s][t].float().mean()) for t in self.targets] for s in self.sources]

    def to_dict(self) -> dict[str, Any]:
        return {
            "n": self.n,
            "threat": self.threat.to_dict(),
            "seed": self.seed,
            "batch_size": self.batch_size,
            "attack": self.attack.to_dict(),
            "sources": list(self.sources),
            "targets": list(self.targets),
            "clean": {t: summarize(v) for t, v in self.clean.items()},
            "plain": {s: {t: summarize(v) for t, v in row.items()} for s, row in self.plain.items()},
            "robust": {s: {t: summarize(v) for t, v in row.items()} for s, row in self.robust.items()},
            "relation": {s: dict(row) for s, row in self.relation.items()},
            "crafted": {s: dict(info) for s, info in self.crafted.items()},
        }


def check_attack(spec: AttackSpec) -> None:
    """Fail with one line if ``spec`` names options its attack does not take (its registry entry says)."""
    info = attack_info(spec.name)
    allowed = [*info.options, *(("targeted", "target") if info.targeted else ()), *(("k",) if info.topk else ()),
               *info.warm]  # fmt: skip
    unknown = sorted(set(spec.params) - set(allowed))
    if unknown:
        raise ConfigError(
            f"attack {spec.name!r} has no option {', '.join(map(repr, unknown))}; its options: {', '.join(allowed)}"
        )


def craft_fingerprint(source: nn.Module, attack: AttackSpec, threat: Linf, x: Tensor, y: Tensor, seed: int,
                      batch_size: int) -> str:  # fmt: skip
    """A digest of everything that determines the examples crafted on ``source``."""
    h = hashlib.sha256(FORMAT.encode())
    h.update(weights_digest(source).encode())
    arch = (getattr(source, "meta", None) or {}).get("model")
    settings = {"attack": attack.name, "params": attack.params, "eps": threat.eps, "bounds": threat.bounds,
                "seed": seed, "batch_size": batch_size, "arch": arch, "shape": list(x.shape)}  # fmt: skip
    h.update(json.dumps(settings, sort_keys=True, default=str).encode())
    h.update(x.detach().cpu().contiguous().numpy().tobytes())
    h.update(y.detach().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()


def _rest_seed(seed: int, b: int) -> int:
    return zlib.crc32(repr(("transfer: clean-wrong points", seed, b)).encode()) & 0x7FFF_FFFF


def craft(
    source: nn.Module,
    x: Tensor,
    y: Tensor,
    attack: AttackSpec,
    *,
    threat: Linf,
    seed: int = 0,
    batch_size: int = 500,
    state_path: Path | None = None,
    progress: ProgressFactory = null_progress,
    desc: str = "craft",
) -> tuple[Tensor, Tensor]:
    """Adversarial examples for all points on ``source``; returns ``(x_adv, source_clean_correct)``.

    The points ``source`` classifies correctly are attacked by ``run_protocol`` itself (same
    batches and seeds as a white-box evaluation); the others afterwards in batches of their own.
    """
    res = run_protocol(source, x, y, [attack], threat=threat, seed=seed, batch_size=batch_size,
                       keep_adversarial=True, state_path=state_path, progress=progress, desc=desc)  # fmt: skip
    x_adv = res.adversarial.to(x.device, copy=True)
    wrong = (~res.clean_correct).nonzero().flatten()
    fn = ATTACKS.get(attack.name)
    for b, start in enumerate(range(0, len(wrong), batch_size)):
        idx = wrong[start : start + batch_size]
        gen = torch.Generator().manual_seed(_rest_seed(seed, b))
        xa = fn(source, x[idx], y[idx], threat=threat, generator=gen, **attack.params)
        if not bool(threat.contains(x[idx], xa).all()):
            raise RuntimeError(f"attack {attack.label} left the threat model")
        x_adv[idx] = xa.to(x_adv.dtype)
    return x_adv, res.clean_correct


def _load_crafted(path: Path, fingerprint: str, like: Tensor) -> Tensor | None:
    if not path.is_file():
        return None
    try:
        with safe_open(str(path), framework="pt") as f:
            if (f.metadata() or {}).get("fingerprint") != fingerprint:
                return None
            x_adv = f.get_tensor("x_adv")
    except Exception:  # noqa: BLE001 - an unreadable file just means crafting again
        return None
    return x_adv.to(like.device) if x_adv.shape == like.shape and x_adv.dtype == like.dtype else None


def _is_member(target: nn.Module, source: nn.Module) -> bool:
    return isinstance(source, EnsembleLogits) and any(m is target for m in source.members)


def transfer_matrix(
    models: Mapping[str, nn.Module],
    x: Tensor,
    y: Tensor,
    *,
    attack: AttackSpec,
    threat: Linf,
    seed: int = 0,
    sources: Mapping[str, nn.Module] | None = None,
    batch_size: int = 500,
    state_dir: str | Path | None = None,
    resume: bool = True,
    progress: ProgressFactory = null_progress,
) -> TransferResult:
    """Craft ``attack`` once on every model of ``models`` (and of ``sources``, extra sources
    that are not targets, e.g. an ensemble) and evaluate the examples on every model.

    Args:
        models: name -> classifier mapping [0, 1] images to logits; each is a source and a target.
        x, y: the points (N, ...) in the threat's bounds and their labels (N,).
        attack: the attack run on each source (``spec.transfer`` is ignored).
        seed, batch_size: as in :func:`run_protocol`; the diagonal equals its white-box result.
        state_dir: folder for the crafted examples, reused when the fingerprint matches
            (``resume=False``: craft again and overwrite).

    Returns a :class:`TransferResult` (rows: sources, columns: targets).
    """
    if not models:
        raise ConfigError("transfer_matrix: no models given")
    extra = dict(sources or {})
    clash = sorted(set(models) & set(extra))
    if clash:
        raise ConfigError(f"transfer: source name(s) {', '.join(clash)} also name a model; choose other names")
    check_attack(attack)
    attack = replace(attack, transfer=False)
    all_sources = {**models, **extra}
    state = Path(state_dir) if state_dir is not None else None
    adversarial: dict[str, Tensor] = {}
    crafted: dict[str, dict[str, Any]] = {}
    for name, src in all_sources.items():
        t0 = time.perf_counter()
        fp = craft_fingerprint(src, attack, threat, x, y, seed, batch_size)
        path = state / f"{fp[:24]}.safetensors" if state is not None else None
        partial = state / f"{fp[:24]}.partial.safetensors" if state is not None else None
        x_adv = _load_crafted(path, fp, x) if (path is not None and resume) else None
        reused = x_adv is not None
        if x_adv is None:
            if state is not None:
                state.mkdir(parents=True, exist_ok=True)
                if not resume:
                    partial.unlink(missing_ok=True)
            x_adv, src_clean = craft(src, x, y, attack, threat=threat, seed=seed, batch_size=batch_size,
                                     state_path=partial, progress=progress, desc=f"craft on {name}")  # fmt: skip
            if path is not None:
                meta = {"fingerprint": fp, "format": FORMAT, "source": name, "attack": json.dumps(attack.to_dict()),
                        "eps": repr(threat.eps), "seed": str(seed), "n": str(len(x))}  # fmt: skip
                tensors = {"x_adv": x_adv.detach().cpu().contiguous(), "y": y.detach().cpu().contiguous(),
                           "source_clean": src_clean.contiguous()}  # fmt: skip
                atomic_write(path, lambda p, t=tensors, m=meta: save_file(t, str(p), metadata=m))
                partial.unlink(missing_ok=True)
        adversarial[name] = x_adv
        crafted[name] = {"fingerprint": fp, "reused": reused, "seconds": round(time.perf_counter() - t0, 3)}
        if path is not None:
            crafted[name]["file"] = str(path)

    bar = progress(len(models) * (1 + len(all_sources)), "evaluate transfer")
    clean: dict[str, Tensor] = {}
    plain: dict[str, dict[str, Tensor]] = {s: {} for s in all_sources}
    robust: dict[str, dict[str, Tensor]] = {s: {} for s in all_sources}
    relation: dict[str, dict[str, str]] = {s: {} for s in all_sources}
    for t, target in models.items():
        clean[t] = topk_correct(predict(target, x), y, 1).cpu()
        bar.update(1)
        for s, src in all_sources.items():
            ok = topk_correct(predict(target, adversarial[s]), y, 1).cpu()
            plain[s][t] = ok
            robust[s][t] = clean[t] & ok
            relation[s][t] = "white-box" if src is target else ("member" if _is_member(target, src) else "transfer")
            bar.update(1)
    bar.close()
    return TransferResult(
        sources=list(all_sources), targets=list(models), clean=clean, plain=plain, robust=robust, relation=relation,
        attack=attack, threat=threat, seed=seed, batch_size=batch_size,
        adversarial={k: v.detach().cpu() for k, v in adversarial.items()}, crafted=crafted,
    )  # fmt: skip


# --------------------------------------------------------------------------- run directories
@dataclass(frozen=True)
class TransferOptions:
    n: int | None = None  # first n test points (None: all)
    eps: float | None = None  # default: the common training eps of the runs
    attack: AttackSpec = field(default_factory=lambda: pgd_spec(40, 2))
    seed: int = 0
    batch_size: int = 500
    data_dir: str | None = None
    resume: bool = True  # reuse crafted examples with the same fingerprint

    def __post_init__(self) -> None:
        if self.n is not None and self.n < 1:
            raise ConfigError(f"expected >= 1, got {self.n}", option="n")
        if self.eps is not None and not 0 <= self.eps <= 1:
            raise ConfigError(f"expected 0 <= eps <= 1, got {self.eps}", option="eps")
        if self.batch_size < 1:
            raise ConfigError(f"expected >= 1, got {self.batch_size}", option="batch_size")


def _names(paths: Sequence[str]) -> list[str]:
    """Short display names: the directory name, the full path where two would collide."""
    short = [Path(p).resolve().name or str(p) for p in paths]
    return [s if short.count(s) == 1 else str(p) for s, p in zip(short, paths, strict=True)]


def _check_common(models: Mapping[str, nn.Module], everything: Mapping[str, nn.Module], eps: float | None) -> float:
    infos = {name: run_info(m, where=f"run {name}", eps=eps) for name, m in everything.items()}
    datasets = {name: info.dataset for name, info in infos.items()}
    if len(set(datasets.values())) > 1:
        shown = ", ".join(f"{k}: {v}" for k, v in datasets.items())
        raise ConfigError(f"the runs use different datasets ({shown}); a transfer study needs one test set")
    if eps is not None:
        return eps
    found = {name: infos[name].eps for name in models}
    values = list(found.values())
    if any(not math.isclose(v, values[0], rel_tol=1e-9, abs_tol=1e-12) for v in values):
        shown = ", ".join(f"{k}: {v:g}" for k, v in found.items())
        raise ConfigError(f"the runs were trained for different eps ({shown}); give the eps explicitly")
    return values[0]


def transfer_runs(
    runs: Sequence[str | Path],
    opts: TransferOptions,
    *,
    ensembles: Mapping[str, Sequence[str | Path]] | None = None,
    out: str | Path = "runs/transfer",
    progress: ProgressFactory = null_progress,
    write: bool = True,
) -> dict[str, Any]:
    """Transfer study of run directories: every run is a source and a target; each entry of
    ``ensembles`` (name -> runs) is one more source, the mean logits of its runs (one run: that
    model alone). Writes ``transfer.json``, ``transfer.md``, ``transfer.png`` and ``crafted/``
    (the stored examples) into ``out``; every check runs before anything is written."""
    if not runs:
        raise ConfigError("transfer: no runs given")
    paths = [str(r) for r in runs]
    if len(set(paths)) != len(paths):
        raise ConfigError(f"transfer: a run is given twice ({', '.join(paths)})")
    ensembles = {k: [str(r) for r in v] for k, v in (ensembles or {}).items()}
    names = _names(paths)
    for name, members in ensembles.items():
        if not name or not members or not all(members):
            raise ConfigError(f"expected NAME=RUN+RUN, got {name}={'+'.join(members)}", option="ensemble")
        if name in names:
            raise ConfigError(f"name {name!r} is also a run's name; choose another", option="ensemble")
    loaded: dict[str, nn.Module] = {}

    def get(path: str) -> nn.Module:
        key = str(Path(path).resolve())
        if key not in loaded:
            loaded[key] = load_model(path)
        return loaded[key]

    models = {name: get(p) for name, p in zip(names, paths, strict=True)}
    sources: dict[str, nn.Module] = {}
    for name, members in ensembles.items():
        member_models = [get(p) for p in members]
        sources[name] = member_models[0] if len(member_models) == 1 else EnsembleLogits(member_models)
    everything = {**models, **{f"{k} member {p}": get(p) for k, v in ensembles.items() for p in v}}
    eps = _check_common(models, everything, opts.eps)
    check_attack(opts.attack)
    threat = Linf(eps)
    first = models[names[0]]
    x, y, dataset = test_points(first, opts.n, opts.data_dir)
    out = Path(out)
    created = not out.exists()
    t0 = time.perf_counter()
    try:
        res = transfer_matrix(
            models, x, y, attack=opts.attack, threat=threat, seed=opts.seed, sources=sources,
            batch_size=opts.batch_size, state_dir=out / "crafted" if write else None, resume=opts.resume,
            progress=progress,
        )  # fmt: skip
    except LogitpairError:
        if created and write:
            shutil.rmtree(out, ignore_errors=True)  # a bad option found while crafting leaves nothing behind
        raise
    doc: dict[str, Any] = {
        "dataset": dataset,
        "eps": eps,
        "runs": dict(zip(names, paths, strict=True)),
        "ensembles": ensembles,
        **res.to_dict(),
        "seconds": round(time.perf_counter() - t0, 2),
    }
    if write:
        out.mkdir(parents=True, exist_ok=True)
        atomic_write(out / "transfer.png", lambda p: plot_transfer(p, doc))
        write_text(out / "transfer.md", transfer_markdown(doc))
        write_json(out / "transfer.json", doc)
    return doc


def plot_transfer(path: Path, doc: dict[str, Any]) -> None:
    """The two matrices side by side as heatmaps; white-box cells framed."""
    src, tgt = doc["sources"], doc["targets"]
    panels = {
        f"(a) plain accuracy on transferred examples, N={doc['n']}": [
            [doc["plain"][s][t]["value"] for t in tgt] for s in src
        ],
        "(b) robust: correct clean and transferred": [[doc["robust"][s][t]["value"] for t in tgt] for s in src],
    }
    outline = [(i, j) for i, s in enumerate(src) for j, t in enumerate(tgt) if doc["relation"][s][t] == "white-box"]
    title = f"{doc['attack']['label']} crafted on the source, L∞ ε = {doc['threat']['eps']:g}, seed {doc['seed']}"
    plot_heatmaps(path, panels, src, tgt, xlabel="target", ylabel="source", title=title, outline=outline)


def transfer_markdown(doc: dict[str, Any]) -> str:
    src, tgt, n = doc["sources"], doc["targets"], doc["n"]
    mark = {"white-box": " (white-box)", "member": " (member)", "transfer": ""}

    def table(kind: str) -> str:
        rows = [[s] + [pct_ci(doc[kind][s][t]) + mark[doc["relation"][s][t]] for t in tgt] for s in src]
        return markdown_table(["source \\ target", *tgt], rows)

    text = "# Transfer study\n\n"
    dataset = f"Dataset {doc['dataset']}, " if doc.get("dataset") else ""
    a = doc["attack"]
    attack = f"`{a['name']}` {json.dumps(a['params'])}"
    if not a["label"].startswith(a["name"]):
        attack = f"{a['label']} ({attack})"
    text += (f"{dataset}L∞ ε = {doc['threat']['eps']:g}, first {n} test points, attack {attack}, seed {doc['seed']}. "
             "Adversarial examples are crafted once on each source (rows) and shown to every target "
             "(columns); accuracy in % with 95% Wilson intervals, N = " + str(n) + " per entry. "
             "The diagonal is white-box: the source attacking itself.\n\n")  # fmt: skip
    if doc.get("ensembles"):
        text += "Ensemble sources (mean logits): "
        text += "; ".join(f"{k} = {' + '.join(v)}" for k, v in doc["ensembles"].items())
        text += ". *(member)*: the target is part of the source ensemble, so the entry is not black-box.\n\n"
    text += "## (a) Accuracy of the target on the transferred examples (the paper's figure)\n\n" + table("plain")
    text += "\n## (b) Robust accuracy: correct clean and on the transferred example (our protocol's rule)\n\n"
    text += table("robust")
    text += "\n## Clean accuracy of the targets\n\n"
    text += markdown_table(["target", "accuracy % [95% CI]", "N"], [[t, pct_ci(doc["clean"][t]), str(n)] for t in tgt])
    reused = [s for s in src if doc["crafted"][s].get("reused")]
    if reused:
        text += f"\nCrafted examples reused from an earlier run (same fingerprint): {', '.join(reused)}.\n"
    return text
