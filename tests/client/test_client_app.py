"""The ClientApp called directly with hand-built messages (no server, no Ray)."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest
import torch
from flwr.app import ArrayRecord, ConfigRecord, Context, Message, MessageType, RecordDict
from flwr.common.constant import SUPERLINK_NODE_ID
from flwr.supercore.task_identity import TaskIdentity

from client.app import app
from client.faults import InjectedFault, corrupt_reply
from devft.aggregation import is_packed, pack_arrayrecord, record_tensors
from devft.config import config_to_flat, load_config
from devft.growth import PlanMismatchError, make_plan, submodel_lora
from devft.models import LoraSettings, attach_lora, load_model, lora_state

SMOKE = Path(__file__).resolve().parents[2] / "simulations" / "configs" / "smoke.toml"


@pytest.fixture(autouse=True)
def _env(monkeypatch, tmp_path):
    monkeypatch.setenv("DEVFT_CACHE", str(tmp_path / "cache"))
    monkeypatch.setenv("FLWR_TELEMETRY_ENABLED", "0")
    TaskIdentity.task_id = 1
    TaskIdentity.run_id = 1
    TaskIdentity.node_id = SUPERLINK_NODE_ID
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _stage0(config):
    """Plan of a 4-layer stage and its LoRA, made as the server makes them."""
    base = load_model(config.model.name)
    full = attach_lora(base.model, config.lora, seed=config.federation.seed)
    plan = make_plan(full, stage=0, capacity=4, settings=dataclasses.replace(config.growth, grouping="even"))
    return plan, submodel_lora(lora_state(full), plan)


def _message(config, plan_json: str, lora, message_type=MessageType.TRAIN, server_round: int = 1) -> Message:
    record = ConfigRecord({**config_to_flat(config), "server-round": server_round, "plan": plan_json})
    content = RecordDict({"arrays": ArrayRecord({k: v.float() for k, v in lora.items()}), "config": record})
    msg = Message(content, dst_node_id=7, message_type=message_type)
    msg.metadata.__dict__["_message_id"] = "m-1"
    return msg


def _context(partition: int) -> Context:
    return Context(run_id=1, node_id=7, node_config={"partition-id": partition, "num-partitions": 4},
                   state=RecordDict(), run_config={})


def _arrays(reply: Message) -> dict[str, torch.Tensor]:
    return {k: t.clone() for k, t in record_tensors(reply.content["arrays"]).items()}


def test_train_replies_with_the_trained_submodel_lora_and_its_costs():
    config = load_config(SMOKE)
    plan, lora = _stage0(config)
    reply = app(_message(config, plan.to_json(), lora), _context(1))
    assert not reply.has_error()
    arrays = _arrays(reply)
    assert arrays.keys() == lora.keys()
    assert all(arrays[k].shape == lora[k].shape and arrays[k].dtype == torch.float32 for k in lora)
    assert any(arrays[k].any() for k in lora if "lora_B" in k)  # B left zero: it trained
    metrics = reply.content["metrics"]
    for key in ("num-examples", "train-loss", "train-s", "train-flops", "peak-rss-mb", "train-steps"):
        assert metrics[key] > 0, key
    assert metrics["train-steps"] == config.train.max_steps
    assert metrics["partition-id"] == 1

    again = app(_message(config, plan.to_json(), lora), _context(1))  # same inputs: same bits
    assert all(torch.equal(arrays[k], _arrays(again)[k]) for k in lora)
    other_round = app(_message(config, plan.to_json(), lora, server_round=2), _context(1))  # new data order
    assert not all(torch.equal(arrays[k], _arrays(other_round)[k]) for k in lora)


def test_float16_on_the_wire_and_ffa_uploads_b_only():
    config = load_config(SMOKE, {"federation.wire_dtype": "float16", "federation.aggregation": "ffa"})
    plan, lora = _stage0(config)
    reply = app(_message(config, plan.to_json(), lora), _context(0))
    arrays = _arrays(reply)
    assert arrays and all(".lora_B." in k for k in arrays)
    assert {v.dtype for v in arrays.values()} == {torch.float16}


@pytest.mark.parametrize("wire_format", ["packed", "arrays"])
def test_both_wire_formats_carry_the_same_update_both_ways(wire_format):
    config = load_config(SMOKE, {"federation.wire_format": wire_format})
    plan, lora = _stage0(config)
    reference = _arrays(app(_message(config, plan.to_json(), lora), _context(1)))
    packed_down = RecordDict({"arrays": pack_arrayrecord({k: v.float() for k, v in lora.items()}),
                              "config": _message(config, plan.to_json(), lora).content["config"]})
    msg = Message(packed_down, dst_node_id=7, message_type=MessageType.TRAIN)
    msg.metadata.__dict__["_message_id"] = "m-1"
    reply = app(msg, _context(1)).content["arrays"]
    assert is_packed(reply) == (wire_format == "packed")
    if wire_format == "arrays":
        assert set(reply.keys()) == set(lora)  # one Flower array per tensor, as ArrayRecord(state_dict) makes
    got = _arrays(app(msg, _context(1)))
    assert got.keys() == reference.keys() and all(torch.equal(got[k], reference[k]) for k in got)


def test_a_plan_for_another_base_model_is_refused():
    config = load_config(SMOKE)
    plan, lora = _stage0(config)
    wrong = dataclasses.replace(plan, base_fingerprint="sha256:" + "0" * 32)
    with pytest.raises(PlanMismatchError):
        app(_message(config, wrong.to_json(), lora), _context(0))


def test_a_message_missing_adapters_is_refused():
    config = load_config(SMOKE)
    plan, lora = _stage0(config)
    partial = dict(list(lora.items())[1:])
    with pytest.raises(KeyError, match="lacks 1 LoRA"):
        app(_message(config, plan.to_json(), partial), _context(0))


def test_a_personalised_evaluation_missing_a_shared_tensor_is_refused():
    """FedSA-LoRA evaluates with the client's own B and the message's A: an A left out of the message would
    silently keep whatever this process's model last held."""
    config = dataclasses.replace(load_config(SMOKE), federation=dataclasses.replace(
        load_config(SMOKE).federation, aggregation="fedsa"))
    plan, lora = _stage0(config)
    shared = {k: v for k, v in lora.items() if ".lora_A." in k}
    message = _message(config, plan.to_json(), shared, MessageType.EVALUATE)
    message.content["config"]["client-state-key"] = "k"
    assert app(message, _context(2)).content["metrics"]["eval-loss"] > 0
    partial = dict(list(shared.items())[1:])
    message = _message(config, plan.to_json(), partial, MessageType.EVALUATE)
    message.content["config"]["client-state-key"] = "k"
    with pytest.raises(KeyError, match="lacks 1 LoRA"):
        app(message, _context(2))


