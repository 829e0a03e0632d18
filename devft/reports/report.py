"""report.md and plots/*.png of one run, and the comparison table of several runs."""

from __future__ import annotations

import logging
from pathlib import Path

from devft.reports.plots import plot_comparison, plot_run
from devft.reports.runs import RunRecords, cost_to_target, read_run

log = logging.getLogger(__name__)


def _fmt(value, spec: str = ".4g") -> str:
    if value is None:
        return "—"
    if isinstance(value, float):
        return format(value, spec)
    return str(value)


def _mib(value) -> str:
    return "—" if value is None else f"{float(value) / 2**20:.2f}"


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
            f"- rounds: {len(run.rounds)}, wall time: {_fmt(s.get('wall_s'), '.1f')} s",
        ]
        final = s.get("final") or {}
        if final:
            lines.append(
                f"- final full-model eval loss {_fmt(final.get('eval_loss'))}, exact-match accuracy "
                f"{_fmt(final.get('eval_accuracy'))}"
            )
        totals = s.get("totals") or {}
        if totals:
            lines.append(
                f"- totals: {_mib(totals.get('bytes_up'))} MiB up, {_mib(totals.get('bytes_down'))} MiB down, "
                f"{_fmt(totals.get('train_flops'), '.3e')} client training FLOPs, "
                f"{_fmt(totals.get('client_train_s'), '.1f')} client training seconds"
            )
        if totals and any(k in totals for k in ("clients_failed", "rounds_skipped", "updates_clipped")):
            lines.append(
                f"- {_fmt(totals.get('clients_failed'))} client failures, {_fmt(totals.get('rounds_skipped'))} "
                f"rounds skipped, {_fmt(totals.get('updates_clipped'))} updates scaled back onto the norm bound"
            )
    lines += ["", "## Rounds", ""]
    header = "| round | stage | layers | ok/sampled | failed | MiB up | MiB down | train loss | eval loss | eval acc | round s | check s | agg s | peak RSS MiB |"
    lines += [header, "|" + "---|" * (header.count("|") - 1)]
    for r in run.rounds:
        lines.append(
            f"| {r.get('round')} | {_fmt(r.get('stage'))} | {_fmt(r.get('submodel_layers'))} | "
            f"{_fmt(r.get('clients_ok'))}/{_fmt(r.get('clients_sampled'))} | {_fmt(r.get('clients_failed'))} | "
            f"{_mib(r.get('bytes_up'))} | {_mib(r.get('bytes_down'))} | {_fmt(r.get('train_loss'))} | "
            f"{_fmt(r.get('eval_loss'))} | {_fmt(r.get('eval_accuracy'))} | {_fmt(r.get('round_wall_s'), '.1f')} | "
            f"{_fmt(r.get('validate_s'), '.3f')} | {_fmt(r.get('aggregate_s'), '.3f')} | {_fmt(r.get('peak_rss_mb'), '.0f')} |"
        )
    lines += _incidents(run.rounds)
    lines += ["", "## Plots", ""] + [f"![{p.stem}](plots/{p.name})" for p in plots]
    out = run.path / "report.md"
    out.write_text("\n".join(lines) + "\n")
    log.info("report written to %s", out)
    return out


def _incidents(rounds: list[dict]) -> list[str]:
    """One bullet per failed client, skipped update or update scaled back onto the norm bound."""
    lines = []
    for r in rounds:
        for f in r.get("failures") or ():
            lines.append(f"- round {r.get('round')}: partition {f.get('partition')} failed: {f.get('reason')}")
        if r.get("skipped"):
            lines.append(f"- round {r.get('round')}: update skipped: {r['skipped']}")
        for c in r.get("clipped") or ():
            lines.append(f"- round {r.get('round')}: the update of partition {c.get('partition')} (norm "
                         f"{_fmt(c.get('norm'))}) was scaled by {_fmt(c.get('scale'))} onto the bound "
                         f"{_fmt(r.get('update_norm_bound'))}")
    return ["", "## Failures, skipped updates and bounded updates", ""] + lines if lines else []


def write_comparison(run_dirs: list[str | Path], out_dir: str | Path, target_eval_loss: float = 0.0) -> Path:
    """Write ``comparison.md`` and ``plots/eval_loss_vs_*.png`` over several run directories.

    Each run is labelled by its directory name (``devft compare`` names them after the config files).
    """
    out_dir = Path(out_dir)
    runs: list[RunRecords] = [read_run(d) for d in run_dirs]
    for run in runs:
        run.summary = {**run.summary, "label": run.path.name}
    plots = plot_comparison(runs, out_dir / "plots")
    if target_eval_loss <= 0:
        finals = [r.summary.get("final", {}).get("eval_loss") for r in runs]
        finals = [f for f in finals if f is not None]
        target_eval_loss = max(finals) if finals else 0.0
    lines = [
        "# devft comparison",
        "",
        f"Target eval loss: {target_eval_loss:.4g} (the cost columns are to first reach it; — = never reached).",
        "",
        "| method | final eval loss | final acc | rounds | wall s | client train s | client FLOPs | MiB up+down | "
        "→ target: round | wall s | client s | FLOPs | MiB |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for run in runs:
        final = run.summary.get("final") or {}
        totals = run.summary.get("totals") or {}
        hit = cost_to_target(run, target_eval_loss)
        total_bytes = (totals.get("bytes_up") or 0) + (totals.get("bytes_down") or 0)
        lines.append(
            f"| {run.label} | {_fmt(final.get('eval_loss'))} | {_fmt(final.get('eval_accuracy'))} | {len(run.rounds)} | "
            f"{_fmt(run.summary.get('wall_s'), '.1f')} | {_fmt(totals.get('client_train_s'), '.1f')} | "
            f"{_fmt(totals.get('train_flops'), '.3e')} | {_mib(total_bytes)} | {_fmt(hit['round'])} | "
            f"{_fmt(hit['wall_s'], '.1f')} | {_fmt(hit['client_train_s'], '.1f')} | {_fmt(hit['train_flops'], '.3e')} | "
            f"{_mib(hit['bytes'])} |"
        )
    lines += ["", "## Plots", ""] + [f"![{p.stem}](plots/{p.name})" for p in plots]
    out = out_dir / "comparison.md"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text("\n".join(lines) + "\n")
    return out
