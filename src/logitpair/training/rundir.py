"""The run directory: creating it, checking a resumed run's config, cleaning a killed run's leftovers."""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path
from typing import Any

from logitpair.checkpoint import latest_checkpoint, prune, remove_stale
from logitpair.config import RunConfig, migrate, to_dict
from logitpair.environment import environment
from logitpair.errors import CheckpointError, ConfigError
from logitpair.io import write_json
from logitpair.progress import Logger, null_log

# what a process killed while writing leaves in a run directory: io.atomic_write's
# ``.<name>.tmp-<pid>``, export_model's ``.model.safetensors.tmp``, safetensors' ``.tmpXXXXXX``
_STALE_RE = re.compile(r"^\.(.+\.tmp-\d+|model\.safetensors\.tmp|tmp\w{6})$")


def checked_write(write: Any, path: Path, obj: Any) -> None:
    """``write(path, obj)``, with an OS error (disk full) as one-line :class:`CheckpointError`."""
    try:
        write(path, obj)
    except OSError as exc:
        raise CheckpointError(f"cannot write {path}: {exc.strerror or exc}") from None


def remove_leftovers(out_dir: Path) -> None:
    """Delete the temporary files of a killed run, and the old checkpoint it had no time to
    prune (only one process writes a run at a time)."""
    if out_dir.is_dir():
        for p in out_dir.iterdir():
            if _STALE_RE.match(p.name) and p.is_file():
                p.unlink(missing_ok=True)
        ckpts = out_dir / "checkpoints"
        if ckpts.is_dir():
            remove_stale(ckpts)
            prune(ckpts)


def prepare_run_dir(out_dir: Path, cfg: RunConfig, resume: bool, overwrite: bool, log: Logger = null_log) -> None:
    cfg_path = out_dir / "config.json"
    if resume:
        if cfg_path.is_file():
            try:
                stored = stored_config(cfg_path)
            except (OSError, ValueError) as exc:
                raise ConfigError(f"`resume`: cannot read {cfg_path} ({exc})") from None
            new = to_dict(cfg)
            if stored != new:
                diff = _first_difference(stored, new)
                raise ConfigError(f"`resume`: the config differs from the one stored in {cfg_path} ({diff})")
            remove_leftovers(out_dir)
            if not (out_dir / "env.json").is_file():  # killed right after writing config.json
                checked_write(write_json, out_dir / "env.json", environment())
            return
        if out_dir.exists() and any(not _STALE_RE.match(p.name) for p in out_dir.iterdir()):
            raise ConfigError(f"`resume`: {out_dir} holds no run (no config.json)")
        # a run killed before it wrote config.json saved nothing: start it from the beginning
        remove_leftovers(out_dir)
        log(f"resume: nothing saved in {out_dir} yet; starting the run from the beginning")
    elif out_dir.exists() and any(out_dir.iterdir()):
        if not overwrite:
            raise ConfigError(f"`out` {out_dir}: directory holds {_occupant(out_dir, cfg)}")
        shutil.rmtree(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    checked_write(write_json, cfg_path, to_dict(cfg))
    checked_write(write_json, out_dir / "env.json", environment())


def stored_config(cfg_path: Path) -> Any:
    """A run's ``config.json`` in the current shape (a version-1 config migrated)."""
    return migrate(json.loads(cfg_path.read_text()))


def _occupant(out_dir: Path, cfg: RunConfig) -> str:
    """What the non-empty ``out_dir`` holds, and the options that go on from there."""
    cfg_path = out_dir / "config.json"
    if not cfg_path.is_file():
        return "files; pass `resume` to continue it or `overwrite`"
    try:
        same = stored_config(cfg_path) == to_dict(cfg)
    except (OSError, ValueError):
        same = False
    if not same:
        return "a different run; pass `resume` to continue it or `overwrite`"
    if (out_dir / "train.json").is_file():
        return "a finished run of the same config; pass `resume` to export it again or `overwrite` to train it again"
    last = latest_checkpoint(out_dir / "checkpoints")
    since = f"last checkpoint {last.name}" if last else "no checkpoint yet"
    return f"an unfinished run of the same config ({since}); pass `resume` to continue it or `overwrite` to start again"


def _first_difference(a: Any, b: Any, prefix: str = "") -> str:
    """The first differing key in the config's own field order (``b``'s), e.g. ``method`` before
    the ``loss`` settings it decides."""
    if isinstance(a, dict) and isinstance(b, dict):
        for k in [*b, *(k for k in a if k not in b)]:
            if a.get(k) != b.get(k):
                return _first_difference(a.get(k), b.get(k), f"{prefix}{k}.")
    return f"{prefix.rstrip('.')}: stored {a!r}, now {b!r}"
