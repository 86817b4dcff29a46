"""The paper's claims as data, the evidence ``reproduce`` gives for each, and its verdict.

Each :class:`Claim` names the hypothesis the paper makes, the preset (table) whose runs test it,
the rows it compares, the metric under the paper's attack and under the strong worst case, and
its kind with the test that fits it (:mod:`logitpair.experiments.stats`):

- ``superiority``: A is more (``direction`` -1: less) accurate than B. Per seed McNemar's exact
  test on the same points (one-sided in the claimed direction); across seeds the mean paired
  difference with its 95% Student-t interval over seeds, and the pooled exact test over seeds.
- ``noninferiority``: A is at most :data:`DELTA` less accurate than B at no more than
  :data:`MAX_COST` of B's training cost ("competitive" at lower cost).
- ``bound``: A's robust accuracy is at most :data:`BOUND` (the upper end of the 95% t-interval
  of the mean over seeds).

The paper's figures come from the presets (``Row.paper``), ours from ``results.json`` of
``logitpair reproduce`` (:func:`load_results`): the per-seed McNemar counts of its paired
comparisons, the per-seed accuracies of its rows and their training seconds. :func:`gather`
returns a claim's :class:`Evidence` (or says which command produces the missing runs), and
:mod:`logitpair.experiments.claims_page` writes ``docs/CLAIMS.md`` from it.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from logitpair.errors import ConfigError
from logitpair.experiments.metricsets import METRICS
from logitpair.experiments.presets import PRESETS, Preset
from logitpair.experiments.stats import (
    NOT_SEPARABLE,
    Verdict,
    bound_verdict,
    mantel_haenszel_pairs,
    mcnemar_one_sided,
    noninferiority_verdict,
    stratified_mcnemar,
    superiority_verdict,
    t_interval,
)
from logitpair.methods import METHODS

KINDS = ("superiority", "noninferiority", "bound")
DELTA = 0.05  # the non-inferiority margin: 5 percentage points
MAX_COST = 0.5  # "at lower cost": at most half of the reference's training seconds
BOUND = 0.10  # "little robustness": robust accuracy at most 10%
K_SUPERIORITY = 5  # seeds needed for the ALP-vs-M-PGD claims
K_OTHERS = 3  # seeds needed for every other claim
PAPER, STRONG = "the paper's attack", "the strong worst case"


@dataclass(frozen=True)
class Claim:
    """One hypothesis of the paper and how its runs test it (see the module docstring).

    ``a`` / ``b``: rows of ``preset`` (``b`` empty for a bound); ``metric`` / ``metric_b``: their
    keys under the paper's attack (``metric_b`` defaults to ``metric``); ``strong`` /
    ``strong_b``: under the strong worst case (empty: none applies, ``no_strong`` says why). A
    paired claim's pairs must be comparisons of the preset, so ``reproduce`` records their
    per-seed McNemar counts. ``duplicates``: the preset whose models this one's are at
    ``--scale small`` (not separate evidence there).
    """

    key: str
    title: str
    hypothesis: str
    kind: str
    preset: str
    a: str
    metric: str
    b: str = ""
    metric_b: str = ""
    strong: str = ""
    strong_b: str = ""
    no_strong: str = ""
    direction: int = 1
    k_min: int = K_OTHERS
    delta: float = DELTA
    max_cost: float = MAX_COST
    bound: float = BOUND
    duplicates: str = ""
    notes: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise ConfigError(f"claim {self.key}: kind must be one of {', '.join(KINDS)}, got {self.kind!r}")
        if self.k_min < 2 or self.direction not in (1, -1):
            raise ConfigError(f"claim {self.key}: k_min must be >= 2 (an interval needs two seeds), direction +1 or -1")
        if bool(self.strong) == bool(self.no_strong):
            raise ConfigError(f"claim {self.key}: name the strong worst case's metric or say why none applies")
        preset = self.table
        if self.paired:
            known = {(c.a, c.b, c.metric_a, c.other_metric) for c in preset.compare}
            for pair in self.pairs.values():
                if (self.a, self.b, *pair) not in known:
                    raise ConfigError(
                        f"claim {self.key}: {self.a}/{self.b} on {pair} is not a comparison of {preset.name}"
                    )
        else:
            measured = {m.key for m in preset.metrics(preset.row(self.a))}
            if not {self.metric, self.strong} <= measured:
                raise ConfigError(f"claim {self.key}: {self.preset} does not measure {self.metric}/{self.strong}")

    @property
    def table(self) -> Preset:
        return PRESETS.get(self.preset)

    @property
    def paired(self) -> bool:
        return self.kind != "bound"

    @property
    def rows(self) -> tuple[str, ...]:
        return tuple(self.row_metrics())

    @property
    def pairs(self) -> dict[str, tuple[str, str]]:
        """Measure name -> (A's metric, B's metric): the paper's attack and, if any, the strong worst case."""
        out = {PAPER: (self.metric, self.metric_b or self.metric)}
        if self.strong:
            out[STRONG] = (self.strong, self.strong_b or self.strong)
        return out

    def row_metrics(self) -> dict[str, list[str]]:
        """Row -> the metrics the claim reads of it, in order (A first)."""
        out: dict[str, list[str]] = {self.a: []}
        for ma, mb in self.pairs.values():
            out[self.a].append(ma)
            if self.paired:
                out.setdefault(self.b, []).append(mb)
        return {row: list(dict.fromkeys(ms)) for row, ms in out.items()}

    def paper(self) -> list[tuple[str, str, float | None]]:
        """The paper's figures (%) of the claim: (row label, metric label, value or None) per row and metric."""
        preset, label = self.table, METRICS[self.table.protocol].label
        return [(preset.row(r).label, label(m), preset.row(r).paper.get(m))
                for r, ms in self.row_metrics().items() for m in ms]  # fmt: skip


