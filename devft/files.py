"""Writes that leave a good earlier file or folder whole when they fail: JSON through a flushed temporary file
and a rename, a folder through a staging folder swapped into place (run directories, centralised runs)."""

from __future__ import annotations

import json
import math
import os
import shutil
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any


def json_safe(value: Any) -> Any:
    """JSON-safe: non-finite floats become None (JSON has no NaN), tuples become lists."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, Mapping):
        return {str(k): json_safe(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [json_safe(v) for v in value]
    return value


def write_json_atomic(path: Path, data: Any) -> None:
    """Write ``data`` as indented JSON to ``path`` via a temporary file, flushed to disk, and a rename."""
    tmp = path.with_name(path.name + ".tmp")
    with tmp.open("w") as fh:
        fh.write(json.dumps(json_safe(data), indent=2, sort_keys=False) + "\n")
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, path)


def replace_directory(path: Path, write: Callable[[Path], None]) -> None:
    """Fill a fresh staging directory beside ``path`` with ``write(staging)``, then put it in ``path``'s place:
    a crash or an error while writing leaves the earlier ``path`` whole, never a mix of the two."""
    staging, old = path.with_name(f".{path.name}.partial"), path.with_name(f".{path.name}.old")
    for leftover in (staging, old):
        shutil.rmtree(leftover, ignore_errors=True)
    staging.mkdir(parents=True)
    try:
        write(staging)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    if path.exists():
        os.replace(path, old)
    os.replace(staging, path)
    shutil.rmtree(old, ignore_errors=True)
