"""report.md and plots/*.png of one run, and the comparison table of several runs."""

from __future__ import annotations

import json
import logging
from collections.abc import Sequence
from pathlib import Path

from devft.reports.central import central_reference
from devft.reports.plots import plot_comparison, plot_run
from devft.reports.runs import read_run
from devft.reports.setting import differences_section
from devft.reports.tables import (
    BYTES_NOTE,
    default_target,
    eval_kind_note,
    fmt,
    mib,
    run_table,
    write_comparison_file,
)

log = logging.getLogger(__name__)


def _planned_rounds(run_dir: Path) -> str:
    """``federation.num_rounds`` from the run's config.json, or "?" where it cannot be read."""
    try:
        return str(int(json.loads((run_dir / "config.json").read_text())["federation"]["num_rounds"]))
    except (OSError, ValueError, KeyError, TypeError):
        return "?"


def write_report(run_dir: str | Path) -> Path:
    """Write ``report.md`` and ``plots/*.png`` for the run in ``run_dir``; returns the report's path."""
    run = read_run(run_dir)
    plots = plot_run(run, run.path / "plots")
    lines = [f"# devft run: {run.label}", ""]
    s = run.summary
    if s:
        lines += [
            f"- method: `{s.get('method')}`, aggregation: `{s.get('aggregation')}`, seed: {s.get('seed')}, "
            f"model: `{s.get('model')}`",
            f"- rounds: {len(run.rounds)}, wall time: {fmt(s.get('wall_s'), '.1f')} s",
        ]
        final = s.get("final") or {}
        if final:
            of = ("mean held-out eval loss of the sampled clients' own (personalised) models"
                  if run.personalised_eval else "full-model eval loss")
            row = next((r for r in run.rounds if r.get("round") == final.get("round")), {})
            diverged = bool(row.get("evaluated")) and final.get("eval_loss") is None
            loss = "NaN (not finite: the model diverged)" if diverged else fmt(final.get("eval_loss"))
            lines.append(f"- final {of} {loss}, exact-match accuracy {fmt(final.get('eval_accuracy'))}")
        totals = s.get("totals") or {}
        if totals:
            lines.append(
                f"- totals: {mib(totals.get('bytes_up'))} MiB up, {mib(totals.get('bytes_down'))} MiB down, "
                f"{fmt(totals.get('train_flops'), '.3e')} client training FLOPs, "
                f"{fmt(totals.get('client_train_s'), '.1f')} client training seconds"
            )
        if totals and (totals.get("eval_bytes_up") or totals.get("eval_bytes_down")):
            lines.append(
                f"- of those bytes, evaluation messages: {mib(totals.get('eval_bytes_up'))} MiB up, "
                f"{mib(totals.get('eval_bytes_down'))} MiB down (the rest is training)"
            )
        if totals and totals.get("truncated_examples"):
            lines.append(
                f"- {fmt(totals.get('truncated_examples'))} training examples (counted once per client and round) "
                "lost the end of their answer at data.max_length: they train on answers that never end"
            )
        if totals and any(k in totals for k in ("clients_failed", "rounds_skipped", "updates_clipped")):
            lines.append(
                f"- {fmt(totals.get('clients_failed'))} client failures, {fmt(totals.get('rounds_skipped'))} "
                f"rounds skipped, {fmt(totals.get('updates_clipped'))} updates scaled back onto the norm bound"
            )
    else:
        planned = _planned_rounds(run.path)
        lines.append(f"- the run has not finished (no summary.json): {len(run.rounds)} of {planned} rounds "
                     "recorded; `devft simulate … --resume` goes on from the last one")
    lines += ["", "## Rounds", ""]
    header = "| round | stage | layers | ok/sampled | failed | MiB up | MiB down | train loss | eval loss | eval acc | round s | check s | agg s | peak RSS MiB |"
    lines += [header, "|" + "---|" * (header.count("|") - 1)]
    for r in run.rounds:
        lines.append(
            f"| {r.get('round')} | {fmt(r.get('stage'))} | {fmt(r.get('submodel_layers'))} | "
            f"{fmt(r.get('clients_ok'))}/{fmt(r.get('clients_sampled'))} | {fmt(r.get('clients_failed'))} | "
            f"{mib(r.get('bytes_up'))} | {mib(r.get('bytes_down'))} | {fmt(r.get('train_loss'))} | "
            f"{_eval_loss(r)} | {fmt(r.get('eval_accuracy'))} | {fmt(r.get('round_wall_s'), '.1f')} | "
            f"{fmt(r.get('validate_s'), '.3f')} | {fmt(r.get('aggregate_s'), '.3f')} | {fmt(r.get('peak_rss_mb'), '.0f')} |"
        )
    lines += _incidents(run.rounds)
    lines += ["", "## Plots", ""] + [f"![{p.stem}](plots/{p.name})" for p in plots]
    out = run.path / "report.md"
    out.write_text("\n".join(lines) + "\n")
    log.info("report written to %s", out)
    return out


def _eval_loss(row: dict) -> str:
    """A round's eval loss; ``NaN`` where the round was evaluated and its loss was not finite (null in the row)."""
    if row.get("evaluated") and row.get("eval_loss") is None:
        return "NaN"
    return fmt(row.get("eval_loss"))


def _incidents(rounds: list[dict]) -> list[str]:
    """One bullet per failed client, skipped update or update scaled back onto the norm bound."""
    lines = []
    for r in rounds:
        for f in r.get("failures") or ():
            lines.append(f"- round {r.get('round')}: partition {f.get('partition')} failed: {f.get('reason')}")
        for f in r.get("ignored_replies") or ():
            lines.append(f"- round {r.get('round')}: a reply of node {f.get('node')} (partition {f.get('partition')}) "
                         f"ignored: {f.get('reason')}")
        if r.get("skipped"):
            lines.append(f"- round {r.get('round')}: update skipped: {r['skipped']}")
        for c in r.get("clipped") or ():
            lines.append(f"- round {r.get('round')}: the update of partition {c.get('partition')} (norm "
                         f"{fmt(c.get('norm'))}) was scaled by {fmt(c.get('scale'))} onto the bound "
                         f"{fmt(r.get('update_norm_bound'))}")
    return ["", "## Failures, skipped updates and bounded updates", ""] + lines if lines else []


def write_comparison(run_dirs: list[str | Path], out_dir: str | Path, target_eval_loss: float = 0.0,
                     central: Sequence[str | Path] = ()) -> Path:
    """Write ``comparison.md`` and ``plots/eval_loss_vs_*.png`` over several run directories.

    Each run is labelled by its directory name (``devft compare`` names them after the config files).
    ``central``: ``devft train`` output directories, the centralised reference (:mod:`devft.reports.central`).
    """
    out_dir = Path(out_dir)
    runs = [read_run(d) for d in run_dirs]
    for run in runs:
        run.summary = {**run.summary, "label": run.path.name}
    target_eval_loss = default_target(runs, target_eval_loss)
    lines = ["# devft comparison", ""] + differences_section({run.label: run.path for run in runs}) + [
             f"Target eval loss: {target_eval_loss:.4g} (the cost columns are to first reach it; — = never reached). "
             f"{BYTES_NOTE}", ""] + run_table(runs, target_eval_loss)
    lines += eval_kind_note({run.label: run.personalised_eval for run in runs})
    reference_lines, reference = central_reference(central)
    lines += reference_lines
    return write_comparison_file(out_dir, lines, plot_comparison(runs, out_dir / "plots", reference))