def test_evaluate_and_partition_query():
    config = load_config(SMOKE)
    plan, lora = _stage0(config)
    reply = app(_message(config, plan.to_json(), lora, MessageType.EVALUATE), _context(2))
    metrics = reply.content["metrics"]
    # the same loss as the submodel built here, with this LoRA, on partition 2's examples
    from devft.data.federated import build_federated_data
    from devft.growth import build_submodel
    from devft.models import load_lora_state
    from devft.training import eval_loss

    base = load_model(config.model.name)
    sub = attach_lora(build_submodel(base.model, plan, use_cache=False), config.lora)
    load_lora_state(sub, lora)
    examples = build_federated_data(config.data).partitions[2]
    expected = eval_loss(sub, base.tokenizer, examples, config.eval.batch_size, config.data.max_length)
    assert metrics["eval-loss"] == pytest.approx(expected, rel=1e-6)
    assert metrics["num-examples"] == len(examples) and metrics["partition-id"] == 2
    # the response tokens that loss averages over, counted here from the encoded examples
    from devft.data.formatting import encode_for_training

    tokens = sum(sum(label != -100 for label in encode_for_training(base.tokenizer, ex, config.data.max_length)
                     ["labels"][1:]) for ex in examples)
    assert metrics["eval-tokens"] == tokens
    query = Message(RecordDict({"config": ConfigRecord()}), dst_node_id=7, message_type="query.partition")
    query.metadata.__dict__["_message_id"] = "m-2"
    assert app(query, _context(3)).content["config"]["partition-id"] == 3


def test_fault_injection_modes():
    state = {"a": torch.ones(2, 3), "b": torch.ones(3, 2)}
    metrics = {"num-examples": 5}
    assert corrupt_reply(None, state, metrics) == (state, metrics)
    assert torch.isnan(corrupt_reply("nan", state, metrics)[0]["a"]).all()
    assert all(torch.equal(v, torch.full_like(v, 1e6)) for v in corrupt_reply("huge", state, metrics)[0].values())
    half = corrupt_reply("huge", {"a": torch.full((2, 3), 0.125, dtype=torch.float16)}, metrics)[0]["a"]
    assert torch.isfinite(half).all() and float(half.max()) > 1e4  # as large as a float16 wire carries
    assert corrupt_reply("shape", state, metrics)[0]["a"].shape == (3, 3)
    assert set(corrupt_reply("keys", state, metrics)[0]) == {"b"}
    assert corrupt_reply("no-examples", state, metrics)[1]["num-examples"] == 0
    with pytest.raises(InjectedFault):
        corrupt_reply("raise", state, metrics)
    assert torch.equal(state["a"], torch.ones(2, 3))  # the inputs are not modified


