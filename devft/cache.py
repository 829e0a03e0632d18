"""Where devft keeps what it builds once per machine: converted models, fused submodels, compiled kernels."""

from __future__ import annotations

import os
from pathlib import Path


def cache_root() -> Path:
    """``$DEVFT_CACHE``, or ``~/.cache/devft``."""
    return Path(os.environ.get("DEVFT_CACHE", Path.home() / ".cache" / "devft"))
