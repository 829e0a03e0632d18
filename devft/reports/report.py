"""report.md and plots/*.png of one run, and the comparison table of several runs."""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from pathlib import Path

from devft.reports.plots import plot_comparison, plot_run, plot_seed_comparison
from devft.reports.runs import RunRecords, cost_to_target, read_run
from devft.reports.seeds import Spread, paired, spread

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


def _default_target(runs: list[RunRecords], target_eval_loss: float) -> float:
    """``target_eval_loss`` when > 0, else the worst final eval loss of ``runs`` (0 when none finished)."""
    if target_eval_loss > 0:
        return target_eval_loss
    finals = [r.summary.get("final", {}).get("eval_loss") for r in runs]
    finals = [f for f in finals if f is not None]
    return max(finals) if finals else 0.0


def _final(run: RunRecords, key: str) -> float | None:
    value = (run.summary.get("final") or {}).get(key)
    return None if value is None else float(value)


def _total(run: RunRecords, key: str) -> float | None:
    totals = run.summary.get("totals") or {}
    if key == "bytes":
        return (totals.get("bytes_up") or 0) + (totals.get("bytes_down") or 0) if totals else None
    value = run.summary.get(key) if key == "wall_s" else totals.get(key)
    return None if value is None else float(value)


def _run_table(runs: list[RunRecords], target_eval_loss: float) -> list[str]:
    """One row per run: final figures, totals and the cost to first reach the target."""
    lines = [
        "| method | final eval loss | final acc | rounds | wall s | client train s | client FLOPs | MiB up+down | "
        "→ target: round | wall s | client s | FLOPs | MiB |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for run in runs:
        hit = cost_to_target(run, target_eval_loss)
        lines.append(
            f"| {run.label} | {_fmt(_final(run, 'eval_loss'))} | {_fmt(_final(run, 'eval_accuracy'))} | "
            f"{len(run.rounds)} | {_fmt(_total(run, 'wall_s'), '.1f')} | {_fmt(_total(run, 'client_train_s'), '.1f')} | "
            f"{_fmt(_total(run, 'train_flops'), '.3e')} | {_mib(_total(run, 'bytes'))} | {_fmt(hit['round'])} | "
            f"{_fmt(hit['wall_s'], '.1f')} | {_fmt(hit['client_train_s'], '.1f')} | {_fmt(hit['train_flops'], '.3e')} | "
            f"{_mib(hit['bytes'])} |"
        )
    return lines


def _labelled(run_dirs, out_dir: Path) -> list[RunRecords]:
    """The runs, each labelled by its directory relative to ``out_dir`` (its name when outside it)."""
    runs = [read_run(d) for d in run_dirs]
    for run in runs:
        try:
            label = run.path.resolve().relative_to(out_dir.resolve()).as_posix()
        except ValueError:
            label = run.path.name
        run.summary = {**run.summary, "label": label}
    return runs


def _write(out_dir: Path, lines: list[str], plots: list[Path]) -> Path:
    lines = lines + ["", "## Plots", ""] + [f"![{p.stem}](plots/{p.name})" for p in plots]
    out = out_dir / "comparison.md"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text("\n".join(lines) + "\n")
    return out


def write_comparison(run_dirs: list[str | Path], out_dir: str | Path, target_eval_loss: float = 0.0) -> Path:
    """Write ``comparison.md`` and ``plots/eval_loss_vs_*.png`` over several run directories.

    Each run is labelled by its directory relative to ``out_dir`` (``devft compare`` names them after the
    config files).
    """
    out_dir = Path(out_dir)
    runs = _labelled(run_dirs, out_dir)
    target_eval_loss = _default_target(runs, target_eval_loss)
    lines = ["# devft comparison", "",
             f"Target eval loss: {target_eval_loss:.4g} (the cost columns are to first reach it; — = never reached).",
             ""] + _run_table(runs, target_eval_loss)
    return _write(out_dir, lines, plot_comparison(runs, out_dir / "plots"))


def _pm(s: Spread | None, spec: str = ".4f", signed: bool = False) -> str:
    """``mean ± sd [low, high]`` (``mean`` alone for one value)."""
    if s is None:
        return "—"
    f = ("+" if signed else "") + spec
    if s.sd is None:
        return format(s.mean, f)
    return f"{s.mean:{f}} ± {s.sd:{spec}} [{s.low:{f}}, {s.high:{f}}]"


def write_seed_comparison(groups: Mapping[str, Mapping[int, str | Path]], out_dir: str | Path,
                          target_eval_loss: float = 0.0, seed_keys: Sequence[str] = ("federation.seed",)) -> Path:
    """``comparison.md`` and plots over configs run with several seeds: ``groups[config][seed]`` is a run
    directory, run with every key of ``seed_keys`` set to ``seed``. Per config, the spread of its final figures over seeds; per config after the first (the
    baseline), the paired differences from the baseline seed by seed (:mod:`devft.reports.seeds`); then
    every run's own row. The plots draw each config's mean over seeds with a band from the lowest to the
    highest seed."""
    out_dir = Path(out_dir)
    names = list(groups)
    if not names or any(not groups[n] for n in names):
        raise ValueError(f"write_seed_comparison needs at least one run per config, got {dict(groups)}")
    runs = {n: dict(zip(groups[n], _labelled(list(groups[n].values()), out_dir))) for n in names}
    every = [run for n in names for run in runs[n].values()]
    target_eval_loss = _default_target(every, target_eval_loss)
    lines = [
        "# devft comparison over seeds",
        "",
        f"Seeds: each config ran once per seed ({', '.join(map(str, sorted({s for n in names for s in groups[n]})))}), "
        f"with {' and '.join(f'`{k}`' for k in seed_keys)} set to it; everything else, the data included, is the "
        "same in every run. Figures are mean ± sample standard deviation [lowest, highest] over seeds.",
        "",
        f"Target eval loss: {target_eval_loss:.4g} (— = never reached).",
        "",
        "| method | seeds | final eval loss | final acc | MiB up+down | client FLOPs | client train s | wall s | "
        "reached target | MiB to target |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for n in names:
        rs = list(runs[n].values())
        hits = [cost_to_target(r, target_eval_loss) for r in rs]
        reached = [h for h in hits if h["round"] is not None]

        def mean_of(key, rs=rs):
            s = spread([v for v in (_total(r, key) for r in rs) if v is not None])
            return None if s is None else s.mean

        lines.append(
            f"| {n} | {len(rs)} | {_pm(spread([v for r in rs if (v := _final(r, 'eval_loss')) is not None]))} | "
            f"{_pm(spread([v for r in rs if (v := _final(r, 'eval_accuracy')) is not None]), '.3f')} | "
            f"{_mib(mean_of('bytes'))} | {_fmt(mean_of('train_flops'), '.3e')} | "
            f"{_fmt(mean_of('client_train_s'), '.1f')} | {_fmt(mean_of('wall_s'), '.1f')} | {len(reached)}/{len(rs)} | "
            f"{_mib(spread([h['bytes'] for h in reached]).mean if reached else None)} |"
        )
    if len(names) > 1:
        base = names[0]
        lines += [
            "",
            f"## Paired by seed, against {base}",
            "",
            f"Differences config − {base}, seed by seed (negative eval loss = better than {base}); ± is the 95 % "
            "t interval of the mean difference, so \"excludes 0\" means the seeds agree beyond their spread.",
            "",
            "| method | seeds | Δ final eval loss | per seed | lower in | excludes 0 | Δ final acc |",
            "|---|---|---|---|---|---|---|",
        ]
        finals = {n: {s: _final(r, "eval_loss") for s, r in runs[n].items()} for n in names}
        accs = {n: {s: _final(r, "eval_accuracy") for s, r in runs[n].items()} for n in names}
        for n in names[1:]:
            d, a = paired(finals[base], finals[n]), paired(accs[base], accs[n])
            if d is None:
                lines.append(f"| {n} | 0 | — | — | — | — | — |")
                continue
            ci = "" if d.spread.ci95 is None else f" ± {d.spread.ci95:.4f}"
            acc = "—" if a is None else f"{a.spread.mean:+.3f}" + ("" if a.spread.ci95 is None else f" ± {a.spread.ci95:.3f}")
            lines.append(
                f"| {n} | {len(d.seeds)} | {d.spread.mean:+.4f}{ci} | "
                f"{', '.join(f'{s}: {x:+.4f}' for s, x in zip(d.seeds, d.diffs))} | {d.lower}/{len(d.seeds)} | "
                f"{'—' if d.spread.ci95 is None else ('yes' if d.significant else 'no')} | {acc} |"
            )
    lines += ["", "## Every run", ""] + _run_table(every, target_eval_loss)
    plots = plot_seed_comparison({n: list(runs[n].values()) for n in names}, out_dir / "plots")
    return _write(out_dir, lines, plots)
