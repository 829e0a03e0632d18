"""Atomic checkpoints: everything a resume needs, in one file replaced by rename after every round.

A checkpoint is written to ``checkpoint/state.pt.tmp``, flushed to disk, then renamed over
``checkpoint/state.pt`` (``os.replace`` is atomic on POSIX), so a run killed at any moment leaves either
the previous round's checkpoint or this round's, never a torn one.
"""

from __future__ import annotations

import os
import random
from pathlib import Path
from typing import Any

import numpy as np
import torch

CHECKPOINT_FILE = "state.pt"
FORMAT_VERSION = 1


def save_checkpoint(directory: Path, payload: dict[str, Any]) -> Path:
    """Write ``payload`` (tensors, plain Python values) atomically to ``directory/state.pt``."""
    directory.mkdir(parents=True, exist_ok=True)
    target = directory / CHECKPOINT_FILE
    tmp = directory / (CHECKPOINT_FILE + ".tmp")
    with tmp.open("wb") as fh:
        torch.save({"format_version": FORMAT_VERSION, **payload}, fh)
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, target)
    dir_fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)
    return target


def load_checkpoint(directory: Path, mmap: bool = False) -> dict[str, Any] | None:
    """The last complete checkpoint in ``directory``, or None when there is none. ``mmap``: tensors stay in the
    file until read (a look at the checkpoint's config and round costs no read of its LoRA and base delta)."""
    path = directory / CHECKPOINT_FILE
    if not path.exists():
        return None
    try:
        payload = torch.load(path, map_location="cpu", weights_only=True, mmap=mmap)
    except Exception as err:  # noqa: BLE001 - a torn or foreign file, whatever torch says about it
        raise ValueError(f"checkpoint {path} cannot be read ({type(err).__name__}: {err}); it was not written by a "
                         "complete save (those are atomic): restore it or start a new run directory") from err
    if not isinstance(payload, dict) or payload.get("format_version") != FORMAT_VERSION:
        version = payload.get("format_version") if isinstance(payload, dict) else None
        raise ValueError(f"checkpoint {path} has format_version={version!r}, expected {FORMAT_VERSION}")
    return payload


def rng_states() -> dict[str, Any]:
    """The process-wide RNG states (Python, NumPy, torch CPU) in a form ``torch.load(weights_only)`` accepts."""
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    return {
        "python": _python_state(),
        "numpy": {"kind": kind, "keys": torch.from_numpy(np.asarray(keys, dtype=np.int64)), "pos": int(pos),
                  "has_gauss": int(has_gauss), "cached": float(cached)},
        "torch": torch.get_rng_state(),
    }


def _python_state() -> dict[str, Any]:
    version, internal, gauss = random.getstate()
    return {"version": version, "internal": list(internal), "gauss": gauss}


def restore_rng_states(states: dict[str, Any]) -> None:
    """Inverse of :func:`rng_states`."""
    py = states["python"]
    random.setstate((py["version"], tuple(py["internal"]), py["gauss"]))
    np_state = states["numpy"]
    np.random.set_state(
        (np_state["kind"], np_state["keys"].numpy().astype(np.uint32), np_state["pos"], np_state["has_gauss"], np_state["cached"])
    )
    torch.set_rng_state(states["torch"])
