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

With ``state_dir`` the crafted examples are stored per source in the evaluation cache
(:mod:`logitpair.evaluation.cache`: safetensors, written atomically, the crafting resumable per
batch) under a fingerprint of the source's weights, the attack, the threat, the points, the
seed and the batch size, and reused by a later call with the same settings. Example::

    res = transfer_matrix({"alp": alp, "mpgd": mpgd}, x, y, attack=pgd_spec(40, 2), threat=Linf(0.1), seed=0)
    res.to_dict()["robust"]["mpgd"]["alp"]   # {"value": ..., "n": ..., "ci95": [lo, hi]}

:func:`transfer_runs` backs ``logitpair transfer`` (run directories in, ``transfer.json``,
``transfer.md`` and ``transfer.png`` out when told to write). Each entry is
:func:`~logitpair.evaluation.blackbox.black_box` on the examples crafted on the source.
"""

from __future__ import annotations

import json
import math
import shutil
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from torch import Tensor, nn

from logitpair.attacks import attack_info, predict
from logitpair.checkpoint import load_model, run_info
from logitpair.distributed import Dist, all_true, barrier, same_on_all_ranks, setup
from logitpair.errors import ConfigError, LogitpairError
from logitpair.evaluation.blackbox import black_box, craft, rest_state_path
from logitpair.evaluation.cache import EvalCache, Fingerprint, points_digest, weights_digest
from logitpair.evaluation.run import check_points_options, check_threat_options, test_points
from logitpair.evaluation.spec import AttackSpec, pgd_spec
from logitpair.external import ExternalModel
from logitpair.io import atomic_write, write_json, write_text
from logitpair.metrics import summarize, topk_correct
from logitpair.models.ensemble import EnsembleLogits
from logitpair.progress import ProgressFactory, null_progress
from logitpair.report import markdown_table, pct_ci, plot_heatmaps, radius
from logitpair.threat import Threat, make_threat

FORMAT = "logitpair-transfer-1"
_Flags = dict[str, dict[str, Tensor]]  # source -> target -> per-example flags


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
    threat: Threat
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


def craft_fingerprint(source: nn.Module, attack: AttackSpec, threat: Threat, x: Tensor, y: Tensor, seed: int,
                      batch_size: int) -> str:  # fmt: skip
    """A digest of everything that determines the examples crafted on ``source``."""
    arch = (getattr(source, "meta", None) or {}).get("model")
    settings = {"attack": attack.name, "params": attack.params, "eps": threat.eps, "bounds": threat.bounds,
                "seed": seed, "batch_size": batch_size, "arch": arch, "shape": list(x.shape)}  # fmt: skip
    if threat.norm != "Linf":  # L-inf examples stored before L2 existed keep their fingerprint
        settings["norm"] = threat.norm
    return Fingerprint(FORMAT).text(weights_digest(source)).json(settings).tensors(x, y).hexdigest()


def _load_crafted(cache: EvalCache, like: Tensor) -> Tensor | None:
    """The stored examples when ``cache`` holds a complete set for points like ``like``."""
    loaded = cache.load()
    if loaded is None:
        return None
    tensors, done = loaded
    x_adv = tensors.get("x_adv")
    if done != len(like) or x_adv is None or x_adv.shape != like.shape or x_adv.dtype != like.dtype:
        return None
    return x_adv.to(like.device)


@dataclass(frozen=True)
class _Crafting:
    """How every source's examples are crafted: the attack and where they are stored."""

    attack: AttackSpec
    threat: Threat
    seed: int
    batch_size: int
    state: Path | None
    resume: bool
    progress: ProgressFactory
    world: Dist | None = None

    def caches(self, fp: str) -> tuple[EvalCache, Path | None]:
        """The finished examples' cache and the crafting protocol's partial state file."""
        if self.state is None:
            return EvalCache(None, fp), None
        return EvalCache(self.state / f"{fp[:24]}.safetensors", fp), self.state / f"{fp[:24]}.partial.safetensors"

    def examples(self, name: str, src: nn.Module, x: Tensor, y: Tensor) -> tuple[Tensor, dict[str, Any]]:
        """The examples crafted on ``src`` (stored ones when the fingerprint matches) and a record of them."""
        t0 = time.perf_counter()
        fp = craft_fingerprint(src, self.attack, self.threat, x, y, self.seed, self.batch_size)
        done, partial = self.caches(fp)
        x_adv = _load_crafted(done, x) if self.resume else None
        # under torchrun every rank must take the same path (crafting is collective): reuse only if all can
        reused = all_true(self.world or Dist(), x_adv is not None)
        if not reused:
            x_adv = self._craft(name, src, x, y, done, partial)
        assert x_adv is not None
        info: dict[str, Any] = {"fingerprint": fp, "reused": reused, "seconds": round(time.perf_counter() - t0, 3)}
        if done.path is not None:
            info["file"] = str(done.path)
        return x_adv, info

    def _craft(self, name: str, src: nn.Module, x: Tensor, y: Tensor, done: EvalCache, partial: Path | None) -> Tensor:
        world = self.world or Dist()
        if self.state is not None:
            self.state.mkdir(parents=True, exist_ok=True)
        if not self.resume and partial is not None and world.is_main:
            for state in (partial, rest_state_path(partial)):
                for cache in (EvalCache(state, ""), *EvalCache(state, "").rank_files()):
                    cache.clear()
        barrier(world)  # no rank reads a state rank 0 is removing
        x_adv, src_clean = craft(src, x, y, self.attack, threat=self.threat, seed=self.seed,
                                 batch_size=self.batch_size, state_path=partial, progress=self.progress,
                                 desc=f"craft on {name}", world=self.world)  # fmt: skip
        if self.world is not None and not self.world.is_main:
            return x_adv  # every rank has the examples; rank 0 stores them
        meta = {"format": FORMAT, "source": name, "attack": json.dumps(self.attack.to_dict()),
                "eps": repr(self.threat.eps), "norm": self.threat.norm, "seed": str(self.seed),
                "n": str(len(x))}  # fmt: skip
        done.save({"x_adv": x_adv, "y": y, "source_clean": src_clean}, len(x), **meta)
        for state in (partial, rest_state_path(partial)):
            if state is not None:
                state.unlink(missing_ok=True)
        return x_adv


