"""Reports from a run directory: cost to a target (hand-computed), report.md, plots, comparison."""

import json

import pytest

from devft.config import RunConfig, config_to_dict, load_config
from devft.reports import cost_to_target, read_run, write_comparison, write_report


def _write_run(path, method, losses, bytes_up, config=None, eval_bytes=None, eval_kind="global"):
    """A run directory as the strategy writes it: per-round rows, totals that are their sums, and (given
    ``config``, a :class:`RunConfig`) its config.json. ``eval_bytes[i]`` of round i+1's bytes each way were
    evaluation messages."""
    path.mkdir(parents=True)
    eval_bytes = eval_bytes or [0] * len(losses)
    rows = []
    for i, (loss, up) in enumerate(zip(losses, bytes_up), start=1):
        rows.append({"round": i, "stage": 0 if i < 3 else 1, "submodel_layers": 2 if i < 3 else 4,
                     "clients_sampled": 2, "clients_ok": 2, "clients_failed": 0, "bytes_up": up,
                     "bytes_down": up, "train_flops": 1e9 * i, "client_train_s_mean": 1.5, "client_train_s_max": 2.0,
                     "round_wall_s": 3.0, "aggregate_s": 0.01, "peak_rss_mb": 500.0, "train_loss": loss + 0.1,
                     "eval_loss": loss, "eval_accuracy": 0.5, "eval_kind": eval_kind,
                     "eval_bytes_up": eval_bytes[i - 1], "eval_bytes_down": eval_bytes[i - 1]})
    (path / "metrics.jsonl").write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    (path / "summary.json").write_text(json.dumps({
        "method": method, "label": method, "seed": 0, "wall_s": 3.0 * len(rows), "eval_kind": eval_kind,
        "final": {"eval_loss": losses[-1], "eval_accuracy": 0.5},
        "totals": {"bytes_up": sum(bytes_up), "bytes_down": sum(bytes_up), "eval_bytes_up": sum(eval_bytes),
                   "eval_bytes_down": sum(eval_bytes), "train_flops": sum(r["train_flops"] for r in rows),
                   "client_train_s": 3.0 * len(rows)},
    }))
    if config is not None:
        (path / "config.json").write_text(json.dumps(config_to_dict(config)))


def test_cost_to_target_is_the_first_round_at_or_below_it(tmp_path):
    _write_run(tmp_path / "a", "devft", [3.0, 2.0, 1.5, 1.2], [10, 10, 20, 20])
    run = read_run(tmp_path / "a")
    hit = cost_to_target(run, 1.5)
    assert hit == {"round": 3, "wall_s": 9.0, "client_train_s": 9.0, "train_flops": 6e9, "bytes": 80.0}
    assert cost_to_target(run, 0.5)["round"] is None


def test_report_and_comparison_files(tmp_path):
    _write_run(tmp_path / "devft", "devft", [3.0, 2.0, 1.5, 1.2], [10, 10, 20, 20])
    _write_run(tmp_path / "fedit", "fedit", [2.5, 1.9, 1.6, 1.4], [40, 40, 40, 40])
    report = write_report(tmp_path / "devft").read_text()
    assert "| 3 | 1 | 4 | 2/2 | 0 |" in report
    assert (tmp_path / "devft" / "plots" / "loss.png").stat().st_size > 1000
    table = write_comparison([tmp_path / "devft", tmp_path / "fedit"], tmp_path / "cmp").read_text()
    # default target = the worst final eval loss (1.4): devft reaches it in round 4, fedit in round 4
    assert "Target eval loss: 1.4" in table
    assert table.count("\n| devft |") == 1 and table.count("\n| fedit |") == 1
    # runs inside the comparison's directory, as devft compare writes them, and through a link: the same labels
    _write_run(tmp_path / "cmp" / "devft", "devft", [3.0, 2.0, 1.5, 1.2], [10, 10, 20, 20])
    (tmp_path / "cmp" / "fedit_link").symlink_to(tmp_path / "fedit")
    table = write_comparison([tmp_path / "cmp" / "devft", tmp_path / "cmp" / "fedit_link"], tmp_path / "cmp").read_text()
    assert table.count("\n| devft |") == 1 and table.count("\n| fedit_link |") == 1
    for name in ("round", "client_flops", "client_seconds", "bytes"):
        assert (tmp_path / "cmp" / "plots" / f"eval_loss_vs_{name}.png").exists()


MIB = 2**20


