"""Models from elsewhere: a registered architecture with a weights file, or the user's own factory.

A model trained elsewhere has no ``model.json``: nothing records its ε or its dataset, so both
are given (``eps``, and ``dataset`` or ``points``), never defaulted, and the typed run
(:class:`~logitpair.checkpoint.RunInfo`) is built from them. :class:`ExternalModel` describes
one; :meth:`ExternalModel.load_run` gives ``(model, RunInfo)`` like
:func:`~logitpair.checkpoint.load_run` does for a run, so ``evaluate``, ``audit``, ``certify``
and ``transfer`` take either. Example::

    ext = ExternalModel(model="resnet50", weights="resnet50-tv.pth", eps=4 / 255, points="points.npz")
    model, info = ext.load_run()                 # torchvision's layout; ImageNet mean/std inside
    evaluate_run("runs/rn50-tv", EvalOptions(n=100), external=ext, write=True)

- ``model`` + ``weights``: a registered architecture (``logitpair list``); the weights are read
  by :mod:`logitpair.models.weights` (safetensors, or ``.pt``/``.pth`` through
  ``torch.load(weights_only=True)``; torchvision's layout for ``resnet50``, ``resnet101``,
  ``inceptionv3``). The number of classes is read from the file's classifier head, the input
  channels and size from the points, and the input normalisation is the one the layout's weights
  expect (ImageNet mean/std for torchvision's ResNets, ``2x - 1`` for InceptionV3).
- ``model_factory="package.module:function"``: the user's own architecture; ``function()``
  (no arguments) returns the ``nn.Module``. Opt-in: it imports and runs the user's code. Its
  ``weights``, if given, are its own state dict (wrapper prefixes such as ``module.`` removed).
- ``input_normalization`` (``MEAN,STD``, per-channel values, a name or ``none``): the
  normalisation the model expects; it replaces the model's own normalisation layer, never
  stacks on it (:func:`~logitpair.models.layers.set_normalization`). Attacks stay in [0, 1].
- ``points``: the user's test points (:func:`~logitpair.data.points.load_points`) instead of a
  dataset's test split; the labels must be classes of the model.

Before anything is evaluated the model runs on one point: a shape that does not fit, an output
that is not ``(N, classes)`` or a label the model cannot predict is one :class:`ConfigError`.
"""

from __future__ import annotations

import importlib
import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from logitpair.checkpoint import RunInfo, load_run, normalization_of, run_info
from logitpair.data import DATASETS, load_dataset, take
from logitpair.data.points import check_labels, load_points
from logitpair.errors import ConfigError, LogitpairError
from logitpair.io import sha256_file
from logitpair.models import MODELS, create_model
from logitpair.models.layers import normalization_stats, set_normalization
from logitpair.models.weights import OWN_LAYOUT, layout_of, load_into, num_classes_of, read_weights

FORMAT = "logitpair-external-1"


