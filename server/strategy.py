"""The DevFT strategy: stages of federated LoRA rounds on growing submodels, on Flower's Message API.

Each round the strategy samples clients reproducibly (:mod:`server.sampling`), sends them the stage's plan
and the submodel's LoRA (:meth:`DevFTStrategy.configure_train`), validates every reply before it
aggregates (:meth:`DevFTStrategy.aggregate_train`), and at the end of a stage writes the trained LoRA back
into the full model (knowledge transfer) and plans the next stage from it. The full model (global LoRA
after transfer) is evaluated on the held-out set every ``eval_every`` rounds and at the end, the submodel
too. After every round one metrics row is appended to the run directory and a checkpoint is written, so
``resume`` continues a killed run and ends with the same adapter as an uninterrupted one.

FedIT and ProgFed run through this same class (see :mod:`server.methods`).

Aggregation rules (``federation.aggregation``, :mod:`devft.aggregation`): the strategy keeps the rule's
server state between rounds, i.e. the submodel LoRA and, for rules that change the frozen weights (FLoRA,
FedEx-LoRA), the cumulative base delta of every module of the full model. The submodel's share of it (with
ProgFed the first L_s layers' own, :meth:`~server.global_model.GlobalModel.submodel_delta`) travels down with
every train message (the rule's downlink), is aggregated and written back; the server's evaluations apply
it, the checkpoint keeps it, and the exported adapter folds it in. For a personalised rule (FedSA-LoRA) each client keeps its own B on its disk, under a key the
server draws once per run (``client-state-key``, kept in the checkpoint so a resumed run finds them), and
the run's ``eval_loss`` is the mean held-out loss of the sampled clients' personalised full models (with
DevFT and ProgFed: Ā after virtual knowledge transfer, sent with the full model's plan, and each client's own
full-model B).
The server fuses and transfers Ā between stages like any shared LoRA; the clients do the same with their B.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import statistics
import threading
import time
import uuid
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

import torch
from flwr.app import ArrayRecord, ConfigRecord, Message, MessageType, MetricRecord, RecordDict
from flwr.serverapp import Grid
from flwr.serverapp.strategy import Result, Strategy

from devft.aggregation import (
    BaseDelta,
    NonFiniteUpdateError,
    ServerState,
    lora_part,
    record_state,
    wire_record,
)
from devft.aggregation.client_side import frozen_parts, lora_digest
from devft.aggregation.kernels import resolve_backend
from devft.aggregation.norm_bound import bound_updates
from devft.config import FederationSettings, RunConfig, changed_keys, config_to_dict, config_to_flat
from devft.files import replace_directory
from devft.growth import GrowthPlan
from devft.models import LoraState
from server.checkpoint import load_checkpoint, restore_rng_states, rng_states, save_checkpoint
from server.global_model import GlobalModel, StagePlan
from server.metering import wire_bytes
from server.replies import (
    MAX_EXAMPLES,
    ClientFailure,
    ClientUpdate,
    InvalidReply,
    client_error,
    parse_train_reply,
)
from server.run_dir import RunDirectory
from server.sampling import discover_partitions, refreshed_partitions, sample_partitions

log = logging.getLogger(__name__)

CONFIG_KEY = "config"
ARRAYS_KEY = "arrays"

RoundCallback = Callable[[dict[str, Any]], None]


class RunStopped(Exception):  # noqa: N818 - a request honoured, not an error
    """The run stopped on request (Ctrl-C) after a completed round; its checkpoint is where ``--resume``
    picks up."""

    after_round: int | None = None
    total_rounds: int | None = None

    @classmethod
    def after(cls, after_round: int, total_rounds: int) -> RunStopped:
        stopped = cls(f"stopped on request after round {after_round} of {total_rounds}; its checkpoint is kept: "
                      "run the same command with --resume to continue")
        stopped.after_round, stopped.total_rounds = after_round, total_rounds
        return stopped


def _finite(value: Any) -> bool:
    return isinstance(value, int | float) and math.isfinite(value)


def number(row: Mapping[str, Any], key: str) -> float:
    """``row[key]`` as a float; 0 where a metrics row holds null (a non-finite value is written as null)."""
    value = row.get(key)
    return float(value) if isinstance(value, int | float) else 0.0


SAME_BITS_KEYS = frozenset({"federation.aggregation_threads"})
"""Config keys that change no result, only timings: any ``aggregation_threads`` sums to the same bits (tested),
and runs from before its default became 0 saved 1. A finished run differing only in these is reused as is."""

RESUME_MAY_CHANGE = SAME_BITS_KEYS | frozenset(
    {"federation.reply_timeout_s", "federation.client_cpus", "federation.client_gpus", "federation.client_eval"}
)
"""Config keys a resumed run may change (they do not change what is trained; ``client_eval`` adds evaluation
messages, whose bytes rows record apart as ``eval_bytes_up`` / ``eval_bytes_down``)."""


def check_resumable(saved: Mapping[str, Any], config: RunConfig, where: Any) -> None:
    """Refuse to resume, in ``where``, a checkpoint whose flat config ``saved`` differs from ``config`` (bar
    :data:`RESUME_MAY_CHANGE`), naming up to five keys with both values."""
    now = config_to_flat(config)
    changed = [k for k in changed_keys(saved, config) if k not in RESUME_MAY_CHANGE]
    if changed:
        details = ", ".join(f"{k}: {saved.get(k)!r} -> {now.get(k)!r}" for k in changed[:5])
        raise ValueError(f"cannot resume {where}: the config differs from the checkpoint's ({details})")


@dataclass
class RunState:
    """Everything that changes from round to round (and therefore goes into the checkpoint)."""

    round: int  # last completed round (0 before the first)
    full_lora: LoraState  # the full model's LoRA after the last knowledge transfer
    sub_lora: LoraState | None = None  # the current stage's submodel LoRA (None before stage 0 is planned)
    stage: StagePlan | None = None
    elapsed_s: float = 0.0  # wall time of completed rounds (carried across resumes)
    base_delta: dict[str, BaseDelta] = field(default_factory=dict)  # module → cumulative base-weight change
    client_state_key: str = ""  # where clients keep personal state (FedSA-LoRA's B); drawn once per run
    plans: list[str] | None = field(default_factory=list)  # the plans of stages 0, 1, … so far (JSON); None: unknown

    def to_payload(self, config: RunConfig) -> dict[str, Any]:
        return {
            "base_delta": ServerState(lora={}, base_delta=self.base_delta).to_tensors(),
            "client_state_key": self.client_state_key,
            "config": json.dumps(config_to_flat(config), sort_keys=True),
            "round": self.round,
            "full_lora": self.full_lora,
            "sub_lora": self.sub_lora,
            "stage": None if self.stage is None else json.dumps(self.stage.record()),
            "elapsed_s": self.elapsed_s,
            "rng": rng_states(),
            "plans": None if self.plans is None else json.dumps(self.plans),
        }

    @classmethod
    def from_payload(cls, payload: Mapping[str, Any]) -> RunState:
        import numpy as np

        stage = None
        if payload["stage"] is not None:
            record = json.loads(payload["stage"])
            sim = record["similarity"]
            stage = StagePlan(GrowthPlan.from_dict(record["plan"]), None if sim is None else np.asarray(sim))
        return cls(
            round=int(payload["round"]),
            full_lora=dict(payload["full_lora"]),
            sub_lora=None if payload["sub_lora"] is None else dict(payload["sub_lora"]),
            stage=stage,
            elapsed_s=float(payload["elapsed_s"]),
            base_delta=ServerState.from_tensors(payload.get("base_delta", {})).base_delta,
            client_state_key=str(payload.get("client_state_key", "")),
            # a checkpoint from before the plans were kept: clients cannot rebuild FFA's A, the server sends it
            plans=None if payload.get("plans") is None else list(json.loads(payload["plans"])),
        )


@dataclass
class _RoundLog:
    """What the hooks of one round learnt, for its metrics row."""

    sampled: list[int] = field(default_factory=list)  # partition ids
    requests: list[Message] = field(default_factory=list)  # the TRAIN messages (their ids are set when pushed)
    bytes_down: int = 0  # every message of the round, evaluation included
    bytes_up: int = 0
    eval_bytes_down: int = 0  # the evaluation messages' share of the above
    eval_bytes_up: int = 0
    updates: list[ClientUpdate] = field(default_factory=list)
    failures: list[ClientFailure] = field(default_factory=list)  # sampled clients without a usable reply
    ignored: list[ClientFailure] = field(default_factory=list)  # replies past the first, or from unsampled nodes
    aggregated: bool = False
    skipped: str | None = None  # why the update was skipped, when it was
    aggregate_s: float = 0.0
    validate_s: float = 0.0  # reading and checking the replies (headers, keys, shapes, finite values)
    update_norms: dict[int, float] = field(default_factory=dict)  # partition → ‖update‖ (norm_bound.py)
    update_norm_bound: float | None = None  # this round's bound (None: federation.max_update_norm* unset)
    update_norm_s: float = 0.0
    clipped: list[dict[str, float]] = field(default_factory=list)  # replies scaled back onto the bound
    client_eval: dict[str, float] = field(default_factory=dict)
    rule_info: dict[str, float] = field(default_factory=dict)  # the rule's diagnostics of this aggregation
    base_delta: dict[str, BaseDelta] | None = None  # the aggregated base delta (None: unchanged)


MAX_REASON = 1000  # characters of a rejected reply's reason kept in rows and logs (keys and headers are the client's)


def round_lora_seed(seed: int, server_round: int) -> int:
    """Seed of the fresh LoRA every client starts a round from (FLoRA): one per (run seed, round)."""
    digest = hashlib.sha256(f"fresh-lora:{seed}:{server_round}".encode()).digest()
    return int.from_bytes(digest[:4], "little") & 0x7FFFFFFF


def wire_torch_dtype(fed: FederationSettings) -> torch.dtype:
    """The torch dtype of ``federation.wire_dtype``: what the server sends and every reply must carry."""
    return torch.float16 if fed.wire_dtype == "float16" else torch.float32


def _to_record(state: Mapping[str, torch.Tensor], fed: FederationSettings) -> ArrayRecord:
    """What the server sends: ``state`` in the run's wire dtype and wire format."""
    return wire_record({k: v.detach().to(wire_torch_dtype(fed)) for k, v in state.items()}, fed.wire_format)


