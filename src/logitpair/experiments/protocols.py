"""The evaluation protocols of ``logitpair reproduce``, behind one interface.

A :class:`Protocol` measures the metrics declared for it in :mod:`logitpair.experiments.metricsets`
(:class:`~logitpair.experiments.metricsets.Metric`: the key of ``results.json`` and the label of
the report), evaluates one seed's table rows
(:meth:`Protocol.evaluate` -> :class:`ProtocolOutcome`, per-example flags per row and metric) and
writes its own part of the report. The presets are checked against the same declarations when
they are registered (:mod:`logitpair.experiments.presets`), so a misspelt metric fails at import.

- ``untargeted`` (MNIST / SVHN tables): clean, the paper's attack, the worst case over it and the
  strong suite, black box from the row's source (crafted once per source, :func:`black_box`).
- ``targeted`` (ImageNet tables): the targeted protocol
  (:func:`~logitpair.evaluation.targeted.targeted_protocol`: the paper's attack, a long targeted
  PGD, the targeted suite, all towards the same random targets; top-1, top-5, success rate;
  untargeted as an extra) and black box per target with the same targets.
- ``transfer``: a source x target matrix (:func:`~logitpair.evaluation.transfer.transfer_matrix`).
"""

from __future__ import annotations

import time
from abc import ABC, abstractmethod
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from logitpair.checkpoint import load_model, run_info
from logitpair.distributed import Dist
from logitpair.evaluation import run_protocol
from logitpair.evaluation.blackbox import black_box, craft
from logitpair.evaluation.run import test_points
from logitpair.evaluation.targeted import targeted_protocol
from logitpair.evaluation.transfer import transfer_matrix
from logitpair.experiments.metricsets import METRICS, Metric
from logitpair.experiments.presets import Preset, Row
from logitpair.experiments.scales import Plan
from logitpair.progress import Logger, ProgressFactory
from logitpair.registry import Registry
from logitpair.report import markdown_table, pct_ci
from logitpair.threat import Linf

Flags = dict[str, Tensor]  # metric key -> per-example flags of one row


@dataclass
class SeedRuns:
    """One seed's trained models and the test points a protocol evaluates them on. Models are
    loaded once; rows with the same image size share the first ``plan.n`` test points. ``world``:
    the torchrun processes, each taking its shard of every protocol batch loop (the same result)."""

    plan: Plan
    dirs: dict[str, Path]
    seed_dir: Path
    data_dir: str | None
    device: torch.device | None
    seed: int
    batch_size: int
    progress: ProgressFactory
    log: Logger
    world: Dist = field(default_factory=Dist)
    _models: dict[str, nn.Module] = field(default_factory=dict)
    _points: dict[str, tuple[Tensor, Tensor]] = field(default_factory=dict)

    def model(self, name: str) -> nn.Module:
        if name not in self._models:  # the protocol runs where the model is
            self._models[name] = load_model(self.dirs[name], device=self.device or "cpu")
        return self._models[name]

    def points(self, name: str) -> tuple[Tensor, Tensor]:
        """The test points of row ``name`` (at its image size)."""
        m = self.model(name)
        key = repr(run_info(m, where=str(self.dirs[name])).data.get("image_size"))
        if key not in self._points:
            x, y, _ = test_points(m, self.plan.n, self.data_dir)
            self._points[key] = (x, y)
        return self._points[key]

    @property
    def n_points(self) -> int:
        return len(next(iter(self._points.values()))[1])

    @property
    def common(self) -> dict[str, Any]:
        """The settings every attack of the seed shares (and the processes that share the work)."""
        return {"threat": Linf(self.plan.eps), "seed": self.seed, "batch_size": self.batch_size, "world": self.world}


@dataclass
class ProtocolOutcome:
    """One seed's evaluation: per table row, metric key -> per-example flags (CPU, length N);
    ``transfer``: the transfer matrix's document (the ``transfer`` protocol only)."""

    flags: dict[str, Flags]
    transfer: dict[str, Any] | None = None


