"""What ``smoke``, ``small`` and ``full`` mean for ``logitpair reproduce``: one object per scale.

A :class:`Scale` decides, for a preset, the evaluation (ε, test points, the paper's attack, the
long attack, the strong and targeted suites, the audit: :class:`ScaleEval`), each row's training
config values (:meth:`Scale.row_values`), the training set (smoke: one batch), whether an
interrupted run resumes, and the substitutions the report lists, written from the same values
that configure the run (so the prose cannot drift from what runs).

- ``smoke`` keeps each architecture and method but runs on a few generated images per class in
  the dataset's real format, one training step, one attack step, a two-attack suite and a minimal
  audit: it checks the pipeline, its numbers mean nothing.
- ``small`` is the demo's budget on a CPU: ``lenet5``, Fashion-MNIST, the demo's training, 1,000
  test points, the ``fast`` (else ``quick``) suite, the quick audit.
- ``full`` uses the preset's settings (the paper's and the official code's where known) and
  resumes an interrupted run.
"""

from __future__ import annotations

import copy
from abc import ABC, abstractmethod
from collections.abc import Mapping
from dataclasses import dataclass, replace
from typing import Any

from logitpair.attacks import parse_official
from logitpair.audit import AuditSettings
from logitpair.config import RunConfig, make_config, merge
from logitpair.data import Splits, load_dataset
from logitpair.evaluation import SUITES, AttackSpec, get_suite, pgd_spec
from logitpair.experiments.presets import SOURCE_SMALL, Preset, Row, long_attack

FOLDER_DATASETS = ("imagenet", "tiny-imagenet")
AUDIT_POINTS = 200  # audit_run's default with the quick settings

# --scale small: the demo's settings (logitpair.experiments.demo): LeNet-5, eps 0.1, the methods'
# default training PGD, Adam, cosine, batch 128, 2 epochs (sources: SOURCE_SMALL)
SMALL_EPS = 0.1
SMALL_BASE: dict[str, Any] = {
    "model": "lenet5", "loss": {"eps": SMALL_EPS}, "val_points": 500, "val_suite": "fast", "optim": {"epochs": 2}
}  # fmt: skip
SMALL_POINTS = 1000
SMALL_FOLDER_SIZE = 32  # a folder dataset at --scale small is read at 32x32 (ours)
SMALL_LAMBDA = {"alp": 0.5, "clp": 0.5, "lsq": 0.05}  # the demo's λ per method (the presets' small rows use them)

# --scale smoke: one step of everything
SMOKE_POINTS = 4
SMOKE_TRAINING: dict[str, Any] = {
    "optim": {"epochs": 1, "batch_size": 2, "accum_steps": 1}, "val_points": 2, "val_attack_steps": 1, "log_every": 1,
    "loss": {"attack_steps": 1},
}  # fmt: skip
SMOKE_SUITE = (
    AttackSpec("pgd", {"steps": 1, "restarts": 1}, "PGD-1 (smoke)"),
    AttackSpec("square", {"queries": 2}, "Square (2 queries, smoke)"),
)
SMOKE_AUDIT = AuditSettings(
    suite=SMOKE_SUITE, baseline=pgd_spec(1, 1), transfer=pgd_spec(1, 1, transfer=True), eps_factors=(1.0, 2.0),
    sweep_steps=1, steps_series=(1, 2), restarts_series=(1, 2), restarts_steps=1, noise_samples=2,
    surface_points=1, surface_grid=3,
)  # fmt: skip
SMOKE_AUDIT_POINTS = 2

