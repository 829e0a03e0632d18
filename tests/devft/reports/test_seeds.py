"""Several seeds per compared config: spreads and paired differences checked by hand, and the seeded
comparison.md (tables and band plots) over run directories written here."""

import json
import math

import pytest
from test_report import _write_run

from devft.config import load_config
from devft.reports import write_seed_comparison
from devft.reports.seeds import paired, spread

T975_DF2 = 4.302652729911275  # Student t, 97.5 % quantile, 2 degrees of freedom (tables)


def test_spread_of_three_values_by_hand():
    s = spread([1.0, 2.0, 4.0])
    assert s.n == 3 and s.mean == pytest.approx(7 / 3)
    assert s.sd == pytest.approx(math.sqrt(((1 - 7 / 3) ** 2 + (2 - 7 / 3) ** 2 + (4 - 7 / 3) ** 2) / 2))
    assert (s.low, s.high) == (1.0, 4.0)
    assert s.ci95 == pytest.approx(T975_DF2 * s.sd / math.sqrt(3))


def test_one_value_has_no_spread_and_none_has_no_figures():
    s = spread([0.5])
    assert (s.n, s.mean, s.sd, s.ci95) == (1, 0.5, None, None)
    assert spread([]) is None


def test_paired_differences_use_only_the_seeds_both_sides_have():
    d = paired({0: 1.0, 1: 2.0, 2: 3.0, 3: None}, {1: 1.5, 2: 3.5, 3: 0.0, 4: 9.0})
    assert d.seeds == (1, 2) and d.diffs == (-0.5, 0.5) and d.lower == 1
    assert d.spread.mean == 0.0 and not d.significant
    assert paired({0: 1.0}, {1: 1.0}) is None


def test_consistent_small_differences_are_significant_and_noisy_ones_not():
    base = {0: 1.00, 1: 1.50, 2: 0.80}  # the seeds differ far more than the configs do
    assert paired(base, {s: v - 0.10 for s, v in base.items()}).significant  # lower by 0.10 on every seed
    assert not paired(base, {0: 0.7, 1: 1.6, 2: 0.8}).significant  # -0.3, +0.1, 0: the sign depends on the seed


def _seeded(tmp_path, name, losses_by_seed, up=10, keys=None):
    """Runs of config ``name``, one per seed; with ``keys``, each writes its config.json: ``keys`` with
    federation.seed and train.seed set to the seed."""
    group = {}
    for seed, losses in losses_by_seed.items():
        path = tmp_path / "cmp" / name / f"seed-{seed}"
        config = None if keys is None else load_config(None, {**keys, "federation.seed": seed, "train.seed": seed})
        _write_run(path, name, losses, [up] * len(losses), config=config)
        group[seed] = path
    return group


def test_seed_comparison_tables_hold_the_spread_and_the_paired_differences(tmp_path):
    groups = {
        "fedit": _seeded(tmp_path, "fedit", {0: [2.0, 1.50], 1: [2.2, 1.70], 2: [2.1, 1.60]}, up=2**20,
                         keys={"federation.method": "fedit"}),
        "devft": _seeded(tmp_path, "devft", {0: [1.9, 1.40], 1: [2.0, 1.65], 2: [2.2, 1.45]}, up=2**18,
                         keys={"federation.method": "devft"}),
    }
    table = write_seed_comparison(groups, tmp_path / "cmp", seed_keys=("federation.seed", "train.seed")).read_text()
    assert "with `federation.seed` and `train.seed` set to it; the configs' other differences are below" in table
    # what the configs differ in: the method; the seeds, which differ by design, are not listed
    assert "| key | fedit | devft |" in table and "| `federation.method` | `fedit` | `devft` |" in table
    assert "`federation.seed` |" not in table and "Not like for like" not in table
    # fedit's finals 1.5, 1.7, 1.6: mean 1.6, sd 0.1; devft's 1.4, 1.65, 1.45: mean 1.5, sd 0.1323
    assert "| fedit | global | 3 | 1.6000 ± 0.1000 [1.5000, 1.7000] | none |" in table
    assert "| devft | global | 3 | 1.5000 ± 0.1323 [1.4000, 1.6500] | none |" in table
    # paired: -0.1, -0.05, -0.15 → mean -0.1, sd 0.05, 95 % half-width 4.303 · 0.05 / √3 = 0.1242
    assert "## Paired by seed, against fedit" in table
    assert "| devft | 3 | -0.1000 ± 0.1242 | 0: -0.1000, 1: -0.0500, 2: -0.1500 | 3/3 | no | +0.000 ± 0.000 |" in table
    # bytes: 2 rounds of 1 MiB up and 1 MiB down = 4 MiB (devft 1 MiB), none of it evaluation; FLOPs 1e9 + 2e9,
    # client seconds 2 × 3.0; target = the worst final, 1.7, which every run reaches in round 2 (fedit: after
    # 4 MiB, devft after 1 MiB)
    assert "Target eval loss: 1.7" in table
    assert "| 0.500 ± 0.000 [0.500, 0.500] | 4.00 | 0.00 | 3.000e+09 | 6.0 | 6.0 | 3/3 | 4.00 |" in table
    assert "| 0.500 ± 0.000 [0.500, 0.500] | 1.00 | 0.00 | 3.000e+09 | 6.0 | 6.0 | 3/3 | 1.00 |" in table
    for seed in range(3):  # every run keeps its own row, labelled by its directory
        assert f"| devft/seed-{seed} | " in table and f"| fedit/seed-{seed} | " in table
    for name in ("round", "client_flops", "client_seconds", "bytes"):
        assert (tmp_path / "cmp" / "plots" / f"eval_loss_vs_{name}.png").stat().st_size > 1000


