"""Run configuration: nested frozen dataclasses, built from YAML/TOML files and CLI overrides.

A run's config is :class:`RunConfig` with the sections ``data`` (:class:`DataConfig`), ``optim``
(:class:`OptimConfig`) and ``loss``: the settings dataclass of the run's method
(``METHODS.settings(method)``, declared next to its loss), so the valid ``loss`` keys depend on
the method. Every field is declared with :func:`logitpair.settings.setting` (default, one line
of help, check, old names); the command line generates its flags from the same fields.

Unknown keys, wrong types and out-of-range values raise :class:`ConfigError` naming the key.
Numbers may be written as fractions (``eps: 8/255``); nothing is ever ``eval``-ed. Configs saved
by version 1 (one ``loss`` section holding every method's settings) are migrated on reading
(:func:`migrate`).
"""

from __future__ import annotations

import dataclasses
import json
import math
import types
import typing
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from logitpair.errors import ConfigError
from logitpair.methods import METHODS, LossSettings
from logitpair.settings import (
    Check,
    above,
    accepted_keys,
    alias_map,
    at_least,
    between,
    canonical_keys,
    check_fields,
    one_of,
    setting,
)
from logitpair.threat import parse_fraction

OPTIMIZERS = ("sgd", "adam", "rmsprop", "rmsprop-tf")
DEVICE = Check(lambda v: v in ("cpu", "cuda") or v.startswith("cuda:"), "cpu, cuda or cuda:N")


@dataclass(frozen=True, kw_only=True)
class DataConfig:
    """Data."""

    dataset: str = setting("fashion-mnist", "dataset name (see `logitpair list`)")
    data_dir: str | None = setting(None, "folder with the dataset's files (None: its standard location)")
    val_size: int | None = setting(
        None,
        "validation images held out of the training set; none given: 10% of it, at most 5000 (recorded in the run)",
        check=at_least(0),
    )
    image_size: int = setting(
        0, "folder datasets (imagenet, tiny-imagenet): side in pixels; 0 = the dataset's default", check=at_least(0)
    )
    workers: int = setting(
        0, "decoding processes for folder datasets (in-memory datasets need none)", check=at_least(0)
    )
    skip_bad: bool = setting(False, "folder datasets: skip unreadable images (counted in the log) instead of failing")

    def __post_init__(self) -> None:
        check_fields(self, "data.")

    def options(self) -> dict[str, Any]:
        """Loader options for ``load_dataset`` (None = the loader's default / not applicable)."""
        return {"image_size": self.image_size or None, "skip_bad": self.skip_bad or None}


@dataclass(frozen=True, kw_only=True)
class OptimConfig:
    """Optimiser and schedule."""

    optimizer: str = setting(
        "adam",
        "sgd, adam, rmsprop (torch.optim.RMSprop) or rmsprop-tf (TensorFlow's RMSProp, the official ALP optimiser: "
        "mean square initialised to 1, eps inside the square root)",
        check=one_of(*OPTIMIZERS),
    )
    lr: float = setting(1e-3, "learning rate", check=above(0))
    lr_reference_batch: int = setting(
        0, "> 0: lr is scaled by batch_size / lr_reference_batch (official: 0.045 per 32)", check=at_least(0)
    )
    momentum: float = setting(0.9, "SGD momentum / RMSProp momentum")
    weight_decay: float = setting(
        0.0, "L2: adds weight_decay * w to the gradient (= weight_decay/2 * ||w||^2 in the loss)", check=at_least(0)
    )
    rmsprop_decay: float = setting(0.9, "RMSProp decay of the mean square")
    rmsprop_eps: float = setting(1.0, "RMSProp epsilon (the official ALP code: 1.0 with rmsprop-tf)")
    schedule: str = setting(
        "cosine", "learning-rate schedule: constant, cosine or step", check=one_of("constant", "cosine", "step")
    )
    step_every: int = setting(2, "epochs between decays of the step schedule", check=at_least(1))
    step_gamma: float = setting(0.94, "decay factor of the step schedule")
    warmup_epochs: float = setting(
        0.0, "linear learning-rate warm-up from 0 (ours; the official recipe has none)", check=at_least(0)
    )
    epochs: int = setting(2, "training epochs", check=at_least(1))
    batch_size: int = setting(128, "the global batch: split over processes and accumulation steps", check=at_least(1))
    accum_steps: int = setting(
        1, "gradient accumulation: micro-batches per optimisation step and process", check=at_least(1)
    )

    def __post_init__(self) -> None:
        check_fields(self, "optim.")