_WORDS = ("no", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")


def _count(k: int, noun: str) -> str:
    """``2 epochs``, ``1 epoch``."""
    return f"{k} {noun}{'' if k == 1 else 's'}"


def _word(k: int) -> str:
    return _WORDS[k] if 0 <= k < len(_WORDS) else str(k)


def _rate(value: float) -> str:
    """``1e-3`` for 0.001, ``0.045`` for 0.045."""
    if value >= 0.01:
        return f"{value:g}"
    mantissa, exponent = f"{value:.0e}".split("e")
    return f"{mantissa}e{int(exponent)}"


@dataclass(frozen=True)
class ScaleEval:
    """How a preset is evaluated at a scale, and what the scale substitutes (for the report)."""

    eps: float
    n: int | None
    paper: AttackSpec
    long: AttackSpec
    suite_name: str
    suite: tuple[AttackSpec, ...]
    targeted_suite: tuple[AttackSpec, ...]
    audit: AuditSettings
    audit_points: int
    substitutions: tuple[str, ...] = ()


class Scale(ABC):
    """One scale of ``logitpair reproduce`` (see the module docstring)."""

    name = ""
    resumes = False  # an interrupted run continues (else the work folder starts afresh)
    generates_data = False  # without a data folder: generated images in the dataset's real format

    def __str__(self) -> str:
        return self.name

    def default_dataset(self, preset: Preset) -> str:
        return preset.dataset

    @abstractmethod
    def evaluation(self, preset: Preset, dataset: str, n: int | None, seeds: int) -> ScaleEval:
        """How the preset's models are evaluated at this scale (points, attacks, seeds)."""

    def own_settings(self, row: Row) -> Mapping[str, Any]:
        """The row's own config overrides at this scale (its ``loss`` keys are its method's)."""
        return row.settings

    def row_values(self, preset: Preset, row: Row, folder: bool) -> tuple[dict[str, Any], dict[str, Any]]:
        """The row's config values and its ``data`` section (dataset, folder and seed are added by the caller)."""
        values = merge(dict(preset.training), dict(row.settings))
        values["model"] = row.model or values.get("model") or preset.model
        data = dict(values.get("data") or {})
        if not folder:
            data.pop("image_size", None)
        return values, data

    def training_splits(self, cfg: RunConfig) -> Splits | None:
        """The training data when not the config's own (None: the trainer loads it)."""
        return None


class FullScale(Scale):
    name = "full"
    resumes = True

    def evaluation(self, preset: Preset, dataset: str, n: int | None, seeds: int) -> ScaleEval:
        return ScaleEval(
            eps=preset.eps, n=preset.full_points if n is None else n, paper=preset.attack.spec(preset.eps),
            long=long_attack(preset.eps), suite_name="standard", suite=tuple(get_suite("standard")),
            targeted_suite=tuple(get_suite("targeted")), audit=AuditSettings.preset(quick=True),
            audit_points=AUDIT_POINTS,
        )  # fmt: skip


def small_suite_name() -> str:
    """The strong suite at ``--scale small``: ``fast`` where it exists, else ``quick``."""
    return "fast" if "fast" in SUITES else "quick"


def _smoke_attack(name: str) -> str:
    """The official notation with one step (``pgdll_16_2_10`` -> ``pgdll_16_2_1``); other names unchanged."""
    spec = parse_official(name)
    return name if spec is None else f"{spec.kind}_{round(spec.eps * 255)}_{round(spec.step * 255)}_1"


class SmallScale(Scale):
    name = "small"

    def default_dataset(self, preset: Preset) -> str:
        return "fashion-mnist"

    def evaluation(self, preset: Preset, dataset: str, n: int | None, seeds: int) -> ScaleEval:
        eps, points, suite_name = SMALL_EPS, SMALL_POINTS if n is None else n, small_suite_name()
        audit = AuditSettings.preset(quick=True)
        models = sorted({r.small_model or "lenet5" for r in preset.rows})
        subs = [f"architecture {' / '.join(models)} instead of {preset.model} (ours; the demo's network)",
                self.training_prose()]  # fmt: skip
        if preset.eps != eps:
            subs.append(f"the paper's attack with its step scaled from ε = {preset.eps:.4g} to {eps} (ours)")
        if dataset in FOLDER_DATASETS:
            subs.append(f"images at {SMALL_FOLDER_SIZE}x{SMALL_FOLDER_SIZE} (ours)")
        subs.append(
            f"evaluation on the first {points} test points, strong suite `{suite_name}`, quick audit on {AUDIT_POINTS} "
            f"points, {seeds} seed(s) (ours)"
        )
        return ScaleEval(
            eps=eps, n=points, paper=preset.attack.spec(eps), long=long_attack(eps), suite_name=suite_name,
            suite=tuple(get_suite(suite_name)), targeted_suite=tuple(get_suite("targeted")), audit=audit,
            audit_points=AUDIT_POINTS, substitutions=tuple(subs),
        )  # fmt: skip

    @staticmethod
    def training_prose() -> str:
        """The demo's training, written from the config a small M-PGD row gets."""
        cfg = make_config(overrides=merge(SMALL_BASE, {"method": "mpgd"}))
        loss, optim = cfg.loss, cfg.optim
        start = " from a random start" if loss.attack_random_start else ""  # type: ignore[attr-defined]
        source_epochs = SOURCE_SMALL["optim"]["epochs"]
        by_value: dict[float, list[str]] = {}
        for method, lam in SMALL_LAMBDA.items():
            by_value.setdefault(lam, []).append(method.upper())
        lams = ", ".join(f"{' / '.join(names)} {lam:g}" for lam, names in by_value.items())
        return (
            f"training as the demo: L∞ ε = {loss.eps}, PGD {loss.attack_steps} steps of "  # type: ignore[attr-defined]
            f"{loss.attack_step_size:g}{start} for M-PGD / ALP, {optim.optimizer.capitalize()} lr "  # type: ignore[attr-defined]
            f"{_rate(optim.lr)}, {optim.schedule} schedule, batch {optim.batch_size}, "
            f"{_count(optim.epochs, 'epoch')} (black-box sources {_count(source_epochs, 'epoch')}), the demo's λ "
            f"({lams}) (ours)"
        )

    def own_settings(self, row: Row) -> Mapping[str, Any]:
        return row.small

    def row_values(self, preset: Preset, row: Row, folder: bool) -> tuple[dict[str, Any], dict[str, Any]]:
        values = merge(SMALL_BASE, dict(row.small))
        values["model"] = row.small_model or "lenet5"
        return values, ({"image_size": SMALL_FOLDER_SIZE} if folder else {})


class SmokeScale(Scale):
    name = "smoke"
    generates_data = True

    def evaluation(self, preset: Preset, dataset: str, n: int | None, seeds: int) -> ScaleEval:
        points = SMOKE_POINTS if n is None else n
        optim = SMOKE_TRAINING["optim"]
        steps = SMOKE_TRAINING["loss"]["attack_steps"]
        prose = (
            "smoke: generated noise images in the dataset's real format (unless --data-dir), "
            f"{_word(optim['epochs'])} training step of batch {optim['batch_size']}, "
            f"{_word(steps)} attack step, {points} test points, a {_word(len(SMOKE_SUITE))}-attack suite and a minimal "
            "audit; checks the pipeline only, the numbers mean nothing"
        )
        return ScaleEval(
            eps=preset.eps, n=points, paper=preset.attack.spec(preset.eps, steps=1), long=long_attack(preset.eps, steps=2),
            suite_name="smoke", suite=SMOKE_SUITE, targeted_suite=SMOKE_SUITE, audit=SMOKE_AUDIT,
            audit_points=SMOKE_AUDIT_POINTS, substitutions=(prose,),
        )  # fmt: skip

    def row_values(self, preset: Preset, row: Row, folder: bool) -> tuple[dict[str, Any], dict[str, Any]]:
        values, data = super().row_values(preset, row, folder)
        values = merge(values, copy.deepcopy(SMOKE_TRAINING))
        if "attack" in values.get("loss", {}):
            values["loss"]["attack"] = _smoke_attack(values["loss"]["attack"])
        data.update(val_size=2, workers=0)
        if folder:
            data["image_size"] = preset.smoke_size
        return values, data

    def training_splits(self, cfg: RunConfig) -> Splits | None:
        """One step: a training set of one batch."""
        splits = load_dataset(cfg.data.dataset, cfg.data.data_dir, cfg.data.val_size, cfg.seed, **cfg.data.options())
        return replace(splits, train=splits.train.subset(slice(0, cfg.optim.batch_size)))


SCALES: dict[str, Scale] = {s.name: s for s in (SmokeScale(), SmallScale(), FullScale())}


@dataclass(frozen=True, kw_only=True)
class Plan(ScaleEval):
    """A preset at a scale: the evaluation's settings (the configs come from ``reproduce.row_config``)."""

    preset: Preset
    scale: Scale
    dataset: str


def plan_for(preset: Preset, scale: Scale, dataset: str | None, n: int | None, seeds: int) -> Plan:
    """``preset`` at ``scale`` on ``dataset`` (None: the scale's default), ``n`` test points (None: the
    scale's), ``seeds`` training seeds."""
    dataset = dataset or scale.default_dataset(preset)
    ev = scale.evaluation(preset, dataset, n, seeds)
    subs = [f"dataset {dataset} instead of the paper's {preset.dataset} (ours)"] if dataset != preset.dataset else []
    values = {**vars(ev), "substitutions": (*subs, *ev.substitutions)}
    return Plan(**values, preset=preset, scale=scale, dataset=dataset)
