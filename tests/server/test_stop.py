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


def test_first_ctrl_c_sets_the_stop_and_the_second_interrupts():
    from server.launch import stop_on_interrupt

    stop, before = threading.Event(), signal.getsignal(signal.SIGINT)
    with pytest.raises(KeyboardInterrupt):
        with stop_on_interrupt(stop):
            os.kill(os.getpid(), signal.SIGINT)
            time.sleep(0.1)  # the handler runs in this (the main) thread between bytecodes
            assert stop.is_set()
            os.kill(os.getpid(), signal.SIGINT)
            time.sleep(1)
    assert signal.getsignal(signal.SIGINT) is before  # restored on the way out


@pytest.mark.slow
def test_ctrl_c_stops_devft_simulate_and_resume_continues(private_env, tmp_path):
    out = tmp_path / "run"
    cmd = [sys.executable, "-m", "devft.cli", "simulate", str(SMOKE), "--out", str(out),
           "--set", "federation.num_rounds=8"]
    env = {**os.environ, **private_env}
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            cwd=str(SMOKE.parents[2]))
    try:
        deadline = time.monotonic() + 300
        while not ((out / "metrics.jsonl").exists() and (out / "metrics.jsonl").read_text().strip()):
            assert proc.poll() is None and time.monotonic() < deadline, "the run ended before its first round"
            time.sleep(0.5)
        proc.send_signal(signal.SIGINT)
        _, err = proc.communicate(timeout=180)
    finally:
        proc.kill()
    assert proc.returncode == 130, err[-2000:]
    assert "stopped on request after round" in err and "--resume" in err
    done = len(_rows(out))
    assert 1 <= done < 8 and not (out / "summary.json").exists()
    resumed = subprocess.run(cmd + ["--resume"], env=env, capture_output=True, text=True, timeout=600,
                             cwd=str(SMOKE.parents[2]))
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert [r["round"] for r in _rows(out)] == list(range(1, 9))
