"""The six LoRA aggregation rules against hand or independent computations; which are exact, and by how much.

Clients start from a common global LoRA and return it moved by local "training" (random steps); the exact
target is ``Σ p_k s_k B_k A_k`` (``ideal_delta``, computed without any rule's code).
"""

from __future__ import annotations

import math
import pickle

import pytest
import torch
from aggregation_cases import NATIVE, SMALL_MODULES, lora_key, random_lora
from flwr.app import ArrayRecord

from devft.aggregation import (
    RULES,
    InvalidUpdateError,
    NonFiniteAggregateError,
    NonFiniteUpdateError,
    ServerState,
    get_rule,
    ideal_delta,
    lora_modules,
    pack_arrayrecord,
    payload_nbytes,
    split_downlink,
    to_arrayrecord,
)
from devft.aggregation.base import BaseDelta

ALPHA = 8.0
COUNTS = [10, 30, 20, 40]


def trained(global_lora, seed, step=0.3, keep_a=False):
    """A client's LoRA after local training: the global one plus a random step (A untouched if keep_a)."""
    g = torch.Generator().manual_seed(seed)
    out = {}
    for key, value in global_lora.items():
        if keep_a and ".lora_A." in key:
            out[key] = value.clone()
        else:
            out[key] = value + step * value.abs().mean() * torch.randn(value.shape, generator=g)
    return out


@pytest.fixture
def start():
    return random_lora(2, 4, SMALL_MODULES, seed=1)


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm())


def p_of(counts):
    return [c / sum(counts) for c in counts]


def test_registry_has_the_six_rules_and_refuses_unknown_names():
    assert sorted(RULES) == ["fedex", "fedit", "fedsa", "ffa", "flora", "svd"]
    for name in RULES:
        assert get_rule(name, alpha=ALPHA).name == name
    with pytest.raises(ValueError, match="unknown aggregation rule='fedavg'"):
        get_rule("fedavg", alpha=ALPHA)
    for alpha in (0, -1.0, float("inf"), float("nan"), "16", True):  # inf: every product would overflow
        with pytest.raises(ValueError, match=f"alpha must be a finite number > 0 .* got alpha={alpha!r}"):
            get_rule("fedit", alpha=alpha)
    with pytest.raises(ValueError, match="svd rank"):
        get_rule("svd", alpha=ALPHA, rank=0)


def test_fedit_averages_factors_and_misses_exactly_the_cross_term(start):
    rule = get_rule("fedit", alpha=ALPHA)
    state = rule.init_state(start)
    clients = [trained(start, 100 + k) for k in range(4)]
    new = rule.aggregate(state, clients, COUNTS)
    p = p_of(COUNTS)
    for key in start:
        hand = sum(pk * c[key].double() for pk, c in zip(p, clients))
        torch.testing.assert_close(new.lora[key].double(), hand, atol=1e-6, rtol=1e-6)
    ideal, got = ideal_delta(clients, COUNTS, ALPHA), rule.effective_delta(new)
    for module, (ka, kb) in lora_modules(start).items():
        s = ALPHA / start[ka].shape[0]
        # Σ p_k B_k A_k − B̄ Ā = ½ Σ_{k,l} p_k p_l (B_k − B_l)(A_k − A_l)
        cross = 0.5 * sum(
            pk * pl * (ck[kb].double() - cl[kb].double()) @ (ck[ka].double() - cl[ka].double())
            for pk, ck in zip(p, clients) for pl, cl in zip(p, clients)
        )
        # the global adapters are fp32: agree to fp32 rounding of ΔW
        tol = 1e-6 * float(ideal[module].abs().max())
        torch.testing.assert_close(ideal[module] - got[module], s * cross, atol=tol, rtol=0)
        assert float(cross.abs().max()) * s > 100 * tol  # the cross term is far above rounding
        assert rel(got[module], ideal[module]) > 1e-3  # not exact


