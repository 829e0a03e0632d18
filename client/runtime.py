"""What a client keeps between messages: its base model, the current stage's submodel, its data.

Everything is cached per process (module level) because the simulation engine reuses a worker for many
messages; the fused submodel layers are also cached on disk by the growth module, and the base model by
``devft.models``, so a deployment that starts a fresh process per message only re-reads files. Nothing of
this goes into ``context.state``.

A personalised rule's own state (FedSA-LoRA's B) is kept on the client's disk, not in ``context.state``
(which the simulation ships with every call): a :class:`devft.growth.PersonalLoRA` (the client's B of every
layer of the full model, the B of the submodel it last trained and that submodel's plan), so it follows the
stages of DevFT and ProgFed. :func:`save_personal` writes one safetensors file per round atomically (temporary
file, fsync, rename) under ``cache_root()/clients/<client-state key>/<partition>/``; :func:`load_personal`
reads the newest one written before a given round (so a resumed run that repeats a round is exact).
"""

from __future__ import annotations

import copy
import hashlib
import json
import logging
import os
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from flwr.app import Context
from peft import PeftModel
from transformers import PreTrainedTokenizerBase

from devft.aggregation import AggregationRule, get_rule
from devft.aggregation.client_side import frozen_parts, lora_digest
from devft.config import RunConfig, config_from_flat
from devft.data import Example, FederatedData, build_federated_data
from devft.growth import GrowthPlan, PersonalLoRA, build_submodel, untrained_lora_for_plan
from devft.models import LoadedModel, LoraState, attach_lora, cache_root, load_model, lora_state

log = logging.getLogger(__name__)

CONFIG_KEY = "config"
"""Name of the ConfigRecord of every devft message (flat run config + ``server-round`` + ``plan``)."""

_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}

_configs: dict[str, RunConfig] = {}
_bases: dict[tuple[str, str], LoadedModel] = {}
_data: dict[str, FederatedData] = {}
# the one current submodel: key → (model, plan). A process serving clients of several ranks (lora.client_ranks)
# rebuilds it when the rank changes: 0.06-0.5 s on SmolLM2, where keeping one model per rank raised the
# process's peak RSS by 0.65 GB over six training calls (measured; docs/federated.md)
_stage: dict[str, tuple[PeftModel, GrowthPlan]] = {}
_initial_frozen: dict[str, LoraState] = {}  # the full model's seeded initial frozen factors (FFA-LoRA's A)


class FrozenMismatchError(ValueError):
    """The frozen factors this client rebuilt differ from the server's: training on them would not be FFA."""


def load_run_config(record: Mapping[str, Any]) -> RunConfig:
    """The run config from a message's ConfigRecord (its ``section.field`` keys; other keys ignored)."""
    flat = {k: v for k, v in record.items() if "." in k and not isinstance(v, bytes | list)}
    key = hashlib.sha256(repr(sorted(flat.items())).encode()).hexdigest()
    if key not in _configs:
        _configs.clear()
        _configs[key] = config_from_flat(flat)
    return _configs[key]


def partition_id(context: Context) -> int:
    """This node's data partition (``partition-id`` in its node config)."""
    if "partition-id" not in context.node_config:
        raise KeyError("node_config has no 'partition-id': start the SuperNode with --node-config 'partition-id=N'")
    return int(context.node_config["partition-id"])


def base_model(config: RunConfig) -> LoadedModel:
    """This client's own copy of the base model (loaded once per process)."""
    key = (config.model.name, config.model.dtype)
    if key not in _bases:
        _bases.clear()
        _bases[key] = load_model(config.model.name, dtype=_DTYPES[config.model.dtype])
    return _bases[key]


def local_partition(config: RunConfig, pid: int) -> list[Example]:
    """This client's training examples (``build_federated_data`` is a pure function of the settings)."""
    key = repr(config.data)
    if key not in _data:
        _data.clear()
        _data[key] = build_federated_data(config.data)
    partitions = _data[key].partitions
    if not 0 <= pid < len(partitions):
        raise IndexError(f"partition-id={pid} is outside the {len(partitions)} partitions of data.num_clients")
    if not partitions[pid]:
        raise ValueError(f"partition {pid} is empty")
    return partitions[pid]


