"""Run configuration: nested frozen dataclasses, built from YAML/TOML files and CLI overrides.

Unknown keys, wrong types and out-of-range values raise :class:`ConfigError` naming the key.
Numbers may be written as fractions (``eps: 8/255``); nothing is ever ``eval``-ed.
"""

from __future__ import annotations

import dataclasses
import json
import math
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from logitpair.errors import ConfigError
from logitpair.methods.base import MethodConfig
from logitpair.threat import parse_fraction


@dataclass(frozen=True)
class DataConfig:
    dataset: str = "fashion-mnist"
    data_dir: str | None = None
    val_size: int = 5000
    image_size: int = 0  # folder datasets (imagenet, tiny-imagenet): side in pixels; 0 = the dataset's default
    workers: int = 0  # decoding processes for folder datasets (in-memory datasets need none)
    skip_bad: bool = False  # folder datasets: skip unreadable images (counted in the log) instead of failing

    def __post_init__(self) -> None:
        if self.val_size < 0:
            raise ConfigError(f"data.val_size: expected >= 0, got {self.val_size}")
        if self.image_size < 0:
            raise ConfigError(f"data.image_size: expected >= 0, got {self.image_size}")
        if self.workers < 0:
            raise ConfigError(f"data.workers: expected >= 0, got {self.workers}")

    def options(self) -> dict[str, Any]:
        """Loader options for ``load_dataset`` (None = the loader's default / not applicable)."""
        return {"image_size": self.image_size or None, "skip_bad": self.skip_bad or None}


OPTIMIZERS = ("sgd", "adam", "rmsprop", "rmsprop-tf")


@dataclass(frozen=True)
class OptimConfig:
    # sgd | adam | rmsprop (torch.optim.RMSprop) | rmsprop-tf (TensorFlow's RMSProp, the official
    # ALP optimiser: ms initialised to 1, eps inside the square root; training/optim.py)
    optimizer: str = "adam"
    lr: float = 1e-3
    lr_reference_batch: int = 0  # > 0: lr is scaled by batch_size / lr_reference_batch (official: 0.045 per 32)
    momentum: float = 0.9  # SGD momentum / RMSProp momentum
    weight_decay: float = 0.0  # L2: adds weight_decay * w to the gradient (= weight_decay/2 * ||w||^2 in the loss)
    rmsprop_decay: float = 0.9
    rmsprop_eps: float = 1.0  # RMSProp epsilon (the official ALP code uses 1.0 with rmsprop-tf)
    schedule: str = "cosine"  # constant | cosine | step
    step_every: int = 2  # epochs between decays for the step schedule
    step_gamma: float = 0.94
    warmup_epochs: float = 0.0  # linear warm-up from 0 (ours; the official recipe has none)
    epochs: int = 2
    batch_size: int = 128  # the global batch: split over processes and accumulation steps
    accum_steps: int = 1  # gradient accumulation: micro-batches per optimisation step and process

    def __post_init__(self) -> None:
        if self.optimizer not in OPTIMIZERS:
            raise ConfigError(f"optim.optimizer: expected one of {', '.join(OPTIMIZERS)}, got {self.optimizer!r}")
        if self.schedule not in ("constant", "cosine", "step"):
            raise ConfigError(f"optim.schedule: expected constant, cosine or step, got {self.schedule!r}")
        if not self.lr > 0:
            raise ConfigError(f"optim.lr: expected > 0, got {self.lr}")
        if self.epochs < 1:
            raise ConfigError(f"optim.epochs: expected >= 1, got {self.epochs}")
        if self.batch_size < 1:
            raise ConfigError(f"optim.batch_size: expected >= 1, got {self.batch_size}")
        if self.weight_decay < 0:
            raise ConfigError(f"optim.weight_decay: expected >= 0, got {self.weight_decay}")
        if self.step_every < 1:
            raise ConfigError(f"optim.step_every: expected >= 1, got {self.step_every}")
        if self.accum_steps < 1:
            raise ConfigError(f"optim.accum_steps: expected >= 1, got {self.accum_steps}")
        if self.lr_reference_batch < 0:
            raise ConfigError(f"optim.lr_reference_batch: expected >= 0, got {self.lr_reference_batch}")
        if self.warmup_epochs < 0:
            raise ConfigError(f"optim.warmup_epochs: expected >= 0, got {self.warmup_epochs}")