@dataclass(frozen=True)
class ExternalModel:
    """A model from elsewhere and what its figures depend on; see the module docstring.

    Exactly one of ``model`` (a registered architecture, with ``weights``) and ``model_factory``
    (``package.module:function``, ``weights`` optional); ``eps`` (the L∞ radius of its
    evaluations, in [0, 1]); ``dataset`` or ``points`` (with both, ``dataset`` only names the
    points); ``data_dir``: the dataset's folder.
    """

    eps: float | None
    model: str | None = None
    model_factory: str | None = None
    weights: str | None = None
    dataset: str | None = None
    points: str | None = None
    input_normalization: str | None = None
    data_dir: str | None = None

    def __post_init__(self) -> None:
        _check_source(self)
        if self.eps is None:
            raise ConfigError("a model from elsewhere has no recorded eps; give it", option="eps")
        if isinstance(self.eps, bool) or not isinstance(self.eps, (int, float)) or not 0 <= self.eps <= 1:
            raise ConfigError(f"expected an L-inf radius 0 <= eps <= 1, got {self.eps!r}", option="eps")
        if not self.dataset and not self.points:
            raise ConfigError(
                "a model from elsewhere has no recorded dataset; give `dataset` (its test split) or `points` (a file)",
                option="dataset",
            )
        if self.dataset:
            _named(DATASETS, self.dataset, "dataset")

    @property
    def label(self) -> str:
        """The architecture's name, or the factory's ``package.module:function``."""
        return str(self.model or self.model_factory)

    @property
    def name(self) -> str:
        """A short display name: the weights file's stem, else the factory's function name."""
        return Path(self.weights).stem if self.weights else self.label.rpartition(":")[2]

    def load(self, device: str | torch.device = "cpu") -> nn.Module:
        """The model in eval mode on ``device``, checked on one point, with ``meta`` (what
        :func:`~logitpair.checkpoint.run_info` reads) describing it."""
        sample, labels, classes = self._sample()
        net, record = self._build(sample)
        if self.input_normalization is not None:
            net = set_normalization(net, normalization_stats(self.input_normalization, sample.shape[1]))
        width = self._check_fit(net, sample)
        if self.points:
            check_labels(self.points, labels, width)
        elif classes > width:
            raise ConfigError(f"{self.dataset} has {classes} classes, the model only {width} outputs", option="dataset")
        record["normalization"] = normalization_of(net)
        net.meta = self._meta(record, sample)
        return net.to(device).eval()

    def load_run(self, device: str | torch.device = "cpu", eps: float | None = None) -> tuple[nn.Module, RunInfo]:
        """``(model, RunInfo)``; ``eps``: evaluate at this radius instead of ``self.eps``."""
        model = self.load(device)
        return model, run_info(model, where=self.label, eps=eps)

    # ---- steps of load
    def _sample(self) -> tuple[Tensor, Tensor, int]:
        """One input (1, C, H, W), the labels to check (the points'), the dataset's classes."""
        if self.points:
            x, y = load_points(self.points)
            return x[:1], y, 0
        splits = load_dataset(str(self.dataset), self.data_dir, val_size=0)
        x, _ = take(splits.test, 1)
        return x, torch.zeros(0, dtype=torch.long), splits.test.num_classes

    def _build(self, sample: Tensor) -> tuple[nn.Module, dict[str, Any]]:
        """The network with its weights loaded, and the record of where they came from."""
        record: dict[str, Any] = {"weights": self.weights, "sha256": None, "factory": self.model_factory}
        tensors = read_weights(self.weights) if self.weights else {}
        if self.weights:
            record["sha256"] = sha256_file(self.weights)
        layout = layout_of(self.model) if self.model is not None else OWN_LAYOUT
        if self.model is not None:
            try:
                record["kwargs"] = self._kwargs(tensors, sample)
                net = create_model(self.model, **record["kwargs"])
            except (TypeError, ValueError) as exc:  # e.g. images too small for the architecture
                raise ConfigError(f"cannot build {self.model} for images {tuple(sample.shape[1:])}: {exc}",
                                  option="model") from None  # fmt: skip
        else:
            net = _call_factory(str(self.model_factory))
        record["layout"] = layout.name
        if self.weights:
            what = f"{self.label} for images {tuple(sample.shape[1:])}" if self.model else self.label
            record["dropped"] = load_into(net, tensors, str(self.weights), layout=layout, what=what).dropped
        return net, record

    def _kwargs(self, tensors: dict[str, Tensor], sample: Tensor) -> dict[str, Any]:
        """The registered architecture's arguments: channels and size from the points, the
        normalisation of the layout, the number of classes from the file's head."""
        model = str(self.model)
        kwargs: dict[str, Any] = {"in_channels": int(sample.shape[1]), "image_size": int(sample.shape[2])}
        normalize = layout_of(model).normalize
        if normalize is not None:
            kwargs["normalize"] = normalize
        return {"num_classes": num_classes_of(model, tensors, str(self.weights), **kwargs), **kwargs}

    def _check_fit(self, net: nn.Module, sample: Tensor) -> int:
        """The number of classes, after one forward of ``sample``: the points fit the model and
        it returns logits (N, classes)."""
        where = ("points", self.points) if self.points else ("dataset", self.dataset)
        net.eval()
        try:
            with torch.no_grad():
                out = net(sample)
        except Exception as exc:  # noqa: BLE001 - any failure of a (possibly user's) forward is one line
            raise ConfigError(f"{where[1]}: images of shape {tuple(sample.shape[1:])} do not fit {self.label} "
                              f"({type(exc).__name__}: {_line(exc)})", option=where[0]) from None  # fmt: skip
        if not isinstance(out, Tensor) or out.dim() != 2 or len(out) != 1:
            shown = tuple(out.shape) if isinstance(out, Tensor) else type(out).__name__
            raise ConfigError(f"{self.label} returns {shown} for one image, not logits (N, classes)",
                              option="model" if self.model else "model_factory")  # fmt: skip
        return int(out.shape[1])

    def _meta(self, record: dict[str, Any], sample: Tensor) -> dict[str, Any]:
        kwargs = record.pop("kwargs", None) or {"in_channels": int(sample.shape[1]), "image_size": int(sample.shape[2])}
        meta: dict[str, Any] = {
            "format": FORMAT,
            "model": {"name": self.label, "kwargs": kwargs},
            "dataset": self.dataset or f"points:{Path(str(self.points)).name}",
            "eps": self.eps,
            "external": record,
        }
        if self.points:
            meta["points"] = str(self.points)
        if self.data_dir:
            meta["config"] = {"data": {"data_dir": self.data_dir}}
        return meta