def test_ffa_trains_and_averages_b_only_and_is_exact(start):
    rule = get_rule("ffa", alpha=ALPHA)
    state = rule.init_state(start)
    clients = [trained(start, 200 + k, keep_a=True) for k in range(4)]
    payloads = [rule.client_payload(c) for c in clients]
    assert all(".lora_B." in k for k in payloads[0]) and len(payloads[0]) == len(start) // 2
    new = rule.aggregate(state, payloads, COUNTS)
    ideal, got = ideal_delta(clients, COUNTS, ALPHA), rule.effective_delta(new)
    for module in ideal:
        assert rel(got[module], ideal[module]) < 1e-6
    assert set(rule.downlink(new)) == set(payloads[0])
    assert set(rule.downlink(new, full=True)) == set(start)


def test_fedsa_shares_a_keeps_b_on_clients(start):
    rule = get_rule("fedsa", alpha=ALPHA)
    state = rule.init_state(start)
    clients = [trained(start, 300 + k) for k in range(4)]
    payloads = [rule.client_payload(c) for c in clients]
    assert all(".lora_A." in k for k in payloads[0]) and len(payloads[0]) == len(start) // 2
    new = rule.aggregate(state, payloads, COUNTS)
    for key in payloads[0]:
        hand = sum(pk * c[key].double() for pk, c in zip(p_of(COUNTS), clients))
        torch.testing.assert_close(new.lora[key].double(), hand, atol=1e-6, rtol=1e-6)
    assert set(rule.downlink(new)) == set(payloads[0]) == set(rule.downlink(new, full=True))
    with pytest.raises(ValueError, match="personalised"):
        rule.effective_delta(new)


def test_flora_stacks_heterogeneous_ranks_exactly_over_rounds():
    modules = {"self_attn.q_proj": (64, 48), "mlp.down_proj": (40, 24)}
    rule = get_rule("flora", alpha=ALPHA)
    state = rule.init_state({k: v * (0 if ".lora_B." in k else 1) for k, v in random_lora(1, 4, modules, 5).items()})
    assert state.base_delta == {}
    total = None
    for rnd in range(3):
        ranks = [1, 2, 3] if rnd == 0 else [2, 8, 4]
        clients = [random_lora(1, r, modules, seed=10 * rnd + r) for r in ranks]
        state = rule.aggregate(state, [to_arrayrecord(c) for c in clients], [3, 1, 2])
        ideal = ideal_delta(clients, [3, 1, 2], ALPHA)
        total = ideal if total is None else {m: total[m] + ideal[m] for m in ideal}
        got = rule.effective_delta(state)
        for module in ideal:
            assert rel(got[module], total[module]) < 1e-6, (rnd, module)
    q = "base_model.model.model.layers.0.self_attn.q_proj"
    # rank 1+2+3 = 6 stacked after round 1 would be factored; 6 + 14 + 14 = 34 > 64·48/112: dense now
    assert state.base_delta[q].dense is not None
    down = rule.downlink(state)
    assert set(down) == {m + ".base_delta.weight" for m in state.base_delta}  # no adapters: clients reinit
    _, deltas = split_downlink(down)
    for module in deltas:
        torch.testing.assert_close(deltas[module].double(), total[module], atol=1e-6, rtol=1e-5)


def test_base_delta_stays_factored_while_smaller_and_equals_dense():
    g = torch.Generator().manual_seed(0)
    b1, a1 = torch.randn(48, 3, generator=g), torch.randn(3, 64, generator=g)
    delta = BaseDelta(48, 64).plus(b1, a1)
    assert delta.dense is None and delta.rank == 3
    assert set(delta.payload("m")) == {"m.base_delta.B", "m.base_delta.A"}
    b2, a2 = torch.randn(48, 30, generator=g), torch.randn(30, 64, generator=g)
    dense = delta.plus(b2, a2)  # 33 · 112 ≥ 48 · 64: dense is smaller now
    assert dense.dense is not None and set(dense.payload("m")) == {"m.base_delta.weight"}
    torch.testing.assert_close(dense.materialize(), b1 @ a1 + b2 @ a2, atol=1e-4, rtol=1e-5)
    _, from_factors = split_downlink(delta.payload("m"))
    torch.testing.assert_close(from_factors["m"], b1 @ a1)


