"""The devft ServerApp: ``flwr run .`` reads the run config from ``[tool.flwr.app.config]``.

Run-config keys with a dot (``federation.num-rounds``, ``lora.r``) are the run configuration
(:func:`devft.config.config_from_flat`); the keys without one are options of this app:

- ``run-dir``: the run directory (relative paths are resolved against the ServerApp's working directory;
  empty = ``~/devft-runs/<method>-<timestamp>``);
- ``resume``: continue the run in ``run-dir`` from its checkpoint.

``devft simulate`` (:mod:`server.launch`) builds its own ServerApp with :func:`build_server_app`, because
``flwr.simulation.run_simulation`` hands the ServerApp an empty run config.
"""

from __future__ import annotations

import math
import threading
import time
from collections.abc import Callable, Iterable, Mapping
from logging import INFO
from pathlib import Path
from typing import Any

from flwr.app import Context
from flwr.common.logger import log
from flwr.serverapp import Grid, ServerApp

from devft.config import RunConfig, config_from_flat
from devft.data import build_federated_data
from server.global_model import GlobalModel
from server.run_dir import RunDirectory, locked
from server.strategy import DevFTStrategy

RoundCallback = Callable[[dict[str, Any]], None]

app = ServerApp()


def split_run_config(run_config: Mapping[str, Any]) -> tuple[dict[str, Any], dict[str, Any]]:
    """``(app options, config keys)``: keys without a dot are options of the app, the rest run config."""
    options = {k: v for k, v in run_config.items() if "." not in k}
    flat = {k: v for k, v in run_config.items() if "." in k}
    unknown = sorted(set(options) - {"run-dir", "resume"})
    if unknown:
        raise ValueError(f"unknown run-config keys {unknown}: app options are 'run-dir' and 'resume'")
    return options, flat


def loss_text(row: dict[str, Any], key: str, digits: int = 4) -> str:
    """``row[key]`` for a progress line: ``-`` where there is none (a round without evaluation, no replies),
    ``NaN`` for a NaN or an evaluated round's null loss (metrics.jsonl keeps NaN and Inf as null), ``inf``."""
    value = row.get(key)
    if value is None:
        return "NaN" if key == "eval_loss" and row.get("evaluated") else "-"
    if math.isnan(value):
        return "NaN"
    return f"{value:.{digits}f}" if math.isfinite(value) else str(value)


def log_round(row: dict[str, Any]) -> None:
    """One log line per round (the progress display of ``flwr run``)."""
    log(
        INFO,
        "[devft] round %d stage %d (%d layers): clients %d/%d, train loss %s, eval loss %s, up %.2f MB, down %.2f MB, %.1f s",
        row["round"],
        row["stage"],
        row["submodel_layers"],
        row["clients_ok"],
        row["clients_sampled"],
        loss_text(row, "train_loss"),
        loss_text(row, "eval_loss"),
        row["bytes_up"] / 1e6,
        row["bytes_down"] / 1e6,
        row["round_wall_s"],
    )


def run_server(
    grid: Grid,
    config: RunConfig,
    run_dir: Path,
    resume: bool = False,
    on_round: Iterable[RoundCallback] = (),
    global_model: GlobalModel | None = None,
    stop: threading.Event | None = None,
) -> Path:
    """Run (or resume) the whole federated run on ``grid``; write the run directory and its report. ``stop``:
    see :class:`~server.strategy.DevFTStrategy`."""
    from devft.reports import write_report

    if global_model is None:
        global_model = GlobalModel(config, build_federated_data(config.data).test)
    directory = RunDirectory(run_dir)
    with locked(directory.path):
        strategy = DevFTStrategy(config, directory, global_model, resume=resume, on_round=on_round, stop=stop)
        strategy.start(grid=grid)
        report = write_report(directory.path)
    log(INFO, "[devft] run directory: %s", directory.path)
    log(INFO, "[devft] report: %s", report)
    return directory.path


def build_server_app(
    config: RunConfig,
    run_dir: Path,
    resume: bool = False,
    on_round: Iterable[RoundCallback] = (),
    global_model: GlobalModel | None = None,
    stop: threading.Event | None = None,
) -> ServerApp:
    """A ServerApp bound to an already resolved config (what ``devft simulate`` runs)."""
    server_app = ServerApp()

    @server_app.main()
    def _main(grid: Grid, context: Context) -> None:
        run_server(grid, config, run_dir, resume=resume, on_round=on_round, global_model=global_model, stop=stop)

    return server_app


@app.main()
def main(grid: Grid, context: Context) -> None:
    """Entry point under ``flwr run``: config from ``context.run_config``."""
    options, flat = split_run_config(context.run_config)
    config = config_from_flat(flat)
    run_dir = str(options.get("run-dir") or "")
    path = Path(run_dir).expanduser() if run_dir else Path.home() / "devft-runs" / (
        f"{config.federation.method}-{time.strftime('%Y%m%d-%H%M%S')}"
    )
    resume = _flag(options.get("resume", False), "resume")
    run_server(grid, config, path.resolve(), resume=resume, on_round=[log_round])


def _flag(value: object, name: str) -> bool:
    """A run-config switch: a TOML boolean, or true/false, 1/0, yes/no; anything else is refused by name."""
    if isinstance(value, bool):
        return value
    text = str(value).strip().lower()
    if text in ("true", "1", "yes"):
        return True
    if text in ("false", "0", "no", ""):
        return False
    raise ValueError(f"run config {name}={value!r} is not a switch: use true or false")