@dataclass(frozen=True)
class RunConfig:
    model: str = "lenet5"
    method: str = "alp"
    seed: int = 0
    checkpoint_every: int = 0  # steps between mid-epoch checkpoints (0: end of epoch only)
    val_points: int = 1000  # validation points attacked each epoch (PGD-10)
    val_attack_steps: int = 10
    # also the robust accuracy under this attack suite (e.g. fast) on the same points each
    # epoch (val_robust; select=best-robust then uses it); "" = PGD only
    val_suite: str = ""
    select: str = "last"  # which weights the run exports: last | best-robust | best-clean
    on_nonfinite: str = "stop"  # stop | skip (skip the batch and count it)
    ema_decay: float = 0.0  # exponential moving average of the weights (official ALP code: 0.9999); 0 = off
    ema_schedule: str = "constant"  # constant | tf: decay min(ema_decay, (1 + t) / (10 + t)) as the official code
    export_weights: str = "ema"  # which weights model.safetensors holds when EMA is on: ema | raw
    # randomness of the losses: per-sample (keyed by seed, epoch and dataset index, so results do
    # not depend on the number of processes) | global (torch's global RNG, the pre-0.2 behaviour)
    noise: str = "per-sample"
    device: str = "cpu"  # cpu | cuda | cuda:N (under torchrun with cuda: cuda:LOCAL_RANK)
    amp: str = "none"  # none | bf16: autocast for the training forward only (attacks stay float32)
    amp_attacks: bool = False  # opt in: training attacks under the same autocast (faster, weaker gradients)
    channels_last: bool = False  # NHWC memory format (GPU convolutions)
    compile: bool = False  # torch.compile the training forward (attacks use the plain module)
    sync_bn: bool = False  # SyncBatchNorm across processes under torchrun
    static_models: str = ""  # comma-separated run directories of frozen source models (ens-adv)
    overfit_guard: float | None = None  # stop when val_pgd drops by more than this many points (None: 20 for FGSM-RS)
    log_every: int = 50  # steps between progress/metric host synchronisations
    tensorboard: bool = False  # also write TensorBoard event logs (optional extra `tensorboard`)
    data: DataConfig = field(default_factory=DataConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    loss: MethodConfig = field(default_factory=MethodConfig)

    def __post_init__(self) -> None:
        from logitpair.methods import METHODS
        from logitpair.models import MODELS

        METHODS.get(self.method)
        MODELS.get(self.model)
        if not 0 <= self.seed < 2**32:  # train() derives generator seeds as seed * 100_003 + epoch
            raise ConfigError(f"seed: expected 0 <= seed < 2**32, got {self.seed}")
        if self.checkpoint_every < 0:
            raise ConfigError(f"checkpoint_every: expected >= 0, got {self.checkpoint_every}")
        if self.val_points < 0:
            raise ConfigError(f"val_points: expected >= 0, got {self.val_points}")
        if self.val_attack_steps < 1:
            raise ConfigError(f"val_attack_steps: expected >= 1, got {self.val_attack_steps}")
        if self.select not in ("last", "best-robust", "best-clean"):
            raise ConfigError(f"select: expected last, best-robust or best-clean, got {self.select!r}")
        if not 0.0 <= self.ema_decay < 1.0:
            raise ConfigError(f"ema_decay: expected 0 <= ema_decay < 1, got {self.ema_decay}")
        if self.on_nonfinite not in ("stop", "skip"):
            raise ConfigError(f"on_nonfinite: expected stop or skip, got {self.on_nonfinite!r}")
        for key, value, choices in (
            ("ema_schedule", self.ema_schedule, ("constant", "tf")),
            ("export_weights", self.export_weights, ("ema", "raw")),
            ("noise", self.noise, ("per-sample", "global")),
            ("amp", self.amp, ("none", "bf16")),
        ):
            if value not in choices:
                raise ConfigError(f"{key}: expected {' or '.join(choices)}, got {value!r}")
        if not (self.device == "cpu" or self.device == "cuda" or self.device.startswith("cuda:")):
            raise ConfigError(f"device: expected cpu, cuda or cuda:N, got {self.device!r}")
        if self.overfit_guard is not None and not self.overfit_guard >= 0:
            raise ConfigError(f"overfit_guard: expected >= 0 (accuracy points), got {self.overfit_guard}")
        if self.log_every < 1:
            raise ConfigError(f"log_every: expected >= 1, got {self.log_every}")

    def static_model_dirs(self) -> list[str]:
        return [p.strip() for p in self.static_models.split(",") if p.strip()]

    def guard_points(self) -> float:
        """The catastrophic-overfitting guard in accuracy points (0 = off): 20 by default for
        FGSM-RS training, as Wong et al. 2020."""
        if self.overfit_guard is not None:
            return self.overfit_guard
        return 20.0 if self.method == "fgsm-rs" or self.loss.attack == "fgsm-rs" else 0.0


def _coerce(value: Any, hint: Any, key: str) -> Any:
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
    if hint is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("true", "false", "yes", "no", "1", "0"):
            return value.lower() in ("true", "yes", "1")
        raise ConfigError(f"{key}: expected true or false, got {_short(value)}")
    if hint is int:
        if isinstance(value, bool) or not isinstance(value, (int, str)):
            raise ConfigError(f"{key}: expected an integer, got {_short(value)}")
        try:
            out = int(value)
        except ValueError:
            raise ConfigError(f"{key}: expected an integer, got {_short(value)}") from None
        if not -(2**63) <= out < 2**63:
            raise ConfigError(f"{key}: integer out of range (|value| >= 2**63): {_short(value)}")
        return out
    if hint is float:
        if isinstance(value, bool) or not isinstance(value, (int, float, str)):
            raise ConfigError(f"{key}: expected a number, got {_short(value)}")
        out = parse_fraction(value, key)
        if not math.isfinite(out):
            raise ConfigError(f"{key}: expected a finite number, got {out}")
        return out
    if hint is str:
        if not isinstance(value, str):
            raise ConfigError(f"{key}: expected a string, got {_short(value)}")
        return value
    raise ConfigError(f"{key}: unsupported type {hint}")  # pragma: no cover


def _short(value: Any, fmt: Any = repr) -> str:
    """``repr`` (or ``fmt``) of a config value, cut to keep error messages to one short line."""
    text = fmt(value)
    return text if len(text) <= 80 else text[:60] + f"... ({len(text)} characters)"


def build(cls: type, values: dict[str, Any], prefix: str = "") -> Any:
    """Build dataclass ``cls`` from a mapping, validating keys and types."""
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted((k for k in values if k not in names), key=repr)  # keys from YAML may be any type
    if unknown:
        key = _short(unknown[0], str if isinstance(unknown[0], str) and unknown[0].isprintable() else repr)
        raise ConfigError(f"unknown config key {prefix}{key}; valid keys: {', '.join(sorted(names))}")
    kwargs = {k: _coerce(v, hints[k], prefix + k) for k, v in values.items()}
    try:
        return cls(**kwargs)
    except TypeError as exc:  # pragma: no cover - defensive
        raise ConfigError(f"{prefix or 'config'}: {exc}") from None


def to_dict(cfg: Any) -> dict[str, Any]:
    return dataclasses.asdict(cfg)


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
    """Defaults, then the file, then CLI overrides (a nested mapping), validated."""
    values: dict[str, Any] = read_config_file(file) if file else {}
    values = merge(values, overrides or {})
    return build(RunConfig, values)
