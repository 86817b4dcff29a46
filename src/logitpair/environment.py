"""The environment record written into every run and benchmark result."""

from __future__ import annotations

import platform
from typing import Any

import torch

from logitpair._version import __version__


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
