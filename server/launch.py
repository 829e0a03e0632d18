"""``devft simulate``: run the ServerApp and ClientApp on Flower's simulation engine (Ray backend).

The config is validated and the server's model built *before* Ray starts, so a bad config fails in
seconds with the field and the value in the message. A rich progress bar shows, per round, the stage, the
submodel's layers, the losses and the bytes moved.

Ray: a private local one (loopback, ``os.cpu_count()`` CPUs, 512 MiB object store), or, when ``RAY_ADDRESS`` is
set, the cluster there (joined, not started, and left running; its workers run the ClientApps with the
environment ``ray start`` had). ``tests/server/test_ray_cluster.py`` checks the second case.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import shutil
import signal
import sys
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

from devft.config import RunConfig
from devft.data import build_federated_data
from server.global_model import GlobalModel
from server.run_dir import (
    ADAPTER_DIR,
    CHECKPOINT_DIR,
    METRICS_FILE,
    STAGES_DIR,
    SUMMARY_FILE,
    RunDirectory,
    locked,
)

log = logging.getLogger(__name__)

_RUN_ARTIFACTS = (METRICS_FILE, SUMMARY_FILE, "config.json", "report.md", ADAPTER_DIR, CHECKPOINT_DIR, STAGES_DIR, "plots")


def backend_config(config: RunConfig) -> dict[str, Any]:
    """Ray backend settings: client resources from the config; an existing cluster via ``RAY_ADDRESS``."""
    init_args: dict[str, Any] = {"include_dashboard": False, "logging_level": "WARNING", "log_to_driver": True}
    if os.environ.get("RAY_ADDRESS"):
        init_args["address"] = os.environ["RAY_ADDRESS"]
    else:
        init_args["num_cpus"] = os.cpu_count() or 1
        init_args["_node_ip_address"] = "127.0.0.1"  # a private local cluster: advertise loopback only
        init_args["object_store_memory"] = 512 * 2**20
    return {
        "client_resources": {"num_cpus": config.federation.client_cpus, "num_gpus": config.federation.client_gpus},
        "init_args": init_args,
    }


PREVIOUS_RUN = ".previous-run"  # inside the run directory: the last complete run, until a new one completes
PREVIOUS_PARTIAL = ".previous-partial-run"  # the last interrupted run (resumable), until a new one completes


def _rounds_run(folder: Path) -> int:
    """Rows in a run folder's metrics.jsonl (how far it got), 0 without one."""
    metrics = folder / METRICS_FILE
    return sum(1 for line in metrics.read_text().splitlines() if line.strip()) if metrics.exists() else 0


def set_aside_previous_run(directory: RunDirectory) -> list[Path]:
    """Starting afresh in a directory that holds an earlier run: move that run's files (only devft's) aside
    inside it, so that nothing is lost if the new run fails; :func:`drop_previous_runs` deletes them once a
    run there has completed. A complete run (with its summary) goes to ``PREVIOUS_RUN``, replacing an older
    complete one; an interrupted one to ``PREVIOUS_PARTIAL``, where an interrupted run already set aside stays
    if it got further (a checkpoint counts first, then rounds run), so a run that failed early never pushes
    out one that could be resumed. Returns the folders that hold set-aside runs."""
    stale = [directory.path / name for name in _RUN_ARTIFACTS if (directory.path / name).exists()]
    if stale:
        complete = directory.summary.exists()
        aside = directory.path / (PREVIOUS_RUN if complete else PREVIOUS_PARTIAL)
        progress = (directory.has_checkpoint(), _rounds_run(directory.path))
        if not complete and aside.exists() and (RunDirectory(aside).has_checkpoint(), _rounds_run(aside)) > progress:
            log.warning("%s holds an interrupted run that got less far than the one kept in %s: deleting it",
                        directory.path, aside)
            for path in stale:
                shutil.rmtree(path) if path.is_dir() else path.unlink()
        else:
            if aside.exists():
                log.warning("%s replaces the run set aside in %s", directory.path, aside)
                shutil.rmtree(aside)
            aside.mkdir()
            for path in stale:
                path.rename(aside / path.name)
            log.warning("%s holds an earlier %s run: it is moved to %s and deleted when a run there completes "
                        "(use --resume to continue a run instead)", directory.path,
                        "complete" if complete else "interrupted", aside)
    return [directory.path / name for name in (PREVIOUS_RUN, PREVIOUS_PARTIAL) if (directory.path / name).exists()]


