"""The devft ClientApp: build the stage's submodel from the local base model, train its LoRA, reply.

A train message carries everything the client needs: the run's flat config and the stage's plan (JSON) in
the ConfigRecord ``config``, and the submodel's LoRA in the ArrayRecord ``arrays``. The base model never
travels: each client loads its own copy and builds the fused submodel itself (cached per process and, by
the growth module, on disk by plan hash, for deployments that restart the client process per message).

Aggregation rules (:func:`devft.aggregation.client_side.prepare_round`): the message carries what the rule
sends down (the adapters, and for FLoRA / FedEx-LoRA the cumulative base delta, applied as ``W₀ + Δ``);
FLoRA restarts from fresh LoRA seeded by the message's ``lora-seed``; FedSA-LoRA's own B is read from and
written back to this client's disk (:func:`client.runtime.load_personal`, :func:`~client.runtime.save_personal`)
as a :class:`devft.growth.PersonalLoRA`, which moves it with the stage plan (:mod:`devft.growth.personal`:
fused for the message's submodel, written back into the client's full-model B after training). A comes from
the server every round, fused and transferred there; the client keeps none.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import time

import torch
from flwr.app import ArrayRecord, ConfigRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp

from client.faults import InjectedFault, corrupt_reply
from client.runtime import (
    CONFIG_KEY,
    aggregation_rule,
    client_train_seed,
    held_out,
    load_personal,
    load_run_config,
    local_partition,
    partition_id,
    rebuilt_frozen,
    received_rank,
    save_personal,
    stage_model,
    to_wire,
)
from devft.aggregation import AggregationRule, ServerState, record_state, split_downlink, wire_record
from devft.aggregation.client_side import (
    finish_round,
    load_adapters,
    personal_state,
    prepare_round,
    set_base_delta,
)
from devft.growth import GrowthPlan, PersonalLoRA, after_training, personal_for_plan
from devft.models import LoraState, load_lora_state, lora_state
from devft.training import eval_loss_and_tokens, train_lora
from devft.training import evaluate as evaluate_model

log = logging.getLogger(__name__)

app = ClientApp()


def _arrays_to_state(record: ArrayRecord) -> dict[str, torch.Tensor]:
    """The received LoRA tensors (either wire format), as writable float32 copies (the wire may carry float16)."""
    return record_state(record)


def _personal(model: torch.nn.Module, rule: AggregationRule, cfg: ConfigRecord, pid: int, before_round: int,
              plan: GrowthPlan) -> tuple[PersonalLoRA | None, LoraState]:
    """This client's stored own state (None before its first round) and its own part (FedSA-LoRA: B) for the
    submodel of ``plan``: as trained when the plan is the one it last trained, else fused from its full-model B
    (zero before its first round)."""
    stored = load_personal(str(cfg["client-state-key"]), pid, before_round)
    return stored, personal_for_plan(stored, plan, personal_state(model, rule))


def _require_downlink(model, rule, received: dict) -> None:
    """Clients keep nothing but personal parts between messages: everything the rule sends must be here (a
    tensor left out would silently keep whatever this process's model last held)."""
    expected = rule.downlink(ServerState(lora=dict(lora_state(model))), full=True)
    missing = sorted(set(expected) - set(received))
    if missing:
        raise KeyError(f"the message lacks {len(missing)} LoRA tensors of the submodel, e.g. {missing[0]!r}")


@app.train()
def train(msg: Message, context: Context) -> Message:
    """Train the received submodel LoRA on this client's partition; reply with the LoRA and the costs."""
    start = time.perf_counter()
    cfg: ConfigRecord = msg.content[CONFIG_KEY]
    config = load_run_config(cfg)
    pid = partition_id(context)
    server_round = int(cfg["server-round"])
    fault = config.federation.faults().get(pid)
    if fault == "raise":
        raise InjectedFault(f"fault injection: partition {pid} was told to raise")
    model, tokenizer, plan = stage_model(config, str(cfg["plan"]), rank=config.lora.rank_of(pid))
    rule = aggregation_rule(config)
    downlink = _arrays_to_state(msg.content["arrays"])
    if "frozen-digest" in cfg:  # FFA-LoRA's A is not sent: rebuilt from the seed and the plans, then checked
        downlink.update(rebuilt_frozen(config, rule, cfg, plan))
    _require_downlink(model, rule, downlink)
    stored, personal = _personal(model, rule, cfg, pid, server_round, plan) if rule.personalised else (None, None)
    seed = int(cfg["lora-seed"]) if rule.fresh_lora_each_round else None
    # Loads the adapters (+ base delta, FLoRA's fresh LoRA, FedSA's own B); FFA-LoRA also freezes A.
    prepare_round(model, rule, downlink, personal=personal, seed=seed)
    examples = local_partition(config, pid)
    settings = dataclasses.replace(config.train, seed=client_train_seed(config.train.seed, server_round, pid))
    result = train_lora(model, tokenizer, examples, settings, max_length=config.data.max_length)
    payload, keep = finish_round(model, rule)  # what the rule uploads (FFA-LoRA: B only; FedSA-LoRA: A only)
    if rule.personalised:  # the trained B, also written into this client's full-model B (knowledge transfer)
        save_personal(str(cfg["client-state-key"]), pid, server_round, after_training(stored, plan, keep))
    state = to_wire(payload, config.federation.wire_dtype)
    metrics = {
        "num-examples": len(examples),
        "examples-seen": result.num_examples,
        "train-loss": result.loss,
        "train-steps": result.steps,
        "train-tokens": result.num_tokens,
        "truncated-examples": result.truncated_examples,
        "train-s": result.wall_s,
        "train-flops": result.flops,
        "peak-rss-mb": result.peak_rss_mb,
        "peak-cuda-mb": result.peak_cuda_mb,
        "partition-id": pid,
        "stage": plan.stage,
        "client-s": time.perf_counter() - start,
    }
    state, metrics = corrupt_reply(fault, state, metrics)
    log.info("round %d partition %d: loss %.4f in %.1f s", server_round, pid, result.loss, result.wall_s)
    content = RecordDict({"arrays": wire_record(state, config.federation.wire_format), "metrics": MetricRecord(metrics)})
    return Message(content=content, reply_to=msg)


@app.evaluate()
def evaluate(msg: Message, context: Context) -> Message:
    """Loss of the received submodel LoRA on this client's partition (federated evaluation), or, with
    ``eval-split = test``, loss and exact match on the run's held-out set (``eval.*`` settings, as the server's
    own evaluation).

    The message may carry a base delta (FLoRA, FedEx-LoRA: applied as ``W₀ + Δ``) and may leave out what the
    client rebuilds (FFA-LoRA's A, as in :func:`train`); a personalised rule
    (FedSA-LoRA) evaluates with this client's own B from its disk, fused for the message's plan when it last
    trained another stage. ``eval-split = test`` evaluates on the run's held-out set instead of the local
    partition (the personalised "global" evaluation).
    """
    cfg: ConfigRecord = msg.content[CONFIG_KEY]
    config = load_run_config(cfg)
    pid = partition_id(context)
    adapters, deltas = split_downlink(_arrays_to_state(msg.content["arrays"]))
    # the model that was sent, at its rank (lora.client_ranks: the server's, not this client's own)
    rank = received_rank(adapters) or config.lora.rank_of(pid)
    model, tokenizer, plan = stage_model(config, str(cfg["plan"]), rank=rank)
    rule = aggregation_rule(config)
    if "frozen-digest" in cfg:  # FFA-LoRA's A is not sent: rebuilt as for training
        adapters.update(rebuilt_frozen(config, rule, cfg, plan))
    set_base_delta(model, deltas)
    if rule.personalised:  # the shared parts from the message (a subset), this client's own from its disk
        _require_downlink(model, rule, adapters)
        load_adapters(model, adapters)
        load_adapters(model, _personal(model, rule, cfg, pid, int(cfg["server-round"]) + 1, plan)[1])
    else:
        load_lora_state(model, adapters)
    metrics = MetricRecord({"partition-id": pid})
    if cfg.get("eval-split") == "test":  # the run's held-out evaluation, exactly as the server runs it
        result = evaluate_model(model, tokenizer, held_out(config), config.eval, config.data.max_length)
        loss, count = result.loss, result.num_examples
    else:  # the partition's training data: a training-set loss of the submodel
        examples = local_partition(config, pid)
        (loss, tokens), count, result = eval_loss_and_tokens(model, tokenizer, examples, config.eval.batch_size,
                                                             config.data.max_length), len(examples), None
        metrics["eval-tokens"] = tokens  # the server pools the clients' losses per token, as one set's
    if not math.isfinite(loss):
        raise FloatingPointError(f"evaluation loss is {loss}")
    metrics["num-examples"], metrics["eval-loss"] = count, loss
    if result is not None and result.accuracy is not None:
        metrics["eval-accuracy"] = float(result.accuracy)
    return Message(content=RecordDict({"metrics": metrics}), reply_to=msg)


@app.query("partition")
def query_partition(msg: Message, context: Context) -> Message:
    """Tell the server which data partition this node holds (reproducible sampling maps it to the node)."""
    reply = ConfigRecord({"partition-id": partition_id(context)})
    if "num-partitions" in context.node_config:  # the server checks it against data.num_clients
        reply["num-partitions"] = int(context.node_config["num-partitions"])
    return Message(content=RecordDict({"config": reply}), reply_to=msg)
