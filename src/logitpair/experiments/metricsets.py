"""What each ``reproduce`` protocol measures: its metrics, each a key of ``results.json`` and a label
of the report.

Declared here, below the presets, so that :mod:`logitpair.experiments.presets` checks every
preset against its protocol when it is registered (a misspelt column or comparison metric is an
error at import), and :mod:`logitpair.experiments.protocols` evaluates and labels exactly these.
A :class:`MetricSet` lists the metrics of every row, those of rows with a black-box source, and
templates instantiated once per model of the preset (the transfer matrix's ``from_{model}``).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass


@dataclass(frozen=True)
class Metric:
    """A figure a protocol measures per row: its key in ``results.json`` and its label in the report."""

    key: str
    label: str


@dataclass(frozen=True)
class MetricSet:
    """The metrics of one protocol (see the module docstring); ``{model}`` in a template's key and
    label is a model of the preset."""

    always: tuple[Metric, ...]
    with_source: tuple[Metric, ...] = ()
    per_model: tuple[Metric, ...] = ()

    def for_row(self, models: Sequence[str], has_source: bool) -> tuple[Metric, ...]:
        """The metrics of a row (``has_source``: it has a black-box source) of a preset with ``models``."""
        out = [*self.always, *(self.with_source if has_source else ())]
        out += [Metric(t.key.format(model=m), t.label.format(model=m)) for m in models for t in self.per_model]
        return tuple(out)

    def label(self, key: str) -> str:
        """The label of ``key`` (the key itself when unknown)."""
        for m in (*self.always, *self.with_source):
            if m.key == key:
                return m.label
        by_suffix = sorted(self.per_model, key=lambda t: -len(t.key.partition("{model}")[2]))
        for t in by_suffix:  # ``from_a_robust``: the longer suffix first
            prefix, _, suffix = t.key.partition("{model}")
            if key.startswith(prefix) and key.endswith(suffix) and len(key) > len(prefix) + len(suffix):
                return t.label.format(model=key[len(prefix) : len(key) - len(suffix)])
        return key


METRICS: dict[str, MetricSet] = {
    "untargeted": MetricSet(
        always=(
            Metric("clean", "Clean"),
            Metric("white_box", "White box: the paper's attack"),
            Metric("strong", "White box: worst case, the paper's attack + strong suite"),
        ),
        with_source=(
            Metric("black_box", "Black box (accuracy on the transferred examples)"),
            Metric("black_box_robust", "Black box, robust (correct clean and transferred)"),
        ),
    ),
    "targeted": MetricSet(
        always=(
            Metric("clean_top1", "Clean top-1"),
            Metric("clean_top5", "Clean top-5"),
            Metric("wb_top1", "Paper's attack top-1"),
            Metric("wb_top5", "Paper's attack top-5"),
            Metric("wb_success", "Paper's attack success"),
            Metric("long_top1", "Long targeted PGD top-1"),
            Metric("long_top5", "Long targeted PGD top-5"),
            Metric("long_success", "Long targeted PGD success"),
            Metric("suite_top1", "Targeted suite top-1"),
            Metric("suite_top5", "Targeted suite top-5"),
            Metric("suite_success", "Targeted suite success"),
            Metric("worst_top1", "Worst case top-1"),
            Metric("worst_top5", "Worst case top-5"),
            Metric("worst_success", "Targeted success, any attack"),
            Metric("untargeted_top1", "Untargeted worst case top-1 (extra)"),
            Metric("untargeted_top5", "Untargeted worst case top-5 (extra)"),
        ),
        with_source=(
            Metric("bb_top1", "Black box top-1"),
            Metric("bb_top5", "Black box top-5"),
            Metric("bb_success", "Black box success"),
        ),
    ),
    "transfer": MetricSet(
        always=(Metric("clean", "Clean"),),
        per_model=(
            Metric("from_{model}", "transferred from {model}"),
            Metric("from_{model}_robust", "transferred from {model} (robust)"),
        ),
    ),
}
