"""An existing Ray cluster (``ray start --head`` on 127.0.0.1) used by ``devft simulate`` and ``flwr run .`` via
``RAY_ADDRESS`` (slow: the cluster takes ~10 s to start, each run 30-50 s on 2 busy cores).

Each run must join that cluster rather than start a Ray of its own, leave it running, and have its clients run
in the cluster's worker processes (which see the environment ``ray start`` saw, e.g. ``DEVFT_CACHE``). The
cluster is stopped by PID: ``ray stop`` would stop every Ray on the machine, not only this test's.
"""

from __future__ import annotations

import json
import math
import shutil
import subprocess
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from deployment_helpers import (
    HOST,
    executable,
    flwr_cli,
    free_port,
    listening,
    process_env,
    smoke_run_config,
    wait_for,
)
from simulation_helpers import kill_with_env, pids_with_env, simulate_cmd, start

REPO = Path(__file__).resolve().parents[2]
SMOKE = REPO / "simulations" / "configs" / "smoke.toml"
TWO_ROUNDS = {"data.num_clients": 2, "federation.num_rounds": 2, "federation.clients_per_round": 2}


@dataclass
class Cluster:
    """A Ray head node started by ``ray start``; its daemons carry ``RAY_TMPDIR=temp_dir`` in their environment."""

    address: str
    port: int
    temp_dir: Path
    cache: Path  # the DEVFT_CACHE of the cluster's processes (its workers run the ClientApps)
    daemons: dict[int, str]

    @property
    def logs(self) -> Path:
        return self.temp_dir / "session_latest" / "logs"

    def drivers(self) -> set[str]:
        """Log files of the driver processes (jobs) that have connected to this cluster."""
        return {p.name for p in self.logs.glob("python-core-driver-*.log")}

    def clear_cache(self) -> None:
        """Forget what earlier runs' clients cached, so a run's clients are seen by what they write."""
        shutil.rmtree(self.cache, ignore_errors=True)

    def alive(self) -> bool:
        return listening(self.port) and set(self.daemons) <= set(pids_with_env("RAY_TMPDIR", str(self.temp_dir)))


