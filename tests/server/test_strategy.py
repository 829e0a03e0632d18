"""The DevFT strategy without Ray: whole runs on an in-process grid, and its hooks on hand-made replies."""

from __future__ import annotations

import dataclasses
import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from flwr.app import Array, ArrayRecord, ConfigRecord, Message, MessageType, MetricRecord, RecordDict
from inprocess_grid import InProcessGrid, run_recorded
from peft import PeftModel
from safetensors.torch import load_file

from devft.aggregation import ServerState, record_tensors
from server.checkpoint import load_checkpoint
from server.metering import serialise
from server.sampling import discover_partitions, sample_partitions

ROW_FIELDS = {
    "round", "stage", "submodel_layers", "clients_sampled", "clients_ok", "clients_failed", "bytes_up",
    "bytes_down", "train_flops", "client_train_s_mean", "client_train_s_max", "round_wall_s", "aggregate_s",
    "validate_s", "peak_rss_mb", "train_loss", "eval_loss", "eval_accuracy", "submodel_eval_loss",
}  # fmt: skip


def rows(run_dir):
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def adapter(run_dir):
    return load_file(str(run_dir / "adapter" / "adapter_model.safetensors"))


def lora_numel_per_layer(hidden=64, inter=128, kv=32, r=4):
    """LoRA parameters of one tiny-llama layer: r·(d_in + d_out) for q, k, v, o, gate, up, down."""
    shapes = [(hidden, hidden), (hidden, kv), (hidden, kv), (hidden, hidden), (hidden, inter), (hidden, inter), (inter, hidden)]
    return sum(r * (a + b) for a, b in shapes)


def test_devft_run_writes_the_run_directory(devft_run):
    config, out, grid = devft_run

    table = rows(out)
    assert [r["round"] for r in table] == [1, 2, 3, 4]
    assert [(r["stage"], r["submodel_layers"]) for r in table] == [(0, 4), (0, 4), (1, 8), (1, 8)]
    for r in table:
        assert ROW_FIELDS <= set(r), ROW_FIELDS - set(r)
        assert r["clients_sampled"] == r["clients_ok"] == 2 and r["clients_failed"] == 0
        assert r["train_flops"] > 0 and r["peak_rss_mb"] > 0 and math.isfinite(r["train_loss"])
        assert r["client_train_s_max"] >= r["client_train_s_mean"] > 0
        assert 0 < r["validate_s"] < r["round_wall_s"] and 0 < r["aggregate_s"] < r["round_wall_s"]
        assert r["eval_bytes_up"] == r["eval_bytes_down"] == 0  # the server evaluates: no messages
    # eval every 2 rounds (and at the end); null otherwise
    assert [r["eval_loss"] is not None for r in table] == [False, True, False, True]
    assert table[1]["submodel_eval_loss"] != table[1]["eval_loss"]  # 4-layer submodel vs the full model
    assert table[3]["submodel_eval_loss"] == table[3]["eval_loss"]  # last stage: the submodel is the full model

    # Uplink: each reply carries the submodel's LoRA in float32 (hand-computed size) plus framing: in the
    # packed wire format (the default) the manifest names every tensor (a peft key of >= 40 characters and
    # its shape: < 256 bytes each), then a few headers, the metrics and the envelope.
    for r in table:
        tensors = 14 * r["submodel_layers"]  # A and B of 7 modules per layer
        payload = 4 * lora_numel_per_layer() * r["submodel_layers"]
        per_reply = r["bytes_up"] / r["clients_ok"]
        assert payload + 40 * tensors <= per_reply <= payload + 256 * tensors + 8192
    # Downlink: exactly the bytes the grid serialised for the train messages of that round.
    sent = [m for m in grid.sent if m.metadata.message_type == MessageType.TRAIN]
    by_round: dict[int, int] = {}
    for m in sent:
        _, objects = serialise(m)
        by_round[int(m.metadata.group_id)] = by_round.get(int(m.metadata.group_id), 0) + sum(map(len, objects.values()))
    assert [by_round[r["round"]] for r in table] == [r["bytes_down"] for r in table]
    # The base model never travels: only LoRA tensors of the submodel's layers are sent.
    for m in sent:
        keys = list(record_tensors(m.content["arrays"]).keys())
        assert keys and all(".lora_A." in k or ".lora_B." in k for k in keys)

    summary = json.loads((out / "summary.json").read_text())
    assert summary["method"] == "devft" and summary["seed"] == 0 and summary["rounds"] == 4
    assert summary["totals"]["bytes_up"] == sum(r["bytes_up"] for r in table)
    from devft.aggregation import server_threads
    from devft.aggregation.kernels import native_kernels

    assert summary["server_aggregation"] == {"backend": "native" if native_kernels() is not None else "torch",
                                             "threads": server_threads(0)}
    assert summary["final"]["eval_loss"] == table[-1]["eval_loss"]
    assert summary["config"]["federation"]["num_rounds"] == 4
    stage0 = json.loads((out / "stages" / "stage-0.json").read_text())
    assert stage0["plan"]["capacity"] == 4 and len(stage0["similarity"]) == 8
    assert (out / "report.md").exists()


def test_wire_format_changes_the_bytes_not_the_result(devft_run, run_inprocess, tmp_path):
    """One Flower array per tensor instead of the packed default: bit-identical training, more bytes."""
    config, packed_out, _ = devft_run
    out = tmp_path / "arrays"
    grid = run_inprocess(dataclasses.replace(
        config, federation=dataclasses.replace(config.federation, wire_format="arrays")), out)
    sent = [m for m in grid.sent if m.metadata.message_type == MessageType.TRAIN]
    assert all(set(m.content["arrays"].keys()) == set(record_tensors(m.content["arrays"])) for m in sent)
    packed, arrays = adapter(packed_out), adapter(out)
    assert packed.keys() == arrays.keys() and all(torch.equal(packed[k], arrays[k]) for k in packed)
    for p_row, a_row in zip(rows(packed_out), rows(out)):
        assert p_row["train_loss"] == a_row["train_loss"] and p_row["eval_loss"] == a_row["eval_loss"]
        tensors = 14 * p_row["submodel_layers"]
        assert a_row["bytes_up"] > p_row["bytes_up"] + 50 * tensors * p_row["clients_ok"]  # per-array framing


def test_adapter_loads_with_peft_and_matches_the_checkpoint(devft_run):
    from devft.data import build_federated_data
    from devft.models import load_model
    from devft.training import eval_loss

    config, out, _ = devft_run
    base = load_model("tiny-llama")
    model = PeftModel.from_pretrained(base.model, str(out / "adapter"))
    saved = load_checkpoint(out / "checkpoint")["full_lora"]
    state = {k: v for k, v in model.state_dict().items() if "lora_" in k}
    assert len(state) == len(saved) > 0
    for key, value in saved.items():
        peft_key = key.replace(".lora_A.weight", ".lora_A.default.weight").replace(".lora_B.weight", ".lora_B.default.weight")
        assert torch.equal(state[peft_key], value), key
    test = build_federated_data(config.data).test
    loss = eval_loss(model, base.tokenizer, test, config.eval.batch_size, config.data.max_length)
    summary = json.loads((out / "summary.json").read_text())
    assert loss == pytest.approx(summary["final"]["eval_loss"], rel=1e-5)


def test_resume_after_interruption_is_bitwise_identical(devft_run, run_inprocess, tmp_path):
    """Also across aggregation thread counts: the interrupted run sums on one thread (as every run did before
    the default became one per CPU), the uninterrupted one and the resumed part on the default."""
    config, full, _ = devft_run
    one_thread = dataclasses.replace(config, federation=dataclasses.replace(config.federation, aggregation_threads=1))

    class Killed(Exception):
        pass

    def kill_after_round_3(row):
        if row["round"] == 3:
            raise Killed

    with pytest.raises(Killed):
        run_inprocess(one_thread, tmp_path / "killed", on_round=[kill_after_round_3])
    assert not (tmp_path / "killed" / "summary.json").exists()
    with open(tmp_path / "killed" / "metrics.jsonl", "a") as fh:  # a row written after the last checkpoint
        fh.write(json.dumps({"round": 4, "stale": True}) + "\n")
    run_inprocess(config, tmp_path / "killed", resume=True)

    assert [r["round"] for r in rows(tmp_path / "killed")] == [1, 2, 3, 4]
    assert "stale" not in rows(tmp_path / "killed")[-1]
    a, b = adapter(full), adapter(tmp_path / "killed")
    assert a.keys() == b.keys()
    assert all(torch.equal(a[k], b[k]) for k in a)
    # every row as the uninterrupted run's, bar what a clock measures (sampling, bytes, FLOPs, losses, stages)
    def measured(row):
        return {k: v for k, v in row.items() if not (k.endswith("_s") or k.endswith("_s_mean")
                or k.endswith("_s_max") or k.endswith("_s_sum") or k in ("peak_rss_mb", "elapsed_s"))}

    assert [measured(r) for r in rows(tmp_path / "killed")] == [measured(r) for r in rows(full)]
    summaries = [json.loads((d / "summary.json").read_text()) for d in (full, tmp_path / "killed")]
    assert summaries[0]["final"] == summaries[1]["final"]
    assert {k: v for k, v in summaries[0]["totals"].items() if k != "client_train_s"} == {
        k: v for k, v in summaries[1]["totals"].items() if k != "client_train_s"}


