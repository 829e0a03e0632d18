"""The per-round records of a run: ``metrics.jsonl``, read back by the server on resume and by the reports."""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)

METRICS_FILE = "metrics.jsonl"


def read_metrics_file(metrics: Path) -> list[dict[str, Any]]:
    """The rows of a ``metrics.jsonl``: JSON objects with an integer ``round``. A last line cut short (the
    process died while appending it) is left out; any other bad line raises, naming the file and line."""
    text = metrics.read_text()
    lines = [(n, line) for n, line in enumerate(text.splitlines(), 1) if line.strip()]
    rows = []
    for i, (n, line) in enumerate(lines):
        try:
            row = json.loads(line)
        except json.JSONDecodeError as err:
            if i == len(lines) - 1 and not text.endswith("\n"):
                log.warning("%s: line %d is incomplete (an interrupted write); left out", metrics, n)
                break
            raise ValueError(f"{metrics}: line {n} is not JSON ({err})") from err
        if not isinstance(row, dict) or isinstance(row.get("round"), bool) or not isinstance(row.get("round"), int):
            raise ValueError(f"{metrics}: line {n} is not a metrics row (a JSON object with an integer round)")
        rows.append(row)
    return rows
