"""The run directory of docs/design.md §4: metrics.jsonl, summary.json, adapter/, checkpoint/, config.

``metrics.jsonl`` gets one JSON object per round, appended and flushed as the round ends; on resume the
rows after the checkpointed round (written by the killed process after its last checkpoint) are dropped,
so the file always matches the checkpoint.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import socket
import threading
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

from devft.files import json_safe, write_json_atomic
from devft.metrics.rows import METRICS_FILE, read_metrics_file

SUMMARY_FILE = "summary.json"
CONFIG_FILE = "config.json"
ADAPTER_DIR = "adapter"
CHECKPOINT_DIR = "checkpoint"
STAGES_DIR = "stages"


LOCK_FILE = ".devft-lock"
_HELD: dict[Path, list] = {}  # locks this process holds: path → [open lock file, holders]
_HELD_GUARD = threading.Lock()


class RunDirectoryBusy(RuntimeError):
    """Another process is running in this run directory (or its lock cannot be taken)."""


def _acquire(path: Path) -> None:
    with _HELD_GUARD:
        if path in _HELD:
            _HELD[path][1] += 1
            return
        path.mkdir(parents=True, exist_ok=True)
        lock = path / LOCK_FILE
        handle = open(lock, "a+")  # noqa: SIM115 (held until the last holder leaves)
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            handle.seek(0)
            holder = handle.read().strip() or "unknown"
            handle.close()
            raise RunDirectoryBusy(f"run directory {str(path)!r} is in use by another devft run (pid {holder}); "
                                   "wait for it to end, or choose another --out / run-dir") from None
        except OSError as err:
            handle.close()
            raise RunDirectoryBusy(f"cannot lock run directory {str(path)!r} ({lock}: {err}); devft needs "
                                   "flock() there (on NFS: a lock daemon), or choose another --out / run-dir") from err
        handle.seek(0)
        handle.truncate()
        handle.write(f"{os.getpid()} on {socket.gethostname()}\n")
        handle.flush()
        _HELD[path] = [handle, 1]


def _release(path: Path) -> None:
    with _HELD_GUARD:
        entry = _HELD[path]
        entry[1] -= 1
        if entry[1] == 0:  # the last holder of this process: another thread may still have been inside
            del _HELD[path]
            fcntl.flock(entry[0], fcntl.LOCK_UN)
            entry[0].close()


@contextlib.contextmanager
def locked(path: Path) -> Iterator[None]:
    """Hold the run directory ``path`` for this process (an exclusive ``flock`` on ``path/.devft-lock``, the
    holder's pid and host written in it). Re-entrant within the process, across threads: the lock is released
    when the last holder leaves (``devft simulate`` holds it, and so does the ServerApp thread it starts). A
    second run there, whose rows and checkpoints would interleave with this one's, raises
    :class:`RunDirectoryBusy` naming the holder."""
    path = Path(path).resolve()
    _acquire(path)
    try:
        yield
    finally:
        _release(path)


class RunDirectory:
    """Paths and writers of one run directory."""

    def __init__(self, path: Path) -> None:
        self.path = Path(path).resolve()

    @property
    def metrics(self) -> Path:
        return self.path / METRICS_FILE

    @property
    def summary(self) -> Path:
        return self.path / SUMMARY_FILE

    @property
    def adapter(self) -> Path:
        return self.path / ADAPTER_DIR

    @property
    def checkpoint(self) -> Path:
        return self.path / CHECKPOINT_DIR

    @property
    def stages(self) -> Path:
        return self.path / STAGES_DIR

    def has_checkpoint(self) -> bool:
        from server.checkpoint import CHECKPOINT_FILE

        return (self.checkpoint / CHECKPOINT_FILE).exists()

    def prepare(self, resume: bool) -> None:
        """Create the directory; refuse to overwrite a previous run unless resuming it."""
        self.check(resume)
        self.path.mkdir(parents=True, exist_ok=True)
        self.stages.mkdir(exist_ok=True)

    def check(self, resume: bool) -> None:
        """Refuse, creating nothing, a directory that holds a run unless resuming, or lacks one to resume."""
        if not resume and self.path.exists() and (self.metrics.exists() or self.has_checkpoint()):
            raise FileExistsError(
                f"run directory {str(self.path)!r} already holds a run: resume it (devft simulate --resume, "
                "or run config resume=true) or choose another directory"
            )
        if resume and not self.has_checkpoint():
            raise FileNotFoundError(f"--resume: no checkpoint in {str(self.checkpoint)!r}")

    def write_config(self, config: Mapping[str, Any]) -> None:
        write_json_atomic(self.path / CONFIG_FILE, config)

    def append_metrics(self, row: Mapping[str, Any]) -> None:
        with self.metrics.open("a") as fh:
            fh.write(json.dumps(json_safe(row)) + "\n")
            fh.flush()
            os.fsync(fh.fileno())

    def read_metrics(self) -> list[dict[str, Any]]:
        """The rows of metrics.jsonl (:func:`devft.metrics.rows.read_metrics_file`: a last line cut short by
        an interrupted write is left out; any other bad line raises, naming the file and line)."""
        return read_metrics_file(self.metrics) if self.metrics.exists() else []

    def truncate_metrics(self, last_round: int) -> list[dict[str, Any]]:
        """Keep only rows with ``round <= last_round`` (atomically); return them."""
        rows = [r for r in self.read_metrics() if int(r["round"]) <= last_round]
        tmp = self.metrics.with_name(METRICS_FILE + ".tmp")
        tmp.write_text("".join(json.dumps(r) + "\n" for r in rows))
        os.replace(tmp, self.metrics)
        return rows

    def write_summary(self, summary: Mapping[str, Any]) -> None:
        write_json_atomic(self.summary, summary)

    def write_stage(self, stage: int, record: Mapping[str, Any]) -> None:
        """``stages/stage-<s>.json``: the plan of a stage (groups, capacities, similarity matrix …)."""
        write_json_atomic(self.stages / f"stage-{stage}.json", record)