def test_resume_refuses_a_different_config(devft_run, smoke_config, run_inprocess, monkeypatch):
    from server.strategy import DevFTStrategy

    _, out, _ = devft_run
    before = (out / "metrics.jsonl").read_text()
    # refused before the wait for nodes (under flwr run, a federation short of nodes would wait for good)
    monkeypatch.setattr(DevFTStrategy, "_discover", lambda self, grid: pytest.fail("waited for nodes first"))
    with pytest.raises(ValueError, match="train.lr"):
        run_inprocess(smoke_config(train__lr=0.5, federation__target_eval_loss=100.0), out, resume=True)
    assert (out / "metrics.jsonl").read_text() == before


def test_client_that_always_raises_is_a_recorded_failure(smoke_config, run_inprocess, tmp_path):
    config = smoke_config(federation__clients_per_round=4, federation__fault_injection="1:raise", federation__num_rounds=2,
                          federation__eval_every=1, federation__client_eval=True)
    out = tmp_path / "run"
    run_inprocess(config, out)
    for r in rows(out):
        assert (r["clients_sampled"], r["clients_ok"], r["clients_failed"]) == (4, 3, 1)
        # federated evaluation on all four (partition 1 only fails at training)
        assert r["client_eval_clients"] == 4 and math.isfinite(r["client_eval_loss"])
        assert 0 < r["eval_bytes_down"] < r["bytes_down"] and 0 < r["eval_bytes_up"] < r["bytes_up"]
        assert r["aggregated"] is True
        assert r["failures"][0]["partition"] == 1 and "told to raise" in r["failures"][0]["reason"]
        assert math.isfinite(r["eval_loss"])
    assert json.loads((out / "summary.json").read_text())["totals"]["clients_failed"] == 2


def test_too_few_replies_skip_the_update(smoke_config, run_inprocess, tmp_path):
    config = smoke_config(federation__clients_per_round=4, federation__min_replies=3, federation__num_rounds=2,
                          federation__fault_injection="0:raise,3:no-examples")
    out = tmp_path / "run"
    run_inprocess(config, out)
    table = rows(out)
    assert [(r["clients_ok"], r["clients_failed"], r["aggregated"]) for r in table] == [(2, 2, False)] * 2
    assert table[0]["skipped"] == "2 valid replies < federation.min_replies=3"
    reasons = sorted(f["reason"] for f in table[0]["failures"])
    assert "told to raise" in reasons[0] and "num-examples must be a positive integer" in reasons[1]
    # Nothing was aggregated: every B is still the initial zero.
    final = adapter(out)
    assert all(not v.any() for k, v in final.items() if "lora_B" in k)


def test_a_huge_update_is_scaled_back_onto_the_norm_bound(smoke_config, run_inprocess, tmp_path, caplog):
    # Partition 1 multiplies its LoRA by 1e6: finite and well-formed, so every reply check lets it through.
    def run(name, **overrides):
        run_inprocess(smoke_config(federation__clients_per_round=4, **overrides), tmp_path / name)
        return rows(tmp_path / name)

    unbounded = run("unbounded", federation__fault_injection="1:huge")
    assert unbounded[0]["update_norm_max"] > 1e5 * unbounded[0]["update_norm_median"]
    assert unbounded[0]["clipped"] == [] and unbounded[0]["update_norm_bound"] is None
    assert any(r["clients_ok"] == 0 for r in unbounded)  # the global model was wrecked: every client failed
    # the diverged evaluations are NaN in the report, told apart from rounds that were not evaluated
    nan_rounds = [r["round"] for r in unbounded if r["evaluated"] and r["eval_loss"] is None]
    assert nan_rounds and nan_rounds[-1] == unbounded[-1]["round"]
    assert [r["round"] for r in unbounded if not r["evaluated"]] == [1, 3]  # eval_every = 2
    report = (tmp_path / "unbounded" / "report.md").read_text()
    for r in unbounded:
        cells = [c.strip() for c in next(line for line in report.splitlines()
                                         if line.startswith(f"| {r['round']} |")).split("|")]
        assert cells[9] == ("NaN" if r["round"] in nan_rounds else "—" if not r["evaluated"] else cells[9])
    assert "final full-model eval loss NaN (not finite: the model diverged)" in report
    assert f"the final eval loss (round {unbounded[-1]['round']}) is not finite: the model diverged" in caplog.text
    caplog.clear()

    bounded = run("bounded", federation__fault_injection="1:huge", federation__max_update_norm_ratio=3.0)
    for r in bounded:
        assert r["aggregated"] and (r["clients_ok"], r["clients_failed"]) == (4, 0)
        assert r["update_norm_bound"] == pytest.approx(3 * r["update_norm_median"])
        (clip,) = r["clipped"]
        assert clip["partition"] == 1 and clip["scale"] == pytest.approx(r["update_norm_bound"] / clip["norm"])
    clean = run("clean")
    assert bounded[-1]["eval_loss"] == pytest.approx(clean[-1]["eval_loss"], abs=0.02)
    assert "is not finite" not in caplog.text
    assert json.loads((tmp_path / "bounded" / "summary.json").read_text())["totals"]["updates_clipped"] == 4

    # a bound no honest update reaches changes nothing: replies within it are aggregated untouched
    loose = run("loose", federation__max_update_norm=1e3)
    assert all(r["clipped"] == [] and r["update_norm_bound"] == 1e3 for r in loose)
    assert [r["update_norm_max"] for r in loose] == [r["update_norm_max"] for r in clean]
    final, ref = adapter(tmp_path / "loose"), adapter(tmp_path / "clean")
    assert all(torch.equal(final[k], ref[k]) for k in ref)


def test_garbage_replies_never_reach_the_global_model(smoke_config, run_inprocess, tmp_path):
    faults = {0: ("nan", "NaN or Inf"), 1: ("shape", "shape"), 2: ("keys", "keys differ")}
    spec = ",".join(f"{p}:{mode}" for p, (mode, _) in faults.items())
    config = smoke_config(federation__clients_per_round=4, federation__num_rounds=2, federation__fault_injection=spec)
    out = tmp_path / "run"
    run_inprocess(config, out)
    for r in rows(out):
        assert (r["clients_ok"], r["clients_failed"], r["aggregated"]) == (1, 3, True)
        for failure in r["failures"]:
            assert faults[failure["partition"]][1] in failure["reason"], failure
    assert all(torch.isfinite(v).all() for v in adapter(out).values())
    # Same adapter as a run where those clients raised instead: their replies had no influence at all.
    ref = tmp_path / "ref"
    run_inprocess(smoke_config(federation__clients_per_round=4, federation__num_rounds=2,
                               federation__fault_injection="0:raise,1:raise,2:raise"), ref)
    a, b = adapter(out), adapter(ref)
    assert all(torch.equal(a[k], b[k]) for k in a)


def _layer(key: str) -> int:
    return int(key.split(".layers.")[1].split(".")[0])


@pytest.mark.parametrize(
    ("overrides", "layers", "stages"),
    [
        ({"federation.method": "fedit"}, [8, 8], 1),
        ({"federation.method": "progfed"}, [4, 8], 2),
        ({"growth.grouping": "random"}, [4, 8], 2),
        ({"growth.grouping": "even", "growth.fusion": "r-one"}, [4, 8], 2),
        ({"growth.fusion": "sum"}, [4, 8], 2),
        ({"federation.aggregation": "ffa"}, [4, 8], 2),
        ({"federation.aggregation": "svd", "federation.method": "progfed"}, [4, 8], 2),
    ],
)
def test_methods_share_one_code_path(smoke_config, run_inprocess, tmp_path, overrides, layers, stages):
    """One config key switches method; after stage 0 DevFT has copied each group's LoRA to all its layers,
    ProgFed has trained layers 0..3 and left 4..7 untouched."""
    config = smoke_config(**{k.replace(".", "__"): v for k, v in overrides.items()}, federation__num_rounds=2,
                          federation__eval_every=2)
    out = tmp_path / "run"
    after_round_1 = {}

    def grab(row):
        if row["round"] == 1:
            after_round_1.update(load_checkpoint(out / "checkpoint")["full_lora"])

    run_inprocess(config, out, on_round=[grab])
    assert [r["submodel_layers"] for r in rows(out)] == layers
    assert len(list((out / "stages").glob("stage-*.json"))) == stages
    method = overrides.get("federation.method", "devft")
    assert json.loads((out / "summary.json").read_text())["method"] == method
    if overrides.get("federation.aggregation") == "ffa":  # uplink: B only, r·d_out per module (hand-computed)
        for r in rows(out):
            b_only = 4 * 4 * (64 + 32 + 32 + 64 + 128 + 128 + 64) * r["submodel_layers"]
            assert b_only <= r["bytes_up"] / r["clients_ok"] <= b_only + 1024 * 7 * r["submodel_layers"] + 8192
    groups = json.loads((out / "stages" / "stage-0.json").read_text())["plan"]["groups"]
    trained = {k: bool(v.any()) for k, v in after_round_1.items() if "lora_B" in k}
    if method == "fedit":  # one stage: the full LoRA changes only at its end (here: after round 2)
        assert groups == [[i] for i in range(8)] and not any(trained.values())
        assert all(v.any() for k, v in adapter(out).items() if "lora_B" in k)
    elif method == "progfed":
        assert groups == [[0], [1], [2], [3]]  # the first L_1 layers, no fusion
        assert all(t == (_layer(k) < 4) for k, t in trained.items())  # no transfer to layers 4..7
    else:
        assert sorted(i for g in groups for i in g) == list(range(8))  # a partition of all layers
        assert all(trained.values())  # knowledge transfer reached every layer
        for group in groups:  # … and every layer of a group holds the group's LoRA
            for key, value in after_round_1.items():
                if _layer(key) in group[1:]:
                    anchor_key = key.replace(f".layers.{_layer(key)}.", f".layers.{group[0]}.")
                    assert torch.equal(value, after_round_1[anchor_key]), key