def test_client_trains_with_the_run_lora_settings():
    config = load_config(SMOKE, {"lora.r": 2, "lora.alpha": 4.0})
    plan, lora = _stage0(config)
    assert config.lora == LoraSettings(r=2, alpha=4.0)
    reply = app(_message(config, plan.to_json(), lora), _context(0))
    assert all(v.shape == lora[k].shape for k, v in _arrays(reply).items())
    assert {v.shape[0] for k, v in _arrays(reply).items() if "lora_A" in k} == {2}


def _personal(scale: float):
    """A personal state of a 2-layer stage (B only) as a client keeps it."""
    from devft.growth import after_training

    config = load_config(SMOKE)
    plan, lora = _stage0(config)
    trained = {k: torch.full_like(v, scale) for k, v in lora.items() if ".lora_B." in k}
    return after_training(None, plan, trained)


def _some_b(state):
    return next(v for k, v in state.sub.items())


def test_personal_state_is_kept_per_round_on_disk():
    from client.runtime import load_personal, personal_dir, save_personal

    assert load_personal("run1", 0, 5) is None
    for server_round in (1, 2, 4):
        save_personal("run1", 0, server_round, _personal(server_round))
    files = sorted(p.name for p in personal_dir("run1", 0).iterdir())
    assert files == ["personal-r000002.safetensors", "personal-r000004.safetensors"]  # this round and the one before
    loaded = load_personal("run1", 0, 5)
    assert torch.all(_some_b(loaded) == 4) and loaded.plan == _personal(4).plan
    assert len(loaded.full) == 2 * len(loaded.sub) and all(v.eq(4).all() for v in loaded.full.values())  # 8 vs 4 layers
    assert torch.all(_some_b(load_personal("run1", 0, 4)) == 2)  # a repeated round 4
    assert load_personal("run1", 1, 5) is None  # another partition
    with pytest.raises(ValueError, match="client-state-key"):
        personal_dir("../x", 0)


@pytest.mark.parametrize("crash", ["write", "rename"])
def test_a_crash_while_saving_leaves_the_previous_personal_state_readable(monkeypatch, crash):
    import safetensors.torch

    import client.runtime as runtime

    runtime.save_personal("run2", 0, 1, _personal(1.0))

    def half_written(tensors, path, metadata=None):
        Path(path).write_bytes(b"\x00" * 7)  # a few bytes of the temporary file, then the process dies
        raise KeyboardInterrupt

    def no_rename(src, dst):
        raise KeyboardInterrupt

    with monkeypatch.context() as patch, pytest.raises(KeyboardInterrupt):
        if crash == "write":
            patch.setattr(safetensors.torch, "save_file", half_written)
        else:
            patch.setattr(runtime.os, "replace", no_rename)
        runtime.save_personal("run2", 0, 2, _personal(2.0))
    assert any(p.name.endswith(".tmp") for p in runtime.personal_dir("run2", 0).iterdir())  # the debris
    for before in (2, 3):  # round 2 repeated, or round 3 of a client that crashed in round 2
        assert torch.all(_some_b(runtime.load_personal("run2", 0, before)) == 1)
    runtime.save_personal("run2", 0, 2, _personal(2.0))  # the repeated round overwrites nothing it needs
    assert torch.all(_some_b(runtime.load_personal("run2", 0, 3)) == 2)


def test_a_process_holds_one_submodel_at_a_time_and_rebuilds_at_another_rank():
    from client.runtime import _stage, clear_process_caches, stage_model

    clear_process_caches()
    config = load_config(SMOKE, {"lora.client_ranks": "2,4", "federation.aggregation": "flora",
                                 "federation.method": "fedit"})
    plan, _ = _stage0(config)
    first, _, _ = stage_model(config, plan.to_json(), rank=2)
    assert stage_model(config, plan.to_json(), rank=2)[0] is first  # the same rank: the same model
    second, _, _ = stage_model(config, plan.to_json(), rank=4)
    assert {t.shape[0] for k, t in lora_state(first).items() if "lora_A" in k} == {2}
    assert {t.shape[0] for k, t in lora_state(second).items() if "lora_A" in k} == {4}
    assert len(_stage) == 1  # the rank-2 model was dropped (keeping it cost 0.65 GB of peak RSS on SmolLM2)
    clear_process_caches()
