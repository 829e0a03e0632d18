"""The Triton kernel against an independent fp64 formula: under TRITON_INTERPRET=1 on a CPU (the conftest
sets it), compiled on CUDA tensors where a GPU exists."""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("triton")

from aggregation_cases import CASES, TOLERANCES, independent, make_updates, weights_for  # noqa: E402

from devft.aggregation import NonFiniteUpdateError, weighted_sum, weighted_sum_many  # noqa: E402
from devft.aggregation.kernels import triton_wsum  # noqa: E402

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")


def test_triton_runs_interpreted_on_cpu_or_compiled_on_gpu():
    # a loud failure, not a silent skip, if the interpreter is not enabled on a machine without a GPU
    assert DEVICE.type == "cuda" or triton_wsum.interpreting(), "TRITON_INTERPRET=1 is not set"


def on_device(updates):
    return [{k: v.to(DEVICE) for k, v in u.items()} for u in updates]


# the interpreter runs each program in Python: the many-tiny-tensors case is cut to 100 tensors here
TRITON_CASES = {**{k: v for k, v in CASES.items() if k != "long_runs"},  # the interpreter is slow per element
                "many_tiny_tensors": (4, CASES["many_tiny_tensors"][1][:100])}


@pytest.mark.parametrize("dtype,atol,rtol", TOLERANCES)
@pytest.mark.parametrize("case", sorted(TRITON_CASES))
def test_triton_matches_independent_formula(case, dtype, atol, rtol):
    clients, shapes = TRITON_CASES[case]
    updates = make_updates(clients, shapes, dtype, seed=11)
    weights = weights_for(clients)
    expected = independent(updates, weights)
    out = weighted_sum_many(on_device(updates), weights, backend="triton")
    for key, exp in expected.items():
        assert out[key].dtype == dtype and out[key].device.type == DEVICE.type, key
        torch.testing.assert_close(out[key].double().cpu(), exp.to(dtype).double(), atol=atol, rtol=rtol)


def test_triton_small_blocks_and_fp32_output():
    updates = make_updates(3, [(1000,), (5, 7)], torch.float16, seed=2)
    out = triton_wsum.weighted_sum_many_triton(on_device(updates), [1.0, 2.0, 3.0], block=128,
                                               out_dtype=torch.float32)
    expected = independent(updates, [1.0, 2.0, 3.0])
    for key in expected:
        assert out[key].dtype == torch.float32
        torch.testing.assert_close(out[key].double().cpu(), expected[key], atol=1e-5, rtol=1e-5)
    with pytest.raises(ValueError, match="power of two"):
        triton_wsum.weighted_sum_many_triton(on_device(updates), [1.0, 2.0, 3.0], block=100)


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
