"""Weight files from elsewhere: the safe formats, the key layouts, the classifier head.

**Formats.** ``.safetensors`` (tensors only, nothing to execute) and ``.pt`` / ``.pth``, read
*only* through ``torch.load(weights_only=True)``: its unpickler builds tensors, numbers,
strings and containers and refuses any other object, so a pickled payload (``__reduce__``
calling a function) is refused before it runs. This relaxes, for weight files the user names,
the rule that nothing is unpickled; checkpoints of our own runs stay safetensors only
(:mod:`logitpair.checkpoint`). The file holds a state dict (name -> tensor), or a dict with
one of :data:`STATE_KEYS` holding it (a training checkpoint's usual shape).

**Layouts.** Our ResNet-50/101 and InceptionV3 are built with torchvision's module names
(``conv1``, ``bn1``, ``layer1.0.conv1``, ``layer1.0.downsample.0``, ``fc``; ``Conv2d_1a_3x3.conv``,
``Mixed_5b.branch5x5_1.bn``, ``AuxLogits.conv1.conv``, ``fc``: the table :data:`TORCHVISION_NAMES`
lists them), so torchvision's key of every tensor *is* our key and the mapping on names is the
identity. What differs between a torchvision state dict and our model is handled here:

- the prefix of a wrapper: ``module.`` (``DataParallel`` / DDP), ``_orig_mod.`` (``torch.compile``);
- the auxiliary head: torchvision's ``inception_v3`` state dicts always carry ``AuxLogits.*``;
  our InceptionV3 has that head only with ``aux_logits=True`` (its forward never uses it), so
  these keys are dropped (and reported) when the model has no such head;
- ``*.num_batches_tracked``, missing from state dicts saved before PyTorch 0.4.1 (the first
  torchvision ResNet files): left at 0; they never change an evaluation;
- the **input normalisation** the weights expect (:class:`Layout`): ImageNet mean/std for
  torchvision's ResNets (our ResNet v1 default), ``2x - 1`` for Inception-family weights
  (torchvision's ``inception_v3`` weights are ported from TensorFlow and expect ``[-1, 1]``;
  its ``transform_input`` maps ImageNet-normalised inputs back there), where our InceptionV3
  normalises with ImageNet mean/std by default.

Any other registered architecture reads its own (our) layout. Missing or unexpected keys are
one :class:`CheckpointError` naming the file and the first few of each; so is a shape mismatch.
"""

from __future__ import annotations

import re
import warnings
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file
from torch import Tensor, nn

from logitpair.errors import CheckpointError
from logitpair.models.registry import create_model

WEIGHT_SUFFIXES = (".safetensors", ".pt", ".pth")
STATE_KEYS = ("state_dict", "model_state_dict", "model")  # a checkpoint dict holding the state dict
WRAPPER_PREFIXES = ("module.", "_orig_mod.")
SHOWN = 5  # keys listed in an error


@dataclass(frozen=True)
class Layout:
    """How weights from elsewhere for one architecture are read.

    ``name``: whose key layout (``torchvision``, or ``logitpair`` for our own); ``normalize``: the
    input normalisation the weights expect, a key of
    :data:`~logitpair.models.layers.NORMALIZATIONS` (None: the architecture's own default);
    ``optional``: key prefixes a file may carry that the model may lack (dropped, reported).
    """

    name: str
    normalize: str | None = None
    optional: tuple[str, ...] = ()


OWN_LAYOUT = Layout("logitpair")
LAYOUTS: dict[str, Layout] = {
    "resnet50": Layout("torchvision", "imagenet"),
    "resnet101": Layout("torchvision", "imagenet"),
    "inceptionv3": Layout("torchvision", "inception", optional=("AuxLogits.",)),
}

# torchvision's module names, as our networks spell them (the mapping is the identity): the stem,
# one block of each stage and the head. ``tests/test_weights.py`` checks each against our models.
TORCHVISION_NAMES: dict[str, tuple[str, ...]] = {
    "resnet": ("conv1", "bn1", "layer1.0.conv1", "layer1.0.bn3", "layer1.0.downsample.0", "layer1.0.downsample.1",
               "layer4.2.conv3", "fc"),
    "inceptionv3": ("Conv2d_1a_3x3.conv", "Conv2d_1a_3x3.bn", "Conv2d_4a_3x3.conv", "Mixed_5b.branch5x5_1.conv",
                    "Mixed_5b.branch_pool.bn", "Mixed_6a.branch3x3dbl_3.conv", "Mixed_6e.branch7x7dbl_5.conv",
                    "AuxLogits.conv0.conv", "AuxLogits.conv1.bn", "AuxLogits.fc", "Mixed_7a.branch7x7x3_4.conv",
                    "Mixed_7c.branch3x3dbl_3b.conv", "fc"),
}  # fmt: skip


