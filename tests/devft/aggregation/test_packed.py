"""The packed wire format: round trips, byte counts, the in-place sum against an independent formula, errors."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from aggregation_cases import (
    CASES,
    SMOLLM2_MODULES,
    TOLERANCES,
    independent,
    make_updates,
    random_lora,
    weights_for,
)
from flwr.app import Array, ArrayRecord, MetricRecord, RecordDict
from flwr.serverapp.strategy.strategy_utils import aggregate_arrayrecords as flower_aggregate

from devft.aggregation import (
    InvalidUpdateError,
    NonFiniteUpdateError,
    aggregate_arrayrecords,
    is_packed,
    pack_arrayrecord,
    packed_nbytes,
    record_state,
    record_tensors,
    to_arrayrecord,
    validate_updates,
    weighted_sum_many,
    weighted_sum_many_reference,
    wire_record,
)
from devft.aggregation._plan import plan_groups
from devft.aggregation.kernels.torch_blocked import _accumulates
from devft.aggregation.packed import DATA_PREFIX, MANIFEST_KEY
from devft.aggregation.sources import as_sources


def _mixed_state() -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    return {
        "b.lora_B.weight": torch.randn(7, 3, generator=g),
        "h": torch.randn(11, generator=g).half(),
        "empty": torch.zeros(0, 4),
        "a.lora_A.weight": torch.randn(3, 5, generator=g),
        "d": torch.randn(2, 2, generator=g).double(),
    }


def test_round_trip_keeps_keys_order_dtypes_shapes_and_values():
    state = _mixed_state()
    record = pack_arrayrecord(state)
    assert is_packed(record) and not is_packed(to_arrayrecord(state))
    assert set(record.keys()) == {MANIFEST_KEY, DATA_PREFIX + "float32", DATA_PREFIX + "float16", DATA_PREFIX + "float64"}
    back = record_tensors(record)
    assert list(back) == list(state)
    for key, t in state.items():
        assert back[key].dtype == t.dtype and back[key].shape == t.shape and torch.equal(back[key], t), key
    copies = record_state(record)  # writable fp32 copies, not views of the message
    copies["a.lora_A.weight"].add_(1.0)
    assert torch.equal(record_tensors(record)["a.lora_A.weight"], state["a.lora_A.weight"])


def test_the_manifest_is_plain_json_any_flower_tool_can_read():
    record = pack_arrayrecord(_mixed_state())
    doc = json.loads(record[MANIFEST_KEY].numpy().tobytes())
    assert doc["format"] == "devft.packed" and doc["version"] == 1
    assert doc["tensors"][0] == ["b.lora_B.weight", "float32", [7, 3]]
    flat = record[DATA_PREFIX + "float32"].numpy()  # Flower's own deserialisation
    assert flat.shape == (7 * 3 + 3 * 5,)


def test_byte_count_matches_flower_and_beats_one_array_per_tensor_for_lora():
    lora = random_lora(layers=2, rank=4, modules=SMOLLM2_MODULES, seed=0)
    packed = pack_arrayrecord(lora)
    assert packed_nbytes(lora) == packed.count_bytes()
    per_array = to_arrayrecord(lora).count_bytes()
    assert packed.count_bytes() < per_array  # the manifest costs less than 28 .npy headers and keys
    assert wire_record(lora, "arrays").count_bytes() == per_array
    with pytest.raises(ValueError, match="wire_format='zip'"):
        wire_record(lora, "zip")


@pytest.mark.parametrize("dtype,atol,rtol", [t for t in TOLERANCES if t[0] != torch.bfloat16])
@pytest.mark.parametrize("case", sorted(CASES))
def test_sum_of_packed_records_matches_independent_formula(case, dtype, atol, rtol):
    clients, shapes = CASES[case]
    updates = make_updates(clients, shapes, dtype)
    weights = weights_for(clients)
    expected = independent(updates, weights)
    records = [pack_arrayrecord(u) for u in updates]
    out = weighted_sum_many(records, weights, backend="torch")
    assert list(out) == list(updates[0])
    for key, exp in expected.items():
        assert out[key].dtype == dtype and out[key].shape == exp.shape, key
        torch.testing.assert_close(out[key].double(), exp.to(dtype).double(), atol=atol, rtol=rtol)
    # one manifest: every dtype's keys are one contiguous run per client, read in place
    groups, _ = plan_groups(as_sources(records), None)
    assert [len(g.runs) for g in groups] == [1]
    assert _accumulates(groups[0]) == (case == "long_runs")


@pytest.mark.parametrize("clients,total", [(3, 350_000), (4, 2_000)])
def test_accumulate_and_stage_paths_give_the_reference_result(clients, total):
    updates = make_updates(clients, [(total,), (17, 3)], torch.float16, seed=4)
    weights = [0.25, -0.5, 1.5, 0.75][:clients]
    records = [pack_arrayrecord(u) for u in updates]
    expected = weighted_sum_many_reference(updates, weights)
    for threads in (1, 2):
        out = weighted_sum_many(records, weights, backend="torch", threads=threads)
        for key in expected:
            torch.testing.assert_close(out[key].double(), expected[key].double(), atol=1e-3, rtol=2e-3)


def test_a_subset_of_keys_is_cut_into_runs():
    lora = [random_lora(layers=2, rank=4, modules=SMOLLM2_MODULES, seed=s) for s in range(3)]
    keys = [k for k in lora[0] if ".lora_B." in k]  # every other tensor: runs of one
    records = [pack_arrayrecord(u) for u in lora]
    groups, _ = plan_groups(as_sources(records), keys)
    assert len(groups[0].runs) == len(keys)
    out = weighted_sum_many(records, [0.2, 0.3, 0.5], keys=keys)
    expected = independent([{k: u[k] for k in keys} for u in lora], [0.2, 0.3, 0.5])
    assert list(out) == keys
    for key in keys:
        torch.testing.assert_close(out[key].double(), expected[key], atol=1e-6, rtol=1e-5)


def test_formats_mix_across_clients_with_the_same_result():
    updates = make_updates(4, [(37, 19), (8,), (4, 40)], torch.float32, seed=5)
    weights = [1.0, 2.0, 3.0, 4.0]
    plain = weighted_sum_many(updates, weights)
    mixed = [pack_arrayrecord(updates[0]), to_arrayrecord(updates[1]), updates[2], pack_arrayrecord(updates[3])]
    out = weighted_sum_many(mixed, weights)
    for key in plain:
        torch.testing.assert_close(out[key], plain[key], atol=1e-6, rtol=1e-6)


def test_packed_aggregation_gives_a_packed_record_equal_to_flowers_mean():
    lora = [random_lora(layers=1, rank=4, modules=SMOLLM2_MODULES, seed=s) for s in range(3)]
    counts = [10, 30, 60]
    ours = aggregate_arrayrecords([pack_arrayrecord(u) for u in lora], counts)
    assert is_packed(ours)
    replies = [RecordDict({"arrays": to_arrayrecord(u), "metrics": MetricRecord({"num-examples": n})})
               for u, n in zip(lora, counts)]
    theirs = flower_aggregate(replies, "num-examples")
    got = record_tensors(ours)
    assert list(got) == list(lora[0])
    for key in lora[0]:
        torch.testing.assert_close(got[key], torch.from_numpy(theirs[key].numpy()), atol=1e-7, rtol=1e-6)


def test_clipping_and_non_finite_values_in_packed_payloads():
    updates = make_updates(3, [(200_000,), (6, 5)], torch.float32, seed=7)
    records = [pack_arrayrecord(u) for u in updates]
    clipped = weighted_sum_many(records, [0.5, 0.3, 0.2], clip_norm=10.0)
    expected = weighted_sum_many_reference(updates, [0.5, 0.3, 0.2], clip_norm=10.0)
    for key in expected:
        torch.testing.assert_close(clipped[key], expected[key], atol=1e-6, rtol=1e-5)
    bad = dict(updates[1])
    bad["t1"] = bad["t1"].clone()
    bad["t1"][2, 3] = float("nan")
    with pytest.raises(NonFiniteUpdateError, match="client 1, key 't1'"):
        weighted_sum_many([records[0], pack_arrayrecord(bad), records[2]], [0.5, 0.3, 0.2])


def _tampered(record: ArrayRecord, key: str, value: Array | None) -> ArrayRecord:
    items = {k: a for k, a in record.items() if k != key}
    if value is not None:
        items[key] = value
    return ArrayRecord(items)


def _manifest_array(doc) -> Array:
    return Array(np.frombuffer(json.dumps(doc).encode(), dtype=np.uint8).copy())


@pytest.mark.parametrize("tamper,match", [
    (lambda r: _tampered(r, DATA_PREFIX + "float32", None), "lacks 'devft.packed.float32'"),
    (lambda r: _tampered(r, DATA_PREFIX + "float32", Array(np.zeros(5, np.float32))), r"needs torch.float32\(56,\)"),
    (lambda r: _tampered(r, DATA_PREFIX + "float32", Array(np.zeros(56, np.int32))), "float16/32/64 only"),
    (lambda r: _tampered(r, "extra", Array(np.zeros(3, np.float32))), "does not name: \\['extra'\\]"),
    (lambda r: _tampered(r, MANIFEST_KEY, _manifest_array({"format": "other", "version": 1})), "format 'devft.packed'"),
    (lambda r: _tampered(r, MANIFEST_KEY, _manifest_array({"format": "devft.packed", "version": 1,
                                                         "tensors": [["a", "int8", [2]]]})), "not \\[key, float"),
    (lambda r: _tampered(r, MANIFEST_KEY, _manifest_array({"format": "devft.packed", "version": 1,
                                                         "tensors": [["a", "float32", [2]], ["a", "float32", [2]]]})),
     "lists key 'a' twice"),
    (lambda r: _tampered(r, MANIFEST_KEY, Array(np.frombuffer(b"{not json", np.uint8).copy())), "not UTF-8 JSON"),
    # hostile: nested past the recursion limit, only the magic, 'tensors' not a list, a header not uint8
    (lambda r: _tampered(r, MANIFEST_KEY, Array(np.frombuffer(b"[" * 100_000 + b"]" * 100_000, np.uint8).copy())),
     "RecursionError"),
    (lambda r: _tampered(r, MANIFEST_KEY, Array("uint8", (6,), "numpy.ndarray", b"\x93NUMPY")), "too few for a .npy"),
    (lambda r: _tampered(r, MANIFEST_KEY, _manifest_array({"format": "devft.packed", "version": 1, "tensors": 5})),
     "'tensors' must be a list, got int"),
    (lambda r: _tampered(r, MANIFEST_KEY, _manifest_array({"format": "devft.packed", "version": 1, "tensors": None})),
     "'tensors' must be a list, got NoneType"),
    (lambda r: _tampered(r, MANIFEST_KEY, Array(np.zeros(8, np.float32))), r"has dtype float32; expected one of \['uint8'\]"),
])
def test_malformed_packed_records_are_refused_naming_the_client(tamper, match):
    good = [pack_arrayrecord(u) for u in make_updates(3, [(4, 8), (24,)], torch.float32)]
    bad = tamper(good[2])
    for check in (lambda: weighted_sum_many([good[0], good[1], bad], [1, 1, 1]),
                  lambda: validate_updates([good[0], good[1], bad])):
        with pytest.raises(InvalidUpdateError, match=match) as err:
            check()
        assert err.value.client == 2


def test_a_client_with_another_manifest_is_checked_key_by_key():
    updates = make_updates(3, [(4, 8), (24,)], torch.float32)
    other = {"t0": updates[2]["t0"], "t1": torch.zeros(25)}  # one shape differs
    records = [pack_arrayrecord(updates[0]), pack_arrayrecord(updates[1]), pack_arrayrecord(other)]
    with pytest.raises(InvalidUpdateError, match=r"client 2, key 't1': torch.float32\(25,\), expected"):
        weighted_sum_many(records, [1, 1, 1])
    reordered = {"t1": updates[2]["t1"], "t0": updates[2]["t0"]}  # same tensors, another order: fine
    out = weighted_sum_many([*records[:2], pack_arrayrecord(reordered)], [0.2, 0.3, 0.5])
    expected = independent(updates, [0.2, 0.3, 0.5])
    for key in expected:
        torch.testing.assert_close(out[key].double(), expected[key], atol=1e-6, rtol=1e-5)