def test_flora_folds_a_nonzero_initial_adapter_into_the_base(start):
    rule = get_rule("flora", alpha=ALPHA)
    state = rule.init_state(start)
    assert all(float(v.abs().sum()) == 0 for k, v in state.lora.items() if ".lora_B." in k)
    for module, (ka, kb) in lora_modules(start).items():
        expected = (ALPHA / 4) * start[kb].double() @ start[ka].double()
        torch.testing.assert_close(state.base_delta[module].materialize().double(), expected, atol=1e-6, rtol=1e-5)


def test_fedex_average_plus_residual_is_exact_over_rounds(start):
    rule = get_rule("fedex", alpha=ALPHA)
    state = rule.init_state(start)
    for rnd in range(2):
        clients = [trained({**state.lora}, 400 + 10 * rnd + k) for k in range(4)]
        # every client's model is base + residual so far + its own adapters
        before = {m: d.materialize().double() for m, d in state.base_delta.items()}
        new = rule.aggregate(state, [ArrayRecord(c) for c in clients], COUNTS)
        ideal = ideal_delta(clients, COUNTS, ALPHA)
        got = rule.effective_delta(new)
        for module, (ka, _) in lora_modules(start).items():
            expected = ideal[module] + before.get(module, 0.0)
            assert rel(got[module], expected) < 1e-6, (rnd, module)
            # the adapters are FedIT's
            hand_a = sum(pk * c[ka].double() for pk, c in zip(p_of(COUNTS), clients))
            torch.testing.assert_close(new.lora[ka].double(), hand_a, atol=1e-6, rtol=1e-6)
        state = new
    # a client that keeps nothing rebuilds the global model from the downlink alone: frozen weight + residual
    # sent + s·B·A of the adapters sent is the server's effective delta
    adapters, deltas = split_downlink(rule.downlink(state))
    assert set(adapters) == set(start) and set(deltas) == set(lora_modules(start))
    effective = rule.effective_delta(state)
    for module, (ka, kb) in lora_modules(adapters).items():
        rebuilt = deltas[module].double() + (ALPHA / 4) * adapters[kb].double() @ adapters[ka].double()
        assert rel(rebuilt, effective[module]) < 1e-6, module


def test_fedex_refuses_heterogeneous_ranks(start):
    rule = get_rule("fedex", alpha=ALPHA)
    clients = [random_lora(2, 4, SMALL_MODULES, seed=1), random_lora(2, 2, SMALL_MODULES, seed=2)]
    with pytest.raises(InvalidUpdateError, match="shape") as info:
        rule.aggregate(rule.init_state(start), clients, [1, 1])
    assert info.value.client == 1


def test_svd_is_the_best_rank_r_approximation_of_the_exact_average(start):
    rule = get_rule("svd", alpha=ALPHA)
    state = rule.init_state(start)
    clients = [trained(start, 500 + k, step=1.0) for k in range(4)]
    new = rule.aggregate(state, clients, COUNTS)
    ideal, got = ideal_delta(clients, COUNTS, ALPHA), rule.effective_delta(new)
    worst = 0.0
    for module in ideal:
        # independent: a dense SVD of the exact ΔW
        u, sigma, vh = torch.linalg.svd(ideal[module], full_matrices=False)
        best = u[:, :4] @ torch.diag(sigma[:4]) @ vh[:4]
        # the global factors are stored in fp32: agree to fp32 rounding
        torch.testing.assert_close(got[module], best, atol=1e-6 * float(best.abs().max()), rtol=0)
        tail = math.sqrt(float(sigma[4:].pow(2).sum()))
        assert (got[module] - ideal[module]).norm().item() == pytest.approx(tail, rel=1e-4)
        worst = max(worst, tail / float(ideal[module].norm()))
    assert worst > 1e-3  # not exact here: 4 clients × rank 4 > rank 4
    assert new.info["svd_tail_rel_max"] == pytest.approx(worst, rel=1e-6)