def _superiority(table: str, direction: str, strong: bool, **kw: Any) -> Claim:
    """ALP vs M-PGD on ``table``: white box (with the strong worst case) or black box."""
    black = direction == "black box"
    return Claim(
        key=f"{table}-alp-mpgd-{'bb' if black else 'wb'}", title=f"ALP beats M-PGD, {direction} ({PRESETS.get(table).table})",
        hypothesis=f"ALP's {direction.replace(' ', '-')} robust accuracy is higher than M-PGD's (mean paired difference > 0)",
        kind="superiority", preset=table, a="alp", b="mpgd", metric="black_box" if black else "white_box",
        strong="" if black else "strong", k_min=K_SUPERIORITY,
        no_strong=("the black-box attack is the paper's attack transferred from an independent source; no worst case "
                   "over black-box attacks is measured") if black else "",
        **kw,
    )  # fmt: skip


def _competitive(table: str, row: str, name: str, black: bool) -> Claim:
    """``row`` (LSQ / CLP) within :data:`DELTA` of M-PGD at most :data:`MAX_COST` of its cost."""
    direction = "black box" if black else "white box"
    return Claim(
        key=f"{table}-{row}-mpgd-{'bb' if black else 'wb'}",
        title=f"{name} is competitive with M-PGD at lower cost, {direction} ({PRESETS.get(table).table})",
        hypothesis=(f"{name}'s {direction.replace(' ', '-')} robust accuracy is at most {100 * DELTA:g} points below M-PGD's (lower "
                    f"95% bound of the mean paired difference > -{100 * DELTA:g}) at no more than {MAX_COST:g} of "
                    "M-PGD's training seconds"),
        kind="noninferiority", preset=table, a=row, b="mpgd", metric="black_box" if black else "white_box",
        strong="" if black else "strong",
        no_strong=("the black-box attack is the paper's attack transferred from an independent source; no worst case "
                   "over black-box attacks is measured") if black else "",
    )  # fmt: skip


def _little(row: str, name: str) -> Claim:
    return Claim(
        key=f"table9-{row}-bound", title=f"{name} gives little robustness (Table 9)",
        hypothesis=(f"{name}'s robust top-1 accuracy under the targeted attack is at most {100 * BOUND:g}% (upper end "
                    "of the 95% t-interval of the mean over seeds)"),
        kind="bound", preset="table9", a=row, metric="wb_top1", strong="worst_top1",
        notes=(("The worst case is the targeted protocol's (the paper's attack, the long targeted PGD and the "
                "targeted suite, towards the same targets): the table's threat model."),),
    )  # fmt: skip


_SMALL_DUPLICATE = ("At `--scale small` Table 2 trains the same Fashion-MNIST LeNet-5 models as Table 1 (the "
                    "scale replaces SVHN and RevNet-9; only the paper's attack step differs), so it is not separate "
                    "evidence.")  # fmt: skip

