"""simulations/bench/gpu_check.sh gets as far as a machine without a GPU lets it: its preflight's Triton kernel
is defined (which needs a source file) and the preflight stops at the missing CUDA device, saying so."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[2]

pytestmark = [pytest.mark.skipif(torch.cuda.is_available(), reason="on a GPU the whole check would run"),
              pytest.mark.skipif(sys.platform != "linux", reason="a bash script with Linux tools")]


def test_the_preflight_defines_its_kernel_and_stops_at_the_missing_gpu():
    pytest.importorskip("triton")
    proc = subprocess.run([sys.executable, "simulations/bench/gpu_preflight.py"], cwd=ROOT, capture_output=True,
                          text=True, timeout=120, env={**os.environ, "TRITON_INTERPRET": "0"})
    assert proc.returncode == 1, proc.stderr
    assert "preflight: torch sees no CUDA device" in proc.stderr
    assert "preflight: Triton kernel _add_one defined" in proc.stdout and "Traceback" not in proc.stderr


def test_gpu_check_stops_after_the_preflight_and_says_why(tmp_path):
    pytest.importorskip("triton")
    stubs = tmp_path / "bin"
    stubs.mkdir()
    (stubs / "nvidia-smi").write_text("#!/bin/sh\necho 'name, memory.total'\n")  # as on a GPU machine
    (stubs / "nvidia-smi").chmod(0o755)
    (stubs / "python3").write_text(f'#!/bin/sh\nexec "{sys.executable}" "$@"\n')  # the script's python3: ours
    (stubs / "python3").chmod(0o755)
    out = tmp_path / "out"
    env = {**os.environ, "OUT": str(out), "PATH": f"{stubs}:{os.environ['PATH']}"}
    proc = subprocess.run(["bash", "simulations/bench/gpu_check.sh"], cwd=ROOT, capture_output=True, text=True,
                          timeout=180, env=env)
    assert proc.returncode == 1
    log = (out / "gpu.txt").read_text()
    assert "preflight: torch sees no CUDA device" in log and "preflight failed (exit 1)" in log
    assert "preflight: Triton kernel _add_one defined" in log  # before the device check, so a CPU shows it
    assert not (out / "gpu_tests.txt").exists()  # nothing after a failed preflight