def layout_of(model_name: str) -> Layout:
    """The layout weights from elsewhere have for the registered architecture ``model_name``."""
    return LAYOUTS.get(model_name, OWN_LAYOUT)


# --------------------------------------------------------------------------- reading files
def read_weights(path: str | Path) -> dict[str, Tensor]:
    """The state dict in ``path`` (safetensors, or ``.pt``/``.pth`` through
    ``torch.load(weights_only=True)``), on the CPU; :class:`CheckpointError` naming the file
    for anything else: another suffix, an unreadable or corrupt file, a pickled object that is
    not a tensor or a plain container (refused before it is built, so a payload never runs), or
    content that is not a state dict."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path}: no such weights file")
    suffix = path.suffix.lower()
    if suffix not in WEIGHT_SUFFIXES:
        raise CheckpointError(f"{path}: expected a weights file {', '.join(WEIGHT_SUFFIXES)}, got {suffix or 'none'!r}")
    if suffix == ".safetensors":
        try:
            return load_file(str(path), device="cpu")
        except (SafetensorError, OSError, ValueError) as exc:
            raise CheckpointError(f"{path}: not a valid safetensors file ({_first_line(exc)})") from None
    return state_dict_of(_torch_load(path), path)


def _torch_load(path: Path) -> Any:
    """``torch.load(path, weights_only=True)`` with every failure as one line naming the file."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # e.g. "Detected pickle protocol 4": the refusal below says what matters
            return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001 - the unpickler raises many types; each is one line here
        raise _load_error(path, exc) from None


def _load_error(path: Path, exc: Exception) -> CheckpointError:
    """What a failed ``torch.load(weights_only=True)`` means, in one line naming the file."""
    text = str(exc)
    rule = ".pt/.pth files are read only with torch.load(weights_only=True), which never runs pickled code"
    if "Weights only load failed" not in text:
        return CheckpointError(f"{path}: not a readable torch.save file ({type(exc).__name__}: {_first_line(exc)})")
    found = re.search(r"Unsupported global: GLOBAL (\S+)", text)
    if found:
        return CheckpointError(
            f"{path}: refusing to load it: it pickles {found.group(1).rstrip('.')}, which is not a tensor or a plain "
            f"container; {rule}"
        )
    found = re.search(r"(Unsupported operand[^\n]*|unsupported[^\n]*)", text)
    reason = f" ({found.group(1).strip().rstrip('.')})" if found else ""
    return CheckpointError(f"{path}: refusing to load it: not a weights-only torch.save file{reason}; {rule}")


def state_dict_of(obj: Any, source: str | Path) -> dict[str, Tensor]:
    """``obj`` as a state dict: a mapping of names to tensors, or a dict holding one under a key
    of :data:`STATE_KEYS`."""
    if isinstance(obj, Mapping):
        for key in STATE_KEYS:
            inner = obj.get(key)
            if isinstance(inner, Mapping) and inner and all(isinstance(v, Tensor) for v in inner.values()):
                obj = inner
                break
    if not isinstance(obj, Mapping) or not obj:
        raise CheckpointError(f"{source}: holds a {type(obj).__name__}, not a state dict (names -> tensors)")
    bad = [str(k) for k, v in obj.items() if not isinstance(k, str) or not isinstance(v, Tensor)]
    if bad:
        raise CheckpointError(
            f"{source}: not a state dict: entries that are not tensors ({', '.join(bad[:SHOWN])}); "
            f"a checkpoint dict must hold its weights under one of {', '.join(STATE_KEYS)}"
        )
    return dict(obj)


def _first_line(exc: BaseException) -> str:
    return (str(exc).strip().splitlines() or [type(exc).__name__])[0][:200]


# --------------------------------------------------------------------------- matching a model
def strip_wrappers(tensors: Mapping[str, Tensor]) -> dict[str, Tensor]:
    """Remove the prefixes of wrappers (``module.``, ``_orig_mod.``) that every key shares."""
    out = dict(tensors)
    changed = True
    while changed and out:
        changed = False
        for prefix in WRAPPER_PREFIXES:
            if all(k.startswith(prefix) for k in out):
                out = {k[len(prefix) :]: v for k, v in out.items()}
                changed = True
    return out