def test_a_config_with_fewer_seeds_is_paired_on_the_seeds_it_has(tmp_path):
    groups = {"a": _seeded(tmp_path, "a", {0: [1.0], 1: [2.0]}), "b": _seeded(tmp_path, "b", {1: [1.5]})}
    table = write_seed_comparison(groups, tmp_path / "cmp", seed_keys=("data.seed",)).read_text()
    assert "| b | 1 | -0.5000 | 1: -0.5000 | 1/1 | — |" in table  # one pair: no interval, no verdict
    assert "| b | global | 1 | 1.5000 | none |" in table  # one seed: the value, no ± and no range
    assert "with `data.seed` set to it; the configs' other differences are below" in table
    assert "No readable config.json in a, b: what those runs ran with is unknown." in table


def test_a_seed_without_a_final_eval_loss_is_named_and_left_out_of_the_figures(tmp_path):
    groups = {"a": _seeded(tmp_path, "a", {0: [1.0], 1: [2.0], 2: [3.0]}),
              "b": _seeded(tmp_path, "b", {0: [0.5], 1: [1.5], 2: [2.5]})}
    summary = groups["b"][1] / "summary.json"  # seed 1 of b diverged: its run ended without a final eval loss
    summary.write_text(json.dumps({**json.loads(summary.read_text()), "final": {"eval_loss": None}}))
    table = write_seed_comparison(groups, tmp_path / "cmp", seed_keys=("federation.seed",)).read_text()
    assert "| b | global | 3 | 1.5000 ± 1.4142 [0.5000, 2.5000] | 1 |" in table
    assert "| b | 2 | -0.5000 ± 0.0000 | 0: -0.5000, 2: -0.5000 | 2/2 | yes |" in table


def test_the_band_plot_draws_only_rounds_every_seed_evaluated(tmp_path, monkeypatch):
    import matplotlib.pyplot as plt

    from devft.reports import plots, read_run

    groups = _seeded(tmp_path, "a", {0: [2.0, 1.0, 0.5], 1: [3.0, 2.0, 1.5]})
    rows = [json.loads(line) for line in (groups[1] / "metrics.jsonl").read_text().splitlines()]
    del rows[1]["eval_loss"]  # seed 1 did not evaluate round 2
    (groups[1] / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    drawn = []
    real = plt.Axes.plot

    def spy(self, xs, ys, *a, **k):
        drawn.append((list(xs), list(ys)))
        return real(self, xs, ys, *a, **k)

    monkeypatch.setattr(plt.Axes, "plot", spy)
    plots.plot_seed_comparison({"a": [read_run(p) for p in groups.values()]}, tmp_path / "plots")
    assert drawn[0] == ([1.0, 3.0], [2.5, 1.0])  # rounds 1 and 3; means of (2, 3) and (0.5, 1.5)


def test_a_config_without_runs_is_refused(tmp_path):
    with pytest.raises(ValueError, match="at least one run per config"):
        write_seed_comparison({"a": {}}, tmp_path, seed_keys=("federation.seed",))
