"""Markdown pieces shared by run reports and comparisons: number formats, a run's final figures and
totals, the one-row-per-run comparison table, and the comparison file."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path

from devft.reports.runs import RunRecords, cost_to_target


def fmt(value, spec: str = ".4g") -> str:
    """``value`` formatted with ``spec`` when a float, as it is otherwise, ``—`` when None."""
    if value is None:
        return "—"
    if isinstance(value, float):
        return format(value, spec)
    return str(value)


def mib(value) -> str:
    """Bytes as MiB with two decimals (``—`` when None)."""
    return "—" if value is None else f"{float(value) / 2**20:.2f}"


def final_value(run: RunRecords, key: str) -> float | None:
    """``summary.json``'s ``final[key]`` (None when the run has none, e.g. it did not finish)."""
    value = (run.summary.get("final") or {}).get(key)
    return None if value is None else float(value)


def total_value(run: RunRecords, key: str) -> float | None:
    """A run's total: ``bytes`` (the training messages' bytes, up + down), ``eval_bytes`` (the evaluation
    messages', up + down), ``wall_s``, or a key of ``summary.json``'s ``totals``."""
    totals = run.summary.get("totals") or {}
    if key in ("bytes", "eval_bytes"):
        if not totals:
            return None
        evaluation = (totals.get("eval_bytes_up") or 0) + (totals.get("eval_bytes_down") or 0)
        return evaluation if key == "eval_bytes" else (
            (totals.get("bytes_up") or 0) + (totals.get("bytes_down") or 0) - evaluation)
    value = run.summary.get(key) if key == "wall_s" else totals.get(key)
    return None if value is None else float(value)


def default_target(runs: list[RunRecords], target_eval_loss: float) -> float:
    """``target_eval_loss`` when > 0, else the worst final eval loss of ``runs`` (0 when none has one)."""
    if target_eval_loss > 0:
        return target_eval_loss
    finals = [f for f in (final_value(r, "eval_loss") for r in runs) if f is not None]
    return max(finals) if finals else 0.0


def eval_cell(run: RunRecords) -> str:
    """What a run's eval loss is of: the global model, or the sampled clients' own models."""
    return "clients' own" if run.personalised_eval else "global"


BYTES_NOTE = ("MiB up+down counts the training messages; evaluation messages (clients evaluating their own "
              "models, or `federation.client_eval`) are the eval MiB beside it, and no cost to the target counts them. "
              "Wall seconds do include evaluation (each round's `eval_s`, on the server or the clients): runs that "
              "evaluate more often, or generate answers, pay for it there; client seconds and FLOPs are training only.")


def eval_kind_note(personalised: Mapping[str, bool]) -> list[str]:
    """A warning when some runs' (``{name: personalised}``) eval loss is of the clients' own models and
    others' of the global model."""
    own = [name for name, is_own in personalised.items() if is_own]
    if not own or len(own) == len(personalised):
        return []
    return ["", f"Eval loss is not the same quantity in every run: for {', '.join(own)} it is the mean held-out loss "
            "of the sampled clients' own (personalised) models, for the others the global model's. Compare those "
            "rows with care."]


def run_table(runs: list[RunRecords], target_eval_loss: float) -> list[str]:
    """One row per run: final figures, totals and the cost to first reach the target."""
    lines = [
        "| method | eval of | final eval loss | final acc | rounds | wall s | client train s | client FLOPs | "
        "MiB up+down | eval MiB | → target: round | wall s | client s | FLOPs | MiB |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for run in runs:
        hit = cost_to_target(run, target_eval_loss)
        lines.append(
            f"| {run.label} | {eval_cell(run)} | {fmt(final_value(run, 'eval_loss'))} | "
            f"{fmt(final_value(run, 'eval_accuracy'))} | {len(run.rounds)} | {fmt(total_value(run, 'wall_s'), '.1f')} | "
            f"{fmt(total_value(run, 'client_train_s'), '.1f')} | {fmt(total_value(run, 'train_flops'), '.3e')} | "
            f"{mib(total_value(run, 'bytes'))} | {mib(total_value(run, 'eval_bytes'))} | {fmt(hit['round'])} | "
            f"{fmt(hit['wall_s'], '.1f')} | {fmt(hit['client_train_s'], '.1f')} | {fmt(hit['train_flops'], '.3e')} | "
            f"{mib(hit['bytes'])} |"
        )
    return lines


def write_comparison_file(out_dir: Path, lines: list[str], plots: list[Path]) -> Path:
    """``out_dir/comparison.md``: ``lines`` and the plots below them."""
    lines = lines + ["", "## Plots", ""] + [f"![{p.stem}](plots/{p.name})" for p in plots]
    out = out_dir / "comparison.md"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text("\n".join(lines) + "\n")
    return out
