"""Checkpoints and exported models: safetensors for tensors, JSON for everything else.

Nothing is ever unpickled. A training checkpoint is a directory ``checkpoints/ckpt-<step>/``
holding ``model.safetensors``, ``train_state.safetensors`` (optimizer tensors, RNG state),
``state.json`` and ``manifest.json`` (format and SHA-256 of every file). It is written as
``ckpt-<step>.tmp/``, fsynced, then renamed; ``checkpoints/latest`` names the newest complete
one and is itself replaced by an atomic rename. Older checkpoints are removed only after
the new one is complete, by renaming them to ``ckpt-<step>.del/`` first. What a killed
writer leaves (``*.tmp``, ``*.del``) is deleted by the next save. A failed write (disk
full) raises :class:`CheckpointError` and leaves the previous checkpoint and ``latest`` as
they were.

An exported model is ``model.safetensors`` + ``model.json`` (architecture, dataset, method,
resolved config, metrics, package version, SHA-256 of the weights) in the run directory.
"""

from __future__ import annotations

import json
import os
import re
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import Tensor, nn

from logitpair.errors import CheckpointError, ConfigError
from logitpair.io import fsync_dir, sha256_file, write_json, write_text

FORMAT = "logitpair-checkpoint-1"
MODEL_FORMAT = "logitpair-model-1"
PICKLE_SUFFIXES = (".pt", ".pth", ".pkl", ".pickle", ".bin", ".ckpt", ".tar")
_CKPT_RE = re.compile(r"^ckpt-(\d+)$")


# --------------------------------------------------------------------------- tensors <-> files
def _save_tensors(path: Path, tensors: dict[str, Tensor]) -> None:
    save_file({k: v.detach().cpu().contiguous() for k, v in tensors.items()}, str(path))


def _load_tensors(path: Path) -> dict[str, Tensor]:
    try:
        return load_file(str(path), device="cpu")
    except (SafetensorError, OSError, ValueError) as exc:
        raise CheckpointError(f"{path}: not a valid safetensors file ({exc})") from None


def optimizer_state(opt: torch.optim.Optimizer) -> tuple[dict[str, Tensor], dict[str, Any]]:
    """Split an optimizer state dict into tensors and JSON-able values."""
    sd = opt.state_dict()
    tensors: dict[str, Tensor] = {}
    scalars: dict[str, dict[str, Any]] = {}
    for pid, entry in sd["state"].items():
        for k, v in entry.items():
            if isinstance(v, Tensor):
                tensors[f"optim.{pid}.{k}"] = v
            else:
                scalars.setdefault(str(pid), {})[k] = v
    return tensors, {"param_groups": sd["param_groups"], "scalars": scalars}


def restore_optimizer(opt: torch.optim.Optimizer, tensors: dict[str, Tensor], meta: dict[str, Any]) -> None:
    state: dict[int, dict[str, Any]] = {}
    for key, v in tensors.items():
        if key.startswith("optim."):
            _, pid, name = key.split(".", 2)
            state.setdefault(int(pid), {})[name] = v
    for pid, entry in meta["scalars"].items():
        state.setdefault(int(pid), {}).update(entry)
    opt.load_state_dict({"state": state, "param_groups": meta["param_groups"]})


# --------------------------------------------------------------------------- training checkpoints
_STALE_RE = re.compile(r"^(ckpt-\d+\.(tmp|del)|\.latest\.tmp-\d+)$")


def _reason(exc: BaseException) -> str:
    """One line for an OS or safetensors write error."""
    if isinstance(exc, OSError) and exc.strerror:
        return f"{exc.strerror} [Errno {exc.errno}]" if exc.errno else exc.strerror
    return (str(exc).strip().splitlines() or [type(exc).__name__])[0]


