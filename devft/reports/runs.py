"""Reading a run directory back: per-round records, the summary, and cumulative cost curves."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from devft.metrics.rows import METRICS_FILE, read_metrics_file


@dataclass
class RunRecords:
    """What a finished (or interrupted) run directory holds."""

    path: Path
    rounds: list[dict[str, Any]]
    summary: dict[str, Any]

    @property
    def label(self) -> str:
        return str(self.summary.get("label") or self.summary.get("method") or self.path.name)

    @property
    def personalised_eval(self) -> bool:
        """Whether ``eval_loss`` is the mean of the sampled clients' own (personalised) models, as FedSA-LoRA's
        is, rather than the global model's: not the same quantity as another run's global eval loss."""
        kinds = {self.summary.get("eval_kind")} | {r.get("eval_kind") for r in self.rounds if r.get("eval_loss") is not None}
        return any(isinstance(k, str) and k.startswith("personalised") for k in kinds)

    def number(self, row: dict[str, Any], key: str) -> float | None:
        """``row[key]`` as a float (None when not recorded); anything else is a corrupt row, named."""
        value = row.get(key)
        if value is None:
            return None
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise ValueError(f"{self.path / METRICS_FILE}: round {row['round']}: {key}={value!r} is not a number")
        return float(value)

    def series(self, key: str) -> tuple[list[int], list[float]]:
        """(rounds, values) of ``key`` over the rounds where it was recorded (not None)."""
        xs, ys = [], []
        for row in self.rounds:
            value = self.number(row, key)
            if value is not None:
                xs.append(int(row["round"]))
                ys.append(value)
        return xs, ys

    def cumulative(self, key: str) -> list[float]:
        """Running total of ``key`` (missing counts as 0), one entry per round.

        ``client_train_s_sum`` (all clients' training seconds of a round) falls back to
        ``client_train_s_mean × clients_ok`` when a run did not record the sum.
        """
        total, out = 0.0, []
        for row in self.rounds:
            value = self.number(row, key)
            if value is None and key == "client_train_s_sum":
                value = (self.number(row, "client_train_s_mean") or 0.0) * (self.number(row, "clients_ok") or 0.0)
            total += value or 0.0
            out.append(total)
        return out

    def training_bytes(self) -> list[float]:
        """Running total of the training messages' bytes, both ways, one entry per round: every message's bytes
        less the evaluation messages' (``eval_bytes_up`` / ``eval_bytes_down``: clients evaluating their own or
        the submodel's LoRA), so a run that evaluates on its clients is not charged for measuring itself."""
        totals = [self.cumulative(k) for k in ("bytes_up", "bytes_down", "eval_bytes_up", "eval_bytes_down")]
        return [up + down - eval_up - eval_down for up, down, eval_up, eval_down in zip(*totals)]


def read_run(path: str | Path) -> RunRecords:
    """Load ``metrics.jsonl`` and ``summary.json`` (empty when the run did not finish) of a run directory."""
    path = Path(path)
    metrics = path / METRICS_FILE
    if not metrics.exists():
        raise FileNotFoundError(f"{metrics} does not exist: is {str(path)!r} a devft run directory?")
    rounds = read_metrics_file(metrics)
    summary_path = path / "summary.json"
    summary: Any = {}
    if summary_path.exists():
        try:
            summary = json.loads(summary_path.read_text())
        except json.JSONDecodeError as err:
            raise ValueError(f"{summary_path} is not JSON ({err})") from err
        if not isinstance(summary, dict):
            raise ValueError(f"{summary_path} is not a JSON object")
    return RunRecords(path=path, rounds=rounds, summary=summary)


def cost_to_target(run: RunRecords, target_eval_loss: float) -> dict[str, float | int | None]:
    """Rounds, wall seconds, client compute (seconds, FLOPs) and training bytes until eval loss first ≤ target."""
    wall = run.cumulative("round_wall_s")
    flops = run.cumulative("train_flops")
    client_s = run.cumulative("client_train_s_sum")
    sent = run.training_bytes()
    for i, row in enumerate(run.rounds):
        loss = row.get("eval_loss")
        if loss is not None and float(loss) <= target_eval_loss:
            return {
                "round": int(row["round"]),
                "wall_s": wall[i],
                "client_train_s": client_s[i],
                "train_flops": flops[i],
                "bytes": sent[i],
            }
    return {"round": None, "wall_s": None, "client_train_s": None, "train_flops": None, "bytes": None}
