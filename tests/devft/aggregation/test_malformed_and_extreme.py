"""Malformed received arrays and extreme values: every backend refuses them with an error naming the
client and key, and never reads past a buffer or hands back Inf where it promised a finite check."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from aggregation_cases import make_updates
from flwr.app import Array, ArrayRecord

from devft.aggregation import (
    InvalidUpdateError,
    NonFiniteUpdateError,
    aggregate_arrayrecords,
    record_tensors,
    validate_updates,
    weighted_sum,
    weighted_sum_many,
)
from devft.aggregation.kernels.torch_blocked import weighted_sum_many_torch
from devft.aggregation.sources import parse_npy_header

N = 40_000  # 160 kB of fp32 per client


def records_of(values: list[torch.Tensor]) -> list[ArrayRecord]:
    return [ArrayRecord({"x": Array(v.numpy())}) for v in values]


def with_data(record: ArrayRecord, data: bytes) -> ArrayRecord:
    arr = record["x"]
    return ArrayRecord({"x": Array(dtype=arr.dtype, shape=arr.shape, stype=arr.stype, data=data)})


def every_reader(records: list[ArrayRecord]) -> dict:
    """Each way devft reads a round of records, as a callable."""
    return {
        "torch, 1 thread": lambda: weighted_sum_many_torch(records, [0.5, 0.5], threads=1),
        "torch, 2 threads": lambda: weighted_sum_many_torch(records, [0.5, 0.5], threads=2, block_bytes=4096),
        "reference": lambda: weighted_sum_many(records, [0.5, 0.5], backend="reference"),
        "validate": lambda: validate_updates(records, [1, 1], check_finite=True),
    }


@pytest.mark.parametrize("bad_client", [0, 1])
def test_a_truncated_buffer_is_refused_even_after_its_header_was_seen(bad_client):
    values = [torch.randn(N) for _ in range(2)]
    good = records_of(values)
    weighted_sum_many(good, [0.5, 0.5])  # the header is parsed and cached by this round
    parse_npy_header(good[0]["x"].data)
    records = list(good)
    records[bad_client] = with_data(good[bad_client], good[bad_client]["x"].data[:-400])
    for name, read in every_reader(records).items():
        with pytest.raises(InvalidUpdateError, match="fewer than its header promises") as info:
            read()
        assert (info.value.client, info.value.key) == (bad_client, "x"), name


@pytest.mark.parametrize("change,match", [
    ((b"'<f4'", b"xyz4 "), "malformed"),
    ((b"(40000,)", b"('a',)  "), "malformed"),
    ((b"(40000,)", b"(-4,)   "), "malformed"),
    ((b"False", b"0    "), "malformed"),
    ((b"'<f4'", b"'>f4'"), "little-endian"),
    ((b"'<f4'", b"'<i4'"), "little-endian"),
])
@pytest.mark.parametrize("bad_client", [0, 1])
def test_a_malformed_header_is_an_invalid_update_naming_the_client(change, match, bad_client):
    good = records_of([torch.randn(N) for _ in range(2)])
    data = good[bad_client]["x"].data
    assert change[0] in data[:128] and len(change[0]) == len(change[1])
    records = list(good)
    records[bad_client] = with_data(good[bad_client], data.replace(change[0], change[1], 1))
    for name, read in every_reader(records).items():
        with pytest.raises(InvalidUpdateError, match=match) as info:
            read()
        assert (info.value.client, info.value.key) == (bad_client, "x"), name


@pytest.mark.parametrize("cut", [6, 9, 40])
@pytest.mark.parametrize("bad_client", [0, 1])
def test_a_buffer_shorter_than_its_header_is_an_invalid_update_naming_the_client(cut, bad_client):
    # only the magic (a hostile 6-byte array), or a header whose declared length runs past the buffer
    good = records_of([torch.randn(N) for _ in range(2)])
    records = list(good)
    records[bad_client] = with_data(good[bad_client], good[bad_client]["x"].data[:cut])
    for name, read in every_reader(records).items():
        with pytest.raises(InvalidUpdateError, match="too few for a .npy header|fewer than its .npy header") as info:
            read()
        assert (info.value.client, info.value.key) == (bad_client, "x"), name


def test_a_huge_malformed_header_is_named_in_a_short_message():
    text = "{'descr': '<f4', " + "x" * 2_000_000 + "}\n"
    header = b"\x93NUMPY\x02\x00" + len(text).to_bytes(4, "little") + text.encode()
    record = with_data(records_of([torch.zeros(4)])[0], header + np.zeros(4, np.float32).tobytes())
    with pytest.raises(InvalidUpdateError, match="malformed .npy header") as info:
        validate_updates([record])
    assert len(str(info.value)) < 400 and "(2000019 characters)" in str(info.value)


def test_what_a_client_sends_cannot_grow_the_header_cache_without_bound():
    # np.save writes short headers; a header padded to 100 kB is read but never kept, and the cache is a
    # least-recently-used one of bounded size
    from devft.aggregation.sources import _HEADER_CACHE, BoundedCache

    before = dict(_HEADER_CACHE)
    text = "{'descr': '<f4', 'fortran_order': False, 'shape': (4,), }" + " " * 100_000 + "\n"
    header = b"\x93NUMPY\x02\x00" + len(text).to_bytes(4, "little") + text.encode()
    padded = with_data(records_of([torch.zeros(4)])[0], header + np.zeros(4, np.float32).tobytes())
    assert torch.equal(record_tensors(padded)["x"], torch.zeros(4))
    assert dict(_HEADER_CACHE) == before
    cache = BoundedCache(entries=2, key_bytes=4)
    for key in (b"a", b"b", b"a", b"c", b"toolong"):
        cache.keep(key, key.upper())
        cache.lookup(b"a")
    assert list(cache) == [b"c", b"a"] and cache.lookup(b"b") is None and cache.lookup(b"toolong") is None


@pytest.mark.parametrize("backend", ["torch", "reference", "triton"])
def test_a_sum_too_large_for_the_output_dtype_is_reported_not_returned_as_inf(backend):
    if backend == "triton":
        pytest.importorskip("triton")
    halves = [{"x": torch.full((8,), 60000.0, dtype=torch.float16)} for _ in range(2)]
    with pytest.raises(NonFiniteUpdateError, match="overflows float16") as info:
        weighted_sum_many(halves, [1.0, 1.0], backend=backend)
    assert info.value.key == "x" and info.value.client is None
    singles = [{"x": torch.full((8,), 40000.0)} for _ in range(2)]
    with pytest.raises(NonFiniteUpdateError, match="overflows float16"):
        weighted_sum_many(singles, [1.0, 1.0], backend=backend, out_dtype=torch.float16)
    # within range, the same call is fine; without the check the caller gets what it asked for
    assert float(weighted_sum_many(halves, [0.5, 0.5], backend=backend)["x"][0]) == 60000.0
    # a wider out_dtype holds the fp16 inputs' sum: nothing to report (it used to be checked against fp16)
    wide = weighted_sum_many(halves, [1.0, 1.0], backend=backend, out_dtype=torch.float32)["x"]
    assert wide.dtype == torch.float32 and float(wide[0]) == 120000.0
    assert torch.isinf(weighted_sum_many(halves, [1.0, 1.0], backend=backend, check_finite=False)["x"]).all()


def test_fp16_records_whose_mean_would_overflow_are_refused():
    records = records_of([torch.full((4,), 65000.0, dtype=torch.float16)] * 2)
    aggregate_arrayrecords(records, [1, 1])  # the mean fits
    with pytest.raises(NonFiniteUpdateError, match="overflows float16"):
        weighted_sum_many(records, [1.0, 1.0])  # the sum does not


def test_clip_norms_do_not_depend_on_the_thread_count():
    # fp64 norms summed over many small blocks: the order of the sum is fixed, whatever thread ends first
    updates = make_updates(3, [(3000,), (50, 40), (7,)], torch.float64, seed=5)
    one = weighted_sum_many_torch(updates, [0.2, 0.3, 0.5], clip_norm=1.0, threads=1, block_bytes=2048)
    for _ in range(5):
        two = weighted_sum_many_torch(updates, [0.2, 0.3, 0.5], clip_norm=1.0, threads=2, block_bytes=2048)
        for key in one:
            assert torch.equal(one[key], two[key]), key


@pytest.mark.parametrize("backend", ["torch", "reference"])
def test_a_norm_that_overflows_float64_is_reported_on_every_backend(backend):
    updates = [{"x": torch.tensor([1e200, 1.0], dtype=torch.float64)}, {"x": torch.tensor([1.0, 2.0], dtype=torch.float64)}]
    with pytest.raises(NonFiniteUpdateError):
        weighted_sum_many(updates, [0.5, 0.5], clip_norm=1.0, backend=backend)


def test_single_tensor_sum_keeps_float64_precision():
    a = torch.tensor([1e300, 1.0 + 1e-12], dtype=torch.float64)
    for backend in ("reference", "torch"):
        out = weighted_sum([a, a], [1.0, 1.0], backend=backend)
        assert out.tolist() == [2e300, 2.0 + 2e-12], backend


def test_bfloat16_tensors_cannot_become_a_flower_record():
    updates = [{"w": torch.ones(3, dtype=torch.bfloat16)} for _ in range(2)]
    with pytest.raises(ValueError, match="'w' has dtype torch.bfloat16"):
        aggregate_arrayrecords(updates, [1, 1])