class Protocol(ABC):
    """One evaluation protocol of ``reproduce`` (see the module docstring)."""

    name = ""
    targeted = False  # records the long attack and the targeted suite
    summary = ""  # one line for ``logitpair reproduce --list``

    def metrics(self, preset: Preset, row: Row) -> tuple[Metric, ...]:
        """Everything this protocol measures for ``row`` of ``preset`` (its declaration in ``METRICS``)."""
        return preset.metrics(row)

    def label(self, key: str) -> str:
        """The report's label of metric ``key`` (the key itself when unknown)."""
        return METRICS[self.name].label(key)

    def describe(self, preset: Preset) -> str:
        return self.summary

    @abstractmethod
    def evaluate(self, runs: SeedRuns) -> ProtocolOutcome:
        """Evaluate the trained runs of every seed under this protocol."""

    @abstractmethod
    def attack_lines(self, res: dict[str, Any]) -> list[str]:
        """The report's lines on the attacks beyond the paper's (``res``: ``results.json``)."""

    def tables(self, res: dict[str, Any]) -> str:
        """The report's tables of every metric of seed 0."""
        keys = list(res["rows"][0]["ours"])
        sel = [k for k in keys if not k.endswith("_robust")] + [k for k in keys if k.endswith("_robust")]
        return self._table(res, sel) + "\n"

    def _table(self, res: dict[str, Any], keys: list[str]) -> str:
        return markdown_table(["model", *(self.label(k) for k in keys)],
                              [[r["label"], *(pct_ci(r["ours"].get(k)) for k in keys)] for r in res["rows"]])  # fmt: skip


class Untargeted(Protocol):
    name = "untargeted"
    summary = "white box (the paper's attack), worst case with the strong suite, black box, clean"

    def evaluate(self, runs: SeedRuns) -> ProtocolOutcome:
        plan, crafted = runs.plan, {}
        flags: dict[str, Flags] = {}
        for r in plan.preset.table_rows:
            x, y = runs.points(r.name)
            runs.log(f"[reproduce] {r.name}: clean, the paper's attack, the {plan.suite_name} suite")
            res = run_protocol(runs.model(r.name), x, y, [plan.paper, *plan.suite], progress=runs.progress,
                               desc=r.name, state_path=runs.dirs[r.name] / "reproduce-white-box.safetensors",
                               **runs.common)  # fmt: skip
            f = flags[r.name] = {"clean": res.clean_correct, "white_box": res.clean_correct & (res.broken_by != 0),
                                 "strong": res.robust}  # fmt: skip
            if r.source:
                if r.source not in crafted:
                    crafted[r.source] = self._craft(runs, r.source, x, y)
                bb = black_box(runs.model(r.name), x, y, crafted=crafted[r.source], clean=f["clean"])
                f["black_box"], f["black_box_robust"] = bb.plain, bb.robust  # type: ignore[assignment]
        return ProtocolOutcome(flags)

    @staticmethod
    def _craft(runs: SeedRuns, source: str, x: Tensor, y: Tensor) -> Tensor:
        runs.log(f"[reproduce] crafting the paper's attack on {source} (black box)")
        x_adv, _ = craft(runs.model(source), x, y, runs.plan.paper, progress=runs.progress, desc=f"craft on {source}",
                         state_path=runs.dirs[source] / "reproduce-crafted.partial.safetensors", **runs.common)  # fmt: skip
        return x_adv

    def attack_lines(self, res: dict[str, Any]) -> list[str]:
        attacks = res["attacks"]
        return [f"- the strong suite `{attacks['suite_name']}`: {', '.join(a['label'] for a in attacks['suite'])}\n"]


_TARGETED_GROUPS = (("wb", "paper", "Paper's attack"), ("long", "long", "Long targeted PGD"),
                    ("suite", "suite", "Targeted suite"), ("worst", None, "Worst case"))  # fmt: skip