def test_svd_is_exact_when_the_stacked_rank_fits(start):
    rule = get_rule("svd", alpha=ALPHA, rank=8)
    clients = [random_lora(2, 4, SMALL_MODULES, seed=7), random_lora(2, 4, SMALL_MODULES, seed=8)]
    state = rule.init_state(random_lora(2, 8, SMALL_MODULES, seed=9))
    new = rule.aggregate(state, clients, [1, 3])
    ideal, got = ideal_delta(clients, [1, 3], ALPHA), rule.effective_delta(new)
    for module in ideal:
        assert rel(got[module], ideal[module]) < 1e-6  # fp32 storage of the factors


def test_svd_with_many_clients_takes_the_iterative_solver_and_gives_the_exact_state(monkeypatch):
    import devft.aggregation.svd as svd_module

    modules = {"self_attn.q_proj": (72, 64), "mlp.down_proj": (64, 80), "self_attn.k_proj": (64, 16)}  # (d_in, d_out)
    start = random_lora(2, 2, modules, seed=21)
    clients = [trained(start, 700 + k, step=0.2) for k in range(16)]  # R = 32: iterative for q and down, not k
    counts = [10 + k for k in range(16)]
    solvers = []

    def spy(*args, **kwargs):
        found = real(*args, **kwargs)
        solvers.append(found.solver)
        return found

    real = svd_module.svd_of_product
    exact_rule = get_rule("svd", alpha=ALPHA, solver="exact")
    exact = exact_rule.aggregate(exact_rule.init_state(start), clients, counts)
    monkeypatch.setattr(svd_module, "svd_of_product", spy)
    auto_rule = get_rule("svd", alpha=ALPHA)
    auto = auto_rule.aggregate(auto_rule.init_state(start), clients, counts)
    assert sorted(solvers) == ["exact"] * 2 + ["iterative"] * 4  # 2 layers × (k; q, down)
    ideal, got, best = ideal_delta(clients, counts, ALPHA), auto_rule.effective_delta(auto), exact_rule.effective_delta(exact)
    for module in ideal:
        # the global factors are stored in fp32: the two solvers agree to its rounding
        torch.testing.assert_close(got[module], best[module], atol=1e-6 * float(best[module].abs().max()), rtol=0)
        assert rel(got[module], ideal[module]) > 1e-3  # truncated: 16 clients of rank 2 do not fit in rank 2
    for key in ("svd_tail_rel_max", "svd_tail_rel_mean"):
        assert auto.info[key] == pytest.approx(exact.info[key], rel=1e-8)
    with pytest.raises(ValueError, match="solver='qr'"):
        get_rule("svd", alpha=ALPHA, solver="qr")


def test_svd_with_many_clients_of_mixed_ranks_gives_the_exact_state():
    modules = {"self_attn.q_proj": (72, 64), "mlp.down_proj": (64, 80)}  # (d_in, d_out)
    start = random_lora(2, 4, modules, seed=22)
    clients = [random_lora(2, 2 if k % 2 else 4, modules, seed=800 + k) for k in range(16)]  # R = 48
    counts = [5 + k for k in range(16)]
    exact_rule, auto_rule = get_rule("svd", alpha=ALPHA, solver="exact"), get_rule("svd", alpha=ALPHA)
    exact = exact_rule.aggregate(exact_rule.init_state(start), clients, counts)
    auto = auto_rule.aggregate(auto_rule.init_state(start), clients, counts)
    best, got = exact_rule.effective_delta(exact), auto_rule.effective_delta(auto)
    for module in best:
        torch.testing.assert_close(got[module], best[module], atol=1e-6 * float(best[module].abs().max()), rtol=0)
    assert auto.info["svd_tail_rel_max"] == pytest.approx(exact.info["svd_tail_rel_max"], rel=1e-8)