def load_subject(
    run_dir: str | Path, external: ExternalModel | None = None, *, device: str | torch.device = "cpu",
    eps: float | None = None, write: bool = False,
) -> tuple[nn.Module, RunInfo]:  # fmt: skip
    """``(model, RunInfo)`` of what a command examines: the run in ``run_dir``, or the model from
    elsewhere ``external``, whose results then go to ``run_dir`` (created with ``write``; a folder
    holding a run of ours is refused, so its own results are never overwritten)."""
    if external is None:
        return load_run(run_dir, device=device, eps=eps)
    run_dir = Path(run_dir)
    if (run_dir / "model.json").is_file() or (run_dir / "checkpoints").is_dir():
        raise ConfigError(f"{run_dir} holds a run; the results of a model from elsewhere go to a folder of their own")
    loaded = external.load_run(device, eps)
    if write:
        run_dir.mkdir(parents=True, exist_ok=True)
    return loaded


# --------------------------------------------------------------------------- checks and the factory
def _check_source(ext: ExternalModel) -> None:
    if (ext.model is None) == (ext.model_factory is None):
        both = "both" if ext.model is not None else "neither"
        raise ConfigError(f"give `model` (a registered architecture) or `model_factory` (your own), got {both}")
    if ext.model is not None:
        _named(MODELS, ext.model, "model")
        if not ext.weights:
            raise ConfigError(f"a registered architecture ({ext.model}) needs its weights file", option="weights")
    else:
        _factory_parts(str(ext.model_factory))
    for option, path in (("weights", ext.weights), ("points", ext.points)):
        if path and not Path(path).is_file():
            raise ConfigError(f"{path}: no such file", option=option)


def _named(registry: Any, name: str, option: str) -> None:
    try:
        registry.get(name)
    except ConfigError as exc:
        raise ConfigError(exc.message, option=option) from None


def _factory_parts(spec: str) -> tuple[str, str]:
    module, sep, attr = spec.partition(":")
    names = [*module.split("."), *attr.split(".")]
    if not sep or not all(n.isidentifier() for n in names):
        raise ConfigError(f"expected package.module:function, got {spec!r}", option="model_factory")
    return module, attr


def import_factory(spec: str) -> Callable[[], Any]:
    """The function ``package.module:function`` names (imported: this runs the module's code)."""
    module, attr = _factory_parts(spec)
    try:
        obj: Any = importlib.import_module(module)
    except ModuleNotFoundError as exc:
        where = f"; is its folder on PYTHONPATH ({os.environ.get('PYTHONPATH') or 'unset'})?"
        raise ConfigError(f"cannot import {module!r}: {exc}{where}", option="model_factory") from None
    except Exception as exc:  # noqa: BLE001 - the user's module failing to import is one line
        raise ConfigError(
            f"importing {module!r} raised {type(exc).__name__}: {_line(exc)}", option="model_factory"
        ) from None
    for part in attr.split("."):
        if not hasattr(obj, part):
            raise ConfigError(f"{module!r} has no {attr!r}", option="model_factory")
        obj = getattr(obj, part)
    if not callable(obj):
        raise ConfigError(f"{spec} is a {type(obj).__name__}, not a function", option="model_factory")
    return obj


def _call_factory(spec: str) -> nn.Module:
    fn = import_factory(spec)
    try:
        net = fn()
    except LogitpairError:
        raise
    except Exception as exc:  # noqa: BLE001 - the user's factory failing is one line
        raise ConfigError(f"{spec}() raised {type(exc).__name__}: {_line(exc)}", option="model_factory") from None
    if not isinstance(net, nn.Module):
        raise ConfigError(f"{spec}() returned a {type(net).__name__}, not a torch.nn.Module", option="model_factory")
    return net


def _line(exc: BaseException) -> str:
    return (str(exc).strip().splitlines() or [type(exc).__name__])[0][:200]