def held_out(config: RunConfig) -> list[Example]:
    """The run's held-out set (what the server evaluates on; ``eval.max_examples`` applied)."""
    key = repr(config.data)
    if key not in _data:
        _data.clear()
        _data[key] = build_federated_data(config.data)
    test = _data[key].test
    return test[: config.eval.max_examples] if config.eval.max_examples else test


_PERSONAL_FILE = re.compile(r"^personal-r(\d+)\.safetensors$")


def personal_dir(state_key: str, pid: int) -> Path:
    """Where partition ``pid`` keeps its personal LoRA parts for the run keyed ``state_key``."""
    if not state_key or not re.fullmatch(r"[0-9a-zA-Z_-]+", state_key):
        raise ValueError(f"client-state-key={state_key!r} is not a usable directory name (the server sends one per run)")
    return cache_root() / "clients" / state_key / str(pid)


def load_personal(state_key: str, pid: int, before_round: int) -> PersonalLoRA | None:
    """The personal state this client saved in its newest round ``< before_round`` (None if none).

    Raises ``ValueError`` naming the file when it is not a devft personal state.
    """
    from safetensors import safe_open

    directory = personal_dir(state_key, pid)
    if not directory.exists():
        return None
    rounds = sorted(int(m.group(1)) for f in directory.iterdir() if (m := _PERSONAL_FILE.match(f.name)))
    earlier = [r for r in rounds if r < before_round]
    if not earlier:
        return None
    path = directory / f"personal-r{earlier[-1]:06d}.safetensors"
    with safe_open(str(path), framework="pt") as fh:
        metadata, tensors = fh.metadata(), {k: fh.get_tensor(k) for k in fh.keys()}
    try:
        return PersonalLoRA.from_flat(tensors, metadata)
    except ValueError as err:
        raise ValueError(f"personal state {path}: {err}") from err


def save_personal(state_key: str, pid: int, server_round: int, state: PersonalLoRA) -> Path:
    """Write this round's personal state atomically (tmp, fsync, rename); keep the previous round's file only."""
    from safetensors.torch import save_file

    directory = personal_dir(state_key, pid)
    directory.mkdir(parents=True, exist_ok=True)
    target = directory / f"personal-r{server_round:06d}.safetensors"
    tmp = directory / f".{target.name}.{os.getpid()}.tmp"
    tensors, metadata = state.to_flat()
    save_file({k: v.detach().cpu().contiguous() for k, v in tensors.items()}, str(tmp), metadata=metadata)
    with open(tmp, "rb") as fh:
        os.fsync(fh.fileno())
    os.replace(tmp, target)
    rounds = sorted(int(m.group(1)) for f in directory.iterdir() if (m := _PERSONAL_FILE.match(f.name)))
    earlier = [r for r in rounds if r < server_round]
    for r in earlier[:-1]:  # keep the one before this round: a resumed run may repeat this round
        (directory / f"personal-r{r:06d}.safetensors").unlink(missing_ok=True)
    return target


def clear_process_caches() -> None:
    """Forget every per-process cache (what a fresh ClientApp process starts without)."""
    _configs.clear()
    _bases.clear()
    _data.clear()
    _stage.clear()
    _initial_frozen.clear()


def stage_model(config: RunConfig, plan_json: str, rank: int | None = None
                ) -> tuple[PeftModel, PreTrainedTokenizerBase, GrowthPlan]:
    """The LoRA-wrapped submodel of ``plan_json`` built from this client's base model (cached per stage),
    with LoRA of rank ``rank`` (default ``lora.r``; a client of ``lora.client_ranks`` passes its own).

    Raises :class:`devft.growth.PlanMismatchError` when the plan was made for another base model.
    """
    base = base_model(config)
    lora = config.lora.with_rank(config.lora.r if rank is None else rank)
    key = hashlib.sha256((plan_json + repr(lora) + config.federation.aggregation).encode()).hexdigest()
    if key not in _stage:
        _stage.clear()
        plan = GrowthPlan.from_json(plan_json)
        submodel = build_submodel(base.model, plan)
        _stage[key] = (attach_lora(submodel, lora, seed=config.federation.seed), plan)
        log.info("stage %d: built %d-layer submodel (LoRA rank %d)", plan.stage, plan.capacity, lora.r)
    model, plan = _stage[key]
    return model, base.tokenizer, plan


