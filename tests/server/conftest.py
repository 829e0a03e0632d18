"""Fixtures of the server tests: a private Flower/Ray/devft environment, smoke configs, in-process runs."""

from __future__ import annotations

import shutil
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).parent))  # inprocess_grid, simulation helpers

REPO = Path(__file__).resolve().parents[2]
SMOKE = REPO / "simulations" / "configs" / "smoke.toml"


@pytest.fixture(scope="session")
def private_env() -> Iterator[dict[str, str]]:
    """FLWR_HOME, RAY_TMPDIR and DEVFT_CACHE (its models/ linked to the real cache) in fresh temporary
    directories, telemetry and runtime installs off.

    Applied to this process (in-process runs) and returned for subprocesses. RAY_TMPDIR is short: Ray's
    socket paths must stay under ~107 characters.
    """
    root = Path(tempfile.mkdtemp(prefix="dvft", dir="/tmp"))
    env = {
        "FLWR_HOME": str(root / "flwr"),
        "RAY_TMPDIR": str(root / "ray"),
        "DEVFT_CACHE": str(root / "cache"),
        "FLWR_TELEMETRY_ENABLED": "0",
        "FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION": "1",
        "OMP_NUM_THREADS": "1",
        "RAY_DEDUP_LOGS": "0",
    }
    for key in ("FLWR_HOME", "RAY_TMPDIR", "DEVFT_CACHE"):
        Path(env[key]).mkdir(parents=True)
    from devft.models import cache_root

    models = cache_root() / "models"  # converted base models are shared; built submodels stay private
    if models.exists():
        (Path(env["DEVFT_CACHE"]) / "models").symlink_to(models, target_is_directory=True)
    with pytest.MonkeyPatch.context() as mp:
        for key, value in env.items():
            mp.setenv(key, value)
        yield env
    shutil.rmtree(root, ignore_errors=True)


@pytest.fixture
def one_thread() -> Iterator[None]:
    """One torch thread while a test runs clients in-process (the simulation gives each client one CPU)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture
def smoke_config():
    """``smoke_config(**overrides)``: the smoke config with ``section.field`` overrides."""
    from devft.config import load_config

    def make(**overrides):
        return load_config(SMOKE, {k.replace("__", "."): v for k, v in overrides.items()})

    return make


@pytest.fixture
def run_inprocess(private_env, one_thread):
    """``run_inprocess(config, out, **kw)``: a whole run on the in-process grid (no Ray); returns the grid."""
    from inprocess_grid import InProcessGrid

    from client.app import app as client_app
    from server.app import run_server

    def run(config, out: Path, **kwargs):
        grid = InProcessGrid(client_app, config.data.num_clients)
        run_server(grid, config, out, **kwargs)
        return grid

    return run


@pytest.fixture(scope="session")
def devft_run(private_env, tmp_path_factory):
    """``(config, run_dir, grid)`` of one 4-round, 2-stage DevFT smoke run on the in-process grid.

    Shared by the strategy tests and, as the reference, by the Ray test (``target_eval_loss`` does not change
    what is trained).
    """
    from inprocess_grid import InProcessGrid

    from client.app import app as client_app
    from devft.config import load_config
    from server.app import run_server

    config = load_config(SMOKE, {"federation.target_eval_loss": 100.0})
    out = tmp_path_factory.mktemp("devft") / "run"
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        grid = InProcessGrid(client_app, config.data.num_clients)
        run_server(grid, config, out)
    finally:
        torch.set_num_threads(threads)
    return config, out, grid
