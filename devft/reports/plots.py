"""Plots of one run and of several runs side by side (matplotlib, Agg backend, PNG files)."""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
from matplotlib.ticker import MaxNLocator  # noqa: E402

from devft.reports.runs import RunRecords  # noqa: E402


def _save(fig, path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def plot_run(run: RunRecords, out_dir: Path) -> list[Path]:
    """Loss, bytes per round and submodel size of one run; returns the written files."""
    written = []
    fig, ax = plt.subplots(figsize=(6.4, 4))
    for key, style in (("train_loss", "-"), ("submodel_eval_loss", ":"), ("eval_loss", "-o")):
        xs, ys = run.series(key)
        if xs:
            label = key.replace("_", " ")
            ax.plot(xs, ys, style, label=_legend(label, [run]) if key.endswith("eval_loss") else label)
    ax.set_xlabel("round")
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))  # rounds are whole: no 1.5 or 2.25 ticks
    ax.set_ylabel("loss")
    ax.set_title(f"{run.label}: loss")
    ax.legend()
    written.append(_save(fig, out_dir / "loss.png"))

    fig, ax1 = plt.subplots(figsize=(6.4, 4))
    rounds = [int(r["round"]) for r in run.rounds]
    up = [float(r.get("bytes_up") or 0) / 2**20 for r in run.rounds]
    down = [float(r.get("bytes_down") or 0) / 2**20 for r in run.rounds]
    ax1.bar(rounds, down, label="down (MiB)", color="tab:blue")
    ax1.bar(rounds, up, bottom=down, label="up (MiB)", color="tab:orange")
    ax1.set_xlabel("round")
    ax1.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax1.set_ylabel("MiB per round")
    ax2 = ax1.twinx()
    ax2.step(rounds, [r.get("submodel_layers") or 0 for r in run.rounds], where="mid", color="black", label="layers")
    ax2.set_ylabel("submodel layers")
    ax1.legend(loc="upper left")
    ax1.set_title(f"{run.label}: communication and growth")
    written.append(_save(fig, out_dir / "bytes_and_layers.png"))
    return written


_COMPARISON_AXES = (
    ("round", "round", lambda r: [float(x["round"]) for x in r.rounds]),
    ("client_flops", "cumulative client training FLOPs", lambda r: r.cumulative("train_flops")),
    ("client_seconds", "cumulative client training seconds", lambda r: r.cumulative("client_train_s_sum")),
    ("bytes", "cumulative training bytes (up + down, MiB)", lambda r: [b / 2**20 for b in r.training_bytes()]),
)


def _eval_points(run: RunRecords, xfun) -> dict[int, tuple[float, float]]:
    """``{round: (x, eval loss)}`` over the rounds where the full model was evaluated."""
    xs = xfun(run)
    return {int(row["round"]): (xs[i], float(row["eval_loss"])) for i, row in enumerate(run.rounds)
            if row.get("eval_loss") is not None}


def _legend(label: str, runs: list[RunRecords]) -> str:
    """A line's label, marked when its eval loss is of the clients' own models rather than the global one."""
    return f"{label}, clients' own models" if any(run.personalised_eval for run in runs) else label


def _comparison_figures(draw, out_dir: Path, legend_title: str | None = None,
                        reference: float | None = None) -> list[Path]:
    """One figure per x axis of :data:`_COMPARISON_AXES`; ``draw(ax, xfun)`` plots the lines; ``reference``,
    the centralised run's eval loss, is a dashed horizontal line."""
    written = []
    for name, xlabel, xfun in _COMPARISON_AXES:
        fig, ax = plt.subplots(figsize=(6.4, 4))
        draw(ax, xfun)
        if reference is not None:
            ax.axhline(reference, linestyle="--", color="gray", label="centralised reference")
        ax.set_xlabel(xlabel)
        if name == "round":
            ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.set_ylabel("full-model eval loss")
        if ax.get_legend_handles_labels()[0]:  # runs that never evaluated draw nothing
            ax.legend(title=legend_title, title_fontsize="small")
        ax.set_title(f"eval loss vs {xlabel}")
        written.append(_save(fig, out_dir / f"eval_loss_vs_{name}.png"))
    return written


def plot_comparison(runs: list[RunRecords], out_dir: Path, reference: float | None = None) -> list[Path]:
    """Eval loss against round, cumulative client compute and cumulative bytes, one line per run (and the
    centralised ``reference`` loss, dashed, when given)."""

    def draw(ax, xfun):
        for run in runs:
            by_round = _eval_points(run, xfun)
            pts = [by_round[r] for r in sorted(by_round)]
            if pts:
                ax.plot([p[0] for p in pts], [p[1] for p in pts], "-o", label=_legend(run.label, [run]), markersize=3)

    return _comparison_figures(draw, out_dir, reference=reference)


def plot_seed_comparison(groups: dict[str, list[RunRecords]], out_dir: Path,
                         reference: float | None = None) -> list[Path]:
    """The same figures over several seeds of each config: per config, the mean eval loss over its seeds at
    each evaluated round (x: the mean over seeds too) and a band from the lowest to the highest seed. Only
    rounds that every seed evaluated are drawn."""

    def draw(ax, xfun):
        for name, runs in groups.items():
            points = [_eval_points(run, xfun) for run in runs]
            rounds = sorted(set.intersection(*(set(p) for p in points))) if points else []
            if not rounds:
                continue
            xs = [sum(p[r][0] for p in points) / len(points) for r in rounds]
            ys = [[p[r][1] for p in points] for r in rounds]
            line, = ax.plot(xs, [sum(y) / len(y) for y in ys], "-o", markersize=3,
                            label=_legend(f"{name} (mean of {len(runs)})", runs))
            ax.fill_between(xs, [min(y) for y in ys], [max(y) for y in ys], color=line.get_color(), alpha=0.2)

    return _comparison_figures(draw, out_dir, legend_title="band: lowest to highest seed", reference=reference)