def test_target_eval_loss_reports_cost_to_reach_it(devft_run):
    _, out, _ = devft_run
    summary = json.loads((out / "summary.json").read_text())
    table = rows(out)
    hit = summary["to_target"]
    assert hit["round"] == 2  # the first evaluated round
    assert hit["bytes"] == sum(r["bytes_up"] + r["bytes_down"] for r in table[:2])
    assert hit["train_flops"] == pytest.approx(sum(r["train_flops"] for r in table[:2]))


@pytest.mark.parametrize("rule", ["flora", "fedex"])
def test_unsupported_or_incompatible_aggregation_is_refused(smoke_config, private_env, rule):
    from server.methods import method_rule

    with pytest.raises(ValueError, match=rule):
        method_rule(smoke_config(federation__aggregation=rule))


@pytest.mark.parametrize("rule", ["flora", "fedex"])
@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
def test_rules_that_change_the_base_weights_need_float32_weights(smoke_config, private_env, rule, dtype):
    from server.methods import check_run

    with pytest.raises(ValueError, match=f"federation.aggregation='{rule}' with model.dtype='{dtype}'"):
        check_run(smoke_config(federation__aggregation=rule, federation__method="fedit", model__dtype=dtype))
    check_run(smoke_config(federation__aggregation="fedit", federation__method="fedit", model__dtype=dtype))


@pytest.mark.parametrize("aggregation", ["fedit", "fedsa"])
def test_the_lora_similarity_view_is_refused_for_a_run_before_anything_loads(smoke_config, private_env, aggregation):
    from server.methods import check_run

    with pytest.raises(ValueError, match="growth.similarity='lora' with growth.grouping='dglg'.*stage 0 starts from a "
                                         "fresh LoRA") as info:
        check_run(smoke_config(growth__similarity="lora", growth__grouping="dglg",
                               federation__aggregation=aggregation))
    assert ("never holds a B" in str(info.value)) == (aggregation == "fedsa")
    check_run(smoke_config(growth__similarity="lora", growth__grouping="even"))  # no similarity needed
    check_run(smoke_config(growth__similarity="lora", federation__method="fedit"))  # one full-depth stage


def test_sampling_is_reproducible_and_independent_of_node_ids(private_env):
    from client.app import app as client_app

    assert sample_partitions(7, 3, range(10), 4) == sample_partitions(7, 3, range(10), 4)
    draws = {tuple(sample_partitions(7, r, range(10), 4)) for r in range(1, 30)}
    assert len(draws) > 20  # rounds differ
    assert sample_partitions(7, 3, range(10), 4) != sample_partitions(8, 3, range(10), 4)
    a = discover_partitions(InProcessGrid(client_app, 4), 4, 2)
    b = discover_partitions(InProcessGrid(client_app, 4, node_ids=[91, 17, 55, 3]), 4, 2)
    assert list(a) == list(b) == [0, 1, 2, 3] and a != b
    with pytest.raises(ValueError, match="cannot sample"):
        sample_partitions(0, 1, range(3), 4)


def _reply_with(request: Message, arrays: dict[str, torch.Tensor], metrics: dict) -> Message:
    return Message(content=RecordDict({"arrays": ArrayRecord(arrays), "metrics": MetricRecord(metrics)}),
                   reply_to=request)


def _reply(request: Message, arrays: dict[str, torch.Tensor], num_examples, pid: int) -> Message:
    return _reply_with(request, arrays, {"num-examples": num_examples, "train-loss": 1.0, "partition-id": pid})


def _strategy_in_round_one(smoke_config, tmp_path, **overrides):
    """A strategy after configure_train of round 1 on 4 clients: (strategy, submodel LoRA, request by partition)."""
    from server.global_model import GlobalModel
    from server.run_dir import RunDirectory
    from server.strategy import DevFTStrategy, RunState

    config = smoke_config(federation__clients_per_round=4, **overrides)
    model = GlobalModel(config, test=[])
    strategy = DevFTStrategy(config, RunDirectory(tmp_path), model)
    full = model.initial_lora()
    planned = model.plan(0, full)
    sub = model.submodel_lora(full, planned.plan)
    strategy.state = RunState(round=0, full_lora=full, sub_lora=sub, stage=planned)
    grid = InProcessGrid(None, 4)  # only node ids are needed
    strategy.partition_to_node = {p: n for p, n in enumerate(grid.get_node_ids())}
    strategy.node_to_partition = {n: p for p, n in strategy.partition_to_node.items()}
    requests = strategy.configure_train(1, ArrayRecord(sub), ConfigRecord(), grid)
    assert len(requests) == 4
    for m in requests:
        m.metadata.__dict__["_message_id"] = f"id-{m.metadata.dst_node_id}"
    return strategy, sub, {strategy.node_to_partition[m.metadata.dst_node_id]: m for m in requests}


def test_aggregate_train_weights_by_examples_and_drops_invalid_replies(smoke_config, private_env, tmp_path):
    strategy, sub, by_pid = _strategy_in_round_one(smoke_config, tmp_path)
    ones = {k: torch.ones_like(v) for k, v in sub.items()}
    threes = {k: 3 * torch.ones_like(v) for k, v in sub.items()}
    bad = dict(ones)
    bad[next(iter(bad))] = torch.full_like(ones[next(iter(ones))], float("inf"))
    replies = [
        _reply(by_pid[0], ones, 30, 0),
        _reply(by_pid[1], threes, 10, 1),
        _reply(by_pid[2], bad, 1000, 2),  # non-finite: must be dropped despite its weight
        _reply(by_pid[3], ones, 2.5, 3),  # not a whole number of examples
    ]
    arrays, metrics = strategy.aggregate_train(1, replies)
    assert arrays is not None and metrics["clients-ok"] == 2
    for key, array in arrays.items():
        assert torch.allclose(torch.from_numpy(array.numpy()), torch.full(sub[key].shape, 1.5))  # (30·1 + 10·3) / 40
    assert sorted(f.partition_id for f in strategy._round.failures) == [2, 3]


def test_unreadable_arrays_are_a_rejected_reply_not_a_failed_round(smoke_config, private_env, tmp_path):
    # a buffer cut short after the same header was read from a good reply, and a header that is not a literal
    strategy, sub, by_pid = _strategy_in_round_one(smoke_config, tmp_path)
    ones = {k: torch.ones_like(v) for k, v in sub.items()}
    replies = [_reply(by_pid[p], ones, 10, p) for p in range(4)]
    first = next(iter(sub))
    for pid, edit in ((2, lambda d: d[:-8]), (3, lambda d: d.replace(b"'<f4'", b"xyz4 ", 1))):
        arrays = replies[pid].content["arrays"]
        arr = arrays[first]
        arrays[first] = Array(dtype=arr.dtype, shape=arr.shape, stype=arr.stype, data=edit(arr.data))
    arrays, metrics = strategy.aggregate_train(1, replies)
    assert arrays is not None and metrics["clients-ok"] == 2
    reasons = {f.partition_id: f.reason for f in strategy._round.failures}
    assert "fewer than its header promises" in reasons[2] and "malformed .npy header" in reasons[3]


@pytest.mark.parametrize("wire", ["float32", "float16"])
@pytest.mark.parametrize("fmt", ["packed", "arrays"])
def test_a_reply_in_another_wire_dtype_is_rejected_not_a_crashed_round(smoke_config, private_env, tmp_path, wire, fmt):
    # both dtypes are fine on the wire, but one round's replies must agree to be summed: the run's is required
    from devft.aggregation import wire_record

    strategy, sub, by_pid = _strategy_in_round_one(smoke_config, tmp_path, federation__wire_dtype=wire,
                                                   federation__max_update_norm_ratio=3.0)
    other = torch.float32 if wire == "float16" else torch.float16
    ours = {k: torch.ones_like(v).to(getattr(torch, wire)) for k, v in sub.items()}
    odd = {k: torch.ones_like(v).to(other) for k, v in sub.items()}
    replies = []
    for pid in range(4):
        arrays = wire_record(odd if pid == 3 else ours, fmt)
        metrics = MetricRecord({"num-examples": 10, "train-loss": 1.0, "partition-id": pid})
        replies.append(Message(content=RecordDict({"arrays": arrays, "metrics": metrics}), reply_to=by_pid[pid]))
    arrays, metrics = strategy.aggregate_train(1, replies)
    assert arrays is not None and metrics["clients-ok"] == 3
    [failure] = strategy._round.failures
    name = str(other).removeprefix("torch.")
    assert failure.partition_id == 3 and f"has dtype {name}, expected {wire} (the run's wire dtype)" in failure.reason


