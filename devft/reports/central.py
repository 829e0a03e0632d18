"""The centralised reference in a comparison: what one LoRA trained on the union of the clients' data, for
the federated runs' budget (``devft train``, :mod:`devft.central`), reaches on the same held-out set."""

from __future__ import annotations

import json
import statistics
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from devft.reports.tables import fmt

CENTRAL_FILE = "central.json"


def read_central(path: str | Path) -> dict[str, Any]:
    """``central.json`` of a ``devft train`` output directory, named when it is missing or unreadable."""
    file = Path(path) / CENTRAL_FILE
    try:
        summary = json.loads(file.read_text())
    except FileNotFoundError as err:
        raise FileNotFoundError(f"{file} does not exist: is {str(path)!r} a devft train output?") from err
    except ValueError as err:
        raise ValueError(f"{file} is not JSON ({err})") from err
    if not isinstance(summary, dict) or not isinstance(summary.get("after"), dict):
        raise ValueError(f"{file} has no 'after' evaluation: not a devft train summary")
    return summary


def central_reference(paths: Sequence[str | Path]) -> tuple[list[str], float | None]:
    """comparison.md's section on the centralised reference runs in ``paths`` (one per seed, or one), and the
    mean of their final eval losses (the plots' reference line; None when there are none)."""
    if not paths:
        return [], None
    summaries = [read_central(p) for p in paths]
    losses = [s["after"]["loss"] for s in summaries if isinstance(s["after"].get("loss"), int | float)]
    budgets = [s.get("budget") or {} for s in summaries]
    budget = budgets[0]
    if any(b.get("budget") != "federated" for b in budgets):
        spent = "the steps below (not all with the federated runs' budget)"
    elif all(b == budget for b in budgets):
        spent = (f"the federated runs' budget: {budget['steps']} optimiser steps ({budget['num_rounds']} rounds × "
                 f"{budget['clients_per_round']} clients × {budget['steps_per_client_call']} steps)")
    else:  # e.g. seeds of data.seed under train.epochs: each seed's partitions give its own budget
        spent = "each seed's federated budget (the steps below: rounds × clients × one client call's steps)"
    lines = ["", "## Centralised reference", "",
             "One LoRA trained on the union of all clients' training data (`devft train`, the first config's "
             f"setting) for {spent}, evaluated on the same held-out set: the dashed line in the plots"
             + (f", at the mean of {len(losses)}" if len(losses) > 1 else "") + ".", "",
             "| run | eval loss before | eval loss after | acc after | steps | train examples | wall s |",
             "|---|---|---|---|---|---|---|"]
    for path, s in zip(paths, summaries):
        lines.append(f"| {Path(path).name} | {fmt(s['before'].get('loss'))} | {fmt(s['after'].get('loss'))} | "
                     f"{fmt(s['after'].get('accuracy'))} | {fmt((s.get('train') or {}).get('steps'))} | "
                     f"{fmt(s.get('train_examples'))} | {fmt(s.get('wall_s'), '.1f')} |")
    return lines, statistics.fmean(losses) if losses else None