RUN, VALIDATION, EXPORT, HARDWARE, LOGGING = (
    "Run",
    "Validation, selection and guards",
    "Checkpoints and exported weights",
    "Device and speed",
    "Logging",
)


@dataclass(frozen=True, kw_only=True)
class RunConfig:
    """Run."""

    model: str = setting("lenet5", "model name (see `logitpair list`)", group=RUN)
    method: str = setting(
        "alp", "training method (see `logitpair list`); it decides the valid loss settings", group=RUN
    )
    seed: int = setting(0, "random seed", check=Check(lambda v: 0 <= v < 2**32, "0 <= seed < 2**32"), group=RUN)
    static_models: str = setting("", "ens-adv: comma-separated run directories of frozen source models", group=RUN)
    init_weights: str = setting(
        "",
        "fine-tune: start from these weights, a run's model.safetensors or a file from elsewhere (.safetensors, "
        ".pt/.pth read with torch.load(weights_only=True); torchvision's layout for resnet50/101, inceptionv3); "
        "a head for another number of classes is re-initialised; '' = a fresh initialisation",
        group=RUN,
    )
    # randomness of the losses: per-sample (keyed by seed, epoch and dataset index, so results do
    # not depend on the number of processes) | global (torch's global RNG, the pre-0.2 behaviour)
    noise: str = setting(
        "per-sample",
        "randomness of the losses: per-sample (independent of the number of processes) or global (torch's global RNG)",
        check=one_of("per-sample", "global"),
        group=RUN,
    )
    on_nonfinite: str = setting(
        "stop", "on a NaN/inf loss: stop, or skip the batch (and count it)", check=one_of("stop", "skip"), group=RUN
    )
    val_points: int = setting(
        1000, "validation points attacked with PGD each epoch (0 = none)", check=at_least(0), group=VALIDATION
    )
    val_attack_steps: int = setting(10, "steps of the validation PGD", check=at_least(1), group=VALIDATION)
    val_suite: str = setting(
        "",
        "also the robust accuracy under this attack suite (e.g. fast) on the validation "
        "points each epoch (val_robust); '' = PGD only",
        group=VALIDATION,
    )
    select: str = setting(
        "last",
        "exported weights: last, best-robust or best-clean",
        check=one_of("last", "best-robust", "best-clean"),
        group=VALIDATION,
    )
    overfit_guard: float | None = setting(
        None,
        "stop when val PGD accuracy drops by more than this many points (None: 20 for FGSM-RS training, else off)",
        check=Check(lambda v: v >= 0, ">= 0 (accuracy points)"),
        group=VALIDATION,
    )
    checkpoint_every: int = setting(
        0, "steps between mid-epoch checkpoints (0: end of epoch only)", check=at_least(0), group=EXPORT
    )
    ema_decay: float = setting(
        0.0,
        "exponential moving average of the weights (official ALP code: 0.9999); 0 = off",
        check=between(0, 1, open_high=True, symbol="ema_decay"),
        group=EXPORT,
    )
    ema_schedule: str = setting(
        "constant",
        "EMA decay: constant, or tf: min(ema_decay, (1 + t) / (10 + t)) as the official code",
        check=one_of("constant", "tf"),
        group=EXPORT,
    )
    export_weights: str = setting(
        "ema",
        "which weights model.safetensors holds when EMA is on: ema or raw",
        check=one_of("ema", "raw"),
        group=EXPORT,
    )
    device: str = setting(
        "cpu", "cpu, cuda or cuda:N (under torchrun with cuda: cuda:LOCAL_RANK)", check=DEVICE, group=HARDWARE
    )
    amp: str = setting(
        "none",
        "none or bf16: autocast for the training forward only (attacks stay float32)",
        check=one_of("none", "bf16"),
        group=HARDWARE,
    )
    amp_attacks: bool = setting(
        False, "also run the training attacks under amp (faster, weaker gradients)", group=HARDWARE
    )
    channels_last: bool = setting(False, "NHWC memory format (GPU convolutions)", group=HARDWARE)
    compile: bool = setting(False, "torch.compile the training forward (attacks use the plain module)", group=HARDWARE)
    sync_bn: bool = setting(False, "SyncBatchNorm across processes under torchrun", group=HARDWARE)
    log_every: int = setting(
        50, "steps between progress/metric host synchronisations", check=at_least(1), group=LOGGING
    )
    tensorboard: bool = setting(
        False, "also write TensorBoard event logs (optional extra `tensorboard`)", group=LOGGING
    )
    data: DataConfig = field(default_factory=DataConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    loss: LossSettings  # the method's settings dataclass, METHODS.settings(method)

    def __post_init__(self) -> None:
        from logitpair.models import MODELS

        expected = METHODS.settings(self.method)
        MODELS.get(self.model)
        check_fields(self)
        if type(self.loss) is not expected:
            raise ConfigError(f"loss: method {self.method!r} takes {expected.__name__}, got {type(self.loss).__name__}")

    def static_model_dirs(self) -> list[str]:
        return [p.strip() for p in self.static_models.split(",") if p.strip()]

    def guard_points(self) -> float:
        """The catastrophic-overfitting guard in accuracy points (0 = off): 20 by default for
        FGSM-RS training, as Wong et al. 2020."""
        if self.overfit_guard is not None:
            return self.overfit_guard
        return 20.0 if self.loss.uses_fgsm_rs else 0.0


def _coerce(value: Any, hint: Any, key: str) -> Any:
    """``value`` (from a file or the command line) as type ``hint``; one clear error naming ``key``."""
    origin = typing.get_origin(hint)
    if origin in (typing.Union, types.UnionType):
        args = typing.get_args(hint)
        if value is None and type(None) in args:
            return None
        (hint,) = [a for a in args if a is not type(None)]
    if dataclasses.is_dataclass(hint):
        if not isinstance(value, dict):
            raise ConfigError(f"{key}: expected a section (mapping), got {type(value).__name__}")
        return build(hint, value, prefix=f"{key}.")
    coerce = _COERCERS.get(hint)
    if coerce is None:  # pragma: no cover
        raise ConfigError(f"{key}: unsupported type {hint}")
    return coerce(value, key)


def _coerce_bool(value: Any, key: str) -> bool:
    if isinstance(value, bool):
        return value
    if isinstance(value, str) and value.lower() in ("true", "false", "yes", "no", "1", "0"):
        return value.lower() in ("true", "yes", "1")
    raise ConfigError(f"{key}: expected true or false, got {_short(value)}")


def _coerce_int(value: Any, key: str) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, str)):
        raise ConfigError(f"{key}: expected an integer, got {_short(value)}")
    try:
        out = int(value)
    except ValueError:
        raise ConfigError(f"{key}: expected an integer, got {_short(value)}") from None
    if not -(2**63) <= out < 2**63:
        raise ConfigError(f"{key}: integer out of range (|value| >= 2**63): {_short(value)}")
    return out


