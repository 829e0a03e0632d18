"""Stopping a run on request: Ctrl-C during `devft simulate` ends it after the round in progress, with that
round's row and checkpoint written, and `--resume` continues it."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time

import pytest
from conftest import SMOKE
from inprocess_grid import InProcessGrid


def _rows(out):
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def test_a_set_stop_ends_the_run_after_the_round_and_resume_finishes_it(smoke_config, private_env, one_thread,
                                                                        tmp_path):
    from client.app import app as client_app
    from server.app import run_server
    from server.checkpoint import load_checkpoint
    from server.strategy import RunStopped

    config, out, stop = smoke_config(), tmp_path / "run", threading.Event()
    with pytest.raises(RunStopped) as info:  # "Ctrl-C" during round 2
        run_server(InProcessGrid(client_app, 4), config, out, stop=stop,
                   on_round=[lambda row: stop.set() if row["round"] == 2 else None])
    assert (info.value.after_round, info.value.total_rounds) == (2, 4) and "--resume" in str(info.value)
    assert [r["round"] for r in _rows(out)] == [1, 2]
    assert load_checkpoint(out / "checkpoint")["round"] == 2 and not (out / "summary.json").exists()

    run_server(InProcessGrid(client_app, 4), config, out, resume=True)  # the lock was released
    assert [r["round"] for r in _rows(out)] == [1, 2, 3, 4] and (out / "summary.json").exists()


def test_a_stop_during_the_last_round_lets_the_run_finish(smoke_config, private_env, one_thread, tmp_path):
    from client.app import app as client_app
    from server.app import run_server

    out, stop = tmp_path / "run", threading.Event()
    run_server(InProcessGrid(client_app, 4), smoke_config(), out, stop=stop,
               on_round=[lambda row: stop.set() if row["round"] == 4 else None])
    assert (out / "summary.json").exists()  # nothing left to resume: the run completes as usual


def _ctrl_c_reaches_it() -> None:
    """In a child before it runs: SIGINT at its default, as a terminal's foreground job has it, whatever the
    test runner passed on (a runner started in the background hands down an ignored SIGINT)."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)


_CTRL_C_TWICE = """
import os, signal, sys, threading, time
from server.launch import stop_on_interrupt
stop = threading.Event()
with stop_on_interrupt(stop):
    os.kill(os.getpid(), signal.SIGINT)
    time.sleep(0.2)
    print("stop set" if stop.is_set() else "stop not set", flush=True)
    os.kill(os.getpid(), signal.SIGINT)
    time.sleep(5)
    print("still running", flush=True)
"""


def test_first_ctrl_c_sets_the_stop_and_the_second_ends_the_process_at_once():
    done = subprocess.run([sys.executable, "-c", _CTRL_C_TWICE], capture_output=True, text=True, timeout=60,
                          cwd=str(SMOKE.parents[2]), preexec_fn=_ctrl_c_reaches_it)
    assert done.returncode == 130 and done.stdout.splitlines() == ["stop set"], (done.stdout, done.stderr[-1000:])
    assert "second Ctrl-C: stopping now" in done.stderr


def test_ctrl_c_handling_leaves_an_ignored_sigint_and_restores_the_handler():
    from server.launch import stop_on_interrupt

    inherited = signal.getsignal(signal.SIGINT)  # ignored when the test runner runs in the background
    try:
        signal.signal(signal.SIGINT, signal.default_int_handler)  # a foreground process's
        with stop_on_interrupt(threading.Event()):
            assert signal.getsignal(signal.SIGINT) is not signal.default_int_handler
        assert signal.getsignal(signal.SIGINT) is signal.default_int_handler  # restored on the way out
        signal.signal(signal.SIGINT, signal.SIG_IGN)  # a background job's: Ctrl-C is not meant for it
        with stop_on_interrupt(threading.Event()):
            assert signal.getsignal(signal.SIGINT) is signal.SIG_IGN
    finally:
        signal.signal(signal.SIGINT, inherited)


def _start(private_env, out, *extra):
    cmd = [sys.executable, "-m", "devft.cli", "simulate", str(SMOKE), "--out", str(out),
           "--set", "federation.num_rounds=8", *extra]
    # its own process group, as a terminal's foreground job: Ctrl-C reaches every process in it (Ray's too)
    proc = subprocess.Popen(cmd, env={**os.environ, **private_env}, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, cwd=str(SMOKE.parents[2]), start_new_session=True,
                            preexec_fn=_ctrl_c_reaches_it)
    deadline = time.monotonic() + 300
    while not ((out / "metrics.jsonl").exists() and (out / "metrics.jsonl").read_text().strip()):
        assert proc.poll() is None and time.monotonic() < deadline, "the run ended before its first round"
        time.sleep(0.2)
    return cmd, proc


def _ray_processes(private_env) -> list[str]:
    """Processes of the Ray this test's runs started (their command lines name its private RAY_TMPDIR)."""
    found = subprocess.run(["pgrep", "-af", private_env["RAY_TMPDIR"]], capture_output=True, text=True).stdout
    return [line for line in found.splitlines() if "pgrep" not in line]


@pytest.mark.slow
def test_ctrl_c_stops_devft_simulate_after_the_round_and_twice_at_once(private_env, tmp_path):
    from server.checkpoint import load_checkpoint

    # once: the round in progress finishes, is written, and the run ends with status 130
    out = tmp_path / "once"
    cmd, proc = _start(private_env, out)
    try:
        os.killpg(proc.pid, signal.SIGINT)
        _, err = proc.communicate(timeout=180)
    finally:
        proc.kill()
    assert proc.returncode == 130, err[-2000:]
    assert "stopped on request after round" in err and "--resume" in err
    done = len(_rows(out))
    assert 1 <= done < 8 and not (out / "summary.json").exists()
    assert load_checkpoint(out / "checkpoint")["round"] == done
    resumed = subprocess.run(cmd + ["--resume"], env={**os.environ, **private_env}, capture_output=True,
                             text=True, timeout=600, cwd=str(SMOKE.parents[2]))
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert [r["round"] for r in _rows(out)] == list(range(1, 9))

    # twice, in a slow round: the process ends within seconds, without that round; rows and checkpoint agree
    out = tmp_path / "twice"
    cmd, proc = _start(private_env, out, "--set", "train.max_steps=150")
    try:
        os.killpg(proc.pid, signal.SIGINT)
        time.sleep(0.5)
        os.killpg(proc.pid, signal.SIGINT)
        _, err = proc.communicate(timeout=60)
    finally:
        proc.kill()
    assert proc.returncode == 130 and "second Ctrl-C: stopping now" in err, err[-2000:]
    done = len(_rows(out))
    assert load_checkpoint(out / "checkpoint")["round"] == done < 8
    time.sleep(3)
    assert _ray_processes(private_env) == []  # Ray went with the process
