"""``flwr run .`` runs the same ServerApp/ClientApp from ``[tool.flwr.app.config]`` (slow: about a minute).

The run uses a private FLWR_HOME; ``flwr run`` starts a detached local SuperLink there, which this test stops
by PID (with its children) afterwards.
"""

from __future__ import annotations

import json
import os
import subprocess
import time
from pathlib import Path

import pytest
import torch
from deployment_helpers import smoke_run_config
from safetensors.torch import load_file
from simulation_helpers import kill_with_env, pids_with_env, ray_pids

REPO = Path(__file__).resolve().parents[2]


@pytest.mark.slow
def test_flwr_run_matches_devft_simulate(private_env, devft_run, tmp_path):
    env = {**os.environ, **private_env, "FLWR_HOME": str(tmp_path / "flwr")}
    out = tmp_path / "run"
    run_config = smoke_run_config({"federation.target_eval_loss": 100.0, "run-dir": str(out)})
    cmd = ["flwr", "run", ".", "--stream", "--run-config", run_config,
           "--federation-config", "num-supernodes=4 client-resources-num-cpus=1"]
    try:
        proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=400)
        log = proc.stdout + proc.stderr
        deadline = time.monotonic() + 60  # the stream can end a moment before the summary is written
        while not (out / "summary.json").exists() and time.monotonic() < deadline:
            time.sleep(1)
    finally:
        kill_with_env("FLWR_HOME", env["FLWR_HOME"])  # the detached local SuperLink and all it started
        kill_with_env("RAY_TMPDIR", private_env["RAY_TMPDIR"])
    assert (out / "summary.json").exists(), log[-3000:]
    summary = json.loads((out / "summary.json").read_text())
    assert summary["rounds"] == 4 and summary["method"] == "devft"
    _, reference, _ = devft_run  # devft simulate's in-process twin of the same config
    a = load_file(str(out / "adapter" / "adapter_model.safetensors"))
    b = load_file(str(reference / "adapter" / "adapter_model.safetensors"))
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert not pids_with_env("FLWR_HOME", env["FLWR_HOME"])
    assert not ray_pids(private_env["RAY_TMPDIR"])


@pytest.mark.parametrize("value,expected", [(True, True), ("true", True), ("1", True), ("yes", True), (False, False),
                                            ("false", False), ("0", False), ("", False), ("on", None), ("ture", None)])
def test_the_resume_switch_of_flwr_run_is_a_boolean_or_refused_by_name(value, expected):
    from server.app import _flag

    if expected is None:
        with pytest.raises(ValueError, match=f"run config resume={value!r} is not a switch: use true or false"):
            _flag(value, "resume")
    else:
        assert _flag(value, "resume") is expected