CLAIMS: tuple[Claim, ...] = (
    _superiority("table1", "white box", True),
    _superiority("table1", "black box", False),
    _superiority("table2", "white box", True, duplicates="table1", notes=(_SMALL_DUPLICATE,)),
    _superiority("table2", "black box", False, duplicates="table1", notes=(_SMALL_DUPLICATE,)),
    Claim(
        key="alp-vs-vat", title="ALP beats VAT, white box (Table 1's setting)",
        hypothesis="ALP's white-box robust accuracy is higher than VAT's (mean paired difference > 0)",
        kind="superiority", preset="alp-vs-vat", a="alp", b="vat", metric="white_box", strong="strong",
        notes=("The paper's tables give no VAT figure; the preset trains VAT in Table 1's setting.",),
    ),
    _competitive("table7", "lsq", "Logit squeezing", black=False),
    _competitive("table7", "lsq", "Logit squeezing", black=True),
    _competitive("table8", "clp", "Clean logit pairing", black=False),
    _competitive("table8", "clp", "Clean logit pairing", black=True),
    _little("ls", "Label smoothing"),
    _little("mixup", "Mixup"),
    Claim(
        key="transfer-alp-ens-adv", title="ALP's adversarial examples hurt ensemble adversarial training more",
        hypothesis=("an ensemble-adversarially-trained model is less accurate on examples crafted on ALP than on "
                    "examples crafted on an undefended model (mean paired difference < 0)"),
        kind="superiority", preset="transfer-vs-ensemble", a="ens-adv", b="ens-adv", metric="from_alp",
        metric_b="from_undefended", direction=-1,
        no_strong="a transfer claim compares the sources of the examples, not attacks of different strength",
    ),
)  # fmt: skip


# --------------------------------------------------------------------------- reading reproduce outputs
def _results_files(path: Path) -> list[Path]:
    if path.is_file():
        return [path]
    if (path / "results.json").is_file():
        return [path / "results.json"]
    found = sorted(path.glob("*/results.json"))
    if not found:
        raise ConfigError(f"no results.json in {path} or its subfolders (the output folders of `logitpair reproduce`)")
    return found


def load_results(paths: Iterable[Path | str]) -> dict[str, dict[str, Any]]:
    """preset name -> ``results.json`` (with ``_path``: where it was read) from ``reproduce`` output
    folders (a ``results.json``, a folder holding one, or a folder of such folders). Two results
    of the same preset are an error (which one would the page use?)."""
    out: dict[str, dict[str, Any]] = {}
    for path in paths:
        for f in _results_files(Path(path)):
            res = json.loads(f.read_text())
            name = res["preset"]
            if name in out:
                raise ConfigError(f"two results for preset {name}: {out[name]['_path']} and {f}; pass one")
            out[name] = {**res, "_path": str(f.parent)}
    return out


# --------------------------------------------------------------------------- evidence
@dataclass
class Measure:
    """One measure of a claim (the paper's attack, or the strong worst case): per-seed paired
    comparisons (``seeds``: reproduce's McNemar records, by seed) or, for a bound, per-seed values."""

    name: str
    metric_a: str
    metric_b: str
    seeds: list[dict[str, Any]]
    values: list[float]  # per seed: the paired difference a - b, or A's accuracy (bound)
    interval: dict[str, Any]
    pooled: dict[str, Any] | None = None
    mantel_haenszel: dict[str, float] | None = None


@dataclass
class Evidence:
    """A claim's evidence from one ``results.json`` (``results`` None: missing, ``missing`` says
    how to produce it), per row the per-seed values, the measures, the costs and the verdict."""

    claim: Claim
    verdict: Verdict
    results: dict[str, Any] | None = None
    missing: str = ""
    rows: dict[str, dict[str, dict[str, Any]]] = field(default_factory=dict)  # row -> metric -> t-interval
    measures: list[Measure] = field(default_factory=list)
    costs: list[dict[str, Any]] = field(default_factory=list)
    cost_ratio: float | None = None


def reproduce_command(claim: Claim) -> str:
    """The command that produces a claim's runs at ``--scale small`` with the seeds it needs."""
    return (f"logitpair reproduce {claim.preset} --scale small --seeds {claim.k_min} --runs runs/models "
            f"--out runs/reproduce/{claim.preset}-small")  # fmt: skip


def _row(res: Mapping[str, Any], name: str) -> dict[str, Any]:
    for r in res["rows"]:
        if r["name"] == name:
            return r
    raise ConfigError(f"{res['_path']}: no row {name!r} in results.json")


def _seed_values(res: Mapping[str, Any], row: str, metric: str) -> list[float]:
    return [s[metric]["value"] for s in _row(res, row)["seeds"] if metric in s]


