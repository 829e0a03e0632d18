"""Norm bounding of client updates (devft/aggregation/norm_bound.py) against hand computations, per rule."""

from __future__ import annotations

import math

import pytest
import torch
from aggregation_cases import SMALL_MODULES, random_lora

from devft.aggregation import get_rule, ideal_delta, pack_arrayrecord, to_arrayrecord
from devft.aggregation.norm_bound import bound_updates, round_bound
from devft.aggregation.sources import as_source

ALPHA = 8.0


@pytest.fixture
def start():
    return random_lora(2, 4, SMALL_MODULES, seed=1)


def moved(origin, seed, size):
    """``origin`` plus a random step of L2 length ``size`` over all tensors together; returns (update, step)."""
    g = torch.Generator().manual_seed(seed)
    step = {k: torch.randn(v.shape, generator=g, dtype=torch.float64) for k, v in origin.items()}
    length = math.sqrt(sum(float(s.pow(2).sum()) for s in step.values()))
    step = {k: s * (size / length) for k, s in step.items()}
    return {k: (origin[k].double() + step[k]).float() for k in origin}, step


def hand_distance(update, origin, keys):
    return math.sqrt(sum(float((update[k].double() - origin[k].double()).pow(2).sum()) for k in keys))


def test_fedit_scales_back_only_the_long_update_along_its_direction(start):
    rule = get_rule("fedit", alpha=ALPHA)
    state = rule.init_state(start)
    sizes = [0.5, 1.0, 40.0]
    pairs = [moved(start, seed, size) for seed, size in enumerate(sizes)]
    updates = [u for u, _ in pairs]

    out = bound_updates(rule, state, updates, max_norm=2.0)

    assert out.norms == pytest.approx(sizes, rel=1e-5)
    assert out.bound == 2.0 and out.clipped == [2] and out.scales[:2] == [1.0, 1.0]
    assert out.scales[2] == pytest.approx(2.0 / 40.0, rel=1e-5)
    assert out.updates[0] is updates[0] and out.updates[1] is updates[1]  # untouched replies are not copied
    clipped = out.updates[2]
    assert hand_distance(clipped, start, start) == pytest.approx(2.0, rel=1e-5)
    for key, step in pairs[2][1].items():  # same direction: origin + (2/40) · step
        torch.testing.assert_close(clipped[key].double(), start[key].double() + step / 20, atol=1e-6, rtol=1e-5)
    # the rule then averages the bounded replies: Σ p_k x'_k
    new = rule.aggregate(state, out.updates, [1, 1, 2])
    for key in start:
        want = (updates[0][key] + updates[1][key] + 2 * clipped[key]) / 4
        torch.testing.assert_close(new.lora[key], want, atol=1e-6, rtol=1e-5)


def test_no_bound_set_measures_and_leaves_every_reply(start):
    rule = get_rule("fedit", alpha=ALPHA)
    updates = [moved(start, s, 10.0 ** s)[0] for s in range(3)]
    out = bound_updates(rule, rule.init_state(start), updates)
    assert out.bound is None and out.clipped == [] and all(a is b for a, b in zip(out.updates, updates))
    assert out.norms == pytest.approx([1.0, 10.0, 100.0], rel=1e-5)


def test_ratio_bound_is_relative_to_the_lower_median():
    assert round_bound([1.0, 2.0, 3.0, 100.0], ratio=10) == 20.0  # lower median 2
    assert round_bound([1.0, 100.0], ratio=10) == 10.0  # two replies: the smaller sets it
    assert round_bound([1.0, 2.0, 3.0, 100.0], max_norm=5.0, ratio=10) == 5.0  # both set: the smaller
    assert round_bound([3.0], ratio=2) == 6.0 and round_bound([1.0, 2.0]) is None
    # clients that did not move (lr 0, an update below the wire's resolution) cannot make the bound 0
    assert round_bound([0.0, 0.0, 0.1, 0.2], ratio=3) == pytest.approx(0.3)
    assert round_bound([0.0, 0.0], ratio=3) is None and round_bound([0.0, 0.0], max_norm=1.0, ratio=3) == 1.0


@pytest.mark.parametrize("max_norm,ratio,field,value", [
    (-1.0, 0.0, "max_update_norm", "-1.0"), (float("nan"), 0.0, "max_update_norm", "nan"),
    (True, 0.0, "max_update_norm", "True"), (0.0, 0.5, "max_update_norm_ratio", "0.5"),
    (0.0, float("inf"), "max_update_norm_ratio", "inf"),
])
def test_bad_bounds_are_refused_by_name(max_norm, ratio, field, value):
    with pytest.raises(ValueError, match=rf"{field} must be .* got {field}={value}"):
        round_bound([1.0], max_norm, ratio)


