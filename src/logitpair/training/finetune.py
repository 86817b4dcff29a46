"""The network a run starts from: a fresh initialisation, or weights to fine-tune (``init_weights``).

``init_weights`` names a file read with the same safe loaders and layouts as ``--weights``
(:mod:`logitpair.models.weights`): safetensors, or ``.pt``/``.pth`` through
``torch.load(weights_only=True)``. Two kinds:

- **a run of ours**: a ``model.safetensors`` with its ``model.json`` beside it (or the run
  directory). Its checksum is verified, its architecture must be the run's, and its input
  normalisation is kept (our layout);
- **a file from elsewhere**: read in the layout of the run's architecture (torchvision's for
  ``resnet50``, ``resnet101``, ``inceptionv3``), whose input normalisation the run then uses
  (``2x - 1`` for InceptionV3) and records in its model spec.

Every tensor is loaded, except the classifier head (:func:`~logitpair.models.weights.head_keys`)
when the file's has another number of classes than the run's dataset, or none: the head then keeps
its fresh seeded initialisation, which the log says. The run records the file, its SHA-256, what
was loaded, dropped and re-initialised (``LoopState.init``, checkpoints, ``model.json``'s
``init_weights``). A resumed run rebuilds the network from its checkpoint's model spec and never
reads ``init_weights`` again.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from torch import Tensor, nn

from logitpair.checkpoint import load_model, read_model_meta
from logitpair.config import RunConfig
from logitpair.errors import CheckpointError, ConfigError
from logitpair.io import sha256_file
from logitpair.models import create_model
from logitpair.models.weights import OWN_LAYOUT, Layout, head_keys, layout_of, load_into, read_weights, strip_wrappers
from logitpair.progress import Logger

Spec = dict[str, Any]


def start_model(
    cfg: RunConfig, spec: Spec, ckpt: Path | None, log: Logger
) -> tuple[Spec, nn.Module, dict[str, Any] | None]:
    """``(spec, model, init record)`` of a run: built from the checkpoint's spec when resuming
    (``ckpt``; its weights are restored by the caller), else from ``spec`` with ``init_weights``
    loaded if given (the record is None without them)."""
    if ckpt is not None and cfg.init_weights:
        spec = _saved_spec(ckpt) or spec
    if ckpt is not None or not cfg.init_weights:
        return spec, create_model(cfg.model, **spec["kwargs"]), None
    return init_from(cfg, spec, log)


def _saved_spec(ckpt: Path) -> Spec | None:
    try:
        return json.loads((ckpt / "state.json").read_text()).get("model_spec")
    except (OSError, ValueError):
        return None  # restoring the checkpoint says what is wrong with it


def init_from(cfg: RunConfig, spec: Spec, log: Logger) -> tuple[Spec, nn.Module, dict[str, Any]]:
    """The run's network with the weights of ``cfg.init_weights`` (see the module docstring). The
    network is built first, so a re-initialised head is the one a fresh run of this seed has."""
    path, layout, normalize, ours = _source(cfg)
    kwargs = dict(spec["kwargs"])
    if normalize is not None:
        kwargs["normalize"] = normalize
    spec = {**spec, "kwargs": kwargs}
    model = create_model(cfg.model, **kwargs)
    expected = model.state_dict()
    tensors = strip_wrappers(load_model(path).state_dict() if ours else _read(path))
    shape_kwargs = {k: v for k, v in kwargs.items() if k != "num_classes"}
    head = [k for k in head_keys(cfg.model, **shape_kwargs)
            if k not in tensors or tuple(tensors[k].shape) != tuple(expected[k].shape)]  # fmt: skip
    done = load_into(model, tensors, path, layout=layout, keep=head, what=f"{cfg.model} for this run")
    record = {"path": str(path), "sha256": sha256_file(path), "layout": layout.name, **done.to_dict()}
    if head:
        record["head"] = {"file_classes": _classes(tensors, head), "run_classes": kwargs["num_classes"]}
    log(_message(record))
    return spec, model, record


def _source(cfg: RunConfig) -> tuple[Path, Layout, str | None, bool]:
    """The weights file, its layout, the input normalisation its weights expect, and whether it is
    one of our runs (a ``model.safetensors`` with its ``model.json``)."""
    path = Path(cfg.init_weights)
    if path.is_dir():
        path = path / "model.safetensors"
    if not path.is_file():
        raise ConfigError(f"{path}: no such file", option="init_weights")
    meta_path = path.with_suffix(".json")
    if path.suffix == ".safetensors" and meta_path.is_file():  # one of our runs
        model = read_model_meta(meta_path).get("model") or {}
        if model.get("name") != cfg.model:
            raise ConfigError(
                f"{path} holds a {model.get('name')} run's weights; this run trains {cfg.model}", option="init_weights"
            )
        return path, OWN_LAYOUT, (model.get("kwargs") or {}).get("normalize"), True
    layout = layout_of(cfg.model)
    return path, layout, layout.normalize, False


def _read(path: Path) -> dict[str, Tensor]:
    try:
        return read_weights(path)
    except CheckpointError as exc:
        raise ConfigError(str(exc), option="init_weights") from None


def _classes(tensors: dict[str, Tensor], head: list[str]) -> int | None:
    """The number of classes of the file's head (None if the file has none): the first dimension
    of the head's weight matrix."""
    weights = [k for k in head if k in tensors and tensors[k].dim() == 2]
    return int(tensors[weights[-1]].shape[0]) if weights else None


def _message(record: dict[str, Any]) -> str:
    text = (f"init weights: {record['path']} (SHA-256 {record['sha256'][:16]}…, {record['layout']} layout): "
            f"{record['loaded']} tensors loaded")  # fmt: skip
    if record["dropped"]:
        text += f", {len(record['dropped'])} dropped ({', '.join(record['dropped'][:3])}…)"
    if "head" in record:
        h = record["head"]
        had = f"{h['file_classes']} classes" if h["file_classes"] is not None else "no head"
        text += (f"; classifier head re-initialised ({', '.join(record['reinitialized'])}): the file has {had}, "
                 f"this run {h['run_classes']}")  # fmt: skip
    return text