def test_a_reply_of_two_ranks_is_rejected_under_svd_with_a_norm_bound(smoke_config, private_env, tmp_path):
    # FlexLoRA takes clients of any rank, one rank per client: what a client is sent, and what its update is
    # measured from when a norm bound is set, follow that rank. A reply with one module at another rank
    # (both factors consistent) costs that client its reply, never the server its round
    strategy, sub, by_pid = _strategy_in_round_one(smoke_config, tmp_path, federation__aggregation="svd",
                                                   federation__max_update_norm_ratio=3.0)
    generator = torch.Generator().manual_seed(0)
    replies = []
    for pid in range(4):
        arrays = {k: v + 1e-2 * torch.randn(v.shape, generator=generator) for k, v in sub.items()}
        if pid == 3:  # the last module at rank 2, the others at the run's rank
            key_a = [k for k in arrays if ".lora_A." in k][-1]
            key_b = key_a.replace("lora_A", "lora_B")
            arrays[key_a], arrays[key_b] = arrays[key_a][:2].clone(), arrays[key_b][:, :2].clone()
        replies.append(_reply(by_pid[pid], arrays, 10, pid))
    arrays, metrics = strategy.aggregate_train(1, replies)
    assert arrays is not None and metrics["clients-ok"] == 3
    [failure] = strategy._round.failures
    assert failure.partition_id == 3 and "rank 2 differs from the rank" in failure.reason
    assert sorted(strategy._round.update_norms) == [0, 1, 2]


def _packed_reply_with_manifest(request: Message, lora: dict[str, torch.Tensor], manifest: Array, pid: int) -> Message:
    from devft.aggregation.packed import MANIFEST_KEY, pack_arrayrecord

    items = {k: a for k, a in pack_arrayrecord(lora).items() if k != MANIFEST_KEY}
    items[MANIFEST_KEY] = manifest
    metrics = {"num-examples": 10, "train-loss": 1.0, "partition-id": pid}
    return Message(content=RecordDict({"arrays": ArrayRecord(items), "metrics": MetricRecord(metrics)}),
                   reply_to=request)


def test_hostile_payloads_are_rejected_replies_not_a_failed_round(smoke_config, private_env, tmp_path, monkeypatch):
    # what a hostile client can send: a manifest nested past Python's recursion limit, a buffer that is only
    # the .npy magic (packed manifest, or one array of the one-array-per-tensor format); and a reader that
    # fails in a way nobody foresaw (simulated) costs that client its reply, never the server its round
    import server.replies

    strategy, sub, by_pid = _strategy_in_round_one(smoke_config, tmp_path)
    ones = {k: torch.ones_like(v) for k, v in sub.items()}
    first = next(iter(sub))
    magic_only = Array(dtype="uint8", shape=(6,), stype="numpy.ndarray", data=b"\x93NUMPY")
    nested = Array(np.frombuffer(b"[" * 100_000 + b"]" * 100_000, dtype=np.uint8).copy())
    arrays_magic = {k: v for k, v in ArrayRecord(ones).items()}
    arrays_magic[first] = Array(dtype="float32", shape=(2,), stype="numpy.ndarray", data=b"\x93NUMPY")
    replies = [
        _reply(by_pid[0], ones, 10, 0),
        _packed_reply_with_manifest(by_pid[1], ones, nested, 1),
        _packed_reply_with_manifest(by_pid[2], ones, magic_only, 2),
        Message(content=RecordDict({"arrays": ArrayRecord(arrays_magic), "metrics": MetricRecord(
            {"num-examples": 10, "train-loss": 1.0, "partition-id": 3})}), reply_to=by_pid[3]),
    ]
    arrays, metrics = strategy.aggregate_train(1, replies)
    assert arrays is not None and metrics["clients-ok"] == 1
    reasons = {f.partition_id: f.reason for f in strategy._round.failures}
    assert "RecursionError" in reasons[1]
    assert "too few for a .npy header" in reasons[2] and "too few for a .npy header" in reasons[3]

    strategy, sub, by_pid = _strategy_in_round_one(smoke_config, tmp_path / "again")
    odd = ArrayRecord(ones)
    real = server.replies.as_source

    def reader(record):
        if record is odd:
            raise IndexError("unforeseen")
        return real(record)

    monkeypatch.setattr(server.replies, "as_source", reader)
    replies = [_reply(by_pid[0], ones, 10, 0), Message(content=RecordDict({"arrays": odd, "metrics": MetricRecord(
        {"num-examples": 10, "train-loss": 1.0, "partition-id": 1})}), reply_to=by_pid[1])]
    arrays, metrics = strategy.aggregate_train(1, replies)
    assert arrays is not None and metrics["clients-ok"] == 1
    assert "IndexError: unforeseen" in strategy._round.failures[0].reason


def test_bad_metrics_and_unexpected_replies_are_failures_not_a_failed_round(smoke_config, private_env, tmp_path):
    strategy, sub, by_pid = _strategy_in_round_one(smoke_config, tmp_path)
    ones = {k: torch.ones_like(v) for k, v in sub.items()}
    good = {"num-examples": 10, "train-loss": 1.0, "train-flops": float("inf"), "train-s": 2.0}
    replies = [
        _reply_with(by_pid[0], ones, good),  # accepted; its infinite FLOPs count are left out of the row
        _reply_with(by_pid[1], ones, {"num-examples": 10, "train-loss": [1.0]}),
        _reply_with(by_pid[2], ones, {"num-examples": 10}),
        _reply_with(by_pid[3], ones, {"num-examples": 1e308, "train-loss": 1.0}),
        _reply_with(by_pid[0], ones, good),  # a second reply of partition 0
    ]
    arrays, metrics = strategy.aggregate_train(1, replies)
    assert arrays is not None and metrics["clients-ok"] == 1
    reasons = [(f.partition_id, f.reason) for f in strategy._round.failures]
    assert [p for p, _ in reasons] == [1, 2, 3]
    assert "train-loss must be a finite number, got [1.0]" in reasons[0][1] and "got None" in reasons[1][1]
    assert "num-examples must be a positive integer <= 2**53, got 1e+308" in reasons[2][1]
    row = strategy._row(1, 0, 4, 1.0, 0.0, {}, False)
    assert row["train_flops"] == 0 and row["client_train_s_sum"] == 2.0 and row["skipped"] is None
    # partition 0's second reply is ignored, not a failure: every sampled client either succeeded or failed
    assert (row["clients_sampled"], row["clients_ok"], row["clients_failed"]) == (4, 1, 3)
    assert row["ignored_replies"] == [{"node": by_pid[0].metadata.dst_node_id, "partition": 0,
                                       "reason": "a second reply this round"}]


def test_the_row_counts_the_accepted_clients_truncated_examples(smoke_config, private_env, tmp_path):
    strategy, sub, by_pid = _strategy_in_round_one(smoke_config, tmp_path)
    ones = {k: torch.ones_like(v) for k, v in sub.items()}
    replies = [_reply_with(by_pid[p], ones, {"num-examples": 10, "train-loss": 1.0, "truncated-examples": p})
               for p in range(4)]
    strategy.aggregate_train(1, replies)
    assert strategy._row(1, 0, 4, 1.0, 0.0, {}, False)["truncated_examples"] == 0 + 1 + 2 + 3


def test_a_reply_the_superlink_gives_for_a_lost_node_is_that_partitions_one_failure(smoke_config, private_env,
                                                                                     tmp_path):
    """A SuperNode that dies mid-round: the SuperLink answers its message with an error, sent from the
    SuperLink's own node id. It is partition 3's failure, counted once, with the SuperLink's reason."""
    from flwr.server.superlink.linkstate.utils import create_message_error_unavailable_res_message

    strategy, sub, by_pid = _strategy_in_round_one(smoke_config, tmp_path)
    ones = {k: torch.ones_like(v) for k, v in sub.items()}
    lost = create_message_error_unavailable_res_message(by_pid[3].metadata, "node_unavail")
    assert lost.metadata.src_node_id not in strategy.node_to_partition
    replies = [_reply(by_pid[p], ones, 10, p) for p in range(3)] + [lost]
    arrays, metrics = strategy.aggregate_train(1, replies)
    assert arrays is not None and metrics["clients-ok"] == 3
    row = strategy._row(1, 0, 4, 1.0, 0.0, {}, False)
    assert (row["clients_sampled"], row["clients_ok"], row["clients_failed"]) == (4, 3, 1)
    assert row["failures"] == [{"partition": 3, "reason": "no reply; the SuperLink answered for the node: "
                                + lost.error.reason}]


@pytest.mark.parametrize("lost", [float("nan"), None])  # NaN in the running process, null once re-read on resume
def test_the_summarys_final_eval_is_the_last_evaluated_round_even_when_it_diverged(smoke_config, private_env,
                                                                                  tmp_path, lost):
    """A run whose last evaluation gave NaN ended without a final eval loss, in the process that ran it and in
    one resumed from its rows alike; its cost to the target counts the training messages alone."""
    strategy, _, _ = _strategy_in_round_one(smoke_config, tmp_path, federation__target_eval_loss=3.0)
    assert strategy.fed.eval_every == 2 and strategy.schedule.total_rounds == 4
    rows = [{"round": r, "eval_loss": None, "bytes_up": 100, "bytes_down": 100, "eval_bytes_up": 10 * (r % 2 == 0),
             "eval_bytes_down": 30 * (r % 2 == 0), "round_wall_s": 1.0, "train_loss": 1.0} for r in (1, 2, 3, 4)]
    rows[1]["eval_loss"], rows[3]["eval_loss"] = 2.5, lost
    summary = strategy._summary(rows)
    final = summary["final"]["eval_loss"]
    assert summary["final"]["round"] == 4 and (final is None or math.isnan(final))
    assert summary["to_target"]["round"] == 2 and summary["to_target"]["bytes"] == 4 * 100 - 40
    assert summary["totals"]["bytes_up"] == 400 and summary["totals"]["eval_bytes_down"] == 60


