"""The aggregation benchmark runs end to end on the real SmolLM2 LoRA shapes and prints what the docs quote
(slow: it loads SmolLM2-135M to read its shapes)."""

from __future__ import annotations

import importlib
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
    assert row["ours_backend"] == "native"  # auto, on a machine with a C compiler (CI's too)
    for key in ("speedup_vs_flower", "bandwidth_fraction", "speedup_same_payload", "arrays_speedup_vs_flower",
                "native_vs_torch", "torch_bandwidth_fraction"):
        assert math.isfinite(row[key]) and row[key] > 0, key


def _load(path: Path):
    spec = importlib.util.spec_from_file_location(path.stem, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _bench():
    return _load(BENCH)


@pytest.mark.slow
def test_static_shapes_are_the_real_models():
    bench = _bench()
    for rank in (8, 32):
        assert bench.static_smollm2_lora_shapes(rank, None) == bench.smollm2_lora_shapes(rank, None)


def test_gpu_only_section_runs_on_static_shapes(monkeypatch, capsys, tmp_path):
    pytest.importorskip("triton")
    monkeypatch.setenv("TRITON_INTERPRET", "1")  # the compiled kernel's code path, interpreted on the CPU
    bench = _bench()
    code = bench.main(["--gpu-only", "--shapes", "static", "--device", "cpu", "--layers", "1", "--clients", "2",
                       "--ranks", "4", "--repeats", "1", "--sweep", "--json", str(tmp_path / "gpu.json")])
    assert code == 0
    lines = capsys.readouterr().out.splitlines()
    (line,) = [ln for ln in lines if ln.startswith("gpu clients=2 ")]
    fields = dict(kv.split("=") for kv in line.split()[1:])
    assert float(fields["max_abs_diff_vs_reference"]) < 1e-6
    assert line.split()[-2].startswith("triton_vs_torch=") and line.split()[-1].startswith("bandwidth_fraction=")
    for key in ("bandwidth_fraction", "packed_bandwidth_fraction", "call_bandwidth_fraction", "kernel_s",
                "traffic_fraction", "packed_traffic_fraction"):
        assert math.isfinite(float(fields[key])) and float(fields[key]) > 0, key
    # traffic counts reads and writes: 2 clients read 2 inputs and write 1, a copy reads 1 and writes 1
    assert float(fields["traffic_fraction"]) == pytest.approx(0.75 * float(fields["bandwidth_fraction"]), rel=1e-3)
    best = [dict(kv.split("=") for kv in ln.split()[1:]) for ln in lines if ln.startswith("sweep-best ")]
    assert sorted(b["layout"] for b in best) == ["packed", "per_key"]
    rows = json.loads((tmp_path / "gpu.json").read_text())
    swept = [r for r in rows if r["kind"] == "sweep"]
    grid = _load(BENCH.with_name("bench_aggregation_device.py")).SWEEP
    assert len(swept) == 2 * math.prod(len(v) for v in grid.values())  # every configuration, both layouts


def test_triton_host_work_is_timed_without_running_a_kernel(monkeypatch, capsys):
    pytest.importorskip("triton")
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    code = _bench().main(["--gpu-only", "--triton-host", "--shapes", "static", "--device", "cpu", "--layers", "2",
                          "--clients", "3", "--ranks", "4", "--repeats", "1"])
    assert code == 0
    (line,) = [ln for ln in capsys.readouterr().out.splitlines() if ln.startswith("host clients=3 ")]
    fields = dict(kv.split("=") for kv in line.split()[1:])
    assert int(fields["tensors_per_client"]) == 2 * 7 * 2  # 2 layers × 7 projections × (A, B)
    assert float(fields["per_key_prepare_s"]) > 0 and float(fields["packed_prepare_s"]) > 0


def test_a_failing_sweep_configuration_is_recorded_and_the_sweep_goes_on(monkeypatch):
    pytest.importorskip("triton")
    import torch

    monkeypatch.setenv("TRITON_INTERPRET", "1")
    _bench()  # puts the device section's folder on sys.path
    device_bench = _load(BENCH.with_name("bench_aggregation_device.py"))
    shapes = {"a": (4, 64), "b": (64, 4)}
    rows = device_bench.sweep_case(shapes, 2, 4, 1, torch.device("cpu"),
                                   grid={"block": (128, 100), "num_warps": (4,), "unroll": (1,)})
    assert [(r["block"], r["layout"]) for r in rows] == [(128, "per_key"), (128, "packed"), (100, "per_key"),
                                                         (100, "packed")]
    assert all("error" not in r and r["traffic_fraction"] > 0 for r in rows[:2])
    assert all("block" in r["error"] and "kernel_s" not in r for r in rows[2:])  # 100 is not a power of two


def test_small_cases_cycle_through_enough_buffers_to_miss_the_l2_cache(monkeypatch):
    from types import SimpleNamespace

    import torch

    device_bench = _load(BENCH.with_name("bench_aggregation_device.py"))
    monkeypatch.setattr(torch.cuda, "get_device_properties", lambda device: SimpleNamespace(L2_cache_size=50 * 2**20))
    cuda = torch.device("cuda")
    assert device_bench.rotations(78_000_000, cuda) == 3  # 8 clients x r = 8: 3 x 78 MB >= 4 x 50 MiB
    assert device_bench.rotations(313_000_000, cuda) == 1
    assert device_bench.rotations(45_000_000, cuda) == 6  # 5 needed; 6 divides a burst, so replays go on in turn
    assert device_bench.BURST % device_bench.rotations(78_000_000, cuda) == 0
    assert device_bench.rotations(10, torch.device("cpu")) == 1
    calls = []
    turn = device_bench.cycling([lambda: calls.append("a"), lambda: calls.append("b"), lambda: calls.append("c")])
    for _ in range(7):
        turn()
    assert calls == ["a", "b", "c", "a", "b", "c", "a"]


def test_the_device_copy_is_the_faster_of_two_and_says_which():
    import torch

    device_bench = _load(BENCH.with_name("bench_aggregation_device.py"))
    inputs = [device_bench.make_inputs({"w": (256, 64)}, 2, torch.device("cpu"), seed=s) for s in (0, 1)]
    clock = iter([2.0, 1.0])  # a fake timer: copy_ is timed first and takes 2 s, the elementwise kernel 1 s

    def timer(fn):
        fn()  # each candidate runs
        return next(clock)

    assert device_bench.device_copy(inputs, timer) == (1.0, "sm_kernel")


def test_a_sweep_that_cannot_start_is_recorded_and_the_cases_go_on(monkeypatch, capsys, tmp_path):
    pytest.importorskip("triton")
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    bench = _bench()
    monkeypatch.syspath_prepend(str(BENCH.parent))  # main() imports its sweep from this module, as patched
    device_bench = importlib.import_module("bench_aggregation_device")

    def no_memory(shapes, clients, *args, **kwargs):
        raise MemoryError(f"no room for {clients} clients")

    monkeypatch.setattr(device_bench, "sweep_case", no_memory)
    code = bench.main(["--gpu-only", "--shapes", "static", "--device", "cpu", "--layers", "1", "--clients", "2", "3",
                       "--ranks", "2", "--repeats", "1", "--sweep", "--json", str(tmp_path / "gpu.json")])
    assert code == 1  # a failed case fails the run, after the rest was measured
    out = capsys.readouterr().out
    assert "# sweep clients=2 rank=2: MemoryError: no room for 2 clients" in out
    assert [ln.split()[1] for ln in out.splitlines() if ln.startswith("gpu ")] == ["clients=2", "clients=3"]
    rows = json.loads((tmp_path / "gpu.json").read_text())
    assert [r["clients"] for r in rows if r["kind"] == "sweep"] == [2, 3]
