"""Markdown pieces shared by run reports and comparisons: number formats, a run's final figures and
totals, the one-row-per-run comparison table, and the comparison file."""

from __future__ import annotations

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
    """A run's total: ``bytes`` (up + down), ``wall_s``, or a key of ``summary.json``'s ``totals``."""
    totals = run.summary.get("totals") or {}
    if key == "bytes":
        return (totals.get("bytes_up") or 0) + (totals.get("bytes_down") or 0) if totals else None
    value = run.summary.get(key) if key == "wall_s" else totals.get(key)
    return None if value is None else float(value)


def default_target(runs: list[RunRecords], target_eval_loss: float) -> float:
    """``target_eval_loss`` when > 0, else the worst final eval loss of ``runs`` (0 when none has one)."""
    if target_eval_loss > 0:
        return target_eval_loss
    finals = [f for f in (final_value(r, "eval_loss") for r in runs) if f is not None]
    return max(finals) if finals else 0.0


def run_table(runs: list[RunRecords], target_eval_loss: float) -> list[str]:
    """One row per run: final figures, totals and the cost to first reach the target."""
    lines = [
        "| method | final eval loss | final acc | rounds | wall s | client train s | client FLOPs | MiB up+down | "
        "→ target: round | wall s | client s | FLOPs | MiB |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for run in runs:
        hit = cost_to_target(run, target_eval_loss)
        lines.append(
            f"| {run.label} | {fmt(final_value(run, 'eval_loss'))} | {fmt(final_value(run, 'eval_accuracy'))} | "
            f"{len(run.rounds)} | {fmt(total_value(run, 'wall_s'), '.1f')} | "
            f"{fmt(total_value(run, 'client_train_s'), '.1f')} | {fmt(total_value(run, 'train_flops'), '.3e')} | "
            f"{mib(total_value(run, 'bytes'))} | {fmt(hit['round'])} | {fmt(hit['wall_s'], '.1f')} | "
            f"{fmt(hit['client_train_s'], '.1f')} | {fmt(hit['train_flops'], '.3e')} | {mib(hit['bytes'])} |"
        )
    return lines


def write_comparison_file(out_dir: Path, lines: list[str], plots: list[Path]) -> Path:
    """``out_dir/comparison.md``: ``lines`` and the plots below them."""
    lines = lines + ["", "## Plots", ""] + [f"![{p.stem}](plots/{p.name})" for p in plots]
    out = out_dir / "comparison.md"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text("\n".join(lines) + "\n")
    return out
