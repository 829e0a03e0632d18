"""The fused weighted sum (torch and native backends, dispatch) against an independent fp64 formula and the reference."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from aggregation_cases import (
    CASES,
    HAS_C_COMPILER,
    NATIVE,
    TOLERANCES,
    clipped_expectation,
    independent,
    make_updates,
    mixed_dtype_updates,
    weights_for,
)
from flwr.app import Array, ArrayRecord

from devft.aggregation import (
    InvalidUpdateError,
    NonFiniteUpdateError,
    client_sq_norms,
    weighted_sum,
    weighted_sum_many,
    weighted_sum_many_reference,
    weighted_sum_reference,
)
from devft.aggregation.kernels import resolve_backend
from devft.aggregation.kernels.torch_blocked import client_sq_norms_torch, weighted_sum_many_torch


def as_records(updates) -> list[ArrayRecord]:
    return [ArrayRecord({k: Array(v.numpy()) for k, v in u.items()}) for u in updates]


@pytest.mark.parametrize("dtype,atol,rtol", TOLERANCES)
@pytest.mark.parametrize("case", sorted(CASES))
@pytest.mark.parametrize("backend", ["torch", NATIVE, "reference"])
def test_weighted_sum_many_matches_independent_formula(case, dtype, atol, rtol, backend):
    clients, shapes = CASES[case]
    updates = make_updates(clients, shapes, dtype)
    weights = weights_for(clients)
    expected = independent(updates, weights)
    out = weighted_sum_many(updates, weights, backend=backend)
    assert list(out) == list(updates[0])
    for key, exp in expected.items():
        assert out[key].dtype == dtype and out[key].shape == exp.shape, key
        torch.testing.assert_close(out[key].double(), exp.to(dtype).double(), atol=atol, rtol=rtol)


def test_blocks_that_split_tensors_and_span_keys():
    # tiny blocks: every tensor is cut across blocks and every block spans several keys
    updates = make_updates(4, [(3001,), (7,), (2, 1500), (5,)], torch.float32, seed=3)
    weights = [0.1, 0.2, 0.3, 0.4]
    expected = independent(updates, weights)
    for threads in (1, 3):
        out = weighted_sum_many_torch(updates, weights, block_bytes=4096, threads=threads)
        for key in expected:
            torch.testing.assert_close(out[key].double(), expected[key], atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize("backend", ["torch", NATIVE])
def test_half_precision_accumulates_in_fp32(backend):
    # 3000 × 1.0 in fp16 accumulation sticks at 2048 (the spacing there is 2); fp32 accumulation gives 3000
    updates = [{"x": torch.ones(5, dtype=torch.float16)} for _ in range(3000)]
    out = weighted_sum_many(updates, [1.0] * 3000, backend=backend)["x"]
    assert out.dtype == torch.float16
    assert torch.equal(out, torch.full((5,), 3000.0, dtype=torch.float16))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("backend", ["torch", NATIVE])
def test_records_are_read_in_place_with_the_same_result(dtype, backend):
    updates = make_updates(4, [(37, 19), (8,), (4, 40)], dtype, seed=5)
    weights = [1.0, 2.0, 3.0, 4.0]
    from_tensors = weighted_sum_many(updates, weights, backend=backend)
    from_records = weighted_sum_many(as_records(updates), weights, backend=backend)  # memoryview copies
    threaded = weighted_sum_many(as_records(updates), weights, backend=backend, threads=2)  # memmove copies
    mixed = weighted_sum_many(as_records(updates[:2]) + updates[2:], weights, backend=backend)
    for key in from_tensors:
        assert torch.equal(from_records[key], from_tensors[key]), key
        assert torch.equal(threaded[key], from_tensors[key]), key
        assert torch.equal(mixed[key], from_tensors[key]), key


@pytest.mark.parametrize("backend", ["torch", NATIVE])
def test_fortran_order_records_are_read_correctly(backend):
    x = [torch.randn(6, 9, generator=torch.Generator().manual_seed(k)) for k in range(3)]
    records = [ArrayRecord({"w": Array(np.asfortranarray(t.numpy()))}) for t in x]
    assert b"'fortran_order': True" in records[0]["w"].data[:128]
    for threads in (1, 2):
        out = weighted_sum_many(records, [0.2, 0.3, 0.5], backend=backend, threads=threads)["w"]
        torch.testing.assert_close(out, 0.2 * x[0] + 0.3 * x[1] + 0.5 * x[2])


@pytest.mark.parametrize("backend", ["torch", NATIVE, "reference"])
def test_clipping_scales_each_client_by_its_global_norm(backend):
    updates = make_updates(3, [(10, 4), (7,)], torch.float32, seed=7)
    updates[1] = {k: 50 * v for k, v in updates[1].items()}  # one large update gets clipped
    weights = [0.2, 0.3, 0.5]
    clip = 3.0
    norms = [sum(float(v.double().pow(2).sum()) for v in u.values()) ** 0.5 for u in updates]
    factors = [min(1.0, clip / n) for n in norms]
    assert factors[1] < 0.1 < factors[0]  # the test really clips one client and not another
    expected = independent(updates, [w * f for w, f in zip(weights, factors)])
    out = weighted_sum_many(updates, weights, clip_norm=clip, backend=backend)
    for key in expected:
        torch.testing.assert_close(out[key].double(), expected[key], atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(client_sq_norms(updates), torch.tensor(norms, dtype=torch.float64) ** 2)


# float32 norms per block (norm_bound.py needs no more): a few 1e-6 relative; float64 data stays float64
@pytest.mark.parametrize("dtype,rtol", [(torch.float32, 2e-5), (torch.float16, 2e-5), (torch.float64, 1e-12)])
@pytest.mark.parametrize("case", sorted(CASES))
def test_distances_from_an_origin_match_the_formula_for_any_blocks_and_threads(case, dtype, rtol):
    clients, shapes = CASES[case]
    updates = make_updates(clients, shapes, dtype, seed=3)
    origin = make_updates(1, shapes, torch.float32, seed=4)[0]  # what the clients started from
    want = torch.tensor([sum(float((u[k].double() - origin[k].double()).pow(2).sum()) for k in u) for u in updates],
                        dtype=torch.float64)
    for source in (updates, as_records(updates)):
        one = client_sq_norms_torch(source, origin=origin, block_bytes=4096, threads=1)
        torch.testing.assert_close(one, want, rtol=rtol, atol=0)
        assert torch.equal(client_sq_norms_torch(source, origin=origin, block_bytes=4096, threads=2), one)
    torch.testing.assert_close(client_sq_norms(updates, origin=origin), want, rtol=rtol, atol=0)
    assert all(torch.equal(updates[0][k], make_updates(clients, shapes, dtype, seed=3)[0][k]) for k in origin)


def test_an_origin_without_a_key_or_of_another_size_is_named():
    updates = make_updates(2, [(4, 3), (5,)], torch.float32)
    origin = dict(updates[0])
    key = next(iter(origin))
    with pytest.raises(ValueError, match=rf"origin of key '{key}' must have 12 elements .* got nothing"):
        client_sq_norms(updates, origin={k: v for k, v in origin.items() if k != key})
    with pytest.raises(ValueError, match=rf"origin of key '{key}' must have 12 elements .* got 5 elements"):
        client_sq_norms(updates, origin={**origin, key: torch.zeros(5)})


@pytest.mark.parametrize("backend", ["torch", NATIVE, "reference"])
def test_clipping_over_mixed_dtypes_uses_one_norm_per_client(backend):
    updates = mixed_dtype_updates(3, seed=12)
    updates[0] = {k: 40 * v for k, v in updates[0].items()}
    expected = clipped_expectation(updates, [0.5, 0.25, 0.25], 20.0)
    out = weighted_sum_many(updates, [0.5, 0.25, 0.25], clip_norm=20.0, backend=backend)
    for key, (dtype, atol, rtol) in zip(("t0", "t1", "t2"), [TOLERANCES[1], TOLERANCES[0], TOLERANCES[3]]):
        assert out[key].dtype == dtype
        torch.testing.assert_close(out[key].double(), expected[key].to(dtype).double(), atol=atol, rtol=rtol)


@pytest.mark.parametrize("backend", ["torch", NATIVE, "reference"])
@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf")])
def test_non_finite_values_name_client_and_key(backend, bad):
    updates = make_updates(4, [(5, 3), (11,)], torch.float32, seed=9)
    updates[2]["t1"][7] = bad
    with pytest.raises(NonFiniteUpdateError) as info:
        weighted_sum_many(updates, [1.0] * 4, backend=backend)
    assert info.value.client == 2 and info.value.key == "t1"
    records = as_records(updates)
    with pytest.raises(NonFiniteUpdateError) as info:
        weighted_sum_many(records, [1.0] * 4, backend=backend)
    assert info.value.client == 2 and info.value.key == "t1"
    out = weighted_sum_many(updates, [1.0] * 4, backend=backend, check_finite=False)
    assert not bool(torch.isfinite(out["t1"]).all())


@pytest.mark.parametrize("backend", ["torch", NATIVE])
def test_overflow_of_finite_inputs_is_reported_without_blaming_a_client(backend):
    updates = [{"x": torch.full((4,), 3e38)} for _ in range(3)]
    with pytest.raises(NonFiniteUpdateError) as info:
        weighted_sum_many(updates, [1.0, 1.0, 1.0], backend=backend)
    assert info.value.client is None and "overflow" in str(info.value)


@pytest.mark.parametrize("backend", ["torch", NATIVE, "reference"])
def test_inconsistent_updates_raise_named_errors(backend):
    updates = make_updates(3, [(4, 4), (3,)], torch.float32)
    missing = [updates[0], updates[1], {"t0": updates[2]["t0"]}]
    with pytest.raises(InvalidUpdateError) as info:
        weighted_sum_many(missing, [1.0] * 3, backend=backend)
    assert info.value.client == 2 and info.value.key == "t1"
    wrong = [updates[0], {"t0": torch.zeros(4, 5), "t1": updates[1]["t1"]}, updates[2]]
    with pytest.raises(InvalidUpdateError) as info:
        weighted_sum_many(wrong, [1.0] * 3, backend=backend)
    assert info.value.client == 1 and info.value.key == "t0"
    with pytest.raises(ValueError, match="3 updates but 2 weights"):
        weighted_sum_many(updates, [1.0, 2.0], backend=backend)


@pytest.mark.parametrize("backend", ["torch", NATIVE, "reference"])
@pytest.mark.parametrize(("weights", "message"), [
    ([[1.0], [2.0]], r"weight 0 must be a real number, got \[1.0\]"),  # summed as 7 before
    ([1, "x"], r"weight 1 must be a real number, got 'x'"),
    (["1", "2"], r"weight 0 must be a real number, got '1'"),
    ([True, False], r"weight 0 must be a real number, got True"),
    (torch.ones(2, 1), r"must be a 1-D sequence of real numbers, got a 2-D Tensor"),
    (np.array([True, False]), r"must be a 1-D sequence of real numbers, got a 1-D ndarray of bool"),
])
def test_weights_that_are_not_one_real_number_per_client_are_refused(weights, message, backend):
    updates = make_updates(2, [(3,)], torch.float32)
    with pytest.raises(ValueError, match=message):
        weighted_sum_many(updates, weights, backend=backend)


@pytest.mark.parametrize("weights", [[[1.0], [2.0]], [True, True]])
def test_weighted_sum_checks_weights_on_its_reference_path_too(weights):
    mixed = [torch.ones(3), torch.ones(3, dtype=torch.float16)]  # mixed dtypes take the reference path
    with pytest.raises(ValueError, match="weight 0 must be a real number"):
        weighted_sum(mixed, weights)


def test_weights_of_numpy_and_tensor_scalars_are_taken():
    updates = make_updates(2, [(3,)], torch.float32)
    expected = weighted_sum_many(updates, [0.25, 0.75])["t0"]
    for weights in ([np.float32(0.25), np.float64(0.75)], [torch.tensor(0.25), torch.tensor(0.75)],
                    np.array([0.25, 0.75]), torch.tensor([0.25, 0.75])):
        assert torch.equal(weighted_sum_many(updates, weights)["t0"], expected)


@pytest.mark.parametrize("dtype,atol,rtol", TOLERANCES)
def test_weighted_sum_keeps_the_reference_contract(dtype, atol, rtol):
    g = torch.Generator().manual_seed(1)
    tensors = [torch.randn(33, 17, generator=g).to(dtype) for _ in range(4)]
    weights = [0.7, 0.1, 0.1, 0.1]  # DBLF: 1 - β(|g|-1), β, β, β
    out = weighted_sum(tensors, weights)
    expected = independent([{"x": t} for t in tensors], weights)["x"].to(dtype).double()
    assert out.dtype == dtype and out.shape == (33, 17)
    torch.testing.assert_close(out.double(), expected, atol=atol, rtol=rtol)
    torch.testing.assert_close(weighted_sum(tensors, torch.tensor(weights, dtype=torch.float64)).double(), expected, atol=atol, rtol=rtol)
    # the reference accumulates fp64 inputs in fp32: agree with it to fp32 accuracy
    ref = weighted_sum_reference(tensors, weights)
    torch.testing.assert_close(out.double(), ref.double(), atol=max(atol, 1e-6), rtol=max(rtol, 1e-5))
    with pytest.raises(ValueError, match="at least one tensor"):
        weighted_sum([], [])
    with pytest.raises(ValueError, match="shape"):
        weighted_sum([tensors[0], tensors[1][:3]], [1.0, 1.0])


def test_weighted_sum_stays_differentiable():
    a = torch.randn(3, 4, requires_grad=True)
    b = torch.randn(3, 4, requires_grad=True)
    out = weighted_sum([a, b], [0.25, -2.0])
    out.sum().backward()
    assert torch.allclose(a.grad, torch.full((3, 4), 0.25)) and torch.allclose(b.grad, torch.full((3, 4), -2.0))


def test_dispatch_picks_native_on_cpu_and_reports_missing_triton(monkeypatch):
    assert resolve_backend("auto", torch.device("cpu")) == ("native" if HAS_C_COMPILER else "torch")
    with pytest.raises(ValueError, match="unknown aggregation backend"):
        resolve_backend("cuda-magic", torch.device("cpu"))
    import devft.aggregation.kernels as kernels

    monkeypatch.setattr(kernels, "native_kernels", lambda: None)
    assert kernels.resolve_backend("auto", torch.device("cpu")) == "torch"
    monkeypatch.setattr(kernels, "triton_available", lambda: False)
    with pytest.raises(ImportError, match=r"pip install devft\[triton\]"):
        kernels.resolve_backend("triton", torch.device("cpu"))
    assert kernels.resolve_backend("auto", torch.device("cuda")) == "torch"


@pytest.fixture
def fresh_triton_probe():
    """``triton_available`` probes once per process; these tests probe again, and leave a fresh probe behind."""
    import devft.aggregation.kernels as kernels

    kernels.triton_available.cache_clear()
    kernels._compiles_for.cache_clear()
    yield kernels
    kernels.triton_available.cache_clear()
    kernels._compiles_for.cache_clear()


def test_auto_takes_torch_when_triton_is_installed_but_does_not_import(fresh_triton_probe, monkeypatch, caplog):
    kernels = fresh_triton_probe
    real_import = kernels.importlib.import_module

    def broken(name, *args):
        if name == "triton":
            raise RuntimeError("triton 3.6 needs torch 2.11")  # what a mismatched pair raises is not only ImportError
        return real_import(name, *args)

    monkeypatch.setattr(kernels.importlib, "import_module", broken)
    with caplog.at_level("WARNING"):
        assert kernels.resolve_backend("auto", torch.device("cuda")) == "torch"
    assert "does not import (RuntimeError: triton 3.6 needs torch 2.11)" in caplog.text
    with pytest.raises(ImportError, match="needs Triton"):
        kernels.resolve_backend("triton", torch.device("cuda"))


@pytest.mark.parametrize(("capability", "chosen"), [((6, 1), "torch"), ((7, 0), "triton"), ((9, 0), "triton")])
def test_auto_takes_triton_only_on_a_gpu_it_compiles_for(capability, chosen, fresh_triton_probe, monkeypatch):
    pytest.importorskip("triton")
    kernels = fresh_triton_probe
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: capability)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "a GPU")
    assert kernels.resolve_backend("auto", torch.device("cuda")) == chosen


def test_a_gpu_triton_cannot_compile_for_is_reported_once(fresh_triton_probe, monkeypatch, caplog):
    pytest.importorskip("triton")
    kernels = fresh_triton_probe
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (6, 1))
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "Tesla P100")
    with caplog.at_level("WARNING"):
        for _ in range(5):  # growth fusion asks once per tensor
            assert kernels.resolve_backend("auto", torch.device("cuda", 0)) == "torch"
    assert caplog.text.count("compute capability 6.1") == 1


@pytest.mark.parametrize("backend", ["torch", NATIVE])
def test_reference_many_matches_torch_backend_on_mixed_dtype_keys(backend):
    g = torch.Generator().manual_seed(2)
    updates = [{"a": torch.randn(9, generator=g), "h": torch.randn(9, generator=g).half()} for _ in range(3)]
    ref = weighted_sum_many_reference(updates, [1.0, 2.0, 3.0])
    out = weighted_sum_many(updates, [1.0, 2.0, 3.0], backend=backend)
    assert out["h"].dtype == torch.float16 and out["a"].dtype == torch.float32
    for key in ref:
        torch.testing.assert_close(out[key], ref[key])


@pytest.mark.parametrize("backend", ["torch", NATIVE])
def test_a_client_whose_numpy_wrote_another_header_is_parsed_not_trusted(backend):
    import io

    x = [torch.randn(4, 6, generator=torch.Generator().manual_seed(k)) for k in range(3)]
    records = [ArrayRecord({"w": Array(t.numpy())}) for t in x]
    buf = io.BytesIO()  # client 1: format 2.0 header (a longer one), same dtype and shape
    arr = x[1].numpy()
    np.lib.format.write_array_header_2_0(buf, np.lib.format.header_data_from_array_1_0(arr))
    records[1]["w"] = Array(dtype="float32", shape=(4, 6), stype="numpy.ndarray", data=buf.getvalue() + arr.tobytes())
    assert records[1]["w"].data[:8] != records[0]["w"].data[:8]
    for threads in (1, 2):
        out = weighted_sum_many(records, [1.0, 2.0, 3.0], backend=backend, threads=threads)["w"]
        torch.testing.assert_close(out, x[0] + 2 * x[1] + 3 * x[2])
    records[2]["w"] = Array(np.zeros((4, 5), dtype=np.float32))
    with pytest.raises(InvalidUpdateError, match=r"\(4, 5\)") as info:
        weighted_sum_many(records, [1.0, 2.0, 3.0], backend=backend)
    assert info.value.client == 2


@pytest.mark.parametrize("threads", [1, 2])
@pytest.mark.parametrize("backend", ["torch", NATIVE])
def test_records_whose_data_is_new_bytes_on_every_read_stay_alive_while_summed(backend, threads):
    class Rebuilt:  # a duck-typed Array whose .data builds a new bytes object each time (the module allows it)
        stype = "numpy.ndarray"

        def __init__(self, array):
            self._data = Array(array).data

        @property
        def data(self):
            return bytes(bytearray(self._data))

    x = [torch.randn(300, 40, generator=torch.Generator().manual_seed(k)) for k in range(4)]
    records = [{"w": Rebuilt(t.numpy())} for t in x]
    out = weighted_sum_many(records, [1.0, 2.0, 3.0, 4.0], backend=backend, threads=threads)["w"]
    torch.testing.assert_close(out, x[0] + 2 * x[1] + 3 * x[2] + 4 * x[3])