class DevFTStrategy(Strategy):
    """Developmental federated fine-tuning (and, through the same path, FedIT and ProgFed).

    Parameters
    ----------
    config:
        The resolved run configuration (sent to every client in each message).
    run_dir:
        Where metrics, checkpoints, the adapter and the summary go.
    global_model:
        The server's base model + global LoRA (plans stages, evaluates, saves the adapter).
    resume:
        Continue from the checkpoint in ``run_dir`` instead of starting at round 1.
    on_round:
        Called with each round's metrics row once it is written (progress bars, logs).
    stop:
        When set (``devft simulate`` sets it on Ctrl-C), the run ends after the round in progress, with its
        row and checkpoint written, by raising :class:`RunStopped`.
    """

    def __init__(
        self,
        config: RunConfig,
        run_dir: RunDirectory,
        global_model: GlobalModel,
        resume: bool = False,
        on_round: Iterable[RoundCallback] = (),
        stop: threading.Event | None = None,
    ) -> None:
        self.config = config
        self.stop = stop
        self.fed = config.federation
        self.run_dir = run_dir
        self.model = global_model
        self.schedule = global_model.schedule
        self.rule = global_model.rule
        self.resume = resume
        self.on_round = list(on_round)
        self.flat_config = config_to_flat(config)
        self.partition_to_node: dict[int, int] = {}
        self.node_to_partition: dict[int, int] = {}
        self._asked_nodes: set[int] = set()  # every node asked for its partition so far
        self.state: RunState | None = None
        self._round = _RoundLog()
        self._extra_train_config: dict[str, Any] = {}
        self._warned_eval_tokens = False

    # ------------------------------------------------------------------ Flower strategy hooks

    def summary(self) -> None:
        """Log the strategy's configuration."""
        log.info(
            "DevFT strategy: method=%s aggregation=%s rounds=%d stages=%s rounds/stage=%s clients/round=%d of %d "
            "min_replies=%d seed=%d",
            self.fed.method,
            self.fed.aggregation,
            self.fed.num_rounds,
            self.schedule.capacities,
            self.schedule.rounds,
            self.fed.clients_per_round,
            self.config.data.num_clients,
            self.fed.min_replies,
            self.fed.seed,
        )

    def _messages(
        self, arrays: ArrayRecord | Mapping[int, ArrayRecord], record: ConfigRecord, partitions: list[int],
        message_type: str, server_round: int
    ) -> list[Message]:
        """One message per sampled partition, addressed to the node that holds it; ``arrays``: the same for
        all, or one record per partition."""
        return [
            Message(
                RecordDict({ARRAYS_KEY: arrays if isinstance(arrays, ArrayRecord) else arrays[pid], CONFIG_KEY: record}),
                dst_node_id=self.partition_to_node[pid],
                message_type=message_type,
                group_id=str(server_round),
            )
            for pid in partitions
        ]

    def configure_train(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid) -> list[Message]:
        """One message per sampled client: ``arrays`` (the submodel LoRA) and ``config`` + run config + plan."""
        state = self._require_state()
        if state.stage is None:
            raise RuntimeError("configure_train called before a stage was planned")
        sampled = sample_partitions(self.fed.seed, server_round, self.partition_to_node, self.fed.clients_per_round)
        record = ConfigRecord(
            {
                **self.flat_config,
                **dict(config),
                **self._extra_train_config,
                "server-round": server_round,
                "stage": state.stage.plan.stage,
                "plan": state.stage.plan.to_json(),
                "lora-seed": round_lora_seed(self.fed.seed, server_round),
                "client-state-key": state.client_state_key,
                **self._frozen_config(),
            }
        )
        messages = self._messages(self._arrays_by_rank(arrays, sampled), record, sampled, MessageType.TRAIN,
                                  server_round)
        self._round.sampled = sampled
        self._round.requests = messages
        self._round.bytes_down += sum(wire_bytes(m) for m in messages)
        return messages

    def _clients_rebuild_frozen(self) -> bool:
        """Whether the clients rebuild the parts the rule freezes (FFA-LoRA's A) instead of receiving them:
        ``federation.rebuild_frozen``, factor-wise LoRA fusion, and the plans of every earlier stage known."""
        state = self._require_state()
        return (bool(self.rule.frozen) and self.fed.rebuild_frozen and state.plans is not None
                and state.stage is not None and state.stage.plan.lora_fusion == "factors"
                and len(state.plans) >= state.stage.plan.stage)

    def _frozen_config(self) -> dict[str, str]:
        """What a client needs to rebuild the frozen parts: the earlier stages' plans and the digest of what
        the server would have sent (``devft.aggregation.client_side.lora_digest``)."""
        state = self._require_state()
        if not self._clients_rebuild_frozen() or state.sub_lora is None:
            return {}
        assert state.plans is not None and state.stage is not None
        return {"plan-history": json.dumps(state.plans[: state.stage.plan.stage]),
                "frozen-digest": lora_digest(frozen_parts(state.sub_lora, self.rule))}

    def _arrays_by_rank(self, arrays: ArrayRecord, sampled: list[int]) -> ArrayRecord | dict[int, ArrayRecord]:
        """What each sampled client trains from: ``arrays``, or, with ``lora.client_ranks`` and a rule that
        sends adapters (svd), the global adapters' top components at each client's own rank."""
        lora = self.config.lora
        ranks = {pid: lora.rank_of(pid) for pid in sampled}
        state = self._require_state()
        if not lora.client_ranks or state.sub_lora is None or state.stage is None:
            return arrays
        rule_state = ServerState(lora=state.sub_lora,
                                 base_delta=self.model.submodel_delta(state.base_delta, state.stage.plan))
        if not any(lora_part(k) for k in self.rule.downlink(rule_state, full=True)):  # flora: no adapters go down
            return arrays
        records = {r: _to_record(self.rule.downlink(rule_state, full=True, rank=r), self.fed)
                   for r in sorted(set(ranks.values()))}
        return {pid: records[rank] for pid, rank in ranks.items()}

    def aggregate_train(
        self, server_round: int, replies: Iterable[Message]
    ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        """Validate every reply, record failures, and average the valid LoRA updates (weights ``n_k / Σ n``).

        Returns ``(None, metrics)`` when fewer than ``federation.min_replies`` clients gave valid replies:
        the round's update is then skipped and the submodel LoRA stays as it was.
        """
        state = self._require_state()
        assert state.sub_lora is not None  # set when the stage was planned
        assert state.stage is not None
        rule_state = ServerState(lora=dict(state.sub_lora),
                                 base_delta=self.model.submodel_delta(state.base_delta, state.stage.plan))
        expected = self.rule.expected_upload(rule_state)
        replies = list(replies)
        answered = set()
        # the node each request went to: the SuperLink answers for a lost node under its own id
        addressed = {m.metadata.message_id: m.metadata.dst_node_id for m in self._round.requests
                     if m.metadata.message_id}
        for reply in replies:
            size = wire_bytes(reply)
            self._round.bytes_up += size
            node = addressed.get(reply.metadata.reply_to_message_id, reply.metadata.src_node_id)
            pid = self.node_to_partition.get(node)
            if pid not in self._round.sampled or pid in answered:  # Flower pairs replies; this is a backstop
                why = "a second reply this round" if pid in answered else "a reply from a node not sampled this round"
                log.warning("round %d: %s (node %d, partition %s) ignored", server_round, why, node, pid)
                self._round.ignored.append(ClientFailure(node, pid, why))
                continue
            answered.add(pid)
            checked = time.perf_counter()
            try:
                update = parse_train_reply(reply, expected, rank_free=self.rule.heterogeneous_ranks,
                                           wire_dtype=wire_torch_dtype(self.fed))
            except InvalidReply as err:
                reason = str(err) if len(str(err)) <= MAX_REASON else str(err)[:MAX_REASON] + "…"  # a client wrote it
                log.warning("round %d: reply of partition %s (node %d) rejected: %s", server_round, pid, node, reason)
                self._round.failures.append(ClientFailure(node, pid, reason))
                continue
            finally:
                self._round.validate_s += time.perf_counter() - checked
            update.partition_id = -1 if pid is None else pid
            update.wire_bytes = size
            self._round.updates.append(update)
        for pid in self._round.sampled:
            if pid not in answered:
                node = self.partition_to_node[pid]
                log.warning("round %d: partition %d (node %d) did not reply in time", server_round, pid, node)
                self._round.failures.append(ClientFailure(node, pid, "no reply before the timeout"))
        updates = sorted(self._round.updates, key=lambda u: u.partition_id)  # fixed order: reproducible sums
        metrics = self._train_metrics(updates)
        if len(updates) < self.fed.min_replies:
            self._round.skipped = f"{len(updates)} valid replies < federation.min_replies={self.fed.min_replies}"
            log.warning(
                "round %d: %d valid replies < federation.min_replies=%d: update skipped",
                server_round,
                len(updates),
                self.fed.min_replies,
            )
            return None, metrics
        records = self._bounded_records(server_round, rule_state, updates)
        start = time.perf_counter()
        try:
            new_state = self.rule.aggregate(rule_state, records, [u.num_examples for u in updates])
        except NonFiniteUpdateError as err:
            if err.client is not None:  # every reply was checked finite above: a client here is a bug
                raise
            # finite replies whose aggregate overflows (e.g. B·A of huge factors): the model keeps its state
            parts = getattr(err, "parts", [err.key] if err.key else [])
            log.warning("round %d: the %s aggregate is not finite in %s: update skipped", server_round,
                        self.rule.name, parts[:3])
            self._round.skipped = (f"the {self.rule.name} aggregate of this round's replies is not finite in "
                                   f"{len(parts)} tensor(s), e.g. {parts[0]}" if parts else
                                   f"the {self.rule.name} aggregate of this round's replies is not finite: {err}")
            self._round.aggregate_s = time.perf_counter() - start
            return None, metrics
        self._round.aggregate_s = time.perf_counter() - start
        self._round.aggregated = True
        self._round.base_delta = new_state.base_delta
        self._round.rule_info = {k: float(v) for k, v in new_state.info.items()}  # e.g. svd's truncated tail
        return ArrayRecord({k: v.float().contiguous() for k, v in new_state.lora.items()}), metrics

    def _bounded_records(self, server_round: int, rule_state: ServerState, updates: list[ClientUpdate]) -> list[Any]:
        """The replies' records after norm bounding (``federation.max_update_norm*``), their update norms
        recorded for the row. Without a bound the norms are diagnostics only: if measuring them fails, the
        round goes on with the replies as they came; with a bound it cannot, and the error is raised."""
        start = time.perf_counter()
        records = [u.record for u in updates]
        try:
            bounded = bound_updates(self.rule, rule_state, records, max_norm=self.fed.max_update_norm,
                                    ratio=self.fed.max_update_norm_ratio)
        except (ValueError, RuntimeError) as err:
            if self.fed.max_update_norm or self.fed.max_update_norm_ratio:
                raise
            log.warning("round %d: update norms not measured (no bound is set): %s", server_round, err)
            return records
        finally:
            self._round.update_norm_s = time.perf_counter() - start
        self._round.update_norms = {u.partition_id: n for u, n in zip(updates, bounded.norms)}
        self._round.update_norm_bound = bounded.bound
        for i in bounded.clipped:
            pid, norm, scale = updates[i].partition_id, bounded.norms[i], bounded.scales[i]
            log.warning("round %d: the update of partition %d has norm %.4g > bound %.4g: scaled by %.3g",
                        server_round, pid, norm, bounded.bound, scale)
            self._round.clipped.append({"partition": pid, "norm": norm, "scale": scale})
        return bounded.updates

    def configure_evaluate(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> list[Message]:
        """Federated evaluation of the submodel LoRA on the round's clients (when ``federation.client_eval``)."""
        state = self._require_state()
        if not self.fed.client_eval or state.stage is None or not self._is_eval_round(server_round):
            return []
        frozen = self._frozen_config()  # FFA-LoRA: A is rebuilt by the clients, as for training
        return self._evaluate_messages(server_round, arrays, ConfigRecord({**dict(config), **frozen}), split="train")

    def _evaluate_messages(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, split: str,
                           plan: GrowthPlan | None = None) -> list[Message]:
        """EVALUATE messages to the round's sampled clients; ``split``: ``train`` (their partition) or ``test``;
        ``plan``: the model the clients build to evaluate (default: the stage's submodel)."""
        state = self._require_state()
        assert state.stage is not None
        plan = plan or state.stage.plan
        record = ConfigRecord(
            {**self.flat_config, **dict(config), "server-round": server_round, "plan": plan.to_json(),
             "eval-split": split, "client-state-key": state.client_state_key}
        )
        messages = self._messages(arrays, record, self._round.sampled, MessageType.EVALUATE, server_round)
        size = sum(wire_bytes(m) for m in messages)
        self._round.bytes_down += size
        self._round.eval_bytes_down += size
        return messages

    def aggregate_evaluate(self, server_round: int, replies: Iterable[Message]) -> MetricRecord | None:
        """The clients' evaluation losses pooled per response token (errors are logged and left out)."""
        means, count = self._mean_eval(server_round, replies)
        if "eval-loss" not in means:
            return None
        self._round.client_eval = {"client_eval_loss": means["eval-loss"], "client_eval_clients": count}
        return MetricRecord({"client-eval-loss": means["eval-loss"]})

    def _mean_eval(self, server_round: int, replies: Iterable[Message],
                   same_set: bool = False) -> tuple[dict[str, float], int]:
        """Means of ``eval-loss`` (and of ``eval-accuracy`` when every counted reply has one) over the replies
        (counting their bytes), and how many replies were counted. The loss is weighted by response tokens
        when every counted reply says how many (``eval-tokens``: the pooled loss of their sets, as the server's
        own is), else by examples; accuracy by examples. ``same_set``: every client evaluated the same set
        (the held-out one), so weighting by examples is weighting by tokens, and no count is missed."""
        rows: list[tuple[float, float, float | None, float | None]] = []  # (examples, loss, accuracy, tokens)
        for reply in replies:
            size = wire_bytes(reply)
            self._round.bytes_up += size
            self._round.eval_bytes_up += size
            if reply.has_error():
                log.warning("round %d: client evaluation failed: %s", server_round, client_error(reply.error.reason))
                continue
            metrics = next(iter(reply.content.metric_records.values()), None) or {}
            loss, n, acc = metrics.get("eval-loss"), metrics.get("num-examples"), metrics.get("eval-accuracy")
            tokens = metrics.get("eval-tokens")
            if isinstance(loss, float) and isinstance(n, int | float) and 0 < n <= MAX_EXAMPLES and math.isfinite(loss):
                rows.append((float(n), loss, acc if isinstance(acc, float) and 0.0 <= acc <= 1.0 else None,
                             float(tokens) if isinstance(tokens, int) and 0 < tokens <= MAX_EXAMPLES else None))
            else:
                log.warning("round %d: an evaluation reply with eval-loss=%r and num-examples=%r left out",
                            server_round, loss, n)
        if not rows:
            return {}, 0
        untold = sum(t is None for *_, t in rows)
        if untold and not same_set and not self._warned_eval_tokens:  # clients of an older devft, or another ClientApp
            self._warned_eval_tokens = True
            log.warning("round %d: %d of %d evaluation replies carry no valid eval-tokens: a round with such a reply "
                        "weights every reply's eval loss by its examples, instead of pooling per response token as "
                        "the server's own loss does (said once a run)", server_round, untold, len(rows))
        weights = [n for n, *_ in rows] if untold else [t for *_, t in rows]
        means = {"eval-loss": sum(w * x for w, (_, x, _, _) in zip(weights, rows)) / sum(weights)}
        if all(a is not None for _, _, a, _ in rows):
            examples = sum(n for n, *_ in rows)
            means["eval-accuracy"] = sum(n * a for n, _, a, _ in rows) / examples  # type: ignore[operator]
        return means, len(rows)

    # ------------------------------------------------------------------ the loop

    def start(
        self,
        grid: Grid,
        initial_arrays: ArrayRecord | None = None,
        num_rounds: int | None = None,
        timeout: float | None = None,
        train_config: ConfigRecord | None = None,
        evaluate_config: ConfigRecord | None = None,
        evaluate_fn: Callable[[int, ArrayRecord], MetricRecord | None] | None = None,
    ) -> Result:
        """Run (or resume) all rounds of all stages; write the run directory; return Flower's ``Result``.

        ``initial_arrays`` is the full model's starting LoRA (default: fresh LoRA seeded by
        ``federation.seed``; ignored when resuming). ``num_rounds``, if given, must equal the schedule's.
        ``train_config`` / ``evaluate_config`` entries are added to every message's ConfigRecord;
        ``evaluate_fn(round, full_lora_arrays)`` is an extra server-side evaluation, called after every round.
        """
        if num_rounds is not None and num_rounds != self.schedule.total_rounds:
            raise ValueError(f"num_rounds={num_rounds} differs from the schedule's {self.schedule.total_rounds}")
        timeout = self.fed.reply_timeout_s if timeout is None else timeout
        self._extra_train_config = dict(train_config or {})
        evaluate_config = evaluate_config or ConfigRecord()
        self.summary()
        result = Result()
        self.run_dir.check(self.resume)  # a directory it cannot use is refused before the wait for nodes, and so is
        if self.resume:                  # a checkpoint of another config (checked again when it is loaded)
            payload = load_checkpoint(self.run_dir.checkpoint, mmap=True)
            if payload is not None:
                self._check_resumable(json.loads(payload["config"]))
        self._discover(grid)  # before anything is written: a federation that cannot run this config leaves no run
        rows = self._initialise(initial_arrays)
        self.run_dir.write_config(config_to_dict(self.config))
        state = self._require_state()
        for row in rows:
            result.train_metrics_clientapp[int(row["round"])] = MetricRecord(
                {k: float(v) for k, v in row.items() if isinstance(v, int | float) and not isinstance(v, bool)}
            )
        for server_round in range(state.round + 1, self.schedule.total_rounds + 1):
            row = self._run_round(grid, server_round, timeout, evaluate_config)
            rows.append(row)
            result.train_metrics_clientapp[server_round] = MetricRecord(
                {k: float(v) for k, v in row.items() if isinstance(v, int | float) and not isinstance(v, bool)}
            )
            if row.get("eval_loss") is not None:
                result.evaluate_metrics_serverapp[server_round] = MetricRecord(
                    {"eval_loss": float(row["eval_loss"])}
                    | ({"eval_accuracy": float(row["eval_accuracy"])} if row.get("eval_accuracy") is not None else {})
                )
            if evaluate_fn is not None:
                extra = evaluate_fn(server_round, ArrayRecord(dict(state.full_lora)))
                if extra is not None:
                    result.evaluate_metrics_serverapp.setdefault(server_round, MetricRecord()).update(extra)
            if self.stop is not None and self.stop.is_set() and server_round < self.schedule.total_rounds:
                log.warning("stopping on request after round %d of %d (checkpoint kept; --resume continues)",
                            server_round, self.schedule.total_rounds)
                raise RunStopped.after(server_round, self.schedule.total_rounds)
        self._finish(rows)
        result.arrays = ArrayRecord(dict(self._require_state().full_lora))
        return result

    def _initialise(self, initial_arrays: ArrayRecord | None) -> list[dict[str, Any]]:
        """Fresh state, or the checkpoint's (with metrics.jsonl cut back to the checkpointed round)."""
        self.run_dir.prepare(self.resume)
        if self.resume:
            payload = load_checkpoint(self.run_dir.checkpoint)
            assert payload is not None  # prepare() checked it exists
            self._check_resumable(json.loads(payload["config"]))
            self.state = RunState.from_payload(payload)
            restore_rng_states(payload["rng"])
            rows = self.run_dir.truncate_metrics(self.state.round)
            log.info("resuming after round %d of %d", self.state.round, self.schedule.total_rounds)
            return rows
        seeded = self.model.initial_lora()
        full = seeded if initial_arrays is None else record_state(initial_arrays)
        initial = self.rule.init_state(full)  # FLoRA folds a non-zero initial B·A into the base delta
        # clients rebuild frozen parts (FFA-LoRA's A) from the seed: not a caller's own initial ones
        frozen_seeded = lora_digest(frozen_parts(full, self.rule)) == lora_digest(frozen_parts(seeded, self.rule))
        self.state = RunState(round=0, full_lora=initial.lora, base_delta=initial.base_delta,
                              client_state_key=uuid.uuid4().hex, plans=[] if frozen_seeded else None)
        return []

    def _check_resumable(self, saved: dict[str, Any]) -> None:
        check_resumable(saved, self.config, self.run_dir.path)

    def _discover(self, grid: Grid) -> None:
        self._set_partition_map(discover_partitions(
            grid, self.config.data.num_clients, min_required=self.fed.clients_per_round, asked=self._asked_nodes))

    def _set_partition_map(self, partition_to_node: dict[int, int]) -> None:
        self.partition_to_node = partition_to_node
        self.node_to_partition = {n: p for p, n in partition_to_node.items()}

    def _refresh_partition_map(self, grid: Grid) -> None:
        """Before a round: nodes that connected since are asked for their partition, so a SuperNode that
        restarted (under a new node id) gets its partition back, and a late one joins the sampling pool."""
        refreshed = refreshed_partitions(grid, self.partition_to_node, self._asked_nodes, self.config.data.num_clients)
        if refreshed != self.partition_to_node:
            self._set_partition_map(refreshed)

    def _run_round(self, grid: Grid, server_round: int, timeout: float, evaluate_config: ConfigRecord) -> dict[str, Any]:
        state = self._require_state()
        start = time.perf_counter()
        self._round = _RoundLog()
        self._refresh_partition_map(grid)
        stage = self.schedule.stage_of_round(server_round)
        if state.stage is None or state.stage.plan.stage != stage:
            self._start_stage(stage)
        assert state.stage is not None and state.sub_lora is not None
        plan = state.stage.plan

        # Clients keep nothing between rounds, so each gets everything the rule sends in a stage's first round.
        # Base deltas (FLoRA, FedEx-LoRA) are cumulative: a fresh client process is exact from this alone.
        # ProgFed: the submodel's layers' share of the full model's base delta, under the submodel's names.
        sub_delta = self.model.submodel_delta(state.base_delta, plan)
        # ... except what the clients rebuild themselves (FFA-LoRA's A: from the seed and the plans)
        downlink = self.rule.downlink(ServerState(lora=state.sub_lora, base_delta=sub_delta),
                                      full=not self._clients_rebuild_frozen())
        replies = grid.send_and_receive(
            self.configure_train(server_round, _to_record(downlink, self.fed), ConfigRecord(), grid),
            timeout=timeout,
        )
        aggregated, _ = self.aggregate_train(server_round, replies)
        if aggregated is not None:
            state.sub_lora = {k: torch.from_numpy(a.numpy()).float() for k, a in aggregated.items()}
            if self._round.base_delta is not None:
                sub_delta = self._round.base_delta
                state.base_delta = self.model.merge_delta(state.base_delta, sub_delta, plan)

        end_of_stage = self.schedule.is_last_round_of_stage(server_round)
        if end_of_stage:
            state.full_lora = self.model.transfer(state.full_lora, state.sub_lora, plan)

        if self.fed.client_eval and self._is_eval_round(server_round):
            # the submodel LoRA and (FLoRA, FedEx-LoRA) the base delta it sits on, less what clients rebuild
            sub_with_delta = ServerState(lora=state.sub_lora, base_delta=sub_delta).to_tensors()
            if self._clients_rebuild_frozen():
                sub_with_delta = {k: v for k, v in sub_with_delta.items()
                                  if k not in frozen_parts(sub_with_delta, self.rule)}
            if self.rule.personalised:  # FedSA-LoRA: each client evaluates with its own B, the server's stays here
                own = set(state.sub_lora) - set(self.rule.downlink(ServerState(lora=state.sub_lora)))
                sub_with_delta = {k: v for k, v in sub_with_delta.items() if k not in own}
            eval_replies = grid.send_and_receive(
                self.configure_evaluate(server_round, _to_record(sub_with_delta, self.fed), evaluate_config, grid),
                timeout=timeout,
            )
            self.aggregate_evaluate(server_round, eval_replies)

        # evaluated: a round whose eval_loss is null then had a NaN/Inf loss (JSON has none), not no evaluation
        evaluation: dict[str, Any] = {"eval_loss": None, "eval_accuracy": None, "submodel_eval_loss": None,
                                      "eval_kind": self._eval_kind(), "evaluated": self._is_eval_round(server_round)}
        eval_s = 0.0
        if self._is_eval_round(server_round) and self.rule.personalised:
            # No global model: the held-out loss of each sampled client's own full model on the clients, i.e.
            # Ā after (virtual) knowledge transfer, sent with the full model's plan, and the client's own
            # full-model B (into which it transferred this round's training).
            eval_start = time.perf_counter()
            identity = self.model.is_identity(plan)
            full_view = state.sub_lora if identity else (
                state.full_lora if end_of_stage else self.model.transfer(state.full_lora, state.sub_lora, plan))
            shared = self.rule.downlink(ServerState(lora=full_view))  # Ā only
            messages = self._evaluate_messages(server_round, _to_record(shared, self.fed), evaluate_config,
                                               split="test", plan=plan if identity else self.model.full_plan(plan.stage))
            means, count = self._mean_eval(server_round, grid.send_and_receive(messages, timeout=timeout),
                                           same_set=True)
            loss = means.get("eval-loss")
            # the clients' personalised submodels are not evaluated separately (that would double their eval)
            # evaluated only where some client's loss counted (replies with errors or non-finite losses do not)
            evaluation.update(eval_loss=loss, eval_accuracy=means.get("eval-accuracy"),
                              submodel_eval_loss=loss if identity else None, eval_clients=count, evaluated=count > 0)
            eval_s = time.perf_counter() - eval_start
        elif self._is_eval_round(server_round):
            eval_start = time.perf_counter()
            full_view = state.full_lora if end_of_stage else self.model.transfer(state.full_lora, state.sub_lora, plan)
            result = self.model.evaluate_full(
                full_view, {m: d.materialize() for m, d in state.base_delta.items()}
            )
            evaluation["eval_loss"] = result.loss
            evaluation["eval_accuracy"] = result.accuracy
            evaluation["eval_family_accuracy"] = result.family_accuracy or None
            evaluation["submodel_eval_loss"] = (
                result.loss if self.model.is_identity(plan)
                else self.model.evaluate_submodel(plan, state.sub_lora, {m: d.materialize() for m, d in sub_delta.items()})
            )
            eval_s = time.perf_counter() - eval_start

        round_wall_s = time.perf_counter() - start
        state.round = server_round
        state.elapsed_s += round_wall_s
        row = self._row(server_round, plan.stage, plan.capacity, round_wall_s, eval_s, evaluation, end_of_stage)
        row["elapsed_s"] = state.elapsed_s
        self.run_dir.append_metrics(row)
        save_checkpoint(self.run_dir.checkpoint, state.to_payload(self.config))
        for callback in self.on_round:
            callback(row)
        return row

    def _start_stage(self, stage: int) -> None:
        """Plan ``stage`` from the full LoRA state and derive the submodel's starting LoRA."""
        state = self._require_state()
        start = time.perf_counter()
        planned = self.model.plan(stage, state.full_lora)
        state.stage = planned
        state.sub_lora = self.model.submodel_lora(state.full_lora, planned.plan)
        if state.plans is not None:  # stages in order; a gap (never expected) makes the history unknown
            state.plans = [*state.plans[:stage], planned.plan.to_json()] if len(state.plans) >= stage else None
        record = planned.record() | {"plan_s": time.perf_counter() - start, "first_round": self.schedule.first_round(stage)}
        self.run_dir.write_stage(stage, record)
        log.info("stage %d: %d of %d layers, groups %s", stage, planned.plan.capacity, self.model.num_layers, planned.plan.groups)

    # ------------------------------------------------------------------ helpers

    def _require_state(self) -> RunState:
        if self.state is None:
            raise RuntimeError("the strategy has not been started")
        return self.state

    def _is_eval_round(self, server_round: int) -> bool:
        return server_round % self.fed.eval_every == 0 or server_round == self.schedule.total_rounds

    def _eval_kind(self) -> str:
        """What ``eval_loss`` means: the global model on the server, or the clients' personalised models."""
        return "personalised-clients-mean" if self.rule.personalised else "global"

    def _train_metrics(self, updates: list[ClientUpdate]) -> MetricRecord:
        """Example-weighted mean training loss of the valid replies (what Flower's Result records)."""
        if not updates:
            return MetricRecord({"clients-ok": 0})
        total = sum(u.num_examples for u in updates)
        loss = sum(u.num_examples * float(u.metrics.get("train-loss", 0.0)) for u in updates) / total
        return MetricRecord({"train-loss": loss, "clients-ok": len(updates)})

    def _row(
        self,
        server_round: int,
        stage: int,
        layers: int,
        round_wall_s: float,
        eval_s: float,
        evaluation: dict[str, Any],
        end_of_stage: bool,
    ) -> dict[str, Any]:
        """The metrics.jsonl row of a round (docs/design.md §4)."""
        r = self._round
        ok = sorted(r.updates, key=lambda u: u.partition_id)

        def values(key: str) -> list[float]:  # a client's number, when it sent a finite one
            found = (u.metrics.get(key) for u in ok)
            return [float(v) for v in found if isinstance(v, int | float) and not isinstance(v, bool)
                    and math.isfinite(v)]

        train_s, flops, rss = values("train-s"), values("train-flops"), values("peak-rss-mb")
        truncated = values("truncated-examples")
        total = sum(u.num_examples for u in ok)
        row = {
            "round": server_round,
            "stage": stage,
            "submodel_layers": layers,
            "end_of_stage": end_of_stage,
            "clients_sampled": len(r.sampled),
            "clients_ok": len(ok),
            "clients_failed": len(r.failures),
            "aggregated": r.aggregated,
            "skipped": r.skipped,
            "sampled_partitions": r.sampled,
            "failures": [{"partition": f.partition_id, "reason": f.reason} for f in r.failures],
            "ignored_replies": [{"node": f.node_id, "partition": f.partition_id, "reason": f.reason}
                                for f in r.ignored],
            "bytes_up": r.bytes_up,
            "bytes_down": r.bytes_down,
            "eval_bytes_up": r.eval_bytes_up,
            "eval_bytes_down": r.eval_bytes_down,
            "train_flops": sum(flops),
            "client_train_s_mean": statistics.fmean(train_s) if train_s else None,
            "client_train_s_max": max(train_s) if train_s else None,
            "client_train_s_sum": sum(train_s),
            "round_wall_s": round_wall_s,
            "aggregate_s": r.aggregate_s,
            "validate_s": r.validate_s,
            "update_norm_s": r.update_norm_s,
            "update_norm_median": statistics.median_low(r.update_norms.values()) if r.update_norms else None,
            "update_norm_max": max(r.update_norms.values()) if r.update_norms else None,
            "update_norm_bound": r.update_norm_bound,
            "clipped": r.clipped,
            "eval_s": eval_s,
            "peak_rss_mb": max(rss) if rss else None,
            "train_loss": sum(u.num_examples * float(u.metrics["train-loss"]) for u in ok) / total if ok else None,
            "num_examples": total,
            "truncated_examples": int(sum(truncated)),  # of those, answers cut at data.max_length
            **evaluation,
            **r.client_eval,
        }
        row.update({k: v for k, v in r.rule_info.items() if k not in row})  # a rule's diagnostic never hides a field
        return row

    def _finish(self, rows: list[dict[str, Any]]) -> None:
        """Save the adapter and write summary.json."""
        state = self._require_state()
        replace_directory(self.run_dir.adapter, lambda staging: self.model.save_adapter(
            state.full_lora, staging, state.base_delta))
        summary = self._summary(rows)
        self.run_dir.write_summary(summary)
        final = summary["final"]
        last = next((r for r in rows if r["round"] == final["round"]), {})
        if last.get("evaluated") and not _finite(final["eval_loss"]):
            log.warning("the final eval loss (round %s) is not finite: the model diverged (see the rounds' failures "
                        "and skipped updates in %s)", final["round"], self.run_dir.path / "report.md")

    def _summary(self, rows: list[dict[str, Any]]) -> dict[str, Any]:
        state = self._require_state()
        # the last evaluated round, whatever its result: a NaN eval loss (null once re-read on resume) is a final
        # eval loss of None, not the last finite one before it
        evaluated = [r for r in rows if self._is_eval_round(int(r["round"]))]
        last = evaluated[-1] if evaluated else {}
        target = self.fed.target_eval_loss
        reached = None
        if target > 0:
            cumulative = {"wall_s": 0.0, "bytes": 0.0, "train_flops": 0.0, "client_train_s": 0.0}
            for row in rows:
                cumulative["wall_s"] += number(row, "round_wall_s")
                cumulative["bytes"] += (number(row, "bytes_up") + number(row, "bytes_down")  # training messages'
                                        - number(row, "eval_bytes_up") - number(row, "eval_bytes_down"))
                cumulative["train_flops"] += number(row, "train_flops")
                cumulative["client_train_s"] += number(row, "client_train_s_sum")
                if row.get("eval_loss") is not None and row["eval_loss"] <= target:
                    reached = {"round": row["round"], **cumulative}
                    break
        return {
            "label": self._label(),
            "method": self.fed.method,
            "aggregation": self.fed.aggregation,
            "eval_kind": self._eval_kind(),
            "server_aggregation": self._aggregation_kernel(),
            "model": self.config.model.name,
            "seed": self.fed.seed,
            "config": config_to_dict(self.config),
            "schedule": {"capacities": list(self.schedule.capacities), "rounds": list(self.schedule.rounds)},
            "num_layers": self.model.num_layers,
            "rounds": len(rows),
            "wall_s": state.elapsed_s,
            "totals": {
                "bytes_up": int(sum(number(r, "bytes_up") for r in rows)),
                "bytes_down": int(sum(number(r, "bytes_down") for r in rows)),
                "eval_bytes_up": int(sum(number(r, "eval_bytes_up") for r in rows)),
                "eval_bytes_down": int(sum(number(r, "eval_bytes_down") for r in rows)),
                "train_flops": float(sum(number(r, "train_flops") for r in rows)),
                "client_train_s": float(sum(number(r, "client_train_s_sum") for r in rows)),
                "clients_failed": int(sum(number(r, "clients_failed") for r in rows)),
                "rounds_skipped": int(sum(1 for r in rows if not r.get("aggregated", True))),  # older rows lack it
                "updates_clipped": int(sum(len(r.get("clipped") or ()) for r in rows)),
                "truncated_examples": int(sum(number(r, "truncated_examples") for r in rows)),
            },
            "final": {
                "round": last.get("round"),
                "eval_loss": last.get("eval_loss"),
                "eval_accuracy": last.get("eval_accuracy"),
                "eval_family_accuracy": last.get("eval_family_accuracy"),
                "submodel_eval_loss": last.get("submodel_eval_loss"),
                "train_loss": rows[-1]["train_loss"] if rows else None,
            },
            "target_eval_loss": target or None,
            "to_target": reached,
            "adapter": str(self.run_dir.adapter),
        }

    def _aggregation_kernel(self) -> dict[str, Any]:
        """What summed the rounds (``aggregate_s`` in the rows): the backend and the thread count. The native C
        loops take fp32 and fp64 data only, so half-precision payloads (``federation.wire_dtype``) are summed by
        the torch loops even where ``auto`` resolves to native."""
        backend = resolve_backend(self.rule.backend, torch.device("cpu"))
        if backend == "native" and self.fed.wire_dtype != "float32":
            backend = "torch"
        return {"backend": backend, "threads": self.rule.threads}

    def _label(self) -> str:
        g = self.config.growth
        if self.fed.method != "devft":
            return self.fed.method
        parts = ["devft"]
        if g.grouping != "dglg":
            parts.append(f"grouping={g.grouping}")
        if g.fusion != "dblf":
            parts.append(f"fusion={g.fusion}")
        if self.fed.aggregation != "fedit":
            parts.append(f"agg={self.fed.aggregation}")
        return " ".join(parts)