def drop_previous_runs(directory: RunDirectory) -> None:
    """Delete the set-aside earlier runs (a run in ``directory``, new or resumed, has completed)."""
    for name in (PREVIOUS_RUN, PREVIOUS_PARTIAL):
        if (directory.path / name).exists():
            shutil.rmtree(directory.path / name)


class _RoundBar:
    """Rich progress bar over the rounds: stage, layers, loss, bytes."""

    def __init__(self, total: int, done: int) -> None:
        self.progress = Progress(
            TextColumn("[bold]round[/bold]"),
            MofNCompleteColumn(),
            BarColumn(),
            TextColumn("{task.description}"),
            TimeElapsedColumn(),
        )
        self.task = self.progress.add_task("starting", total=total, completed=done)

    def __call__(self, row: dict[str, Any]) -> None:
        from server.app import loss_text

        train = loss_text(row, "train_loss", 3)
        evl = f" eval {loss_text(row, 'eval_loss', 3)}" if row.get("evaluated") else ""
        failed = f" [red]{row['clients_failed']} failed[/red]" if row["clients_failed"] else ""
        self.progress.update(
            self.task,
            completed=row["round"],
            description=(
                f"stage {row['stage']} ({row['submodel_layers']} layers) loss {train}{evl} "
                f"↑{row['bytes_up'] / 2**20:.1f} ↓{row['bytes_down'] / 2**20:.1f} MiB{failed}"
            ),
        )


INTERRUPTED = 130  # the exit status of a program Ctrl-C ended, as shells report it


@contextmanager
def stop_on_interrupt(stop: threading.Event) -> Iterator[None]:
    """While inside, the first Ctrl-C (SIGINT) sets ``stop``: the run ends after the round in progress, with its
    row and checkpoint written. The second ends the process at once with status 130: the round in progress is
    lost, the last completed round's checkpoint stays (rows and checkpoints are replaced atomically, the lock
    goes with the process, and the Ray that ``ray.init`` started shares the process's fate). A plain
    KeyboardInterrupt cannot do that: Flower's server thread would wait out ``federation.reply_timeout_s``
    and go on. Nothing changes outside the main thread, or where SIGINT is ignored (a background job)."""
    if threading.current_thread() is not threading.main_thread() or signal.getsignal(signal.SIGINT) in (
            signal.SIG_IGN, None):
        yield
        return

    def second(signum: int, frame: Any) -> None:
        log.warning("second Ctrl-C: stopping now; the round in progress is lost, the checkpoint of the last "
                    "completed round is kept (--resume continues from it)")
        for handler in logging.getLogger().handlers:
            handler.flush()
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(INTERRUPTED)

    def first(signum: int, frame: Any) -> None:
        stop.set()
        log.warning("Ctrl-C: stopping after the round in progress (its checkpoint is kept; --resume continues); "
                    "Ctrl-C again to stop at once")
        signal.signal(signal.SIGINT, second)

    before = signal.signal(signal.SIGINT, first)
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, before)


def _check_checkpoint(directory: RunDirectory, config: RunConfig) -> int:
    """The round ``directory``'s checkpoint ended; refuses (naming the keys) a config it cannot resume with."""
    from server.checkpoint import load_checkpoint
    from server.strategy import check_resumable

    payload = load_checkpoint(directory.checkpoint, mmap=True)
    if payload is None:
        raise FileNotFoundError(f"--resume: no checkpoint in {str(directory.checkpoint)!r}")
    check_resumable(json.loads(payload["config"]), config, directory.path)
    return int(payload["round"])