def _discard(path: Path) -> None:
    """Remove a checkpoint directory: rename it to ``<name>.del`` first, so that a crash in
    the middle of the removal never leaves a half-deleted ``ckpt-*`` that looks complete."""
    trash = path.with_name(path.name + ".del")
    if trash.exists():
        shutil.rmtree(trash, ignore_errors=True)
    os.replace(path, trash)
    shutil.rmtree(trash, ignore_errors=True)


def remove_stale(root: Path) -> None:
    """Delete what a killed writer left in ``root``: ``ckpt-*.tmp`` / ``ckpt-*.del``
    directories and ``.latest.tmp-*`` files (only one process writes a run at a time)."""
    if not root.is_dir():
        return
    for p in root.iterdir():
        if _STALE_RE.match(p.name):
            if p.is_dir():
                shutil.rmtree(p, ignore_errors=True)
            else:
                p.unlink(missing_ok=True)


def save_checkpoint(
    root: Path, step: int, files: dict[str, dict[str, Tensor]], state: dict[str, Any], keep: int = 2
) -> Path:
    """Write checkpoint ``ckpt-<step>`` under ``root`` atomically and point ``latest`` at it.

    A failed write (disk full, I/O error) raises :class:`CheckpointError` naming the
    checkpoint and the OS error; the previous checkpoint and ``latest`` are left as they
    were and no ``.tmp`` directory remains.
    """
    name = f"ckpt-{step:09d}"
    final = root / name
    tmp = root / f"{name}.tmp"
    pointer = root / "latest"

    def failed(exc: BaseException) -> CheckpointError:
        try:
            prev = pointer.read_text().strip() if pointer.is_file() else None
        except OSError:
            prev = None
        kept = f"the previous checkpoint {prev} is kept" if prev else "no earlier checkpoint exists"
        return CheckpointError(f"cannot write checkpoint {final}: {_reason(exc)}; {kept}")

    try:
        root.mkdir(parents=True, exist_ok=True)
        remove_stale(root)
        tmp.mkdir()
        for fname, tensors in files.items():
            _save_tensors(tmp / f"{fname}.safetensors", tensors)
        (tmp / "state.json").write_text(json.dumps(state, indent=1))
        digests = {}
        for p in sorted(tmp.iterdir()):
            with open(p, "rb+") as f:
                os.fsync(f.fileno())
            digests[p.name] = sha256_file(p)
        write_json(tmp / "manifest.json", {"format": FORMAT, "step": step, "sha256": digests})
        fsync_dir(tmp)
        if final.exists():  # same step saved again, e.g. after resuming from an older checkpoint
            _discard(final)
        os.replace(tmp, final)
        fsync_dir(root)
    except (OSError, SafetensorError) as exc:
        shutil.rmtree(tmp, ignore_errors=True)
        raise failed(exc) from None
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    try:
        write_text(pointer, name + "\n")
    except OSError as exc:
        err = failed(exc)  # ``latest`` still names the previous checkpoint: drop the new one
        shutil.rmtree(final, ignore_errors=True)
        raise err from None
    prune(root, keep)
    return final


def prune(root: Path, keep: int = 2) -> None:
    """Remove all but the ``keep`` newest checkpoints (never the one ``latest`` names)."""
    try:
        current = (root / "latest").read_text().strip()
    except OSError:
        current = None
    complete = sorted(p for p in root.iterdir() if _CKPT_RE.match(p.name))
    for old in complete[:-keep]:
        if old.name != current:
            try:
                _discard(old)
            except OSError:
                pass  # an old checkpoint that cannot be removed now is removed by a later save


def latest_checkpoint(root: Path) -> Path | None:
    """The checkpoint named by ``latest``, else the newest complete ``ckpt-*`` directory."""
    pointer = root / "latest"
    if pointer.is_file():
        cand = root / pointer.read_text().strip()
        if (cand / "manifest.json").is_file():
            return cand
    done = sorted(p for p in root.glob("ckpt-*") if _CKPT_RE.match(p.name) and (p / "manifest.json").is_file())
    return done[-1] if done else None


