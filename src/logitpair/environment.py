"""The environment record written into every run and benchmark result."""

from __future__ import annotations

import platform
import subprocess
from pathlib import Path
from typing import Any

import torch

from logitpair._version import __version__
from logitpair.errors import ConfigError


def parse_device(text: str, option: str = "device") -> torch.device:
    """``cpu``, ``cuda`` or ``cuda:N`` as a device, with one clear error when it is malformed or
    CUDA is not available here."""
    if not (text == "cpu" or text == "cuda" or (text.startswith("cuda:") and text[5:].isdigit())):
        raise ConfigError(f"expected cpu, cuda or cuda:N, got {text!r}", option=option)
    if text != "cpu" and not torch.cuda.is_available():
        raise ConfigError(f"`{option}` {text}: CUDA is not available on this machine (torch {torch.__version__})")
    return torch.device(text)


def environment() -> dict[str, Any]:
    return {
        "logitpair": __version__,
        "python": platform.python_version(),
        "torch": torch.__version__,
        "platform": platform.platform(),
        "machine": platform.machine(),
        "threads": torch.get_num_threads(),
        "cuda": torch.cuda.is_available(),
    }


def source_commit() -> str | None:
    """``git describe --always --dirty`` of the repository this module is in (None outside a git checkout)."""
    try:
        out = subprocess.run(["git", "describe", "--always", "--dirty", "--abbrev=12"], cwd=Path(__file__).parent,
                             capture_output=True, text=True, check=True, timeout=30)  # fmt: skip
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip() or None