def _coerce_float(value: Any, key: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float, str)):
        raise ConfigError(f"{key}: expected a number, got {_short(value)}")
    out = parse_fraction(value, key)
    if not math.isfinite(out):
        raise ConfigError(f"{key}: expected a finite number, got {out}")
    return out


def _coerce_str(value: Any, key: str) -> str:
    if not isinstance(value, str):
        raise ConfigError(f"{key}: expected a string, got {_short(value)}")
    return value


_COERCERS: dict[Any, Callable[[Any, str], Any]] = {
    bool: _coerce_bool,
    int: _coerce_int,
    float: _coerce_float,
    str: _coerce_str,
}


def _short(value: Any, fmt: Any = repr) -> str:
    """``repr`` (or ``fmt``) of a config value, cut to keep error messages to one short line."""
    text = fmt(value)
    return text if len(text) <= 80 else text[:60] + f"... ({len(text)} characters)"


def build(cls: type, values: dict[str, Any], prefix: str = "") -> Any:
    """Build dataclass ``cls`` from a mapping, validating keys and types (old names accepted).
    For :class:`RunConfig` the ``loss`` section is built as the method's settings, after
    :func:`migrate`."""
    if cls is RunConfig:
        return _build_run(values)
    return _build(cls, values, prefix)


def _build(cls: type, values: Mapping[Any, Any], prefix: str = "", built: dict[str, Any] | None = None) -> Any:
    values = canonical_keys(cls, values, prefix)
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)} - set(built or {})
    unknown = sorted((k for k in values if k not in names), key=repr)  # keys from YAML may be any type
    if unknown:
        raise ConfigError(f"unknown config key {prefix}{_key(unknown[0])}; valid keys: {', '.join(sorted(names))}")
    kwargs = {k: _coerce(v, hints[k], prefix + k) for k, v in values.items()}
    try:
        return cls(**kwargs, **(built or {}))
    except TypeError as exc:  # pragma: no cover - defensive
        raise ConfigError(f"{prefix or 'config'}: {exc}") from None