def load_checkpoint(path: Path) -> tuple[dict[str, dict[str, Tensor]], dict[str, Any]]:
    """Verify the manifest's checksums, then load every safetensors file and ``state.json``."""
    manifest_path = path / "manifest.json"
    try:
        manifest = json.loads(manifest_path.read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise CheckpointError(f"{manifest_path}: missing or unreadable checkpoint manifest ({exc})") from None
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        raise CheckpointError(f"{manifest_path}: not a {FORMAT} manifest")
    for fname, digest in manifest.get("sha256", {}).items():
        fpath = path / fname
        if not fpath.is_file():
            raise CheckpointError(f"{fpath}: listed in the manifest but missing")
        actual = sha256_file(fpath)
        if actual != digest:
            raise CheckpointError(f"{fpath}: checksum mismatch (manifest {digest[:12]}..., file {actual[:12]}...)")
    files = {p.stem: _load_tensors(p) for p in sorted(path.glob("*.safetensors"))}
    state = json.loads((path / "state.json").read_text())
    return files, state


# --------------------------------------------------------------------------- exported models
def export_model(run_dir: Path, model: nn.Module, meta: dict[str, Any]) -> None:
    """Write ``model.safetensors`` then ``model.json`` (with the weights' SHA-256), atomically."""
    weights = run_dir / "model.safetensors"
    tmp = run_dir / ".model.safetensors.tmp"
    try:
        _save_tensors(tmp, model.state_dict())
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        digest = sha256_file(tmp)
        os.replace(tmp, weights)
        write_json(run_dir / "model.json", {"format": MODEL_FORMAT, **meta, "sha256": digest})
    except (OSError, SafetensorError) as exc:
        tmp.unlink(missing_ok=True)
        raise CheckpointError(f"cannot export the model to {run_dir}: {_reason(exc)}") from None


def _check_not_pickle(path: Path) -> None:
    if path.suffix.lower() in PICKLE_SUFFIXES:
        raise CheckpointError(
            f"{path}: refusing to load a pickle-based file ({path.suffix}); unpickling can run code. "
            "logitpair loads only safetensors weights with JSON metadata"
        )
    try:
        head = path.read_bytes()[:4]
    except OSError as exc:
        raise CheckpointError(f"{path}: cannot read ({exc.strerror})") from None
    if head[:1] == b"\x80" or head[:2] == b"PK":
        raise CheckpointError(f"{path}: looks like a pickle or zip archive (torch.save format); refusing to load it")


def build_from_spec(spec: dict[str, Any], source: Path) -> nn.Module:
    from logitpair.models import MODELS, create_model

    if not isinstance(spec, dict) or "name" not in spec:
        raise CheckpointError(f"{source}: metadata has no model architecture ('model.name')")
    if spec["name"] not in MODELS:
        raise CheckpointError(
            f"{source}: unknown model architecture {spec['name']!r}; known: {', '.join(MODELS.names())}"
        )
    kwargs = spec.get("kwargs", {})
    try:
        return create_model(spec["name"], **kwargs)
    except (TypeError, ValueError) as exc:
        raise CheckpointError(f"{source}: cannot build {spec['name']} with {kwargs}: {exc}") from None


def load_weights(model: nn.Module, tensors: dict[str, Tensor], source: Path) -> None:
    """Copy ``tensors`` into ``model`` after checking names and shapes (error names the mismatch)."""
    expected = model.state_dict()
    missing = sorted(set(expected) - set(tensors))
    extra = sorted(set(tensors) - set(expected))
    if missing or extra:
        raise CheckpointError(
            f"{source}: weights do not match the architecture (missing {missing[:3]}, unexpected {extra[:3]})"
        )
    for k, v in expected.items():
        if tuple(tensors[k].shape) != tuple(v.shape):
            raise CheckpointError(
                f"{source}: shape mismatch for {k}: checkpoint {tuple(tensors[k].shape)}, model {tuple(v.shape)}"
            )
    model.load_state_dict(tensors)


def read_model_meta(path: Path) -> dict[str, Any]:
    try:
        meta = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise CheckpointError(f"{path}: unreadable model metadata ({exc})") from None
    if not isinstance(meta, dict) or meta.get("format") != MODEL_FORMAT:
        raise CheckpointError(f"{path}: not {MODEL_FORMAT} metadata")
    return meta


def load_model(path: str | os.PathLike, *, device: str | torch.device = "cpu") -> nn.Module:
    """Load a model from a run directory, a checkpoint directory or a ``model.safetensors`` file.

    Returns an ``nn.Module`` in eval mode on ``device`` (default CPU) that maps [0, 1]
    inputs to logits. ``model.meta`` holds the metadata. Pickle files are refused.
    """
    path = Path(path)
    if not path.exists():
        raise CheckpointError(f"{path}: no such run directory or checkpoint")
    if path.is_file():
        _check_not_pickle(path)
        if path.suffix != ".safetensors":
            raise CheckpointError(f"{path}: expected a run directory, a checkpoint directory or a .safetensors file")
        meta_path = path.with_name(path.name.removesuffix(".safetensors") + ".json")
        return _load_exported(path, meta_path, device)
    if (path / "model.json").is_file():
        return _load_exported(path / "model.safetensors", path / "model.json", device)
    ckpt = path if (path / "manifest.json").is_file() else latest_checkpoint(path / "checkpoints")
    if ckpt is None:
        raise CheckpointError(f"{path}: no model.json and no complete checkpoint found")
    files, state = load_checkpoint(ckpt)
    model = build_from_spec(state.get("model_spec", {}), ckpt)
    load_weights(model, files.get("model", {}), ckpt / "model.safetensors")
    model.meta = {"model": state.get("model_spec"), "config": state.get("config"), "checkpoint": str(ckpt)}
    return model.to(device).eval()


def _load_exported(weights: Path, meta_path: Path, device: str | torch.device) -> nn.Module:
    if not meta_path.is_file():
        raise CheckpointError(f"{meta_path}: model metadata not found next to {weights.name}")
    meta = read_model_meta(meta_path)
    model = build_from_spec(meta.get("model", {}), meta_path)
    if not weights.is_file():
        raise CheckpointError(f"{weights}: weights file not found")
    digest = sha256_file(weights)
    if meta.get("sha256") and digest != meta["sha256"]:
        raise CheckpointError(f"{weights}: checksum mismatch with {meta_path.name} (file modified or corrupt)")
    load_weights(model, _load_tensors(weights), weights)
    model.meta = meta
    return model.to(device).eval()


# --------------------------------------------------------------------------- typed runs
@dataclass(frozen=True)
class RunInfo:
    """What a run's figures depend on, resolved once from its metadata (never from defaults).

    ``dataset`` and ``eps`` (the L-inf radius it was trained for, the default radius of its
    evaluations) are required; so is ``model`` (the architecture's registry name, or a free label
    for a model from elsewhere). ``config`` is the resolved training config (empty for a model
    trained elsewhere); ``data`` the dataset options evaluation uses (``data_dir``,
    ``image_size``, ``skip_bad``, ``workers``: a subset of the config's ``data`` section).
    ``normalization`` is the model's input normalisation ``(mean, std)`` (None: none), read from
    the network itself. ``points``: a file of the user's own test points that replaces the
    dataset's test split (:func:`logitpair.data.points.load_points`; a model from elsewhere,
    :mod:`logitpair.external`). Build it with :meth:`from_meta` / :func:`load_run` for our runs, or
    directly from explicit values for models from elsewhere::

        info = RunInfo(dataset="cifar10", eps=8 / 255, model="my-wrn")
    """

    dataset: str
    eps: float
    model: str
    method: str | None = None
    image_size: int | None = None
    normalization: tuple[tuple[float, ...], tuple[float, ...]] | None = None
    config: dict[str, Any] = field(default_factory=dict)
    data: dict[str, Any] = field(default_factory=dict)
    source: str = ""
    points: str | None = None

    def __post_init__(self) -> None:
        where = self.source or "RunInfo"
        if not isinstance(self.dataset, str) or not self.dataset:
            raise ConfigError(f"{where}: dataset must be a dataset name, got {self.dataset!r}")
        if isinstance(self.eps, bool) or not isinstance(self.eps, (int, float)) or not 0 <= self.eps <= 1:
            raise ConfigError(f"{where}: eps must be a number in [0, 1], got {self.eps!r}")
        if not isinstance(self.model, str) or not self.model:
            raise ConfigError(f"{where}: model must be a name, got {self.model!r}")

    @classmethod
    def from_meta(
        cls, meta: dict[str, Any], *, where: str, module: nn.Module | None = None, eps: float | None = None
    ) -> RunInfo:
        """The one resolver: a run's ``model.json`` (or a checkpoint's state) -> RunInfo. Anything
        a figure depends on that the metadata does not name is one :class:`ConfigError` naming
        ``where``. ``eps``: evaluate at this radius instead of (or, if it names none, in place of)
        the run's training eps."""
        cfg = meta.get("config") or {}
        data = cfg.get("data") or {}
        spec = meta.get("model") or {}
        dataset = meta.get("dataset") or data.get("dataset")
        if not dataset:
            raise ConfigError(f"{where}: its metadata names no dataset; logitpair does not guess which test set to use")
        if eps is None:
            eps = meta.get("eps", (cfg.get("loss") or {}).get("eps"))
        if eps is None:
            raise ConfigError(f"{where}: its metadata names no training eps; give the eps to evaluate at explicitly")
        if not spec.get("name"):
            raise ConfigError(f"{where}: its metadata names no model architecture ('model.name')")
        return cls(
            dataset=str(dataset), eps=float(eps), model=str(spec["name"]), method=meta.get("method") or cfg.get("method"),
            image_size=(spec.get("kwargs") or {}).get("image_size"), normalization=normalization_of(module),
            config=dict(cfg), data={k: data[k] for k in DATA_KEYS if k in data}, source=where,
            points=meta.get("points"),
        )  # fmt: skip


DATA_KEYS = ("data_dir", "image_size", "skip_bad", "workers", "val_size")


def normalization_of(module: nn.Module | None) -> tuple[tuple[float, ...], tuple[float, ...]] | None:
    """The ``(mean, std)`` of the first input-normalisation layer of ``module`` (None if it has none)."""
    for m in module.modules() if module is not None else ():
        mean, std = getattr(m, "mean", None), getattr(m, "std", None)
        if type(m).__name__ == "Normalize" and isinstance(mean, Tensor) and isinstance(std, Tensor):
            return tuple(mean.flatten().tolist()), tuple(std.flatten().tolist())
    return None


def run_info(model: nn.Module, *, where: str = "the model", eps: float | None = None) -> RunInfo:
    """The :class:`RunInfo` of a model loaded by :func:`load_model` (from its ``meta``); ``eps`` as in
    :meth:`RunInfo.from_meta`."""
    meta = getattr(model, "meta", None)
    if not isinstance(meta, dict):
        raise ConfigError(
            f"{where}: a model without logitpair metadata; describe it with RunInfo(dataset=, eps=, model=)"
        )
    return RunInfo.from_meta(meta, where=where, module=model, eps=eps)


def load_run(
    path: str | os.PathLike, *, device: str | torch.device = "cpu", eps: float | None = None
) -> tuple[nn.Module, RunInfo]:
    """``(model, RunInfo)`` of a run directory, checkpoint or ``model.safetensors``: the model as
    :func:`load_model` returns it, and what its figures depend on, resolved once (``eps``: evaluate
    at this radius instead of the training eps)."""
    model = load_model(path, device=device)
    return model, run_info(model, where=str(path), eps=eps)
