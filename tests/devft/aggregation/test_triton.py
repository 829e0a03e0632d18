"""The Triton kernel against an independent fp64 formula: under TRITON_INTERPRET=1 on a CPU (the conftest
sets it), compiled on CUDA tensors where a GPU exists."""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("triton")

from aggregation_cases import (  # noqa: E402
    CASES,
    TOLERANCES,
    clipped_expectation,
    independent,
    make_updates,
    mixed_dtype_updates,
    weights_for,
)

from devft.aggregation import NonFiniteUpdateError, weighted_sum, weighted_sum_many  # noqa: E402
from devft.aggregation.kernels import triton_wsum  # noqa: E402

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")


def test_triton_runs_interpreted_on_cpu_or_compiled_on_gpu():
    # a loud failure, not a silent skip, if the interpreter is not enabled on a machine without a GPU
    assert DEVICE.type == "cuda" or triton_wsum.interpreting(), "TRITON_INTERPRET=1 is not set"


def on_device(updates):
    return [{k: v.to(DEVICE) for k, v in u.items()} for u in updates]


@pytest.mark.parametrize("dtype,atol,rtol", TOLERANCES)
@pytest.mark.parametrize("case", sorted(CASES))  # every case whole, interpreted too (≤ 5 s each)
def test_triton_matches_independent_formula(case, dtype, atol, rtol):
    clients, shapes = CASES[case]
    updates = make_updates(clients, shapes, dtype, seed=11)
    weights = weights_for(clients)
    expected = independent(updates, weights)
    out = weighted_sum_many(on_device(updates), weights, backend="triton")
    for key, exp in expected.items():
        assert out[key].dtype == dtype and out[key].device.type == DEVICE.type, key
        torch.testing.assert_close(out[key].double().cpu(), exp.to(dtype).double(), atol=atol, rtol=rtol)


@pytest.mark.parametrize("config", [dict(block=128), dict(block=128, unroll=2), dict(block=64, unroll=3, num_warps=2)])
def test_triton_launch_configs_and_fp32_output(config):
    # 4 clients: unroll 3 leaves a partial step, whose missing clients must add nothing
    updates = make_updates(4, [(1000,), (5, 7)], torch.float16, seed=2)
    weights = [1.0, 2.0, 3.0, -0.5]
    out = triton_wsum.weighted_sum_many_triton(on_device(updates), weights,
                                               config=triton_wsum.KernelConfig(**config), out_dtype=torch.float32)
    expected = independent(updates, weights)
    for key in expected:
        assert out[key].dtype == torch.float32
        torch.testing.assert_close(out[key].double().cpu(), expected[key], atol=1e-5, rtol=1e-5)


def test_triton_unroll_does_not_change_the_rounding():
    updates = on_device(make_updates(7, [(3000,), (17, 9)], torch.float32, seed=3))
    weights = [0.1 * (k + 1) for k in range(7)]
    plain = triton_wsum.weighted_sum_many_triton(updates, weights)
    for unroll in (2, 4):
        out = triton_wsum.weighted_sum_many_triton(updates, weights, config=triton_wsum.KernelConfig(unroll=unroll))
        for key in plain:
            assert torch.equal(out[key], plain[key]), (unroll, key)


@pytest.mark.parametrize("bad", [dict(block=100), dict(num_warps=3), dict(unroll=0), dict(unroll=9)])
def test_triton_refuses_bad_launch_configs(bad):
    name, value = next(iter(bad.items()))
    with pytest.raises(ValueError, match=f"{name}={value}"):
        triton_wsum.KernelConfig(**bad)


def test_triton_vector_width_needs_aligned_addresses_and_lengths():
    aligned = on_device(make_updates(3, [(64,), (8, 4)], torch.float32, seed=1))
    assert triton_wsum.prepare_weighted_sum_triton(aligned).vector_widths() == {torch.float32: 4}
    halves = [{k: v.half() for k, v in u.items()} for u in aligned]
    assert triton_wsum.prepare_weighted_sum_triton(halves).vector_widths() == {torch.float16: 8}
    odd_length = on_device(make_updates(3, [(64,), (7, 3)], torch.float32, seed=1))
    assert triton_wsum.prepare_weighted_sum_triton(odd_length).vector_widths() == {torch.float32: 1}
    # a view one element into a buffer: 4-byte, not 16-byte, aligned
    bufs = [torch.randn(65, device=DEVICE) for _ in range(3)]
    shifted = [{"x": b[1:]} for b in bufs]
    prepared = triton_wsum.prepare_weighted_sum_triton(shifted)
    assert prepared.vector_widths() == {torch.float32: 1}
    out = triton_wsum.weighted_sum_many_triton(shifted, [1.0, 2.0, 3.0])
    torch.testing.assert_close(out["x"], bufs[0][1:] + 2 * bufs[1][1:] + 3 * bufs[2][1:])