@pytest.mark.parametrize("rule,method", [("flora", "fedit"), ("fedex", "fedit"), ("svd", "fedit")])
def test_an_aggregate_that_overflows_is_skipped_and_the_model_keeps_its_state(
        rule, method, smoke_config, private_env, tmp_path):
    # finite replies whose aggregate is not: B·A of 1e30-sized factors overflows fp32 (FLoRA and FedEx fold
    # it into the base delta; SVD re-factors it, and its fp32 factors of 3e38-sized inputs overflow)
    strategy, sub, by_pid = _strategy_in_round_one(smoke_config, tmp_path, federation__aggregation=rule,
                                                   federation__method=method)
    shapes = strategy.rule.expected_upload(ServerState(lora=dict(sub)))
    value = 3e38 if rule == "svd" else 1e30
    big = {k: torch.full(tuple(shape), value) for k, shape in shapes.items()}
    replies = [_reply_with(by_pid[p], big, {"num-examples": 10, "train-loss": 1.0}) for p in range(4)]
    before = {k: v.clone() for k, v in strategy.state.sub_lora.items()}
    arrays, metrics = strategy.aggregate_train(1, replies)
    assert arrays is None and metrics["clients-ok"] == 4 and not strategy._round.aggregated
    assert f"the {rule} aggregate of this round's replies is not finite" in strategy._round.skipped
    assert strategy._round.base_delta is None
    assert all(torch.equal(before[k], strategy.state.sub_lora[k]) for k in before)


def test_a_torn_metrics_line_or_checkpoint_is_handled_by_name(tmp_path):
    from server.checkpoint import CHECKPOINT_FILE
    from server.run_dir import RunDirectory

    (tmp_path / "run").mkdir()
    run_dir = RunDirectory(tmp_path / "run")
    for r in (1, 2):
        run_dir.append_metrics({"round": r, "x": 1.0})
    with run_dir.metrics.open("a") as fh:
        fh.write('{"round": 3, "x"')  # the process died while appending round 3
    assert [r["round"] for r in run_dir.truncate_metrics(2)] == [1, 2]
    run_dir.metrics.write_text('{"round": 1}\n{"round": \n{"round": 3}\n')
    with pytest.raises(ValueError, match=r"metrics.jsonl: line 2 is not JSON"):
        run_dir.read_metrics()
    (tmp_path / CHECKPOINT_FILE).write_bytes(b"PK\x03\x04 torn")
    with pytest.raises(ValueError, match=rf"checkpoint {tmp_path / CHECKPOINT_FILE} cannot be read"):
        load_checkpoint(tmp_path)


def test_an_adapter_written_halfway_never_replaces_the_one_before(tmp_path):
    from devft.files import replace_directory

    adapter = tmp_path / "adapter"
    replace_directory(adapter, lambda d: (d / "adapter_model.safetensors").write_text("first"))

    def crash(staging):
        (staging / "adapter_model.safetensors").write_text("half")
        raise OSError("disk full")

    with pytest.raises(OSError, match="disk full"):
        replace_directory(adapter, crash)
    assert (adapter / "adapter_model.safetensors").read_text() == "first"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["adapter"]  # no staging left behind
    replace_directory(adapter, lambda d: (d / "adapter_config.json").write_text("{}"))
    assert sorted(p.name for p in adapter.iterdir()) == ["adapter_config.json"]  # the new one whole, nothing mixed in
    assert sorted(p.name for p in tmp_path.iterdir()) == ["adapter"]


def test_query_round_needs_a_partition_id(private_env):
    from client.app import app as client_app

    grid = InProcessGrid(client_app, 2)
    for context in grid.contexts.values():
        context.node_config = {}
    with pytest.raises(RuntimeError, match="usable partition"):
        discover_partitions(grid, 2, 1, wait_s=0)


def test_nodes_told_another_partition_count_are_refused_by_name(private_env):
    # flwr run's default local federation starts 2 simulated nodes, each told num-partitions=2: against
    # data.num_clients=4 only partitions 0 and 1 would ever train, so the run refuses to start
    from client.app import app as client_app

    grid = InProcessGrid(client_app, 2)
    with pytest.raises(ValueError, match=r"num-partitions=2 .* but data.num_clients=4: in a simulation pass "
                                         r"--federation-config 'num-supernodes=4'"):
        discover_partitions(grid, 4, 1, wait_s=0)
    assert discover_partitions(InProcessGrid(client_app, 4), 4, 1, wait_s=0) == {0: 1000, 1: 1007, 2: 1014, 3: 1021}


def test_a_federation_told_another_partition_count_is_refused_at_once_and_leaves_no_run(smoke_config, private_env,
                                                                                       tmp_path):
    """flwr run on its default 2-node federation against data.num_clients=4: refused as soon as the nodes that
    are there answer (not after the 30 s wait for the other two), before the run directory holds anything."""
    import time

    from client.app import app as client_app
    from server.app import run_server

    config = smoke_config()
    assert config.data.num_clients == 4
    started = time.monotonic()
    with pytest.raises(ValueError, match=r"num-partitions=2 .* but data.num_clients=4"):
        run_server(InProcessGrid(client_app, 2), config, tmp_path / "run")
    assert time.monotonic() - started < 25
    assert sorted(p.name for p in (tmp_path / "run").iterdir()) == [".devft-lock"]  # no config.json, no stages/


# ---------------------------------------------------------------- aggregation rules in the Flower app


SMOKE_PATH = Path(__file__).resolve().parents[2] / "simulations" / "configs" / "smoke.toml"


def _train_bytes(grid, server_round):
    return [len_ for m, _ in grid.pairs if m.metadata.message_type == MessageType.TRAIN
            and int(m.metadata.group_id) == server_round for len_ in [sum(map(len, serialise(m)[1].values()))]]


@pytest.fixture(scope="module")
def fedit_baseline(private_env, tmp_path_factory):
    """A 2-round FedIT run with FedIT aggregation (the byte reference of the base-delta rules)."""
    from devft.config import load_config

    config = load_config(SMOKE_PATH, {"federation.method": "fedit", "federation.num_rounds": 2})
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        out = tmp_path_factory.mktemp("fedit") / "run"
        return run_recorded(config, out), out
    finally:
        torch.set_num_threads(threads)


@pytest.mark.parametrize("rule_name", ["flora", "fedex"])
def test_base_delta_rules_are_exact_carried_checkpointed_and_exported(
    rule_name, smoke_config, private_env, one_thread, fedit_baseline, tmp_path
):
    from devft.aggregation import ServerState, get_rule, ideal_delta
    from devft.data import build_federated_data
    from devft.models import load_model
    from devft.training import eval_loss

    config = smoke_config(federation__method="fedit", federation__aggregation=rule_name, federation__num_rounds=2)
    rule = get_rule(rule_name, alpha=config.lora.alpha)
    out = tmp_path / "run"
    after: dict[int, dict] = {}

    def grab(row):
        after[row["round"]] = load_checkpoint(out / "checkpoint")

    grid = run_recorded(config, out, fresh=True, on_round=[grab])  # fresh client process per message

    # Exact: clients train on W0 + D_{t-1} (the base delta they were sent; FedEx-LoRA: plus Ā, B̄), so after
    # round t the global effective ΔW must be D_{t-1} + Σ_k p_k s B_k A_k of their replies (independent formula).
    previous = {}
    for server_round in (1, 2):
        replies = grid.train_replies(server_round)
        assert len(replies) == 2
        updates = [r.content["arrays"] for _, r in replies]
        weights = [r.content["metrics"]["num-examples"] for _, r in replies]
        ideal = ideal_delta(updates, weights, config.lora.alpha)
        expected = {m: v + previous[m] if m in previous else v for m, v in ideal.items()}
        ckpt = after[server_round]
        previous = {m: d.materialize().double()
                    for m, d in ServerState.from_tensors(ckpt["base_delta"]).base_delta.items()}
        assert ckpt["base_delta"], "the checkpoint must carry the base delta"
        state = ServerState.from_tensors({**ckpt["sub_lora"], **ckpt["base_delta"]})  # fedit: sub = full
        got = rule.effective_delta(state)
        assert got.keys() == expected.keys()
        for module, value in expected.items():
            torch.testing.assert_close(got[module], value, atol=2e-5, rtol=1e-4)

    # Bytes: round 2's train messages carry the round-1 base delta on top of what FedIT sends (real payload).
    base_bytes = sum(4 * v.numel() for v in after[1]["base_delta"].values())
    base_arrays = len(after[1]["base_delta"])
    ref_grid, _ = fedit_baseline
    if rule_name == "fedex":  # round 1: no base delta yet, the same adapters as FedIT
        assert _train_bytes(grid, 1) == _train_bytes(ref_grid, 1)
    for ours, theirs in zip(_train_bytes(grid, 2), _train_bytes(ref_grid, 2)):
        if rule_name == "fedex":  # adapters as FedIT + the base delta (+ per-array framing)
            assert base_bytes <= ours - theirs <= base_bytes + 1024 * base_arrays
        else:  # FLoRA sends no adapters, only the base delta
            assert base_bytes <= ours <= base_bytes + 1024 * base_arrays + 8192 and ours > theirs
    table = rows(out)
    assert table[1]["bytes_down"] == sum(_train_bytes(grid, 2))

    # The exported adapter is the effective model: same held-out loss as the server's final evaluation.
    cfg = json.loads((out / "adapter" / "adapter_config.json").read_text())
    assert cfg["r"] == cfg["lora_alpha"] > config.lora.r and "base delta" in (out / "adapter" / "README.md").read_text()
    base = load_model("tiny-llama")
    model = PeftModel.from_pretrained(base.model, str(out / "adapter"))
    test = build_federated_data(config.data).test
    loss = eval_loss(model, base.tokenizer, test, config.eval.batch_size, config.data.max_length)
    summary = json.loads((out / "summary.json").read_text())
    assert loss == pytest.approx(summary["final"]["eval_loss"], rel=1e-4)

    # Resume after round 1 (base delta from the checkpoint) ends with the same adapter.
    class Killed(Exception):
        pass

    def kill_after_round_1(row):
        if row["round"] == 1:
            raise Killed

    with pytest.raises(Killed):
        run_recorded(config, tmp_path / "killed", on_round=[kill_after_round_1])
    run_recorded(config, tmp_path / "killed", resume=True)
    a, b = adapter(out), adapter(tmp_path / "killed")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.parametrize("rule_name", ["flora", "fedex"])
