"""Flower records: zero-copy views, byte-identical serialisation, byte counts, and the drop-in aggregation."""

from __future__ import annotations

import pytest
import torch
from aggregation_cases import SMALL_MODULES, random_lora
from flwr.app import ArrayRecord, MetricRecord, RecordDict
from flwr.serverapp.strategy.strategy_utils import aggregate_arrayrecords as flower_aggregate

from devft.aggregation import (
    InvalidUpdateError,
    aggregate_arrayrecords,
    npy_nbytes,
    payload_nbytes,
    record_tensors,
    to_arrayrecord,
)
from devft.aggregation.sources import buffer_address


def test_record_tensors_alias_the_received_bytes():
    state = random_lora(1, 4, SMALL_MODULES, seed=1)
    record = ArrayRecord(state)
    views = record_tensors(record)
    for key, t in views.items():
        data = record[key].data
        start = buffer_address(data)
        assert start < t.data_ptr() < start + len(data)  # inside the received buffer: no copy
        assert torch.equal(t, state[key])


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.float64])
def test_to_arrayrecord_is_byte_identical_to_flower(dtype):
    state = {k: v.to(dtype) for k, v in random_lora(2, 3, SMALL_MODULES, seed=2).items()}
    state["scalar"] = torch.tensor(1.5, dtype=dtype)
    state["transposed"] = torch.randn(5, 3).to(dtype).T  # not contiguous
    ours, theirs = to_arrayrecord(state), ArrayRecord({k: v.contiguous() for k, v in state.items()})
    assert list(ours) == list(theirs)
    for key in theirs:
        assert ours[key].data == theirs[key].data, key
        assert (ours[key].dtype, tuple(ours[key].shape), ours[key].stype) == (
            theirs[key].dtype, tuple(theirs[key].shape), theirs[key].stype)
    assert payload_nbytes(state) == theirs.count_bytes() == payload_nbytes(ours)
    first = next(iter(theirs))
    assert npy_nbytes(dtype, tuple(state[first].shape)) == len(theirs[first].data)


def test_bfloat16_is_refused_with_advice():
    with pytest.raises(ValueError, match="bfloat16"):
        to_arrayrecord({"x": torch.ones(3, dtype=torch.bfloat16)})


def _replies(states, counts):
    return [RecordDict({"arrays": ArrayRecord(s), "metrics": MetricRecord({"num-examples": n})})
            for s, n in zip(states, counts)]


@pytest.mark.parametrize("dtype,atol", [(torch.float32, 1e-7), (torch.float16, 2e-3)])
def test_drop_in_matches_flowers_aggregate_arrayrecords(dtype, atol):
    states = [{k: v.to(dtype) for k, v in random_lora(2, 4, SMALL_MODULES, seed=20 + k).items()} for k in range(5)]
    counts = [10, 3, 7, 1, 30]
    theirs = flower_aggregate(_replies(states, counts), "num-examples")
    ours = aggregate_arrayrecords([ArrayRecord(s) for s in states], counts)
    assert list(ours) == list(theirs)
    for key in theirs:
        a, b = ours[key].numpy(), theirs[key].numpy()
        assert a.dtype == b.dtype and a.shape == b.shape
        torch.testing.assert_close(torch.from_numpy(a).double(), torch.from_numpy(b).double(), atol=atol, rtol=1e-3)
    # and against an fp64 computation by hand (Flower accumulates fp16 in fp16; ours in fp32)
    total = sum(counts)
    for key in list(theirs)[:3]:
        exact = sum((n / total) * s[key].double() for s, n in zip(states, counts))
        torch.testing.assert_close(torch.from_numpy(ours[key].numpy()).double(), exact.to(dtype).double(),
                                   atol=atol / 10 if dtype == torch.float16 else 1e-7, rtol=1e-3)


@pytest.mark.parametrize("bad", [0, -3, float("nan"), float("inf")])
def test_weights_must_be_positive_and_finite(bad):
    records = [ArrayRecord(random_lora(1, 2, SMALL_MODULES, seed=k)) for k in range(3)]
    with pytest.raises(InvalidUpdateError) as info:
        aggregate_arrayrecords(records, [5, bad, 5])
    assert info.value.client == 1 and "positive finite" in str(info.value)