def _comm(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/comm").read_text().strip()
    except OSError:
        return ""


@pytest.fixture(scope="module")
def ray_cluster(private_env) -> Iterator[Cluster]:
    root = Path(tempfile.mkdtemp(prefix="dvrc", dir="/tmp"))  # short: Ray's socket paths must stay < 107 chars
    temp_dir, cache = root / "ray", root / "cluster-cache"
    port, client_port, agent_port = free_port(), free_port(), free_port()
    env = {**private_env, "RAY_TMPDIR": str(temp_dir), "DEVFT_CACHE": str(cache)}
    cmd = [executable("ray"), "start", "--head", f"--node-ip-address={HOST}",
           f"--port={port}", "--num-cpus=2", "--include-dashboard=false", f"--temp-dir={temp_dir}",
           f"--object-store-memory={512 * 2**20}", f"--ray-client-server-port={client_port}",
           f"--dashboard-agent-listen-port={agent_port}", "--disable-usage-stats"]
    try:
        proc = subprocess.run(cmd, env=process_env(env), capture_output=True, text=True, timeout=120)
        assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
        daemons = {pid: _comm(pid) for pid in pids_with_env("RAY_TMPDIR", str(temp_dir))}
        daemons = {pid: name for pid, name in daemons.items() if name in ("gcs_server", "raylet")}
        assert sorted(daemons.values()) == ["gcs_server", "raylet"], daemons
        yield Cluster(f"{HOST}:{port}", port, temp_dir, cache, daemons)
    finally:
        kill_with_env("RAY_TMPDIR", str(temp_dir))
        leftover = pids_with_env("RAY_TMPDIR", str(temp_dir))
        shutil.rmtree(root, ignore_errors=True)
        assert not leftover, leftover


@pytest.fixture
def driver_tmp() -> Iterator[Path]:
    """The run's own RAY_TMPDIR: a run that started a Ray of its own would put its session here."""
    path = Path(tempfile.mkdtemp(prefix="dvrd", dir="/tmp"))
    yield path
    kill_with_env("RAY_TMPDIR", str(path))
    shutil.rmtree(path, ignore_errors=True)


def assert_complete(run_dir: Path) -> None:
    """Both rounds (stage 1: 4 layers, stage 2: 8) trained by both clients, evaluated, summarised, saved."""
    table = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [(r["round"], r["stage"], r["submodel_layers"]) for r in table] == [(1, 0, 4), (2, 1, 8)]
    for r in table:
        assert (r["clients_sampled"], r["clients_ok"], r["clients_failed"]) == (2, 2, 0)
        assert r["bytes_up"] > 0 and r["bytes_down"] > 0 and math.isfinite(r["train_loss"])
    assert math.isfinite(table[-1]["eval_loss"])
    assert json.loads((run_dir / "summary.json").read_text())["rounds"] == 2
    assert (run_dir / "adapter" / "adapter_model.safetensors").exists()


def assert_ran_on(cluster: Cluster, driver_tmp: Path, new_drivers: set[str]) -> None:
    assert not list(driver_tmp.rglob("session_*")), "the run started a Ray of its own"
    assert len(new_drivers) == 1, new_drivers  # it joined the cluster as one job
    # The clients built the first stage's submodel in the cluster's worker processes, whose DEVFT_CACHE is the
    # cluster's (cleared before the run), not the run's (the full-depth stage fuses nothing and caches nothing).
    built = list(cluster.cache.glob("submodels/*/layers.safetensors"))
    assert len(built) == 1, f"the clients did not run in the cluster's workers: {built}"
    assert cluster.alive(), "the run shut the cluster down"


@pytest.mark.slow
def test_devft_simulate_joins_the_cluster_in_ray_address(ray_cluster, private_env, driver_tmp, tmp_path):
    out = tmp_path / "run"
    env = {**private_env, "RAY_ADDRESS": ray_cluster.address, "RAY_TMPDIR": str(driver_tmp),
           "DEVFT_CACHE": str(tmp_path / "driver-cache")}
    before = ray_cluster.drivers()
    ray_cluster.clear_cache()
    started = time.monotonic()
    proc = start(simulate_cmd(SMOKE, out, TWO_ROUNDS), env, tmp_path / "log.txt")
    try:
        code = proc.wait(timeout=240)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(timeout=30)
        kill_with_env("RAY_TMPDIR", str(driver_tmp))
    wall_s = time.monotonic() - started
    assert code == 0, (tmp_path / "log.txt").read_text()[-3000:]
    assert_complete(out)
    new = ray_cluster.drivers() - before
    assert_ran_on(ray_cluster, driver_tmp, new)
    assert new.pop().endswith(f"_{proc.pid}.log")  # the job is this very process
    print(f"devft simulate on the cluster: {wall_s:.1f} s")


@pytest.mark.slow
def test_flwr_run_joins_the_cluster_in_ray_address(ray_cluster, private_env, driver_tmp, tmp_path):
    out, flwr_home = tmp_path / "run", tmp_path / "flwr"
    env = {**private_env, "RAY_ADDRESS": ray_cluster.address, "RAY_TMPDIR": str(driver_tmp),
           "DEVFT_CACHE": str(tmp_path / "driver-cache"), "FLWR_HOME": str(flwr_home)}
    args = ["run", ".", "--stream", "--run-config", smoke_run_config(TWO_ROUNDS | {"run-dir": str(out)}),
            "--federation-config", "num-supernodes=2 client-resources-num-cpus=1"]
    before = ray_cluster.drivers()
    ray_cluster.clear_cache()
    started = time.monotonic()
    try:  # flwr run starts a detached local SuperLink (with this environment); it runs the simulation
        code, log = flwr_cli(args, env, timeout=300, log=tmp_path / "flwr-run.log")
        wait_for(lambda: (out / "summary.json").exists(), 60, f"{out / 'summary.json'}\n{log[-3000:]}")
    finally:
        kill_with_env("FLWR_HOME", str(flwr_home))  # the local SuperLink and the simulation process it started
        kill_with_env("RAY_TMPDIR", str(driver_tmp))
    wall_s = time.monotonic() - started
    assert code == 0, log[-3000:]
    assert_complete(out)
    assert_ran_on(ray_cluster, driver_tmp, ray_cluster.drivers() - before)
    assert not pids_with_env("FLWR_HOME", str(flwr_home))
    print(f"flwr run on the cluster: {wall_s:.1f} s")