def test_svd_sends_each_client_its_own_rank(start):
    rule = get_rule("svd", alpha=ALPHA)
    new = rule.aggregate(rule.init_state(start), [trained(start, 600 + k) for k in range(3)], [1, 1, 1])
    full = rule.effective_delta(new)
    down = rule.downlink(new, rank=2)
    for module, (ka, kb) in lora_modules(start).items():
        assert down[ka].shape[0] == 2 and down[kb].shape[1] == 2
        u, sigma, vh = torch.linalg.svd(full[module], full_matrices=False)
        rank2 = u[:, :2] @ torch.diag(sigma[:2]) @ vh[:2]
        torch.testing.assert_close((ALPHA / 2) * down[kb].double() @ down[ka].double(), rank2, atol=1e-5, rtol=1e-4)
    with pytest.raises(ValueError, match="exceeds the server's svd rank"):
        rule.downlink(new, rank=5)


def test_svd_keeps_a_trainable_when_the_average_is_zero(start):
    zero_b = {k: (torch.zeros_like(v) if ".lora_B." in k else v) for k, v in start.items()}
    rule = get_rule("svd", alpha=ALPHA)
    new = rule.aggregate(rule.init_state(zero_b), [zero_b, zero_b], [1, 1])
    for key, value in new.lora.items():
        if ".lora_A." in key:
            assert torch.equal(value, zero_b[key])  # A kept: the LoRA direction is not dead
        else:
            assert float(value.abs().sum()) == 0.0


@pytest.mark.parametrize("name", sorted(RULES))
def test_records_and_tensors_give_the_same_state(name, start):
    rule = get_rule(name, alpha=ALPHA)
    clients = [rule.client_payload(trained(start, 700 + k, keep_a=(name == "ffa"))) for k in range(3)]
    a = rule.aggregate(rule.init_state(start), clients, [1, 2, 3])
    b = rule.aggregate(rule.init_state(start), [to_arrayrecord(c) for c in clients], [1, 2, 3])
    for key in a.lora:
        torch.testing.assert_close(a.lora[key], b.lora[key], atol=1e-7, rtol=1e-6)
    for module in a.base_delta:
        torch.testing.assert_close(a.base_delta[module].materialize(), b.base_delta[module].materialize())


@pytest.mark.parametrize("backend", ["torch", NATIVE])
@pytest.mark.parametrize("name", ["fedit", "fedsa"])
def test_threads_spread_the_sum_without_changing_a_bit(name, backend, monkeypatch):
    from devft.aggregation.kernels import torch_blocked

    # r = 64 on 4096-wide modules, 3 layers: 15.7 MB of fp32 per client (6.3 MB of A alone, what FedSA
    # uploads), so the torch loops run in several 4 MiB output blocks; the native ones in one part a thread
    big = random_lora(3, 64, {"q_proj": (4096, 4096), "up_proj": (4096, 8192)}, seed=3)
    one = get_rule(name, alpha=ALPHA, backend=backend)
    two = get_rule(name, alpha=ALPHA, threads=2, backend=backend)
    assert (one.threads, two.threads) == (None, 2)
    clients = [pack_arrayrecord(one.client_payload(trained(big, 900 + k))) for k in range(3)]
    calls = []
    spread = torch_blocked._map_blocks
    monkeypatch.setattr(torch_blocked, "_map_blocks",
                        lambda blocks, work, threads, device: (calls.append((len(blocks), threads)),
                                                               spread(blocks, work, threads, device)))
    a = one.aggregate(one.init_state(big), clients, [1, 2, 3])
    b = two.aggregate(two.init_state(big), clients, [1, 2, 3])
    if backend == "torch":
        assert [t for _, t in calls] == [1, 2] and min(n for n, _ in calls) >= 2  # several blocks, on 2 threads
    else:
        assert calls == [(1, 1), (2, 2)]  # one C call on one thread; two halves on two
    for key in a.lora:
        assert torch.equal(a.lora[key], b.lora[key]), key
    for bad in (0, -1, 1.5, True):
        with pytest.raises(ValueError, match=rf"threads={bad!r}"):
            get_rule(name, alpha=ALPHA, threads=bad)