def _key(key: Any) -> str:
    return _short(key, str if isinstance(key, str) and key.isprintable() else repr)


def _build_run(values: Mapping[Any, Any]) -> RunConfig:
    values = migrate(values)
    method = _coerce(values.get("method", _default(RunConfig, "method")), str, "method")
    settings = METHODS.settings(method)
    loss = values.get("loss", {})
    if not isinstance(loss, dict):
        raise ConfigError(f"loss: expected a section (mapping), got {type(loss).__name__}")
    _check_loss_keys(method, settings, loss)
    rest = {k: v for k, v in values.items() if k != "loss"}
    return _build(RunConfig, rest, built={"loss": _build(settings, loss, "loss.")})


def _check_loss_keys(method: str, settings: type, loss: Mapping[Any, Any]) -> None:
    """ConfigError for a key of ``loss`` that ``method``'s settings do not take, naming the
    methods that do take it, if any."""
    accepted = accepted_keys(settings)
    unknown = sorted((k for k in loss if k not in accepted), key=repr)
    if not unknown:
        return
    others = [m for m in METHODS.names() if unknown[0] in accepted_keys(METHODS.settings(m))]
    where = f" (a setting of {', '.join(others)})" if others else ""
    valid = ", ".join(sorted(f.name for f in dataclasses.fields(settings)))
    raise ConfigError(f"unknown config key loss.{_key(unknown[0])}{where}; valid keys for method {method!r}: {valid}")


def _default(cls: type, name: str) -> Any:
    return {f.name: f.default for f in dataclasses.fields(cls)}[name]


# Version 1 (MethodConfig) wrote every method's settings into ``loss``; a loss section holding all
# of its first fields is one it saved (the current settings classes each hold only some of them).
V1_LOSS_KEYS = frozenset({"lam", "eps", "attack_steps", "attack_step_size", "attack_random_start", "noise_std",
                          "distance", "pair_reduction", "ce_reduction", "label_smoothing"})  # fmt: skip
# v1's ls read its delta from ``smoothing`` and ignored ``label_smoothing``; every other method
# read ``label_smoothing`` and ignored ``smoothing`` (now an old name of ``label_smoothing``).
V1_RENAMES: dict[str, dict[str, str]] = {"ls": {"smoothing": "label_smoothing"}}
# settings a method takes now but ignored in v1 (v1's regular trained on clean inputs whatever noise_std
# said): migrated to their default
V1_IGNORED: dict[str, frozenset[str]] = {"regular": frozenset({"noise_std"})}


