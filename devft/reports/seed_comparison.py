"""comparison.md over configs each run with several seeds: spreads over seeds, paired differences, band plots."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path

from devft.reports.central import central_reference
from devft.reports.plots import plot_seed_comparison
from devft.reports.runs import RunRecords, cost_to_target, read_run
from devft.reports.seeds import Paired, Spread, paired, spread
from devft.reports.setting import differences_section
from devft.reports.tables import (
    BYTES_NOTE,
    default_target,
    eval_cell,
    eval_kind_note,
    final_value,
    fmt,
    mib,
    run_table,
    total_value,
    write_comparison_file,
)


def _spread_cell(s: Spread | None, spec: str = ".4f") -> str:
    """``mean ± sd [lowest, highest]``, the value alone for one seed, ``—`` for none."""
    if s is None:
        return "—"
    if s.sd is None:
        return format(s.mean, spec)
    return f"{s.mean:{spec}} ± {s.sd:{spec}} [{s.low:{spec}}, {s.high:{spec}}]"


def _mean(values) -> float | None:
    values = [v for v in values if v is not None]
    return sum(values) / len(values) if values else None


def _interval_cell(d: Paired | None, spec: str) -> str:
    """``mean ± 95 % half-width`` of paired differences (the mean alone for one pair)."""
    if d is None:
        return "—"
    s = d.spread
    return f"{s.mean:+{spec}}" + ("" if s.ci95 is None else f" ± {s.ci95:{spec}}")


def _config_row(name: str, runs: Mapping[int, RunRecords], target: float) -> str:
    finals = {seed: final_value(r, "eval_loss") for seed, r in runs.items()}
    missing = [seed for seed, v in finals.items() if v is None]
    reached = [h for h in (cost_to_target(r, target) for r in runs.values()) if h["round"] is not None]
    rs = list(runs.values())
    return (
        f"| {name} | {eval_cell(rs[0])} | {len(runs)} | "
        f"{_spread_cell(spread([v for v in finals.values() if v is not None]))} | "
        f"{', '.join(map(str, missing)) or 'none'} | "
        f"{_spread_cell(spread([v for r in rs if (v := final_value(r, 'eval_accuracy')) is not None]), '.3f')} | "
        f"{mib(_mean(total_value(r, 'bytes') for r in rs))} | {mib(_mean(total_value(r, 'eval_bytes') for r in rs))} | "
        f"{fmt(_mean(total_value(r, 'train_flops') for r in rs), '.3e')} | "
        f"{fmt(_mean(total_value(r, 'client_train_s') for r in rs), '.1f')} | "
        f"{fmt(_mean(total_value(r, 'wall_s') for r in rs), '.1f')} | {len(reached)}/{len(runs)} | "
        f"{mib(_mean(h['bytes'] for h in reached))} |"
    )


def _paired_rows(runs: Mapping[str, Mapping[int, RunRecords]]) -> list[str]:
    names = list(runs)
    base = names[0]
    lines = [
        "",
        f"## Paired by seed, against {base}",
        "",
        f"Differences config − {base}, seed by seed, over the seeds where both have a final eval loss (negative "
        f"eval loss: lower than {base}'s). ± is the 95 % Student t interval of the mean difference; \"excludes 0\" "
        "is a paired t-test rejecting \"no difference\" at the 5 % level (it assumes roughly normal differences).",
        "",
        "| method | pairs | Δ final eval loss | per seed | lower in | excludes 0 | Δ final acc |",
        "|---|---|---|---|---|---|---|",
    ]

    def finals(name: str, key: str) -> dict[int, float | None]:
        return {seed: final_value(r, key) for seed, r in runs[name].items()}

    for name in names[1:]:
        d = paired(finals(base, "eval_loss"), finals(name, "eval_loss"))
        if d is None:
            lines.append(f"| {name} | 0 | — | — | — | — | — |")
            continue
        verdict = "—" if d.spread.ci95 is None else ("yes" if d.significant else "no")
        per_seed = ", ".join(f"{s}: {x:+.4f}" for s, x in zip(d.seeds, d.diffs))
        lines.append(
            f"| {name} | {len(d.seeds)} | {_interval_cell(d, '.4f')} | {per_seed} | {d.lower}/{len(d.seeds)} | "
            f"{verdict} | {_interval_cell(paired(finals(base, 'eval_accuracy'), finals(name, 'eval_accuracy')), '.3f')} |"
        )
    return lines


def write_seed_comparison(groups: Mapping[str, Mapping[int, str | Path]], out_dir: str | Path, *,
                          seed_keys: Sequence[str], target_eval_loss: float = 0.0,
                          central: Sequence[str | Path] = ()) -> Path:
    """``comparison.md`` and plots over configs run with several seeds.

    ``groups[config][seed]`` is a run directory, run with every key of ``seed_keys`` set to ``seed``. Per
    config: the spread of its final figures over seeds and its mean costs; per config after the first (the
    baseline): the differences from the baseline seed by seed (:mod:`devft.reports.seeds`); then every
    run's own row, labelled ``config/seed-S``. The plots draw each config's mean over seeds with a band from
    the lowest to the highest seed. ``central``: the centralised reference's ``devft train`` directories, one
    per seed (:mod:`devft.reports.central`).
    """
    out_dir = Path(out_dir)
    names = list(groups)
    if not names or any(not groups[n] for n in names):
        raise ValueError(f"write_seed_comparison needs at least one run per config, got {dict(groups)}")
    runs: dict[str, dict[int, RunRecords]] = {}
    for name in names:
        runs[name] = {}
        for seed, path in groups[name].items():
            run = read_run(path)
            run.summary = {**run.summary, "label": f"{name}/seed-{seed}"}
            runs[name][seed] = run
    every = [run for name in names for run in runs[name].values()]
    target = default_target(every, target_eval_loss)
    seeds = sorted({seed for name in names for seed in groups[name]})
    first = {name: next(iter(runs[name].values())).path for name in names}  # a config's seeds differ in seed_keys alone
    lines = [
        "# devft comparison over seeds",
        "",
        f"Seeds: each config ran once per seed ({', '.join(map(str, seeds))}), with "
        f"{' and '.join(f'`{k}`' for k in seed_keys)} set to it; the configs' other differences are below. "
        "Figures are mean ± sample standard deviation [lowest, highest] over the seeds that have them.",
        "",
    ] + differences_section(first, ignore=seed_keys) + [
        f"Target eval loss: {target:.4g} (— = never reached). {BYTES_NOTE}",
        "",
        "| method | eval of | seeds | final eval loss | seeds without one | final acc | MiB up+down | eval MiB | "
        "client FLOPs | client train s | wall s | reached target | MiB to target (mean over the seeds that reached it) |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    lines += [_config_row(name, runs[name], target) for name in names]
    lines += eval_kind_note({name: any(r.personalised_eval for r in runs[name].values()) for name in names})
    if len(names) > 1:
        lines += _paired_rows(runs)
    reference_lines, reference = central_reference(central)
    lines += reference_lines
    lines += ["", "## Every run", ""] + run_table(every, target)
    plots = plot_seed_comparison({n: list(runs[n].values()) for n in names}, out_dir / "plots", reference)
    return write_comparison_file(out_dir, lines, plots)