def test_base_delta_rules_follow_progfeds_growing_submodel_exactly(rule_name, smoke_config, private_env, one_thread,
                                                                   tmp_path):
    from devft.aggregation import ServerState, get_rule, ideal_delta, lora_modules
    from devft.aggregation.client_side import set_base_delta
    from devft.data import build_federated_data
    from devft.growth import GrowthPlan, build_submodel, transfer_lora
    from devft.models import attach_lora, load_lora_state, load_model
    from devft.training import eval_loss

    # ProgFed, 2 stages: round 1 trains layers 0-3, rounds 2-3 all 8 layers.
    config = smoke_config(federation__method="progfed", federation__aggregation=rule_name, federation__num_rounds=3,
                          federation__eval_every=1)
    rule = get_rule(rule_name, alpha=config.lora.alpha)
    out = tmp_path / "run"
    after: dict[int, dict] = {}

    def grab(row):
        after[row["round"]] = load_checkpoint(out / "checkpoint")

    grid = run_recorded(config, out, fresh=True, on_round=[grab])
    table = rows(out)
    assert [(r["stage"], r["submodel_layers"]) for r in table] == [(0, 4), (1, 8), (1, 8)]
    assert all(r["clients_ok"] == 2 and r["aggregated"] for r in table)  # clients applied what they were sent

    def effective(ckpt):
        """The full model's ΔW per module: the base delta plus the LoRA after (virtual) knowledge transfer."""
        plan = GrowthPlan.from_dict(json.loads(ckpt["stage"])["plan"])
        view = transfer_lora(ckpt["full_lora"], ckpt["sub_lora"], plan)
        return rule.effective_delta(ServerState.from_tensors({**view, **ckpt["base_delta"]}))

    modules = lora_modules(k for k in after[1]["full_lora"])
    previous_eff = {m: torch.zeros(1, dtype=torch.float64) for m in modules}
    previous_delta: dict[str, torch.Tensor] = {}
    for server_round in (1, 2, 3):
        replies = grid.train_replies(server_round)
        updates = [r.content["arrays"] for _, r in replies]
        ideal = ideal_delta(updates, [r.content["metrics"]["num-examples"] for _, r in replies], config.lora.alpha)
        trained = set(ideal)
        assert len(trained) == 7 * table[server_round - 1]["submodel_layers"]  # the submodel's modules, full names
        got = effective(after[server_round])
        assert got.keys() == set(modules)
        for module in modules:
            if module in trained:  # clients trained on W0 + D (+ s B̄ Ā): the average of their models, exactly
                want = ideal[module] + previous_delta.get(module, 0)
            else:  # layers the stage did not hold keep what they had (here: nothing yet)
                want = previous_eff[module].expand_as(got[module])
            torch.testing.assert_close(got[module], want, atol=2e-5, rtol=1e-4)
        previous_eff = got
        previous_delta = {m: d.materialize().double()
                          for m, d in ServerState.from_tensors(after[server_round]["base_delta"]).base_delta.items()}
        assert all(int(m.split(".layers.")[1].split(".")[0]) < table[server_round - 1]["submodel_layers"]
                   for m in previous_delta)
    assert not any(after[1]["base_delta"][k].abs().sum() == 0 for k in after[1]["base_delta"])

    # The server's submodel evaluation (round 1: layers 0-3) applies the submodel's share of the base delta.
    ckpt = after[1]
    plan = GrowthPlan.from_dict(json.loads(ckpt["stage"])["plan"])
    base = load_model(config.model.name)
    sub = attach_lora(build_submodel(base.model, plan), config.lora, seed=config.federation.seed)
    test = build_federated_data(config.data).test
    load_lora_state(sub, ckpt["sub_lora"])
    without = eval_loss(sub, base.tokenizer, test, config.eval.batch_size, config.data.max_length)
    deltas = ServerState.from_tensors(ckpt["base_delta"]).base_delta
    set_base_delta(sub, {m: d.materialize() for m, d in deltas.items()})
    with_delta = eval_loss(sub, base.tokenizer, test, config.eval.batch_size, config.data.max_length)
    assert table[0]["submodel_eval_loss"] == pytest.approx(with_delta, rel=1e-5)
    assert with_delta != pytest.approx(without, rel=1e-4)
    # The exported adapter is the final effective model.
    model = PeftModel.from_pretrained(load_model(config.model.name).model, str(out / "adapter"))
    loss = eval_loss(model, base.tokenizer, test, config.eval.batch_size, config.data.max_length)
    assert loss == pytest.approx(table[-1]["eval_loss"], rel=1e-4)


def test_fedsa_keeps_each_clients_b_on_its_disk_and_averages_a(smoke_config, private_env, one_thread, monkeypatch, tmp_path):
    import client.app as client_module
    from client.runtime import personal_dir
    from devft.aggregation import get_rule
    from devft.aggregation.validation import normalized_weights

    config = smoke_config(federation__method="fedit", federation__aggregation="fedsa", federation__num_rounds=2,
                          federation__clients_per_round=4)
    loaded: dict[tuple[int, int], dict] = {}
    real_load = client_module.load_personal

    def spy(key, pid, before_round):
        found = real_load(key, pid, before_round)
        if found is not None:
            loaded[(pid, before_round)] = found
        return found

    monkeypatch.setattr(client_module, "load_personal", spy)
    out = tmp_path / "run"
    saved_r1: dict[int, dict] = {}

    def grab(row):
        if row["round"] == 1:
            key = load_checkpoint(out / "checkpoint")["client_state_key"]
            for pid in range(4):
                saved_r1[pid] = real_load(key, pid, 2).sub

    grid = run_recorded(config, out, fresh=True, on_round=[grab])  # a fresh client process per message
    key = load_checkpoint(out / "checkpoint")["client_state_key"]

    # B never travels: uplink A only, downlink A only.
    for m, r in grid.pairs:
        if m.metadata.message_type == MessageType.TRAIN:
            assert all(".lora_A." in k for k in record_tensors(r.content["arrays"]).keys())
            assert all(".lora_A." in k for k in record_tensors(m.content["arrays"]).keys())
    # Each client's B persisted on its disk across fresh processes: round 2 started from its own round-1 B.
    for pid in range(4):
        assert loaded[(pid, 2)].sub.keys() == saved_r1[pid].keys()
        assert all(torch.equal(loaded[(pid, 2)].sub[k], saved_r1[pid][k]) for k in saved_r1[pid])
    assert (personal_dir(key, 0) / "personal-r000002.safetensors").exists()
    final_b = {pid: real_load(key, pid, 3).sub for pid in range(4)}
    some_b = next(iter(final_b[0]))
    assert all(final_b[p][some_b].abs().sum() > 0 for p in range(4))
    assert not torch.equal(final_b[0][some_b], final_b[1][some_b])  # personalised: the clients' B differ
    # A is the example-weighted average of the round-2 replies (hand formula).
    replies = [r for _, r in grid.train_replies(2)]
    p = normalized_weights([r.content["metrics"]["num-examples"] for r in replies], len(replies))
    final = adapter(out)
    for k in [k for k in final if ".lora_A." in k]:
        avg = sum(pk * record_tensors(r.content["arrays"])[k] for pk, r in zip(p, replies))
        torch.testing.assert_close(final[k], avg, atol=1e-6, rtol=1e-5)
        assert not torch.equal(final[k], record_tensors(replies[0].content["arrays"])[k])
    assert all(not v.any() for k, v in final.items() if ".lora_B." in k)  # the server has no B
    # The "global" evaluation is the mean held-out loss of the sampled clients' personalised models.
    last = rows(out)[-1]
    assert last["eval_kind"] == "personalised-clients-mean" and last["eval_clients"] == 4
    assert math.isfinite(last["eval_loss"])
    assert "personalised" in (out / "adapter" / "README.md").read_text()
    get_rule("fedsa", alpha=1.0)  # the rule still resolves


@pytest.mark.parametrize(
    ("rule_name", "method", "match"),
    [("flora", "devft", "cannot be combined"), ("fedex", "devft", "cannot be combined")],
)
def test_rule_method_pairs_the_app_does_not_run_are_refused(smoke_config, private_env, rule_name, method, match):
    from server.methods import method_rule

    with pytest.raises(ValueError, match=match):
        method_rule(smoke_config(federation__aggregation=rule_name, federation__method=method))


def test_aggregation_threads_reach_the_rule_and_bad_values_are_refused(smoke_config, private_env):
    import os

    from devft.aggregation import server_threads
    from server.methods import method_rule

    assert method_rule(smoke_config(federation__aggregation_threads=3)).threads == 3
    assert method_rule(smoke_config(federation__aggregation_threads=1)).threads == 1
    usable = len(os.sched_getaffinity(0))
    assert method_rule(smoke_config()).threads == min(usable, 4) == server_threads(0)  # 0, the default: per CPU
    with pytest.raises(ValueError, match=r"federation.aggregation_threads must be >= 0 .*aggregation_threads=-1"):
        smoke_config(federation__aggregation_threads=-1)


