"""The devft ClientApp: build the stage's submodel from the local base model, train its LoRA, reply.

A train message carries everything the client needs: the run's flat config and the stage's plan (JSON) in
the ConfigRecord ``config``, and the submodel's LoRA in the ArrayRecord ``arrays``. The base model never
travels: each client loads its own copy and builds the fused submodel itself (cached per process and, by
the growth module, on disk by plan hash, for deployments that restart the client process per message).
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
    load_run_config,
    local_partition,
    partition_id,
    stage_model,
    to_wire,
)
from devft.aggregation.client_side import finish_round, prepare_round
from devft.models import load_lora_state, lora_state
from devft.training import eval_loss, train_lora

log = logging.getLogger(__name__)

app = ClientApp()


def _arrays_to_state(record: ArrayRecord) -> dict[str, torch.Tensor]:
    """The received LoRA tensors, as float32 (the wire may carry float16)."""
    return {key: torch.from_numpy(array.numpy()).float() for key, array in record.items()}


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
    model, tokenizer, plan = stage_model(config, str(cfg["plan"]))
    rule = aggregation_rule(config)
    downlink = _arrays_to_state(msg.content["arrays"])
    missing = sorted(set(lora_state(model)) - set(downlink))
    if missing:  # clients keep nothing between rounds: every adapter must come with the message
        raise KeyError(f"the message lacks {len(missing)} LoRA tensors of the submodel, e.g. {missing[0]!r}")
    prepare_round(model, rule, downlink)  # loads the adapters; FFA-LoRA also freezes A
    examples = local_partition(config, pid)
    settings = dataclasses.replace(config.train, seed=client_train_seed(config.train.seed, server_round, pid))
    result = train_lora(model, tokenizer, examples, settings, max_length=config.data.max_length)
    payload, _ = finish_round(model, rule)  # what the rule uploads (FFA-LoRA: B only)
    state = to_wire(payload, config.federation.wire_dtype)
    metrics = {
        "num-examples": len(examples),
        "examples-seen": result.num_examples,
        "train-loss": result.loss,
        "train-steps": result.steps,
        "train-tokens": result.num_tokens,
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
    content = RecordDict({"arrays": ArrayRecord(state), "metrics": MetricRecord(metrics)})
    return Message(content=content, reply_to=msg)


@app.evaluate()
def evaluate(msg: Message, context: Context) -> Message:
    """Loss of the received submodel LoRA on this client's partition (federated evaluation)."""
    cfg: ConfigRecord = msg.content[CONFIG_KEY]
    config = load_run_config(cfg)
    pid = partition_id(context)
    model, tokenizer, _ = stage_model(config, str(cfg["plan"]))
    load_lora_state(model, _arrays_to_state(msg.content["arrays"]))
    examples = local_partition(config, pid)
    loss = eval_loss(model, tokenizer, examples, config.eval.batch_size, config.data.max_length)
    if not math.isfinite(loss):
        raise FloatingPointError(f"evaluation loss is {loss}")
    metrics = MetricRecord({"num-examples": len(examples), "eval-loss": loss, "partition-id": pid})
    return Message(content=RecordDict({"metrics": metrics}), reply_to=msg)


@app.query("partition")
def query_partition(msg: Message, context: Context) -> Message:
    """Tell the server which data partition this node holds (reproducible sampling maps it to the node)."""
    reply = ConfigRecord({"partition-id": partition_id(context)})
    return Message(content=RecordDict({"config": reply}), reply_to=msg)
