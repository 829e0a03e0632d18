"""The aggregation benchmark runs end to end on the real SmolLM2 LoRA shapes and prints what the docs quote
(slow: it loads SmolLM2-135M to read its shapes)."""

from __future__ import annotations

import importlib.util
import json
import math
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parents[2] / "simulations" / "bench" / "bench_aggregation.py"


@pytest.mark.slow
def test_bench_prints_the_fields_docs_quote(tmp_path, capsys):
    bench = _bench()
    out = tmp_path / "bench.json"
    code = bench.main(["--clients", "3", "--ranks", "4", "--layers", "2", "--repeats", "2", "--flower-repeats", "1",
                       "--threads", "1", "--json", str(out), "--device", "cpu"])
    assert code == 0
    (line,) = [ln for ln in capsys.readouterr().out.splitlines() if ln.startswith("clients=3 ")]
    assert line.split()[-2].startswith("speedup_vs_flower=") and line.split()[-1].startswith("bandwidth_fraction=")
    (row,) = [r for r in json.loads(out.read_text()) if r["kind"] == "cpu"]
    assert row["rank"] == 4 and row["mb_per_client"] > 0
    assert row["max_rel_diff_vs_flower"] < 1e-6  # the same weighted mean as Flower's
    for key in ("speedup_vs_flower", "bandwidth_fraction", "speedup_same_payload", "arrays_speedup_vs_flower"):
        assert math.isfinite(row[key]) and row[key] > 0, key


def _bench():
    spec = importlib.util.spec_from_file_location("bench_aggregation", BENCH)
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    return bench


@pytest.mark.slow
def test_static_shapes_are_the_real_models():
    bench = _bench()
    for rank in (8, 32):
        assert bench.static_smollm2_lora_shapes(rank, None) == bench.smollm2_lora_shapes(rank, None)


def test_gpu_only_section_runs_on_static_shapes(monkeypatch, capsys):
    pytest.importorskip("triton")
    monkeypatch.setenv("TRITON_INTERPRET", "1")  # the compiled kernel's code path, interpreted on the CPU
    code = _bench().main(["--gpu-only", "--shapes", "static", "--device", "cpu", "--layers", "1", "--clients", "2",
                          "--ranks", "4", "--repeats", "1"])
    assert code == 0
    (line,) = [ln for ln in capsys.readouterr().out.splitlines() if ln.startswith("gpu clients=2 ")]
    fields = dict(kv.split("=") for kv in line.split()[1:])
    assert float(fields["max_abs_diff_vs_reference"]) < 1e-6 and float(fields["bandwidth_fraction"]) > 0