def simulate(
    config: RunConfig,
    out_dir: Path,
    resume: bool = False,
    progress: bool = True,
    stop: threading.Event | None = None,
) -> Path:
    """Run ``config`` on the simulation engine with one virtual SuperNode per data partition.

    Writes the run directory of docs/design.md §4 to ``out_dir`` and returns its path. Unless ``resume``, an
    earlier run there is set aside (:func:`set_aside_previous_run`) and deleted only when a run there completes.
    ``stop``: an event that ends the run after the round in progress (:class:`~server.strategy.RunStopped`); by
    default Ctrl-C sets one (:func:`stop_on_interrupt`); a caller that passes its own handles the signal.
    """
    from flwr.simulation import run_simulation

    from client.app import app as client_app
    from server.app import build_server_app

    if out_dir.exists() and not out_dir.is_dir():
        raise ValueError(f"--out {str(out_dir)!r} is a file, not a directory")
    directory = RunDirectory(out_dir)
    if resume and not directory.has_checkpoint():
        raise FileNotFoundError(f"--resume: no checkpoint in {str(directory.checkpoint)!r}")
    resumed_round = _check_checkpoint(directory, config) if resume else 0  # before the data, the model and Ray
    data = build_federated_data(config.data)
    global_model = GlobalModel(config, data.test)  # validates the schedule against the model before Ray starts
    if resume and resumed_round >= global_model.schedule.total_rounds and directory.summary.exists():
        log.warning("%s holds a complete run (round %d of %d): nothing is left to train; its summary and report "
                    "are written again", out_dir, resumed_round, global_model.schedule.total_rounds)
    with locked(out_dir):  # one run at a time in a directory: a second one would interleave rows and checkpoints
        if resume and not directory.has_checkpoint():  # checked again, now that no other run can move it
            raise FileNotFoundError(f"--resume: no checkpoint in {str(directory.checkpoint)!r}")
        asides = [] if resume else set_aside_previous_run(directory)
        supernodes = config.data.num_clients  # one node per partition: each is told num-partitions, checked
        done = len(directory.read_metrics()) if resume else 0
        bar = _RoundBar(global_model.schedule.total_rounds, done) if progress else None
        own_stop = stop is None
        stop = threading.Event() if stop is None else stop
        server_app = build_server_app(
            config, directory.path, resume=resume, on_round=[bar] if bar else [], global_model=global_model, stop=stop
        )
        log.info("simulating %d clients (%d per round) into %s", supernodes, config.federation.clients_per_round, directory.path)
        os.environ.setdefault("RAY_ACCEL_ENV_VAR_OVERRIDE_ON_ZERO", "0")  # silences a Ray FutureWarning; CPU-only
        # The server (planning, evaluation) shares the machine with the client workers: give it the CPU share of
        # one client. Measured on 2 shared cores: SmolLM2 evaluation with 2 torch threads under load took
        # 90-120 s, with 1 thread about 30 s (OpenMP threads spin when cores are oversubscribed).
        threads = torch.get_num_threads()
        torch.set_num_threads(max(1, int(config.federation.client_cpus)))
        flwr_logger = logging.getLogger("flwr")
        propagate = flwr_logger.propagate
        flwr_logger.propagate = False  # Flower prints through its own handler; do not print every line twice
        if bar is not None:
            bar.progress.start()
        try:
            with stop_on_interrupt(stop) if own_stop else contextlib.nullcontext():
                run_simulation(
                    server_app=server_app,
                    client_app=client_app,
                    num_supernodes=supernodes,
                    backend_config=backend_config(config),
                )
        finally:
            torch.set_num_threads(threads)
            flwr_logger.propagate = propagate
            if bar is not None:
                bar.progress.stop()
            if asides and not directory.summary.exists():
                log.warning("the earlier runs are kept in %s", ", ".join(str(a) for a in asides))
        if not directory.summary.exists():
            raise RuntimeError(f"the simulation ended without writing {directory.summary}: see the log above")
        drop_previous_runs(directory)
    return directory.path
