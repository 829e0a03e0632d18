"""Clients of different LoRA ranks (``lora.client_ranks``) with the rank-heterogeneous rules, through the
Flower app on the in-process grid: what each client is sent, trains and replies, and that FLoRA stays exact."""

from __future__ import annotations

import json

import pytest
import torch
from flwr.app import MessageType
from inprocess_grid import run_recorded

from devft.aggregation import ServerState, get_rule, ideal_delta, record_tensors
from server.checkpoint import load_checkpoint
from server.metering import serialise

RANKS = [2, 4]  # partitions 0 and 2 train rank 2, partitions 1 and 3 rank 4 (lora.r = 4 in the smoke config)


def _rank(tensors):
    return next(t.shape[0] for k, t in sorted(tensors.items()) if k.endswith(".lora_A.weight"))


def _pairs(grid, kind, server_round):
    return [(grid.node_pid(m), m, r) for m, r in grid.pairs
            if m.metadata.message_type == kind and int(m.metadata.group_id) == server_round]


def _size(message):
    return sum(map(len, serialise(message)[1].values()))


def _rows(out):
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def _run(config, out, fresh=True):
    after = {}
    grid = run_recorded(config, out, fresh=fresh, on_round=[lambda row: after.setdefault(
        row["round"], load_checkpoint(out / "checkpoint"))])
    return grid, after


def test_flora_stacks_clients_of_different_ranks_exactly(smoke_config, private_env, one_thread, tmp_path):
    config = smoke_config(federation__method="fedit", federation__aggregation="flora", federation__num_rounds=2,
                          federation__clients_per_round=4, federation__client_eval=True, federation__eval_every=1,
                          lora__client_ranks=RANKS)
    rule = get_rule("flora", alpha=config.lora.alpha)
    grid, after = _run(config, tmp_path / "run")

    previous = {}
    for server_round in (1, 2):
        replies = _pairs(grid, MessageType.TRAIN, server_round)
        assert sorted(pid for pid, _, _ in replies) == [0, 1, 2, 3]
        updates = {pid: record_tensors(reply.content["arrays"]) for pid, _, reply in replies}
        assert {pid: _rank(t) for pid, t in updates.items()} == {0: 2, 1: 4, 2: 2, 3: 4}
        # the uplink follows each client's rank: a rank-2 reply carries half the LoRA of a rank-4 one
        up = {pid: _size(reply) for pid, _, reply in replies}
        assert up[0] < up[1] and up[2] < up[3]
        # exact: the new base delta is the old one plus Σ p_k (alpha / r_k) B_k A_k over the mixed ranks
        weights = [reply.content["metrics"]["num-examples"] for _, _, reply in replies]
        ideal = ideal_delta([r.content["arrays"] for _, _, r in replies], weights, config.lora.alpha)
        state = ServerState.from_tensors({**after[server_round]["sub_lora"], **after[server_round]["base_delta"]})
        got = rule.effective_delta(state)
        for module, value in ideal.items():
            torch.testing.assert_close(got[module], value + previous.get(module, 0), atol=2e-5, rtol=1e-4)
        previous = {m: d.materialize().double() for m, d in state.base_delta.items()}
    # after one round the stacked base delta has rank Σ r_k = 12 (factored: smaller than the dense matrix)
    first = ServerState.from_tensors(after[1]["base_delta"]).base_delta
    assert {d.rank for d in first.values()} == {2 + 4 + 2 + 4}

    # federated evaluation: every client evaluated what the server sent, whatever its own training rank
    for server_round in (1, 2):
        evals = _pairs(grid, MessageType.EVALUATE, server_round)
        assert len(evals) == 4 and not any(reply.has_error() for _, _, reply in evals)
    table = _rows(tmp_path / "run")
    assert [(r["clients_ok"], r["clients_failed"], r["client_eval_clients"]) for r in table] == [(4, 0, 4)] * 2