def test_prepared_sum_relaunches_with_new_weights_and_clears_the_flags():
    updates = on_device(make_updates(3, [(500,), (6, 6)], torch.float32, seed=5))
    prepared = triton_wsum.prepare_weighted_sum_triton(updates)
    for weights in ([1.0, 0.0, 0.0], [0.2, 0.3, 0.5]):
        flats = prepared.launch(weights)
        prepared.raise_if_not_finite(flats)
        expected = independent(updates, weights)
        for group, flat in flats:
            for key, n, off in zip(group.keys, group.numels, group.offsets):
                torch.testing.assert_close(flat[off : off + n].double().cpu(), expected[key].reshape(-1),
                                           atol=1e-6, rtol=1e-6)
    with pytest.raises(ValueError, match="2 weights"):
        prepared.launch([1.0, 2.0])
    updates[1]["t0"][3] = float("nan")  # the buffers changed in place: the next launch sees it
    with pytest.raises(NonFiniteUpdateError) as info:
        prepared.raise_if_not_finite(prepared.launch([1.0, 1.0, 1.0]))
    assert info.value.client == 1
    updates[1]["t0"][3] = 0.0
    prepared.raise_if_not_finite(prepared.launch([1.0, 1.0, 1.0]))  # flags were cleared


def test_device_weights_are_read_contiguously_and_checked_in_the_one_sync(monkeypatch):
    # weights already on the device skip the host check; the kernel reads weight k at weights + k, so a column
    # of a table (stride 2) or an expanded scalar (stride 0) must still give client k its own weight, and a
    # NaN weight must be named, not reported as an overflow of finite inputs
    if DEVICE.type == "cpu":  # under the interpreter, CPU tensors stand in for device ones: the same branch
        monkeypatch.setattr(triton_wsum.PreparedWeightedSum, "on_device",
                            lambda self, weights: isinstance(weights, torch.Tensor))
    updates = on_device(make_updates(3, [(500,), (6, 6)], torch.float32, seed=5))
    prepared = triton_wsum.prepare_weighted_sum_triton(updates)
    # float32, the inputs' accumulation dtype: the launch converts (and so copies) nothing
    table = torch.tensor([[0.2, 9.0], [0.3, 7.0], [0.5, 5.0]], dtype=torch.float32, device=DEVICE)
    for weights in (table[:, 0], torch.tensor(0.25, dtype=torch.float32, device=DEVICE).expand(3)):
        assert weights.stride(0) != 1
        flats = prepared.launch(weights)
        prepared.raise_if_not_finite(flats)
        expected = independent(updates, weights.tolist())
        for group, flat in flats:
            for key, n, off in zip(group.keys, group.numels, group.offsets):
                torch.testing.assert_close(flat[off : off + n].double().cpu(), expected[key].reshape(-1),
                                           atol=1e-6, rtol=1e-6)
    bad = table[:, 0].clone()
    bad[1] = float("nan")
    with pytest.raises(ValueError, match=r"weights must be finite, got nan for update 1 \(device weights\)"):
        prepared.raise_if_not_finite(prepared.launch(bad))
    prepared.raise_if_not_finite(prepared.launch(table[:, 0]))  # each launch's weights are checked anew


def test_triton_clipping_of_a_norm_beyond_float64_is_reported_like_the_other_backends():
    # finite float64 values whose squared norm overflows: a clip factor of 0 would drop the client silently
    updates = [{"x": torch.full((4,), 1e200, dtype=torch.float64)}, {"x": torch.ones(4, dtype=torch.float64)}]
    for backend in ("reference", "torch", "triton"):
        chosen = on_device(updates) if backend == "triton" else updates
        with pytest.raises(NonFiniteUpdateError, match="overflow"):
            weighted_sum_many(chosen, [0.5, 0.5], clip_norm=1.0, backend=backend)