@pytest.mark.parametrize("name", sorted(RULES))
def test_a_non_finite_reply_is_named(name, start):
    rule = get_rule(name, alpha=ALPHA)
    clients = [rule.client_payload(trained(start, 800 + k, keep_a=(name == "ffa"))) for k in range(3)]
    key = sorted(clients[1])[1]
    clients[1][key].view(-1)[3] = float("nan")
    with pytest.raises(NonFiniteUpdateError) as info:
        rule.aggregate(rule.init_state(start), clients, [1, 2, 3])
    assert (info.value.client, info.value.key) == (1, key)


@pytest.mark.parametrize("name,value", [("flora", 1e20), ("fedex", 1e20), ("svd", 3e38)])
def test_finite_replies_whose_aggregate_overflows_raise_and_leave_the_state(name, value, start):
    # B·A of 1e20-sized factors overflows float32 in the base delta; svd re-factors B·A of 3e38-sized factors
    # into balanced float32 factors that overflow
    rule = get_rule(name, alpha=ALPHA)
    state = rule.init_state(start)
    before = {k: v.clone() for k, v in state.to_tensors().items()}
    clients = [{k: torch.full_like(v, value) for k, v in rule.client_payload(start).items()} for _ in range(2)]
    with pytest.raises(NonFiniteAggregateError, match=f"the {name} aggregate of finite replies is not finite") as info:
        rule.aggregate(state, clients, [1, 1])
    assert info.value.client is None and info.value.parts
    again = pickle.loads(pickle.dumps(info.value))  # Ray and multiprocessing carry exceptions pickled
    assert type(again) is NonFiniteAggregateError and again.parts == info.value.parts and str(again) == str(info.value)
    assert all(torch.equal(before[k], v) for k, v in state.to_tensors().items()) and state.round == 0
    unchecked = get_rule(name, alpha=ALPHA, check_finite=False).aggregate(state, clients, [1, 1])
    assert unchecked.non_finite_parts() == info.value.parts  # asked not to check, the caller gets what it is


@pytest.mark.parametrize(
    "name,up_parts,down_parts,full_down_parts",
    [("fedit", "AB", "AB", "AB"), ("ffa", "B", "B", "AB"), ("fedsa", "A", "A", "A"), ("svd", "AB", "AB", "AB"),
     ("flora", "AB", "", ""), ("fedex", "AB", "AB", "AB")],
)
def test_bytes_follow_the_real_payloads(name, up_parts, down_parts, full_down_parts, start):
    # down: to a client that holds the rest (devft's FFA clients rebuild A); full: to one that keeps nothing
    # and rebuilds nothing
    rule = get_rule(name, alpha=ALPHA)
    replies = [rule.client_payload(trained(start, 900 + k, keep_a=(name == "ffa"))) for k in range(2)]
    state = rule.aggregate(rule.init_state(start), replies, [1, 1])
    up, down = rule.payload_bytes(state, start)
    assert up == ArrayRecord(rule.client_payload(start)).count_bytes() == payload_nbytes(rule.client_payload(start))
    assert down == to_arrayrecord(rule.downlink(state)).count_bytes()
    packed_up, packed_down = rule.payload_bytes(state, start, wire_format="packed")
    assert packed_up == pack_arrayrecord(rule.client_payload(start)).count_bytes() < up
    assert packed_down == pack_arrayrecord(rule.downlink(state)).count_bytes() <= down

    def lora_bytes(parts):
        keys = [k for k in start if any(f".lora_{p}." in k for p in parts)]
        return payload_nbytes({k: start[k] for k in keys})

    assert up == lora_bytes(up_parts)
    base = sum(payload_nbytes(d.payload(m)) for m, d in state.base_delta.items())
    assert (base > 0) == rule.changes_base
    assert down == lora_bytes(down_parts) + base
    _, full_down = rule.payload_bytes(state, start, full=True)
    assert full_down == to_arrayrecord(rule.downlink(state, full=True)).count_bytes() == lora_bytes(full_down_parts) + base
    # elements per module as in docs/design.md §3: FedIT r(d_in + d_out), FFA r·d_out, FedSA r·d_in
    a_key, b_key = lora_key(0, "mlp.down_proj", "lora_A"), lora_key(0, "mlp.down_proj", "lora_B")
    sent = rule.client_payload(start)
    elements = sum(sent[k].numel() for k in (a_key, b_key) if k in sent)
    r, d_in, d_out = 4, 40, 24
    assert elements == {"AB": r * (d_in + d_out), "B": r * d_out, "A": r * d_in}[up_parts]


