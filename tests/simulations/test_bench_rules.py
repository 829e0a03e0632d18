"""The rules benchmark runs every rule through real aggregation rounds on SmolLM2's LoRA shapes and
reports downlinks that match each rule's payload."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

BENCH = Path(__file__).resolve().parents[2] / "simulations" / "bench" / "bench_rules.py"


def _bench():
    spec = importlib.util.spec_from_file_location(BENCH.stem, BENCH)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_every_rule_runs_and_downlinks_follow_the_rules(tmp_path, capsys):
    out = tmp_path / "rules.json"
    assert _bench().main(["--layers", "1", "--clients", "3", "--rounds", "2", "--threads", "1", "--json", str(out)]) == 0
    rows = {r["rule"]: r for r in json.loads(out.read_text())}
    assert set(rows) == {"fedit", "ffa", "fedsa", "flora", "fedex", "svd"}
    printed = [line for line in capsys.readouterr().out.splitlines() if line.startswith("rule=")]
    assert len(printed) == 6 and all(line.split()[-1].startswith("down_mib=") for line in printed)
    for row in rows.values():
        assert len(row["aggregate_s_by_round"]) == 2 and all(t > 0 for t in row["aggregate_s_by_round"])
    # one layer's seven modules at r = 8: A and B of every module go down for fedit and svd; ffa sends B only
    # (its clients rebuild the shared A), fedsa A only (B: 5184 of SmolLM2's 10176 elements a layer, A the
    # rest); flora sends the base delta instead
    adapters = rows["fedit"]["down_mib"]
    assert adapters == rows["svd"]["down_mib"]
    assert 0.49 * adapters < rows["ffa"]["down_mib"] < 0.53 * adapters
    assert 0.47 * adapters < rows["fedsa"]["down_mib"] < 0.51 * adapters
    # after 2 rounds of 3 clients, flora's stacked base delta has rank 2 · 3 · 8 = 48 per module: 6× the adapters
    assert 5.5 * adapters < rows["flora"]["down_mib"] < 6.5 * adapters
    assert rows["fedex"]["down_mib"] > rows["flora"]["down_mib"]  # its residual plus the averaged adapters