@pytest.mark.skipif(DEVICE.type == "cuda", reason="records live in host memory; compiled kernels read the device's")
def test_triton_reads_packed_payloads_as_one_run_per_client():
    pytest.importorskip("flwr")
    from devft.aggregation.packed import pack_arrayrecord

    updates = make_updates(3, [(40, 8), (8,), (16, 3)], torch.float32, seed=9)
    records = [pack_arrayrecord(u) for u in updates]
    prepared = triton_wsum.prepare_weighted_sum_triton(records)
    assert [ln.runs for ln in prepared.launches] == [[40 * 8 + 8 + 16 * 3]]
    out = weighted_sum_many(records, [0.5, 0.25, 0.25], backend="triton")
    expected = independent(updates, [0.5, 0.25, 0.25])
    for key in expected:
        torch.testing.assert_close(out[key].double(), expected[key], atol=1e-6, rtol=1e-6)


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_triton_flags_the_client_holding_non_finite_values(bad):
    updates = make_updates(4, [(300,), (6, 6)], torch.float32, seed=4)
    updates[3]["t1"][2, 5] = bad
    with pytest.raises(NonFiniteUpdateError) as info:
        weighted_sum_many(on_device(updates), [1.0] * 4, backend="triton")
    assert info.value.client == 3 and info.value.key == "t1"


def test_triton_clipping_matches_hand_computation():
    updates = make_updates(3, [(40, 3), (9,)], torch.float32, seed=6)
    updates[0] = {k: 30 * v for k, v in updates[0].items()}
    norms = [sum(float(v.double().pow(2).sum()) for v in u.values()) ** 0.5 for u in updates]
    clip = 2.5
    factors = [min(1.0, clip / n) for n in norms]
    assert factors[0] < 0.2 and factors[2] <= 1.0
    expected = independent(updates, [0.3 * f for f in factors])
    out = weighted_sum_many(on_device(updates), [0.3] * 3, clip_norm=clip, backend="triton")
    for key in expected:
        torch.testing.assert_close(out[key].double().cpu(), expected[key], atol=1e-5, rtol=1e-4)


def test_triton_clipping_over_mixed_dtypes_uses_one_norm_per_client():
    # fp16, fp32 and fp64 keys: one kernel per dtype, one clip factor per client over all of them
    updates = mixed_dtype_updates(3, seed=12)
    updates[0] = {k: 40 * v for k, v in updates[0].items()}
    expected = clipped_expectation(updates, [0.5, 0.25, 0.25], 20.0)
    out = weighted_sum_many(on_device(updates), [0.5, 0.25, 0.25], clip_norm=20.0, backend="triton")
    for key, (dtype, atol, rtol) in zip(("t0", "t1", "t2"), [TOLERANCES[1], TOLERANCES[0], TOLERANCES[3]]):
        assert out[key].dtype == dtype
        torch.testing.assert_close(out[key].double().cpu(), expected[key].to(dtype).double(), atol=atol, rtol=rtol)


def test_triton_single_tensor_entry_point():
    tensors = [t["t0"] for t in make_updates(4, [(13, 11)], torch.float32, seed=8)]
    out = weighted_sum([t.to(DEVICE) for t in tensors], [0.7, 0.1, 0.1, 0.1], backend="triton")
    torch.testing.assert_close(out.cpu(), 0.7 * tensors[0] + 0.1 * (tensors[1] + tensors[2] + tensors[3]))


def test_triton_refuses_cpu_tensors_outside_the_interpreter(monkeypatch):
    monkeypatch.setattr(triton_wsum, "interpreting", lambda: False)
    with pytest.raises(ValueError, match="TRITON_INTERPRET=1"):
        weighted_sum_many([{"x": torch.ones(3)}], [1.0], backend="triton")


@pytest.mark.gpu
def test_triton_on_gpu_at_lora_scale_matches_torch_backend():
    from aggregation_cases import SMOLLM2_MODULES, random_lora

    clients = [{k: v.cuda() for k, v in random_lora(2, 8, SMOLLM2_MODULES, seed=k).items()} for k in range(32)]
    weights = [1.0 / 32] * 32
    out = weighted_sum_many(clients, weights, backend="triton")
    ref = weighted_sum_many(clients, weights, backend="torch")
    for key in ref:
        torch.testing.assert_close(out[key], ref[key], atol=1e-6, rtol=1e-5)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype,atol,rtol", [t for t in TOLERANCES if t[0] != torch.float64])