def _is_member(target: nn.Module, source: nn.Module) -> bool:
    return isinstance(source, EnsembleLogits) and any(m is target for m in source.members)


def transfer_matrix(
    models: Mapping[str, nn.Module],
    x: Tensor,
    y: Tensor,
    *,
    attack: AttackSpec,
    threat: Threat,
    seed: int = 0,
    sources: Mapping[str, nn.Module] | None = None,
    batch_size: int = 500,
    state_dir: str | Path | None = None,
    resume: bool = True,
    progress: ProgressFactory = null_progress,
    world: Dist | None = None,
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
        world: the torchrun processes (every rank calls this with the same arguments): the
            crafting is sharded by whole batches (:func:`~logitpair.evaluation.blackbox.craft`),
            every rank gets the same result, equal to one process's; rank 0 stores the examples.

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
    crafting = _Crafting(attack, threat, seed, batch_size, Path(state_dir) if state_dir is not None else None,
                         resume, progress, world)  # fmt: skip
    adversarial: dict[str, Tensor] = {}
    crafted: dict[str, dict[str, Any]] = {}
    for name, src in all_sources.items():
        adversarial[name], crafted[name] = crafting.examples(name, src, x, y)
    clean, plain, robust, relation = _evaluate_targets(models, all_sources, adversarial, x, y, progress)
    return TransferResult(
        sources=list(all_sources), targets=list(models), clean=clean, plain=plain, robust=robust, relation=relation,
        attack=attack, threat=threat, seed=seed, batch_size=batch_size,
        adversarial={k: v.detach().cpu() for k, v in adversarial.items()}, crafted=crafted,
    )  # fmt: skip


def _evaluate_targets(
    models: Mapping[str, nn.Module], sources: Mapping[str, nn.Module], adversarial: Mapping[str, Tensor], x: Tensor,
    y: Tensor, progress: ProgressFactory,
) -> tuple[dict[str, Tensor], _Flags, _Flags, dict[str, dict[str, str]]]:  # fmt: skip
    """Every target on every source's examples (:func:`black_box`): clean, plain, robust, relation."""
    bar = progress(len(models) * (1 + len(sources)), "evaluate transfer")
    clean: dict[str, Tensor] = {}
    plain: dict[str, dict[str, Tensor]] = {s: {} for s in sources}
    robust: dict[str, dict[str, Tensor]] = {s: {} for s in sources}
    relation: dict[str, dict[str, str]] = {s: {} for s in sources}
    for t, target in models.items():
        clean[t] = topk_correct(predict(target, x), y, 1).cpu()
        bar.update(1)
        for s, src in sources.items():
            bb = black_box(target, x, y, crafted=adversarial[s], clean=clean[t])
            plain[s][t], robust[s][t] = bb.plain, bb.robust  # type: ignore[assignment]
            relation[s][t] = "white-box" if src is target else ("member" if _is_member(target, src) else "transfer")
            bar.update(1)
    bar.close()
    return clean, plain, robust, relation


# --------------------------------------------------------------------------- run directories
@dataclass(frozen=True)
class TransferOptions:
    n: int | None = None  # first n test points (None: all)
    eps: float | None = None  # default: the common training eps of the runs (L-inf only; L2 needs it)
    attack: AttackSpec = field(default_factory=lambda: pgd_spec(40, 2))
    seed: int = 0
    batch_size: int = 500
    data_dir: str | None = None
    resume: bool = True  # reuse crafted examples with the same fingerprint
    norm: str = "linf"  # the threat model: linf or l2 (logitpair.threat.make_threat)

    def __post_init__(self) -> None:
        check_points_options(self.n, None, self.batch_size)
        check_threat_options(self.norm, self.eps)


def _names(paths: Sequence[str]) -> list[str]:
    """Short display names: the directory name, the full path where two would collide."""
    short = [Path(p).resolve().name or str(p) for p in paths]
    return [s if short.count(s) == 1 else str(p) for s, p in zip(short, paths, strict=True)]


def _common_threat(
    models: Mapping[str, nn.Module], everything: Mapping[str, nn.Module], norm: str, eps: float | None
) -> Threat:
    """The study's threat model, after checking that the runs share a dataset: radius ``eps`` in
    ``norm``; an L-inf radius defaults to the runs' common training eps (an L2 one is always given,
    :class:`TransferOptions` checks)."""
    linf = make_threat(norm, 0.0).norm == "Linf"
    infos = {name: run_info(m, where=f"run {name}", eps=eps if linf else None) for name, m in everything.items()}
    datasets = {name: info.dataset for name, info in infos.items()}
    if len(set(datasets.values())) > 1:
        shown = ", ".join(f"{k}: {v}" for k, v in datasets.items())
        raise ConfigError(f"the runs use different datasets ({shown}); a transfer study needs one test set")
    if eps is not None:
        return make_threat(norm, eps)
    found = {name: infos[name].eps for name in models}
    values = list(found.values())
    if any(not math.isclose(v, values[0], rel_tol=1e-9, abs_tol=1e-12) for v in values):
        shown = ", ".join(f"{k}: {v:g}" for k, v in found.items())
        raise ConfigError(f"the runs were trained for different eps ({shown}); give the eps explicitly")
    return make_threat(norm, values[0])


def _check_runs(paths: list[str], ensembles: Mapping[str, list[str]], external: bool = False) -> list[str]:
    """The runs' display names, after checking the runs and the ensembles' names and members
    (``external``: a model from elsewhere joins the runs, so none may be given)."""
    if not paths and not external:
        raise ConfigError("transfer: no runs given")
    if len(set(paths)) != len(paths):
        raise ConfigError(f"transfer: a run is given twice ({', '.join(paths)})")
    names = _names(paths)
    for name, members in ensembles.items():
        if not name or not members or not all(members):
            raise ConfigError(f"expected NAME=RUN+RUN, got {name}={'+'.join(members)}", option="ensemble")
        if name in names:
            raise ConfigError(f"name {name!r} is also a run's name; choose another", option="ensemble")
    return names


class _Loader:
    """Each run directory loaded once (an ensemble member may also be a run)."""

    def __init__(self) -> None:
        self.loaded: dict[str, nn.Module] = {}

    def __call__(self, path: str) -> nn.Module:
        key = str(Path(path).resolve())
        if key not in self.loaded:
            self.loaded[key] = load_model(path)
        return self.loaded[key]

    def ensemble(self, members: Sequence[str]) -> nn.Module:
        """One run alone, several runs as the mean of their logits."""
        models = [self(p) for p in members]
        return models[0] if len(models) == 1 else EnsembleLogits(models)


def transfer_runs(
    runs: Sequence[str | Path],
    opts: TransferOptions,
    *,
    ensembles: Mapping[str, Sequence[str | Path]] | None = None,
    external: ExternalModel | None = None,
    out: str | Path = "runs/transfer",
    progress: ProgressFactory = null_progress,
    write: bool,
) -> dict[str, Any]:
    """Transfer study of run directories: every run is a source and a target; each entry of
    ``ensembles`` (name -> runs) is one more source, the mean logits of its runs (one run: that
    model alone). With ``write`` it stores the crafted examples in ``out/crafted/`` (reused by a
    rerun) and writes ``transfer.json``, ``transfer.md`` and ``transfer.png`` into ``out``; every
    check runs before anything is written. ``external``: one more model, from elsewhere, named
    after its weights file (its ``points``, if any, are the study's points). Returns the
    ``transfer.json`` document.

    Under torchrun (every process runs the same command) the crafting is sharded by whole batches
    and every process returns the same document, equal to one process's; rank 0 writes it."""
    world, _ = setup("cpu")  # the runs are loaded on the CPU; joins the process group under torchrun
    paths = [str(r) for r in runs]
    ensembles = {k: [str(r) for r in v] for k, v in (ensembles or {}).items()}
    names = _check_runs(paths, ensembles, external is not None)
    get = _Loader()
    models = {name: get(p) for name, p in zip(names, paths, strict=True)}
    if external is not None:
        if external.name in models or external.name in ensembles:
            raise ConfigError(f"the model from elsewhere is named {external.name!r}, as a run or an ensemble is")
        models[external.name] = external.load()
    sources = {name: get.ensemble(members) for name, members in ensembles.items()}
    everything = {**models, **{f"{k} member {p}": get(p) for k, v in ensembles.items() for p in v}}
    threat = _common_threat(models, everything, opts.norm, opts.eps)
    check_attack(opts.attack)
    first = next((m for m in models.values() if m.meta.get("points")), next(iter(models.values())))
    x, y, dataset = test_points(first, opts.n, opts.data_dir)
    out = Path(out)
    created = not out.exists()
    # the same study on every rank (and, collective, before any rank creates `out`)
    if world.active:
        same_on_all_ranks(world, {"opts": opts, "runs": paths, "ensembles": ensembles, "points": points_digest(x, y)},
                          "the transfer study (options, runs or test points)")  # fmt: skip
    t0 = time.perf_counter()
    try:
        res = transfer_matrix(
            models, x, y, attack=opts.attack, threat=threat, seed=opts.seed, sources=sources,
            batch_size=opts.batch_size, state_dir=out / "crafted" if write else None, resume=opts.resume,
            progress=progress, world=world,
        )  # fmt: skip
    except LogitpairError:
        if created and write and world.is_main:
            shutil.rmtree(out, ignore_errors=True)  # a bad option found while crafting leaves nothing behind
        raise
    doc: dict[str, Any] = {
        "dataset": dataset,
        "eps": threat.eps,
        "runs": dict(zip(names, paths, strict=True)),
        "ensembles": ensembles,
        **({"external": {external.name: models[external.name].meta["external"]}} if external is not None else {}),
        **res.to_dict(),
        "seconds": round(time.perf_counter() - t0, 2),
        "processes": world.world_size,
    }
    if write and world.is_main:
        write_transfer(out, doc)
    return doc


def write_transfer(out: Path, doc: dict[str, Any]) -> None:
    """``transfer.png``, ``transfer.md`` and ``transfer.json`` of a transfer document into ``out``."""
    out.mkdir(parents=True, exist_ok=True)
    atomic_write(out / "transfer.png", lambda p: plot_transfer(p, doc))
    write_text(out / "transfer.md", transfer_markdown(doc))
    write_json(out / "transfer.json", doc)


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
    title = f"{doc['attack']['label']} crafted on the source, {radius(doc['threat'])}, seed {doc['seed']}"
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
    text += (f"{dataset}{radius(doc['threat'])}, first {n} test points, attack {attack}, seed {doc['seed']}. "
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