@pytest.mark.parametrize("wire_dtype", ["float32", "float16"])
def test_the_summary_names_the_loops_that_summed_the_rounds(wire_dtype, smoke_config, run_inprocess, tmp_path,
                                                            monkeypatch):
    """The C loops take fp32 payloads; half-precision ones are summed by the torch loops, and the summary
    says which ran. (Native sums that fuse layers, DBLF on the server or the clients, are not the rounds'.)"""
    import traceback

    from devft.aggregation.kernels import native_kernels

    kernels = native_kernels()
    if kernels is None:
        pytest.skip("no native kernels here (no C compiler): the torch loops sum everything")
    round_sums = []
    original = kernels.wsum

    def spy(*args, **kwargs):
        if not any("growth/fusion.py" in frame.filename for frame in traceback.extract_stack()):
            round_sums.append(args[0].dtype)
        return original(*args, **kwargs)

    monkeypatch.setattr(kernels, "wsum", spy)
    config = smoke_config(federation__method="fedit", federation__num_rounds=1, federation__wire_dtype=wire_dtype)
    run_inprocess(config, tmp_path / "run")
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert bool(round_sums) == (wire_dtype == "float32"), round_sums
    assert summary["server_aggregation"]["backend"] == ("native" if round_sums else "torch")


def test_a_personalised_round_whose_evaluations_were_all_lost_is_not_called_diverged(smoke_config, private_env,
                                                                                    tmp_path, caplog):
    """FedSA evaluates on the clients: when every evaluation reply is an error (the SuperLink's answer for a node
    that went away), the round has no eval loss, and that is not a NaN one."""
    from flwr.app import Error, Message, MessageType
    from flwr.common.constant import ErrorCode

    from client.app import app as client_app
    from server.app import run_server

    class EvaluationsLost(InProcessGrid):
        def _call(self, message):
            if message.metadata.message_type != MessageType.EVALUATE:
                return super()._call(message)
            reply = Message(Error(code=ErrorCode.NODE_UNAVAILABLE, reason="node unavailable"), reply_to=message)
            reply.metadata.__dict__["_message_id"] = "lost-" + message.metadata.message_id
            return reply

    out = tmp_path / "run"
    config = smoke_config(federation__aggregation="fedsa", federation__num_rounds=2)
    with caplog.at_level("WARNING"):
        run_server(EvaluationsLost(client_app, 4), config, out)
    table = rows(out)
    assert [r["evaluated"] for r in table] == [False, False] and table[-1]["eval_loss"] is None
    assert "client evaluation failed" in caplog.text and "is not finite" not in caplog.text
    report = (out / "report.md").read_text()
    assert "NaN" not in report and "diverged" not in report


def test_the_servers_default_thread_count_follows_the_cpus_it_may_use(monkeypatch):
    from devft.aggregation.kernels import torch_blocked

    for cpus, expected in ((1, 1), (2, 2), (3, 3), (16, 4)):
        monkeypatch.setattr(torch_blocked.os, "sched_getaffinity", lambda pid, n=cpus: set(range(n)))
        assert torch_blocked.server_threads(0) == expected
        assert torch_blocked.server_threads(5) == 5  # asked for: taken as it is


@pytest.mark.parametrize("rule,method", [("flora", "fedit"), ("ffa", "devft"), ("svd", "fedit"), ("fedex", "fedit")])
def test_every_rule_bounds_a_huge_reply_in_the_strategy(rule, method, smoke_config, private_env, tmp_path):
    strategy, sub, by_pid = _strategy_in_round_one(smoke_config, tmp_path, federation__aggregation=rule,
                                                   federation__method=method, federation__max_update_norm_ratio=2.0)
    sent = strategy.rule.downlink(ServerState(lora=dict(sub)), full=True)
    shapes = strategy.rule.expected_upload(ServerState(lora=dict(sub)))
    g = torch.Generator().manual_seed(0)
    replies = []
    for p in range(4):  # what each client received plus a small step (flora: fresh A, B = 0 plus a step)
        step = 1e6 if p == 2 else 1e-2
        arrays = {k: (sent[k] if k in sent and rule != "flora" else torch.zeros(shape))
                  + step * torch.randn(shape, generator=g) for k, shape in shapes.items()}
        replies.append(_reply(by_pid[p], arrays, 10, p))
    arrays, metrics = strategy.aggregate_train(1, replies)
    assert arrays is not None and strategy._round.aggregated and metrics["clients-ok"] == 4
    (clip,) = strategy._round.clipped
    assert clip["partition"] == 2 and clip["norm"] > 1e6 * strategy._round.update_norm_bound / 2
    honest = sorted(n for pid, n in strategy._round.update_norms.items() if pid != 2)
    assert strategy._round.update_norm_bound == pytest.approx(2 * honest[1])  # 2 × the lower median of 4
    assert all(torch.isfinite(torch.from_numpy(a.numpy())).all() for a in arrays.values())


@pytest.mark.parametrize("bound", [0.0, 5.0])
def test_update_norms_that_cannot_be_measured_stop_the_round_only_under_a_bound(bound, smoke_config, private_env,
                                                                                 tmp_path, monkeypatch):
    strategy, sub, by_pid = _strategy_in_round_one(smoke_config, tmp_path, federation__max_update_norm=bound)

    def broken(state, sources):
        raise ValueError("cannot measure")

    monkeypatch.setattr(strategy.rule, "update_norms", broken)
    replies = [_reply(by_pid[p], {k: torch.ones_like(v) for k, v in sub.items()}, 10, p) for p in range(4)]
    if bound:
        with pytest.raises(ValueError, match="cannot measure"):
            strategy.aggregate_train(1, replies)
        return
    arrays, _ = strategy.aggregate_train(1, replies)  # diagnostics only: the round is aggregated as it came
    assert arrays is not None and strategy._round.aggregated and strategy._round.update_norms == {}
    assert all(torch.equal(torch.from_numpy(a.numpy()), torch.ones_like(sub[k])) for k, a in arrays.items())


def test_a_checkpoint_from_before_a_config_key_existed_resumes_with_its_default(smoke_config, private_env, tmp_path):
    from devft.config import config_to_flat

    strategy, _, _ = _strategy_in_round_one(smoke_config, tmp_path)
    saved = config_to_flat(strategy.config)
    del saved["federation.max_update_norm"], saved["federation.max_update_norm_ratio"]
    strategy._check_resumable(saved)  # ran with the defaults: resumable
    saved["lora.r"] = 2
    with pytest.raises(ValueError, match=r"the config differs from the checkpoint's \(lora.r: 2 -> 4\)"):
        strategy._check_resumable(saved)
    strategy.config.federation.max_update_norm = 1.0
    with pytest.raises(ValueError, match=r"federation.max_update_norm: None -> 1.0"):
        strategy._check_resumable({k: v for k, v in saved.items() if k != "lora.r"})


def test_bad_norm_bounds_are_refused_by_name(smoke_config):
    with pytest.raises(ValueError, match=r"federation.max_update_norm must be a finite number >= 0 .* got max_update_norm=-1"):
        smoke_config(federation__max_update_norm=-1.0)
    with pytest.raises(ValueError, match=r"federation.max_update_norm_ratio must be 0 \(off\) or .* got max_update_norm_ratio=0.5"):
        smoke_config(federation__max_update_norm_ratio=0.5)


def test_fedsa_runs_with_every_method_but_not_with_devfts_svd_lora_fusion(smoke_config, private_env):
    from server.methods import method_rule

    for method in ("fedit", "progfed", "devft"):
        assert method_rule(smoke_config(federation__aggregation="fedsa", federation__method=method)).name == "fedsa"
    assert method_rule(smoke_config(federation__aggregation="fedsa", federation__method="progfed",
                                    growth__lora_fusion="svd")).personalised  # ProgFed fuses nothing
    with pytest.raises(ValueError, match=r"growth.lora_fusion='svd' with federation.aggregation='fedsa'"):
        method_rule(smoke_config(federation__aggregation="fedsa", growth__lora_fusion="svd"))


def test_fedsa_client_eval_sends_the_clients_a_alone(smoke_config, private_env, one_thread, tmp_path):
    """``federation.client_eval`` under FedSA-LoRA: each client evaluates the submodel with its own B, so the
    evaluation message carries the shared A only, as the training message does."""
    config = smoke_config(federation__aggregation="fedsa", federation__client_eval=True)
    grid = run_recorded(config, tmp_path / "run")
    local = [m for m, _ in grid.pairs if m.metadata.message_type == MessageType.EVALUATE
             and m.content["config"]["eval-split"] == "train"]
    assert local and all(record_tensors(m.content["arrays"]) and all(".lora_A." in k for k in
                         record_tensors(m.content["arrays"])) for m in local)
    evaluated = [r for r in rows(tmp_path / "run") if r.get("client_eval_loss") is not None]
    assert evaluated and all(math.isfinite(r["client_eval_loss"]) for r in evaluated)