@pytest.mark.parametrize("name", ["fedex", "flora"])
def test_server_state_round_trips_through_tensors_for_checkpoints(name, start):
    rule = get_rule(name, alpha=ALPHA)
    state = rule.init_state(start)
    for rnd in range(2):
        state = rule.aggregate(state, [trained(start, 950 + 10 * rnd + k) for k in range(3)], [1, 2, 3])
    record = to_arrayrecord(state.to_tensors())  # what a checkpoint would write
    restored = type(state).from_tensors({k: torch.from_numpy(a.numpy()) for k, a in record.items()}, round=state.round)
    assert restored.round == 2 and set(restored.lora) == set(state.lora)
    got, expected = rule.effective_delta(restored), rule.effective_delta(state)
    for module in expected:
        torch.testing.assert_close(got[module], expected[module])
    assert rule.downlink(restored).keys() == rule.downlink(state).keys()


def test_svd_of_a_higher_rank_than_the_replies_leaves_no_direction_dead(start):
    # rank 8 from rank-4 replies of 1 client: 4 components, the other 4 directions get B = 0 and a random A
    rule = get_rule("svd", alpha=ALPHA, rank=8)
    client = trained(start, 950)
    new = rule.aggregate(rule.init_state(start), [client], [1])
    again = get_rule("svd", alpha=ALPHA, rank=8).aggregate(rule.init_state(start), [client], [1])
    for module, (ka, kb) in lora_modules(new.lora).items():
        a, b = new.lora[ka], new.lora[kb]
        assert a.shape[0] == b.shape[1] == 8
        assert all(float(a[i].abs().max()) > 0 for i in range(8)), module  # no dead direction
        assert float(b[:, 4:].abs().max()) == 0.0  # the added directions do not change ΔW
        assert torch.equal(a, again.lora[ka])  # seeded: every server draws the same
        bound = 1 / math.sqrt(a.shape[1])
        assert float(a[4:].abs().max()) <= bound
    ideal = ideal_delta([client], [1], alpha=ALPHA)
    for module, delta in rule.effective_delta(new).items():
        assert rel(delta, ideal[module]) < 1e-5  # exact: the stacked rank 4 fits


@pytest.mark.parametrize("name", sorted(RULES))
def test_rules_of_products_refuse_tensors_that_are_not_lora_factors(name, start):
    # a trainable head beside the LoRA: averaged by fedit/ffa/fedsa, refused by name by flora/fedex/svd
    with_head = {**start, "head.weight": torch.randn(3, 5)}
    rule = get_rule(name, alpha=ALPHA)
    if not rule.lora_pairs_only:
        state = rule.init_state(with_head)
        clients = [rule.client_payload({**trained(start, 960 + k, keep_a=(name == "ffa")),
                                        "head.weight": torch.full((3, 5), float(k))}) for k in range(2)]
        assert torch.equal(rule.aggregate(state, clients, [1, 3]).lora["head.weight"], torch.full((3, 5), 0.75))
        return
    with pytest.raises(ValueError, match=f"rule '{name}' aggregates products B·A .* e.g. 'head.weight'"):
        rule.init_state(with_head)
    clients = [{**rule.client_payload(trained(start, 960 + k)), "head.weight": torch.zeros(3, 5)} for k in range(2)]
    with pytest.raises(ValueError, match="e.g. 'head.weight'"):
        rule.aggregate(ServerState(lora=with_head), clients, [1, 1])
    assert {n for n, cls in RULES.items() if cls.lora_pairs_only} == {"flora", "fedex", "svd"}