def migrate(values: Any, method: Any = None) -> Any:
    """``values`` in the current shape. A version-1 config (recognised by its ``loss`` section,
    see ``V1_LOSS_KEYS``) keeps in ``loss`` what its method read, under the current names; the
    settings of other methods, which v1 ignored, are dropped. ``method``: the run's method if
    not the one in ``values`` (a CLI override). Anything else is returned as it is."""
    loss = values.get("loss") if isinstance(values, Mapping) else None
    if method is None and isinstance(values, Mapping):
        method = values.get("method", _default(RunConfig, "method"))
    if not (isinstance(loss, dict) and V1_LOSS_KEYS <= loss.keys() and isinstance(method, str) and method in METHODS):
        return values
    settings = METHODS.settings(method)
    kept = {k: _default(settings, k) if k in V1_IGNORED.get(method, ()) else v for k, v in loss.items()}
    return {**values, "loss": _v1_loss(kept, settings, V1_RENAMES.get(method, {}))}


def _v1_loss(loss: dict[str, Any], settings: type, renames: dict[str, str]) -> dict[str, Any]:
    names, aliases = {f.name for f in dataclasses.fields(settings)}, alias_map(settings)
    out = {}
    for key, value in loss.items():
        target = renames.get(key, aliases.get(key, key))
        if target not in names:
            continue  # another method's setting
        if key not in renames and (target in renames.values() or (key != target and target in loss)):
            continue  # a field v1 ignored for this method, or an old name beside its field
        out[target] = value
    return out


def loss_for(method: str, values: Mapping[str, Any]) -> dict[str, Any]:
    """The entries of a ``loss`` mapping that ``method`` takes (for settings shared by several
    runs, e.g. a preset's table-wide ``loss``, applied to the methods that have them)."""
    accepted = accepted_keys(METHODS.settings(method))
    return {k: v for k, v in values.items() if k in accepted}


# Run fields added after the configs that runs have saved: written only when set, so a saved
# config.json (and a reproduce run's digest) compares equal to the same config read today.
OMITTED_AT_DEFAULT = ("init_weights",)


def to_dict(cfg: Any) -> dict[str, Any]:
    out = dataclasses.asdict(cfg)
    if isinstance(cfg, RunConfig):
        for name in OMITTED_AT_DEFAULT:
            if out[name] == _default(RunConfig, name):
                del out[name]
    return out


def merge(base: dict[str, Any], override: dict[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for k, v in override.items():
        if isinstance(v, dict) and isinstance(out.get(k), dict):
            out[k] = merge(out[k], v)
        else:
            out[k] = v
    return out


def read_config_file(path: str | Path) -> dict[str, Any]:
    """Read a YAML (``.yaml``/``.yml``), TOML (``.toml``) or JSON config file into a mapping."""
    path = Path(path)
    try:
        text = path.read_text()
    except OSError as exc:
        raise ConfigError(f"{path}: cannot read config file ({exc.strerror})") from None
    except UnicodeDecodeError:
        raise ConfigError(f"{path}: config file is not UTF-8 text") from None
    try:
        if path.suffix == ".toml":
            try:
                import tomllib
            except ImportError:  # Python 3.10
                import tomli as tomllib  # type: ignore[no-redef]
            data = tomllib.loads(text)
        elif path.suffix == ".json":
            data = json.loads(text)
        else:
            import yaml

            data = yaml.safe_load(text)
    except Exception as exc:  # noqa: BLE001 - every parser error becomes one line
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise ConfigError(f"{path}: cannot parse config file: {first}") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: expected a mapping at the top level, got {type(data).__name__}")
    return data


def make_config(file: str | Path | None = None, overrides: dict[str, Any] | None = None) -> RunConfig:
    """Defaults, then the file (migrated if version 1), then CLI overrides (a nested mapping), validated."""
    overrides = overrides or {}
    values: dict[str, Any] = read_config_file(file) if file else {}
    values = migrate(values, method=overrides.get("method"))
    return build(RunConfig, merge(values, overrides))