def test_client_eval_pools_the_clients_losses_per_response_token(smoke_config, private_env, one_thread, tmp_path):
    """``client_eval_loss`` is the loss over the union of the evaluated partitions, as one set's: each client's
    loss weighted by its response tokens, not by its examples (answers differ in length between partitions)."""
    config = smoke_config(federation__client_eval=True, federation__num_rounds=1, federation__method="fedit")
    grid = run_recorded(config, tmp_path / "run")
    metrics = [reply.content["metrics"] for m, reply in grid.pairs if m.metadata.message_type == MessageType.EVALUATE
               and m.content["config"]["eval-split"] == "train"]
    assert len(metrics) == config.federation.clients_per_round
    pooled = sum(m["eval-loss"] * m["eval-tokens"] for m in metrics) / sum(m["eval-tokens"] for m in metrics)
    per_example = sum(m["eval-loss"] * m["num-examples"] for m in metrics) / sum(m["num-examples"] for m in metrics)
    (row,) = rows(tmp_path / "run")
    assert row["client_eval_loss"] == pytest.approx(pooled, rel=1e-12)
    assert abs(pooled - per_example) > 1e-6  # the two weightings differ on these partitions


@pytest.mark.parametrize(("method", "rounds", "stages"), [("devft", 4, [0, 0, 1, 1]), ("progfed", 2, [0, 1])])
def test_fedsa_with_growth_moves_each_clients_b_through_the_stages(
    method, rounds, stages, smoke_config, private_env, one_thread, monkeypatch, tmp_path
):
    import client.app as client_module
    from client.runtime import load_personal
    from devft.growth import GrowthPlan, submodel_lora, transfer_lora

    config = smoke_config(federation__method=method, federation__aggregation="fedsa", federation__num_rounds=rounds)
    out = tmp_path / "run"
    started: dict[tuple[int, int], dict] = {}  # (partition, round) → the B it trained from
    evaluated_with: dict[int, dict] = {}  # partition → the B of its last evaluation
    real_personal = client_module._personal

    def spy(model, rule, cfg, pid, before_round, plan):
        stored, personal = real_personal(model, rule, cfg, pid, before_round, plan)
        seen = evaluated_with if cfg.get("eval-split") else started
        seen[pid if cfg.get("eval-split") else (pid, before_round)] = {k: v.clone() for k, v in personal.items()}
        return stored, personal

    monkeypatch.setattr(client_module, "_personal", spy)
    kept: dict[tuple[int, int], object] = {}  # (partition, round) → its personal state after that round

    def grab(row):
        key = load_checkpoint(out / "checkpoint")["client_state_key"]
        for pid in row["sampled_partitions"]:
            kept[(pid, row["round"])] = load_personal(key, pid, row["round"] + 1)

    grid = run_recorded(config, out, fresh=True, on_round=[grab])  # a fresh client process per message
    table = rows(out)
    assert [r["stage"] for r in table] == stages and json.loads((out / "summary.json").read_text())["rounds"] == rounds
    assert all(r["clients_ok"] == 2 and r["aggregated"] for r in table)
    evaluated = [r for r in table if r["eval_loss"] is not None]
    assert evaluated and all(math.isfinite(r["eval_loss"]) and r["eval_clients"] == 2 for r in evaluated)
    assert all(0.0 <= r["eval_accuracy"] <= 1.0 for r in evaluated)  # the clients' exact match, as the server's
    # Evaluation is of each client's full model in every stage (docs/design.md §2.6): Ā of all 8 layers after virtual
    # transfer, with the full model's plan; the personalised submodels are not evaluated separately.
    assert all(r["eval_kind"] == "personalised-clients-mean" for r in evaluated)
    full_depth = [r for r in table if r["submodel_layers"] == 8]
    assert all((r["submodel_eval_loss"] is None) == (r not in full_depth) for r in evaluated)
    eval_msgs = [m for m, _ in grid.pairs if m.metadata.message_type == MessageType.EVALUATE]
    assert eval_msgs and all(GrowthPlan.from_json(str(m.content["config"]["plan"])).groups == tuple((i,) for i in range(8))
                             and len(record_tensors(m.content["arrays"])) == 8 * 7 for m in eval_msgs)
    # B never travels: A only, up and down, in train and evaluate messages.
    assert grid.pairs and all(all(".lora_A." in k for k in record_tensors(m.content["arrays"]).keys()) for m, _ in grid.pairs
                              if m.metadata.message_type in (MessageType.TRAIN, MessageType.EVALUATE))
    assert all(".lora_A." in k for _, r in grid.train_replies(1) + grid.train_replies(rounds)
               for k in record_tensors(r.content["arrays"]).keys())
    # Every client that trained keeps its B of the full model (all 8 layers); the clients' B differ.
    key = load_checkpoint(out / "checkpoint")["client_state_key"]
    full_b_keys = {k for k in adapter(out) if ".lora_B." in k}
    trained = sorted({pid for r in table for pid in r["sampled_partitions"]})
    final = {pid: load_personal(key, pid, rounds + 1) for pid in range(4)}
    for pid in range(4):
        assert (final[pid] is None) == (pid not in trained)
    assert all(set(final[p].full) == full_b_keys and len(full_b_keys) == 8 * 7 for p in trained)
    some = sorted(full_b_keys)[0]
    assert not torch.equal(final[trained[0]].full[some], final[trained[1]].full[some])
    # A client that comes back in a later stage starts from its last B, transferred with the plan it was
    # trained under and fused with the new plan (clients may skip rounds and stages in between).
    plans = [GrowthPlan.from_dict(json.loads((out / "stages" / f"stage-{s}.json").read_text())["plan"]) for s in (0, 1)]
    checked = 0
    for (pid, r), start in started.items():
        before = [(q, kept[(pid, q)]) for q in range(1, r) if (pid, q) in kept]
        if not before or table[r - 1]["stage"] != 1 or before[-1][1].plan.stage != 0:
            continue
        last = before[-1][1]
        zero = {k: torch.zeros_like(v) for k, v in final[pid].full.items()}
        earlier = before[-2][1].full if len(before) > 1 else zero
        want = submodel_lora(transfer_lora(earlier, last.sub, plans[0]), plans[1])
        assert start.keys() == want.keys() and all(torch.equal(start[k], want[k]) for k in want), (pid, r)
        assert any(v.any() for v in start.values())
        checked += 1
    assert checked >= 1
    # A client evaluated in a stage it did not train evaluates its B fused with that stage's plan.
    idle = next(p for p in trained if final[p].plan.stage == 0)
    last_eval = next(m for m, _ in reversed(grid.pairs) if m.metadata.message_type == MessageType.EVALUATE)
    message = Message(last_eval.content, dst_node_id=next(n for n, c in grid.contexts.items()
                                                          if c.node_config["partition-id"] == idle),
                      message_type=MessageType.EVALUATE, group_id=str(rounds))
    (reply,) = grid.send_and_receive([message])
    assert math.isfinite(reply.content["metrics"]["eval-loss"])
    want = submodel_lora(final[idle].full, plans[1])
    assert all(torch.equal(evaluated_with[idle][k], want[k]) for k in want) and want.keys() == evaluated_with[idle].keys()


def test_fedsa_resume_finds_the_clients_b_and_ends_where_an_uninterrupted_run_ends(
    smoke_config, private_env, one_thread, tmp_path
):
    from client.runtime import personal_dir

    config = smoke_config(federation__method="fedit", federation__aggregation="fedsa", federation__num_rounds=2,
                          federation__clients_per_round=4, federation__eval_every=2)

    class Killed(Exception):
        pass

    def kill_after_round_1(row):
        if row["round"] == 1:
            raise Killed

    run_recorded(config, tmp_path / "full")
    with pytest.raises(Killed):
        run_recorded(config, tmp_path / "killed", on_round=[kill_after_round_1])
    run_recorded(config, tmp_path / "killed", resume=True, fresh=True)
    a, b = adapter(tmp_path / "full"), adapter(tmp_path / "killed")
    assert all(torch.equal(a[k], b[k]) for k in a)  # Ā
    keys = [load_checkpoint(tmp_path / run / "checkpoint")["client_state_key"] for run in ("full", "killed")]
    assert keys[0] != keys[1]  # one key per run, kept across the resume
    for pid in range(4):
        full_b, resumed_b = (load_file(str(personal_dir(k, pid) / "personal-r000002.safetensors")) for k in keys)
        assert all(torch.equal(full_b[k], resumed_b[k]) for k in full_b)
    assert rows(tmp_path / "full")[-1]["eval_loss"] == rows(tmp_path / "killed")[-1]["eval_loss"]


def test_evaluation_replies_without_token_counts_are_weighted_by_examples_and_said_once(
        smoke_config, private_env, tmp_path, caplog):
    strategy, sub, by_pid = _strategy_in_round_one(smoke_config, tmp_path)
    told = [_reply_with(by_pid[p], {}, {"eval-loss": loss, "num-examples": n, "eval-tokens": t})
            for p, (loss, n, t) in enumerate([(1.0, 10, 90), (2.0, 30, 10)])]
    means, counted = strategy._mean_eval(1, told)
    assert counted == 2 and means["eval-loss"] == pytest.approx((90 * 1.0 + 10 * 2.0) / 100)  # pooled per token
    untold = told[:1] + [_reply_with(by_pid[1], {}, {"eval-loss": 2.0, "num-examples": 30})]
    with caplog.at_level("WARNING"):
        strategy._mean_eval(2, untold, same_set=True)  # the held-out set, evaluated by all: examples are tokens
        assert "eval-tokens" not in caplog.text
        for round_ in (2, 3):
            means, _ = strategy._mean_eval(round_, untold)
            assert means["eval-loss"] == pytest.approx((10 * 1.0 + 30 * 2.0) / 40)  # by examples
    assert caplog.text.count("carry no valid eval-tokens") == 1 and "round 2: 1 of 2 evaluation replies" in caplog.text