def test_svd_sends_each_client_the_global_adapters_at_its_rank(smoke_config, private_env, one_thread, tmp_path):
    # DevFT's two stages (4 then 8 layers): the server keeps rank-4 adapters, fuses and transfers them
    config = smoke_config(federation__aggregation="svd", federation__clients_per_round=4,
                          federation__client_eval=True, lora__client_ranks=RANKS)
    rule = get_rule("svd", alpha=config.lora.alpha)
    # one process serves every partition, as a simulation's actor does: a model per rank, reused
    grid, after = _run(config, tmp_path / "run", fresh=False)

    table = _rows(tmp_path / "run")
    assert [(r["submodel_layers"], r["clients_ok"], r["clients_failed"]) for r in table] == [
        (4, 4, 0), (4, 4, 0), (8, 4, 0), (8, 4, 0)]
    # rows say how much the truncation dropped: 4 replies of ranks 2, 4, 2, 4 stack to rank 12, kept at 4
    assert all(0 < r["svd_tail_rel_mean"] <= r["svd_tail_rel_max"] < 1 for r in table)
    for server_round in (1, 2, 3, 4):
        sent = {pid: (message, record_tensors(message.content["arrays"]))
                for pid, message, _ in _pairs(grid, MessageType.TRAIN, server_round)}
        assert {pid: _rank(t) for pid, (_, t) in sent.items()} == {0: 2, 1: 4, 2: 2, 3: 4}
        assert _size(sent[0][0]) < _size(sent[1][0])  # the downlink is cut to the client's rank
        replies = {pid: record_tensors(reply.content["arrays"]) for pid, _, reply in
                   _pairs(grid, MessageType.TRAIN, server_round)}
        assert {pid: _rank(t) for pid, t in replies.items()} == {0: 2, 1: 4, 2: 2, 3: 4}
        if server_round in (2, 4):  # within a stage: the top components of the last round's global adapters
            global_lora = after[server_round - 1]["sub_lora"]
            assert _rank(global_lora) == config.lora.r
            for rank, pid in ((2, 0), (4, 1)):
                expected = rule.downlink(ServerState(lora=global_lora), full=True, rank=rank)
                assert sent[pid][1].keys() == expected.keys()
                for key, value in expected.items():
                    torch.testing.assert_close(sent[pid][1][key], value.float(), atol=1e-6, rtol=1e-5)
        evals = _pairs(grid, MessageType.EVALUATE, server_round)  # federation.eval_every = 2
        assert len(evals) == (4 if server_round % 2 == 0 else 0) and not any(r.has_error() for _, _, r in evals)
    assert all(r["client_eval_clients"] == 4 for r in table if r["eval_loss"] is not None)


@pytest.mark.parametrize("rule", ["fedit", "ffa", "fedsa", "fedex"])
def test_rules_that_need_one_rank_refuse_client_ranks(rule, smoke_config):
    from server.methods import check_run

    config = smoke_config(federation__method="fedit", federation__aggregation=rule, lora__client_ranks=RANKS)
    with pytest.raises(ValueError, match=rf"lora.client_ranks=\[2, 4\] with federation.aggregation='{rule}'"):
        check_run(config)


def test_svd_refuses_a_client_rank_above_the_servers(smoke_config):
    from server.methods import check_run

    check_run(smoke_config(federation__aggregation="svd", lora__client_ranks=[1, 4]))
    check_run(smoke_config(federation__method="fedit", federation__aggregation="flora", lora__client_ranks=[16]))
    with pytest.raises(ValueError, match=r"no client rank may exceed it; set lora.r=8"):
        check_run(smoke_config(federation__aggregation="svd", lora__client_ranks=[2, 8]))


@pytest.mark.parametrize("value", ["2,0", "2,x", [2, -1], [True], [2.5], [float("inf")]])
def test_client_ranks_must_be_positive_integers(value, smoke_config):
    with pytest.raises(ValueError, match=r"lora.client_ranks"):
        smoke_config(lora__client_ranks=value)


def test_client_ranks_are_cycled_over_partitions():
    from devft.models import LoraSettings

    lora = LoraSettings(r=8, client_ranks=(4, 8, 16))
    assert [lora.rank_of(p) for p in range(7)] == [4, 8, 16, 4, 8, 16, 4]
    assert LoraSettings(r=8).rank_of(5) == 8
    one = lora.with_rank(16)
    assert (one.r, one.client_ranks, one.alpha, one.scale) == (16, (), lora.alpha, lora.alpha / 16)