@dataclass
class Loaded:
    """What :func:`load_into` did: tensors copied, keys dropped (optional in the layout, absent in
    the model) and keys left as the model had them (``keep``: the re-initialised head)."""

    loaded: list[str] = field(default_factory=list)
    dropped: list[str] = field(default_factory=list)
    kept: list[str] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return {"loaded": len(self.loaded), "dropped": self.dropped, "reinitialized": self.kept}


def load_into(
    model: nn.Module, tensors: Mapping[str, Tensor], source: str | Path, *, layout: Layout = OWN_LAYOUT,
    keep: Iterable[str] = (), what: str = "the model",
) -> Loaded:  # fmt: skip
    """Copy the state dict ``tensors`` (read from ``source``, in ``layout``) into ``model``.

    Wrapper prefixes are removed and the layout's optional keys the model lacks dropped; the keys
    in ``keep`` are left as the model has them (the head of a fine-tuned run) whatever the file
    holds. Every other key must be present with the model's shape: else one
    :class:`CheckpointError` naming ``source``, ``what`` and the first few missing, unexpected or
    mismatched keys."""
    expected = model.state_dict()
    tensors = strip_wrappers(tensors)
    keep = set(keep)
    dropped = sorted(k for k in tensors if k not in expected and k.startswith(layout.optional))
    given = {k: v for k, v in tensors.items() if k not in keep and k not in dropped}
    optional = {k for k in expected if k.endswith(".num_batches_tracked")} | keep
    missing = sorted(k for k in expected if k not in given and k not in optional)
    extra = sorted(k for k in given if k not in expected)
    if missing or extra:
        raise CheckpointError(f"{source}: the weights do not fit {what} ({layout.name} layout): "
                              f"{_listed('missing', missing)}; {_listed('unexpected', extra)}")  # fmt: skip
    wrong = [f"{k} (file {tuple(v.shape)}, model {tuple(expected[k].shape)})" for k, v in given.items()
             if tuple(v.shape) != tuple(expected[k].shape)]  # fmt: skip
    if wrong:
        raise CheckpointError(f"{source}: shape mismatch with {what}: {', '.join(wrong[:SHOWN])}"
                              + (f" and {len(wrong) - SHOWN} more" if len(wrong) > SHOWN else ""))  # fmt: skip
    model.load_state_dict(given, strict=False)
    return Loaded(loaded=sorted(given), dropped=dropped, kept=sorted(keep & set(expected)))


def _listed(kind: str, keys: list[str]) -> str:
    if not keys:
        return f"none {kind}"
    more = f" and {len(keys) - SHOWN} more" if len(keys) > SHOWN else ""
    return f"{len(keys)} {kind} ({', '.join(keys[:SHOWN])}{more})"


# --------------------------------------------------------------------------- the classifier head
def _heads(model_name: str, **kwargs: Any) -> dict[str, tuple[int, int]]:
    """Head key -> (its number of dimensions, the class dimension) of the registered architecture:
    the keys whose shape differs between builds for 2 and 3 classes on the ``meta`` device (no
    memory, no initialisation cost)."""
    with torch.device("meta"):
        two = create_model(model_name, num_classes=2, **kwargs).state_dict()
        three = create_model(model_name, num_classes=3, **kwargs).state_dict()
    heads = {}
    for key, v in two.items():
        diff = [i for i, (a, b) in enumerate(zip(v.shape, three[key].shape)) if a != b]
        if diff:
            heads[key] = (v.dim(), diff[0])
    return heads


def head_keys(model_name: str, **kwargs: Any) -> tuple[str, ...]:
    """The state-dict keys of the registered architecture whose shape depends on the number of
    classes: its classifier head (``fc.weight``, ``fc.bias``; with InceptionV3's auxiliary head
    also ``AuxLogits.fc.*``)."""
    return tuple(_heads(model_name, **kwargs))


def num_classes_of(model_name: str, tensors: Mapping[str, Tensor], source: str | Path, **kwargs: Any) -> int:
    """The number of classes the state dict ``tensors`` has for the registered architecture: the
    size of the class dimension of its head (:func:`head_keys`)."""
    tensors = strip_wrappers(tensors)
    heads = _heads(model_name, **kwargs)
    for key, (ndim, dim) in heads.items():
        if key in tensors and tensors[key].dim() == ndim:
            return int(tensors[key].shape[dim])
    raise CheckpointError(f"{source}: no classifier head of {model_name} in the file (none of {', '.join(heads)})")