class Targeted(Protocol):
    name = "targeted"
    targeted = True
    summary = "targeted protocol: the paper's attack, long targeted PGD, targeted suite; top-1/top-5"

    def describe(self, preset: Preset) -> str:
        return self.summary + ("; black box" if any(r.source for r in preset.table_rows) else "")

    def evaluate(self, runs: SeedRuns) -> ProtocolOutcome:
        flags = {}
        for r in runs.plan.preset.table_rows:
            flags[r.name] = self._row(runs, r)
        return ProtocolOutcome(flags)

    @staticmethod
    def _row(runs: SeedRuns, r: Row) -> Flags:
        plan, (x, y) = runs.plan, runs.points(r.name)
        runs.log(
            f"[reproduce] {r.name}: targeted protocol (paper's attack, long PGD, targeted suite), untargeted extra"
        )
        tr = targeted_protocol(
            runs.model(r.name), x, y, {"paper": [plan.paper], "long": [plan.long], "suite": list(plan.targeted_suite)},
            untargeted=plan.suite, state_dir=runs.dirs[r.name] / "reproduce-targeted", progress=runs.progress,
            **runs.common,
        )  # fmt: skip
        f = {"clean_top1": tr.clean_top1, "clean_top5": tr.clean_top5}
        for key, group, _ in _TARGETED_GROUPS:
            f[f"{key}_top1"], f[f"{key}_top5"] = tr.robust(group, 1), tr.robust(group, 5)
            f[f"{key}_success"] = tr.success(group)
        if tr.untargeted is not None:
            f["untargeted_top1"], f["untargeted_top5"] = tr.untargeted.robust, tr.untargeted.robust_top5  # type: ignore[assignment]
        if r.source:
            runs.log(f"[reproduce] {r.name}: black box, the paper's attack crafted on {r.source} (same targets)")
            bb = black_box(
                runs.model(r.name), x, y, source=runs.model(r.source), targeted=True, top5=True,
                attack=replace(plan.paper, transfer=True, label=plan.paper.label + " (transfer)"),
                progress=runs.progress, desc=f"{r.name} black box",
                state_path=runs.dirs[r.name] / f"reproduce-black-box-{runs.dirs[r.source].name}.safetensors",
                **runs.common,
            ).protocol  # fmt: skip
            if not torch.equal(bb.target, tr.target):  # type: ignore[union-attr,arg-type]
                raise RuntimeError("black box: the targets differ from the white-box protocol's")
            f["bb_top1"], f["bb_top5"], f["bb_success"] = bb.robust, bb.robust_top5, bb.target_hit  # type: ignore[union-attr,assignment]
        return f

    def attack_lines(self, res: dict[str, Any]) -> list[str]:
        attacks = res["attacks"]
        return [
            f"- the long attack: {attacks['long']['label']}\n",
            "- the targeted suite: " + ", ".join(a["label"] for a in attacks["targeted_suite"]) + "\n",
            "- every targeted attack aims at the same random target class per point (≠ label, seeded); the worst case "
            "is per point over all of them; the untargeted worst case (strong suite `"
            + attacks["suite_name"] + "`) is an extra, not the paper's protocol\n",
        ]  # fmt: skip

    def tables(self, res: dict[str, Any]) -> str:
        keys = list(res["rows"][0]["ours"])
        text = ""
        for group, title in (
            ("top1", "Top-1 accuracy"),
            ("top5", "Top-5 accuracy"),
            ("success", "Targeted success rate"),
        ):
            text += f"**{title}:**\n\n" + self._table(res, [k for k in keys if k.endswith(group)]) + "\n"
        return text


class TransferMatrix(Protocol):
    name = "transfer"
    summary = "source x target transfer matrix"

    def evaluate(self, runs: SeedRuns) -> ProtocolOutcome:
        plan = runs.plan
        names = [r.name for r in plan.preset.rows]
        x, y = runs.points(names[0])
        runs.log(f"[reproduce] transfer matrix over {', '.join(names)}")
        t1 = time.perf_counter()
        tm = transfer_matrix({n: runs.model(n) for n in names}, x, y, attack=plan.paper, progress=runs.progress,
                             state_dir=runs.seed_dir / "transfer-crafted", **runs.common)  # fmt: skip
        doc = {"dataset": plan.dataset, "eps": plan.eps, "runs": {n: str(runs.dirs[n]) for n in names},
               "ensembles": {}, **tm.to_dict(), "seconds": round(time.perf_counter() - t1, 2)}  # fmt: skip
        flags = {}
        for r in plan.preset.table_rows:
            f = flags[r.name] = {"clean": tm.clean[r.name]}
            for s in names:
                f[f"from_{s}"], f[f"from_{s}_robust"] = tm.plain[s][r.name], tm.robust[s][r.name]
        return ProtocolOutcome(flags, doc)

    def attack_lines(self, res: dict[str, Any]) -> list[str]:
        line = "- crafted once on every model (the statics, ens-adv, the sources) and shown to every model; "
        return [line + "a model's own column is white box\n"]

    def tables(self, res: dict[str, Any]) -> str:
        return super().tables(res) + (
            "The full source x target matrices: [transfer.md](transfer.md), ![transfer](transfer.png)\n\n"
        )


PROTOCOLS: Registry = Registry("protocol")
for _protocol in (Untargeted(), Targeted(), TransferMatrix()):
    PROTOCOLS.register(_protocol.name)(_protocol)


def check_outcome(protocol: Protocol, preset: Preset, outcome: ProtocolOutcome) -> ProtocolOutcome:
    """Fail when a protocol measured a metric it does not declare (a key the report could not label)."""
    for r in preset.table_rows:
        declared = {m.key for m in protocol.metrics(preset, r)}
        extra = set(outcome.flags[r.name]) - declared
        if extra:
            raise RuntimeError(f"protocol {protocol.name}: row {r.name} measured undeclared metrics {sorted(extra)}")
    return outcome
