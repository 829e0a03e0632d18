"""Run ``devft simulate`` in a subprocess (its own session) and make sure no Ray process outlives it."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]


def simulate_cmd(config: Path, out: Path, sets: dict[str, object] | None = None, resume: bool = False) -> list[str]:
    cmd = [sys.executable, "-m", "devft.cli", "simulate", str(config), "--out", str(out)]
    for key, value in (sets or {}).items():
        cmd += ["--set", f"{key}={value}"]
    return cmd + (["--resume"] if resume else [])


def start(cmd: list[str], env: dict[str, str], log: Path) -> subprocess.Popen:
    """Start ``cmd`` in a new session (so it and every Ray process it spawns share one process group)."""
    fh = log.open("w")
    return subprocess.Popen(
        cmd, cwd=REPO, env={**os.environ, **env}, stdout=fh, stderr=subprocess.STDOUT, start_new_session=True
    )


def ray_pids(ray_tmpdir: str) -> list[int]:
    """PIDs of the live processes a test started under its private ``RAY_TMPDIR`` (Ray daemons, actors)."""
    return pids_with_env("RAY_TMPDIR", ray_tmpdir)


def pids_with_env(key: str, value: str) -> list[int]:
    """PIDs of live (not zombie) processes started with ``key=value`` in their environment.

    A test's private directories are in the environment of every process it starts and of their
    descendants (Ray daemons and workers, a local SuperLink), but not in this process's original one.
    """
    needle = f"{key}={value}".encode()
    pids = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit() or int(entry.name) == os.getpid():
            continue
        try:
            environ = (entry / "environ").read_bytes().split(b"\0")
            state = next(line for line in (entry / "status").read_text().splitlines() if line.startswith("State:"))
        except (OSError, StopIteration):
            continue
        if needle in environ and state.split()[1] != "Z":
            pids.append(int(entry.name))
    return pids


def stop(proc: subprocess.Popen, env: dict[str, str]) -> None:
    """Kill the process group of ``proc`` and any Ray daemon of this test's RAY_TMPDIR still alive."""
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    proc.wait(timeout=30)
    kill_with_env("RAY_TMPDIR", env["RAY_TMPDIR"])


def kill_with_env(key: str, value: str, wait_s: float = 20) -> None:
    """SIGKILL, by PID, every process started with ``key=value`` in its environment (see :func:`pids_with_env`)."""
    deadline = time.monotonic() + wait_s
    while (pids := pids_with_env(key, value)) and time.monotonic() < deadline:
        for pid in pids:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        time.sleep(0.5)


def run(cmd: list[str], env: dict[str, str], log: Path, timeout: float = 300) -> int:
    """Run ``cmd`` to completion (killing it after ``timeout``); clean up its Ray; return its exit code."""
    proc = start(cmd, env, log)
    try:
        return proc.wait(timeout=timeout)
    finally:
        stop(proc, env)