def test_a_comparison_charges_training_bytes_and_shows_evaluation_bytes_beside_them(tmp_path):
    """Two runs with the same training traffic (1 MiB each way a round); one also evaluates on its clients
    (0.5 MiB each way in rounds 2 and 4, inside its bytes_up / bytes_down as the strategy records them). The
    bytes a comparison charges, to the end and to the target, are the same for both."""
    _write_run(tmp_path / "fedit", "fedit", [2.0, 1.8, 1.6, 1.5], [MIB] * 4)
    _write_run(tmp_path / "fedsa", "fedsa", [2.0, 1.7, 1.6, 1.5], [MIB, 1.5 * MIB, MIB, 1.5 * MIB],
               eval_bytes=[0, MIB // 2, 0, MIB // 2], eval_kind="personalised-clients-mean")
    assert read_run(tmp_path / "fedsa").training_bytes() == [2 * MIB, 4 * MIB, 6 * MIB, 8 * MIB]
    table = write_comparison([tmp_path / "fedit", tmp_path / "fedsa"], tmp_path / "cmp").read_text()
    # both reach the target (the worst final, 1.5) in round 4: 12 s, 12 client s, 1e9·(1+2+3+4) FLOPs, 8 MiB
    assert "| fedit | global | 1.5 | 0.5 | 4 | 12.0 | 12.0 | 1.000e+10 | 8.00 | 0.00 | 4 | 12.0 | 12.0 | 1.000e+10 | 8.00 |" in table
    assert "| fedsa | clients' own | 1.5 | 0.5 | 4 | 12.0 | 12.0 | 1.000e+10 | 8.00 | 2.00 | 4 | 12.0 | 12.0 | 1.000e+10 | 8.00 |" in table
    assert "Eval loss is not the same quantity in every run: for fedsa it is the mean held-out loss" in table
    report = write_report(tmp_path / "fedsa").read_text()
    assert "- totals: 5.00 MiB up, 5.00 MiB down," in report
    assert "- of those bytes, evaluation messages: 1.00 MiB up, 1.00 MiB down (the rest is training)" in report


def test_a_comparison_states_what_its_runs_differ_in(tmp_path):
    base, fedit = RunConfig(), load_config(None, {"federation.method": "fedit"})
    _write_run(tmp_path / "devft", "devft", [2.0, 1.5], [10, 10], config=base)
    _write_run(tmp_path / "same", "devft", [2.0, 1.5], [10, 10], config=base)
    _write_run(tmp_path / "fedit", "fedit", [2.0, 1.6], [10, 10], config=fedit)
    _write_run(tmp_path / "longer", "fedit", [2.0, 1.6], [10, 10],
               config=load_config(None, {"federation.method": "fedit", "train.max_steps": 20}))
    _write_run(tmp_path / "unknown", "fedit", [2.0, 1.6], [10, 10])

    table = write_comparison([tmp_path / "devft", tmp_path / "same"], tmp_path / "cmp1").read_text()
    assert "Every config key is the same in every run." in table

    table = write_comparison([tmp_path / "devft", tmp_path / "fedit"], tmp_path / "cmp2").read_text()
    assert "| key | devft | fedit |" in table and "| `federation.method` | `devft` | `fedit` |" in table
    assert "Not like for like" not in table  # the method is what a comparison compares

    table = write_comparison([tmp_path / "fedit", tmp_path / "longer", tmp_path / "unknown"], tmp_path / "cmp3").read_text()
    assert "| `train.max_steps` | `10` | `20` |" in table and "federation.method" not in table
    assert "**Not like for like:** the runs differ in `train.max_steps`, part of the setting" in table
    assert "No readable config.json in unknown: what those runs ran with is unknown." in table


def test_the_report_lists_failures_skips_and_bounded_updates(tmp_path):
    _write_run(tmp_path / "run", "devft", [3.0, 2.0], [10, 10])
    rows = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    rows[0].update(failures=[{"partition": 3, "reason": "client raised: boom"}], update_norm_bound=2.5,
                   clipped=[{"partition": 1, "norm": 5.0e6, "scale": 5e-7}])
    rows[1].update(skipped="1 valid replies < federation.min_replies=2",
                   ignored_replies=[{"node": 7, "partition": 2, "reason": "a second reply this round"}])
    (tmp_path / "run" / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    summary["totals"].update(clients_failed=1, rounds_skipped=1, updates_clipped=1, truncated_examples=7)
    (tmp_path / "run" / "summary.json").write_text(json.dumps(summary))

    report = write_report(tmp_path / "run").read_text()

    assert "- 1 client failures, 1 rounds skipped, 1 updates scaled back onto the norm bound" in report
    assert "- 7 training examples (counted once per client and round) lost the end of their answer" in report
    assert "- round 1: partition 3 failed: client raised: boom" in report
    assert "- round 1: the update of partition 1 (norm 5e+06) was scaled by 5e-07 onto the bound 2.5" in report
    assert "- round 2: update skipped: 1 valid replies < federation.min_replies=2" in report
    assert "- round 2: a reply of node 7 (partition 2) ignored: a second reply this round" in report


@pytest.mark.parametrize("metrics,summary,match", [
    ('{"round": 1}\nnot json\n{"round": 3}\n', None, r"metrics.jsonl: line 2 is not JSON"),
    ('[1, 2]\n', None, r"metrics.jsonl: line 1 is not a metrics row"),
    ('{"eval_loss": 1.0}\n', None, r"metrics.jsonl: line 1 is not a metrics row"),
    ('{"round": 1, "eval_loss": "abc"}\n', None, r"round 1: eval_loss='abc' is not a number"),
    ('{"round": 1}\n', "[1, 2]", r"summary.json is not a JSON object"),
    ('{"round": 1}\n', "{", r"summary.json is not JSON"),
])
def test_a_damaged_run_directory_is_named_not_a_traceback(tmp_path, metrics, summary, match):
    (tmp_path / "metrics.jsonl").write_text(metrics)
    if summary is not None:
        (tmp_path / "summary.json").write_text(summary)
    with pytest.raises(ValueError, match=match):
        read_run(tmp_path).series("eval_loss")


def test_an_interrupted_last_line_is_left_out(tmp_path):
    (tmp_path / "metrics.jsonl").write_text('{"round": 1, "eval_loss": 2.0}\n{"round": 2, "eval_lo')
    assert read_run(tmp_path).series("eval_loss") == ([1], [2.0])


def test_a_personalised_runs_report_does_not_call_its_loss_the_full_models(tmp_path):
    _write_run(tmp_path / "fedsa", "devft", [3.0, 2.0, 1.5, 1.2], [10, 10, 20, 20], eval_kind="personalised-clients-mean")
    report = write_report(tmp_path / "fedsa").read_text()
    assert "final mean held-out eval loss of the sampled clients' own (personalised) models 1.2" in report
    assert "full-model" not in report
    _write_run(tmp_path / "fedit", "fedit", [3.0, 2.0, 1.5, 1.2], [10, 10, 20, 20])
    assert "final full-model eval loss 1.2" in write_report(tmp_path / "fedit").read_text()


def test_the_report_of_an_unfinished_run_says_so(tmp_path):
    _write_run(tmp_path / "cut", "devft", [3.0, 2.0], [10, 10], config=RunConfig())
    (tmp_path / "cut" / "summary.json").unlink()
    report = write_report(tmp_path / "cut").read_text()
    assert f"has not finished (no summary.json): 2 of {RunConfig().federation.num_rounds} rounds recorded" in report


def test_the_central_reference_section_says_which_budget_it_had(tmp_path):
    from devft.reports.central import central_reference

    for name, budget, loss in (("fed", {"budget": "federated", "steps": 64, "num_rounds": 16, "clients_per_round": 2,
                                        "steps_per_client_call": 2}, 0.5), ("own", {"budget": "train"}, 0.7)):
        (tmp_path / name).mkdir()
        (tmp_path / name / "central.json").write_text(json.dumps({
            "before": {"loss": 2.0, "accuracy": 0.0}, "after": {"loss": loss, "accuracy": 0.25},
            "train_examples": 40, "train": {"steps": 64}, "wall_s": 3.0, "budget": budget}))
    lines, reference = central_reference([tmp_path / "fed"])
    assert reference == 0.5
    assert "the federated runs' budget: 64 optimiser steps (16 rounds × 2 clients × 2 steps)" in "\n".join(lines)
    lines, reference = central_reference([tmp_path / "fed", tmp_path / "own"])  # one without the budget: said so
    assert reference == pytest.approx(0.6) and "not all with the federated runs' budget" in "\n".join(lines)
    other = json.loads((tmp_path / "fed" / "central.json").read_text())
    other["budget"] = {**other["budget"], "steps": 80, "steps_per_client_call": 5}  # another seed's partitions
    (tmp_path / "seed2").mkdir()
    (tmp_path / "seed2" / "central.json").write_text(json.dumps(other))
    lines, _ = central_reference([tmp_path / "fed", tmp_path / "seed2"])
    assert "each seed's federated budget" in "\n".join(lines)
    assert central_reference([]) == ([], None)
    with pytest.raises(FileNotFoundError, match="is 'nowhere' a devft train output"):
        central_reference(["nowhere"])
    _write_run(tmp_path / "run", "devft", [3.0, 2.0], [10, 10])
    table = write_comparison([tmp_path / "run"], tmp_path / "cmp", central=[tmp_path / "fed"]).read_text()
    assert "## Centralised reference" in table and "| fed | 2 | 0.5 | 0.25 | 64 | 40 | 3.0 |" in table


def test_round_axes_tick_whole_rounds(tmp_path, monkeypatch):
    from devft.reports import plots

    _write_run(tmp_path / "a", "devft", [3.0, 2.0, 1.5, 1.2], [10, 10, 20, 20])
    _write_run(tmp_path / "b", "fedit", [2.5, 1.9, 1.6, 1.4], [40, 40, 40, 40])
    ticks = {}
    save = plots._save

    def recording(fig, path):
        fig.canvas.draw()
        ticks[path.name] = list(fig.axes[0].get_xticks())
        return save(fig, path)

    monkeypatch.setattr(plots, "_save", recording)
    plots.plot_run(read_run(tmp_path / "a"), tmp_path / "plots")
    plots.plot_comparison([read_run(tmp_path / "a"), read_run(tmp_path / "b")], tmp_path / "cmp")
    for name in ("loss.png", "bytes_and_layers.png", "eval_loss_vs_round.png"):
        assert ticks[name] and all(float(t).is_integer() for t in ticks[name]), (name, ticks[name])