@pytest.mark.parametrize("wire", ["arrays", "packed"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_flower_records_are_measured_in_place_and_scaled_in_their_dtype(wire, dtype, start):
    rule = get_rule("fedit", alpha=ALPHA)
    state = rule.init_state(start)
    updates = [{k: v.to(dtype) for k, v in moved(start, s, size)[0].items()} for s, size in enumerate([1.0, 30.0])]
    make = pack_arrayrecord if wire == "packed" else to_arrayrecord
    records = [make(u) for u in updates]
    before = {k: bytes(a.data) for k, a in records[1].items()}

    out = bound_updates(rule, state, records, max_norm=3.0)

    sent = {k: v.to(dtype) for k, v in start.items()}  # the wire's dtype carries both ways
    want = [hand_distance(u, sent, start) for u in updates]  # of the values on the wire
    assert out.norms == pytest.approx(want, rel=1e-6)
    assert out.updates[0] is records[0] and out.clipped == [1]
    assert all(t.dtype == dtype for t in out.updates[1].values())
    assert hand_distance(out.updates[1], sent, start) == pytest.approx(3.0, rel=2e-3 if dtype == torch.float16 else 1e-5)
    assert {k: bytes(a.data) for k, a in records[1].items()} == before  # the reply itself is not modified


@pytest.mark.parametrize("name", ["fedit", "svd"])
def test_a_client_that_did_not_move_has_norm_zero_on_a_float16_wire(name, start):
    rule = get_rule(name, alpha=ALPHA)
    state = rule.init_state(start)
    unchanged = {k: v.half() for k, v in rule.downlink(state).items()}  # what it received, sent straight back
    trained = {k: v.half() for k, v in moved(rule.downlink(state), 0, 1.0)[0].items()}
    out = bound_updates(rule, state, [pack_arrayrecord(unchanged), pack_arrayrecord(trained)], ratio=1.0)
    assert out.norms[0] == 0.0 and out.norms[1] == pytest.approx(1.0, rel=2e-3)
    assert out.bound == out.norms[1] and out.scales == [1.0, 1.0]  # the client that did not move sets no bound


@pytest.mark.parametrize("name,counted", [("ffa", ".lora_B."), ("fedsa", ".lora_A.")])
def test_only_what_a_client_uploads_is_its_update(name, counted, start):
    rule = get_rule(name, alpha=ALPHA)
    state = rule.init_state(start)
    full, _ = moved(start, 3, 5.0)  # the client's whole LoRA; it sends only its uploaded part
    reply = rule.client_payload(full)
    assert set(reply) == {k for k in start if counted in k}
    out = bound_updates(rule, state, [reply], max_norm=1.0)
    assert out.norms[0] == pytest.approx(hand_distance(full, start, reply), rel=1e-6)
    assert hand_distance(out.updates[0], start, reply) == pytest.approx(1.0, rel=1e-5)


def test_flora_measures_and_scales_the_product_it_folds_into_the_model():
    rule = get_rule("flora", alpha=ALPHA)
    start = random_lora(2, 4, SMALL_MODULES, seed=1)
    state = rule.init_state({k: v * (0 if ".lora_B." in k else 1) for k, v in start.items()})
    clients = [random_lora(2, r, SMALL_MODULES, seed=10 + r, scale=0.05 * (1 + 20 * (r == 8))) for r in (2, 4, 8)]
    ideal = [ideal_delta([c], [1], ALPHA) for c in clients]  # {module: s B_k A_k} of each client alone
    want = [math.sqrt(sum(float(d.pow(2).sum()) for d in per.values())) for per in ideal]

    out = bound_updates(rule, state, clients, ratio=2.0)

    assert out.norms == pytest.approx(want, rel=1e-9)
    assert out.clipped == [2] and out.bound == pytest.approx(2 * sorted(want)[1])
    c = out.scales[2]
    for key, value in out.updates[2].items():  # B scaled by c, A kept (fresh LoRA: B started at 0)
        torch.testing.assert_close(value, clients[2][key] * (c if ".lora_B." in key else 1.0))
    new = rule.aggregate(state, out.updates, [1, 2, 1])
    got = rule.effective_delta(new)
    for module in ideal[0]:  # Σ p_k c_k s_k B_k A_k
        expected = (ideal[0][module] + 2 * ideal[1][module] + c * ideal[2][module]) / 4
        torch.testing.assert_close(got[module], expected, atol=1e-7, rtol=1e-5)  # fp32 stacking


def test_svd_measures_each_client_from_what_its_rank_received(start):
    rule = get_rule("svd", alpha=ALPHA)
    state = rule.init_state(start)
    sent = {2: rule.downlink(state, rank=2), 4: rule.downlink(state, rank=4)}
    replies = [dict(sent[2]), moved(sent[4], 0, 3.0)[0]]

    out = bound_updates(rule, state, replies, max_norm=1.0)

    assert out.norms[0] == 0.0 and out.norms[1] == pytest.approx(3.0, rel=1e-5)
    assert hand_distance(out.updates[1], sent[4], sent[4]) == pytest.approx(1.0, rel=1e-5)


def test_svd_measures_a_reply_above_the_servers_rank_from_the_padded_global(start):
    rule = get_rule("svd", alpha=ALPHA)
    state = rule.init_state(start)  # rank 4
    padded = rule.update_origin(state, as_source({k: torch.zeros(8, v.shape[1]) if ".lora_A." in k else torch.zeros(v.shape[0], 8)
                                                   for k, v in start.items()}))
    q = "base_model.model.model.layers.0.self_attn.q_proj"
    a8, b8 = padded[q + ".lora_A.weight"], padded[q + ".lora_B.weight"]
    assert a8.shape == (8, 24) and not a8[4:].any() and not b8[:, 4:].any()
    torch.testing.assert_close((ALPHA / 8) * b8 @ a8, (ALPHA / 4) * start[q + ".lora_B.weight"] @ start[q + ".lora_A.weight"])
    replies = [dict(padded), moved(padded, 1, 2.0)[0], moved(rule.downlink(state), 2, 1.0)[0]]
    out = bound_updates(rule, state, replies, max_norm=1.5)
    assert out.norms[0] == 0.0 and out.norms[1:] == pytest.approx([2.0, 1.0], rel=1e-5) and out.clipped == [1]
    rule.aggregate(state, out.updates, [1, 1, 1])  # the rank-8 replies are aggregated as before


def test_an_update_longer_than_float32_norms_reach_is_measured_in_float64(start):
    rule = get_rule("fedit", alpha=ALPHA)
    state = rule.init_state({k: torch.zeros_like(v) for k, v in start.items()})
    far = {k: torch.full_like(v, 1e20) for k, v in start.items()}  # ‖·‖ ≈ 1e22: inf as a float32 norm
    numel = sum(v.numel() for v in start.values())
    out = bound_updates(rule, state, [far, {k: torch.zeros_like(v) for k, v in start.items()}], max_norm=1.0)
    assert out.norms[0] == pytest.approx(1e20 * math.sqrt(numel), rel=1e-6)
    assert hand_distance(out.updates[0], state.lora, start) == pytest.approx(1.0, rel=1e-5)


def test_an_update_of_infinite_length_is_scaled_to_what_the_client_received(start):
    rule = get_rule("fedit", alpha=ALPHA)
    state = rule.init_state(start)
    far = {k: torch.full_like(v, 3e38) for k, v in start.items()}
    state.lora = {k: torch.full_like(v, -3e38) for k, v in start.items()}  # 6e38 apart: inf in fp32
    out = bound_updates(rule, state, [far, far], max_norm=1.0)
    assert out.norms == [math.inf, math.inf] and out.scales == [0.0, 0.0]
    assert all(torch.equal(out.updates[0][k], state.lora[k]) for k in start)


@pytest.mark.parametrize("name", ["fedit", "flora"])
def test_an_update_holding_inf_is_scaled_to_its_origin_not_to_nan(name, start):
    # the server refuses non-finite replies before bounding; called directly, "scaled to 0" still means
    # the origin (B = 0 for flora), not 0 · Inf = NaN
    rule = get_rule(name, alpha=ALPHA)
    state = rule.init_state(start)
    bad = {k: v.clone() for k, v in start.items()}
    key_b = next(k for k in bad if ".lora_B." in k)
    bad[key_b][0, 0] = math.inf
    out = bound_updates(rule, state, [bad, start], max_norm=1.0)
    assert out.norms[0] == math.inf and out.scales[0] == 0.0
    expected = torch.zeros_like(start[key_b]) if name == "flora" else state.lora[key_b]
    assert torch.equal(out.updates[0][key_b], expected)


def test_infinite_norms_do_not_set_a_ratio_bound(start):
    # two of three updates hold Inf: their norms must not lift the median (and so the bound) to infinity
    rule = get_rule("fedit", alpha=ALPHA)
    state = rule.init_state(start)
    bad = {k: v.clone() for k, v in start.items()}
    key_b = next(k for k in bad if ".lora_B." in k)
    bad[key_b][0, 0] = math.inf
    ok, _ = moved(start, seed=3, size=0.5)
    out = bound_updates(rule, state, [bad, bad, ok], ratio=3.0)
    assert out.bound == pytest.approx(1.5, rel=1e-5)  # 3 x the one finite norm
    assert out.scales[:2] == [0.0, 0.0] and out.scales[2] == 1.0
    assert torch.equal(out.updates[0][key_b], state.lora[key_b])