def initial_frozen(config: RunConfig, rule: AggregationRule) -> LoraState:
    """The full model's initial LoRA factors that ``rule`` freezes (FFA-LoRA: every A), drawn as the server
    draws them: the base model wrapped with fresh LoRA from ``federation.seed`` (the server's ``GlobalModel``),
    in a copy of its module tree that shares the weights (peft replaces modules of the copy; the base model's
    own tree and ``requires_grad`` flags stay as they were). Once per process."""
    key = repr((config.model.name, config.model.dtype, config.lora, config.federation.seed, rule.frozen))
    if key not in _initial_frozen:
        _initial_frozen.clear()
        base = base_model(config).model
        tensors = (*base.parameters(), *base.buffers())
        flags = [(p, p.requires_grad) for p in base.parameters()]
        try:
            full = attach_lora(copy.deepcopy(base, {id(t): t for t in tensors}), config.lora,
                               seed=config.federation.seed)
            _initial_frozen[key] = {k: v.detach().clone() for k, v in frozen_parts(lora_state(full), rule).items()}
        finally:
            for param, flag in flags:
                param.requires_grad_(flag)
    return _initial_frozen[key]


def rebuilt_frozen(config: RunConfig, rule: AggregationRule, record: Mapping[str, Any], plan: GrowthPlan) -> LoraState:
    """The submodel's frozen factors (FFA-LoRA's A) for ``plan``, rebuilt here instead of received: the
    seeded initial ones fused and transferred through the earlier stages' plans (``plan-history`` in the
    message), then checked against the server's ``frozen-digest`` and rounded through ``federation.wire_dtype``
    as the tensors the server would have sent. Raises :class:`FrozenMismatchError` when they differ (other
    arithmetic than the server's: set ``federation.rebuild_frozen = false``)."""
    history = [GrowthPlan.from_json(p) for p in json.loads(str(record["plan-history"]))]
    rebuilt = untrained_lora_for_plan(initial_frozen(config, rule), history, plan)
    rebuilt = {k: v.float().contiguous() for k, v in rebuilt.items()}  # as the server's submodel LoRA
    if lora_digest(rebuilt) != str(record["frozen-digest"]):
        raise FrozenMismatchError(
            f"the {len(rebuilt)} frozen LoRA tensors rebuilt for stage {plan.stage} differ from the server's "
            f"(digest {lora_digest(rebuilt)[:12]} vs {str(record['frozen-digest'])[:12]}): this client's "
            "arithmetic or base model differs from the server's; set federation.rebuild_frozen = false to "
            "have the server send them")
    wire = _DTYPES[config.federation.wire_dtype]
    return {k: v.to(wire).float() for k, v in rebuilt.items()}  # float16 on the wire: trains as a sent A would


def received_rank(arrays: Mapping[str, torch.Tensor]) -> int | None:
    """The LoRA rank of the adapters in a message (of its first ``lora_A``), None when none travel."""
    return next((int(t.shape[0]) for k, t in sorted(arrays.items()) if k.endswith(".lora_A.weight")), None)


def aggregation_rule(config: RunConfig) -> AggregationRule:
    """The run's LoRA aggregation rule (its client-side duties: what to load, freeze and upload)."""
    return get_rule(config.federation.aggregation, alpha=config.lora.alpha)


def client_train_seed(seed: int, server_round: int, pid: int) -> int:
    """Seed of a client's data order and dropout in a round: distinct per (seed, round, partition)."""
    digest = hashlib.sha256(f"train:{seed}:{server_round}:{pid}".encode()).digest()
    return int.from_bytes(digest[:4], "little") & 0x7FFFFFFF


def to_wire(state: Mapping[str, torch.Tensor], wire_dtype: str) -> dict[str, torch.Tensor]:
    """LoRA tensors as they go on the wire: contiguous CPU copies in ``wire_dtype`` (never bfloat16)."""
    dtype = _DTYPES[wire_dtype]
    if dtype is torch.bfloat16:
        raise ValueError("bfloat16 cannot travel in a Flower ArrayRecord; use float32 or float16")
    return {k: v.detach().to("cpu", dtype).contiguous() for k, v in state.items()}