@pytest.mark.parametrize("config", [dict(), dict(block=1024, unroll=2), dict(block=4096, num_warps=8, unroll=4),
                                    dict(block=8192, num_warps=8, unroll=3)])
def test_triton_on_gpu_every_launch_config_aligned_or_not(dtype, atol, rtol, config):
    # aligned LoRA-like tensors take 16-byte accesses; views one element into a buffer must not
    cfg = triton_wsum.KernelConfig(**config)
    aligned = [{k: v.cuda().to(dtype) for k, v in u.items()}
               for u in make_updates(5, [(8, 576), (576, 8), (4096,)], torch.float32, seed=21)]
    backing = [torch.randn(20001, device="cuda", dtype=dtype) for _ in range(5)]
    shifted = [{"x": b[1:10001], "y": b[10001:].view(100, 100)} for b in backing]
    weights = [0.3, -0.2, 0.5, 0.25, 0.15]
    for updates, vec in ((aligned, 16 // torch.tensor([], dtype=dtype).element_size()), (shifted, 1)):
        prepared = triton_wsum.prepare_weighted_sum_triton(updates, config=cfg)
        assert set(prepared.vector_widths().values()) == {vec}
        out = triton_wsum.weighted_sum_many_triton(updates, weights, config=cfg)
        expected = independent([{k: v.cpu() for k, v in u.items()} for u in updates], weights)
        for key in expected:  # the kernel fuses w·x + acc (one rounding): compare with fp64, not the reference
            torch.testing.assert_close(out[key].double().cpu(), expected[key].to(dtype).double(), atol=atol, rtol=rtol)
        # weights already on the device are used as they are, with no copy
        on_device = [flat.clone() for _, flat in prepared.launch(weights)]
        again = prepared.launch(torch.tensor(weights, dtype=torch.float64, device="cuda"))
        for first, (_, second) in zip(on_device, again):
            assert torch.equal(first, second)


@pytest.mark.gpu
def test_triton_on_gpu_takes_device_weights_in_the_accumulation_dtype():
    updates = on_device(make_updates(3, [(4096,), (8, 576)], torch.float32, seed=8))
    prepared = triton_wsum.prepare_weighted_sum_triton(updates)
    expected = independent(updates, [0.2, 0.3, 0.5])
    for dtype in (torch.float64, torch.float32):  # float32: the launch converts nothing
        flats = prepared.launch(torch.tensor([0.2, 0.3, 0.5], dtype=dtype, device=DEVICE))
        for group, flat in flats:
            for key, n, off in zip(group.keys, group.numels, group.offsets):
                torch.testing.assert_close(flat[off : off + n].double().cpu(), expected[key].reshape(-1),
                                           atol=1e-6, rtol=1e-6)
    wide = triton_wsum.prepare_weighted_sum_triton(on_device(make_updates(2, [(64,)], torch.float64, seed=1)))
    with pytest.raises(ValueError, match="device weights must be torch.float64 of shape"):
        wide.launch(torch.tensor([0.5, 0.5], dtype=torch.float32, device=DEVICE))  # would round fp64 sums' weights


def test_a_prepared_sum_keeps_its_block_tables_past_the_cache(monkeypatch):
    # a launch must not rebuild the tables (a host-to-device copy: no CUDA-graph capture, and a graph
    # captured before would read freed memory) after other layouts pushed them out of the cache
    updates = on_device(make_updates(2, [(300,), (7,)], torch.float32, seed=3))
    prepared = triton_wsum.prepare_weighted_sum_triton(updates)
    held = [ln.tables for ln in prepared.launches]
    for n in range(1, triton_wsum._TABLE_CACHE_SIZE + 2):  # more layouts than the cache holds
        triton_wsum.prepare_weighted_sum_triton(on_device(make_updates(2, [(n,)], torch.float32, seed=n)))
    monkeypatch.setattr(triton_wsum, "block_tables", lambda *a, **k: pytest.fail("a launch rebuilt block tables"))
    flats = prepared.launch([0.25, 0.75])
    assert [ln.tables for ln in prepared.launches] == held
    expected = independent(updates, [0.25, 0.75])
    for group, flat in flats:
        for key, n, off in zip(group.keys, group.numels, group.offsets):
            torch.testing.assert_close(flat[off : off + n].double().cpu(), expected[key].reshape(-1), atol=1e-6, rtol=1e-6)