def _paired(res: Mapping[str, Any], claim: Claim, name: str, ma: str, mb: str) -> Measure | None:
    seeds = sorted((c for c in res["comparisons"] if (c["row_a"], c["row_b"], c["metric_a"], c["metric_b"]) ==
                    (claim.a, claim.b, ma, mb)), key=lambda c: c["seed"])  # fmt: skip
    if not seeds:
        return None
    alternative = "greater" if claim.direction > 0 else "less"
    seeds = [{**c, "p_claimed": mcnemar_one_sided(c["a_only"], c["b_only"], alternative)} for c in seeds]
    diffs = [c["a"] - c["b"] for c in seeds]
    a_only, b_only = [c["a_only"] for c in seeds], [c["b_only"] for c in seeds]
    return Measure(name, ma, mb, seeds, diffs, t_interval(diffs), stratified_mcnemar(a_only, b_only),
                   mantel_haenszel_pairs(a_only, b_only))  # fmt: skip


def _total_passes(p: Mapping[str, Any]) -> int | None:
    """A run's forward + backward images of the trained model (None when its steps differ, see
    :func:`~logitpair.training.passes.run_passes`)."""
    total = p.get("total")
    return None if total is None else int(total["forward"] + total["backward"])


def _costs(res: Mapping[str, Any], claim: Claim) -> tuple[list[dict[str, Any]], float | None]:
    """Training seconds per seed of the claim's rows (and the declared step cost of their methods);
    the ratio of A's mean to B's for a non-inferiority claim."""
    costs = []
    for name in claim.rows:
        r = _row(res, name)
        cost = METHODS.entry(r["method"]).cost
        seconds = [float(s) for s in r["train_seconds"]]
        passes = [_total_passes(p) for p in r.get("passes", [])]  # absent in results of older versions
        costs.append({"row": name, "label": r["label"], "method": r["method"], "seconds": seconds,
                      "mean": sum(seconds) / len(seconds) if seconds else None,
                      "passes": passes, "per_image": [p.get("per_image_last_step") for p in r.get("passes", [])],
                      "step": cost.floor if cost else "regular step"})  # fmt: skip
    ratio = None
    if claim.kind == "noninferiority" and len(costs) == 2 and costs[0]["mean"] is not None and costs[1]["mean"]:
        ratio = costs[0]["mean"] / costs[1]["mean"]
    return costs, ratio


def _verdict(claim: Claim, ev: Evidence, res: Mapping[str, Any]) -> Verdict:
    if claim.duplicates and res["scale"] == "small" and res["dataset"] != claim.table.dataset:
        return Verdict(NOT_SEPARABLE, f"at --scale small these are the models of {PRESETS.get(claim.duplicates).table} "
                       f"({res['dataset']}): not separate evidence, that claim's verdict stands for both")  # fmt: skip
    wanted = list(claim.pairs)
    found = {m.name: m.values for m in ev.measures}
    absent = [w for w in wanted if w not in found]
    if absent:
        return Verdict(NOT_SEPARABLE, f"{' and '.join(absent)} not measured in {res['_path']}")
    if claim.kind == "superiority":
        return superiority_verdict(found, k_min=claim.k_min, direction=claim.direction)
    if claim.kind == "noninferiority":
        return noninferiority_verdict(found, k_min=claim.k_min, delta=claim.delta, cost_ratio=ev.cost_ratio,
                                      max_cost_ratio=claim.max_cost)  # fmt: skip
    return bound_verdict(found, k_min=claim.k_min, bound=claim.bound)


def gather(claim: Claim, results: Mapping[str, Mapping[str, Any]]) -> Evidence:
    """The evidence for ``claim`` from ``results`` (preset name -> ``results.json``, :func:`load_results`)."""
    res = results.get(claim.preset)
    if res is None:
        reason = f"no results for preset {claim.preset}: run `{reproduce_command(claim)}`"
        return Evidence(claim, Verdict(NOT_SEPARABLE, reason), missing=reason)
    ev = Evidence(claim, Verdict(NOT_SEPARABLE, ""), results=dict(res))
    for name, metrics in claim.row_metrics().items():
        ev.rows[name] = {m: t_interval(_seed_values(res, name, m)) for m in metrics}
    for name, (ma, mb) in claim.pairs.items():
        if claim.paired:
            m = _paired(res, claim, name, ma, mb)
        else:
            values = _seed_values(res, claim.a, ma)
            m = Measure(name, ma, mb, [], values, t_interval(values)) if values else None
        if m is not None:
            ev.measures.append(m)
    ev.costs, ev.cost_ratio = _costs(res, claim)
    ev.verdict = _verdict(claim, ev, res)
    return ev


def gather_all(results: Mapping[str, Mapping[str, Any]], claims: Sequence[Claim] = CLAIMS) -> list[Evidence]:
    """Every claim's evidence, in the order of ``claims``."""
    return [gather(c, results) for c in claims]
