"""What every LoRA aggregation rule shares: server state, base-weight deltas, the rule interface, the registry.

A rule is Flower-free. The server keeps a :class:`ServerState` (the global adapters and, for rules that
change the frozen weights, the cumulative :class:`BaseDelta` of each module) and calls, each round:

1. ``rule.downlink(state)``: the tensors to send to a client (adapters and/or base deltas),
2. the client trains and replies ``rule.client_payload(lora_state(model))``,
3. ``rule.aggregate(state, replies, num_examples)`` → the next state (validates the replies first).

Replies are mappings of tensors or Flower ``ArrayRecord``s (read in place). ``ΔW`` of a module is
``s · B A`` with ``s = alpha / r``; weights ``p_k = n_k / Σ n``. See docs/design.md §3 for the rules' table.

Base deltas travel under ``{module}.base_delta.weight`` (dense, ``(d_out, d_in)``) or as factors
``{module}.base_delta.B`` ``(d_out, R)`` and ``{module}.base_delta.A`` ``(R, d_in)`` with ``ΔW = B A``:
always the *cumulative* change since the pristine base weights, so a client that reloads its base model
every round (a fresh Flower ClientApp process) or that skipped rounds still ends up exact; clients apply it
with :func:`devft.aggregation.client_side.set_base_delta` (set, not add). The factored form is used while
it is smaller than the dense one (``R (d_in + d_out) < d_in d_out``).
"""

from __future__ import annotations

import logging
import math
import numbers
import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch

from devft.aggregation.errors import NonFiniteAggregateError
from devft.aggregation.kernels import weighted_sum_many
from devft.aggregation.norm_bound import distances, moved_towards
from devft.aggregation.packed import packed_nbytes
from devft.aggregation.records import payload_nbytes
from devft.aggregation.sources import as_sources
from devft.aggregation.validation import InvalidUpdateError, normalized_weights, validate_updates

log = logging.getLogger(__name__)

Update = Any  # Mapping[str, torch.Tensor] | flwr.app.ArrayRecord
LORA_PARTS = ("lora_A", "lora_B")
BASE_DELTA_DENSE = ".base_delta.weight"
BASE_DELTA_A = ".base_delta.A"
BASE_DELTA_B = ".base_delta.B"
_LORA_KEY = re.compile(r"^(?P<module>.+)\.(?P<part>lora_A|lora_B)\.weight$")


def lora_part(key: str) -> tuple[str, str] | None:
    """``(module, "lora_A" | "lora_B")`` of a peft LoRA key, or None for any other key."""
    m = _LORA_KEY.match(key)
    return (m.group("module"), m.group("part")) if m else None


def as_wire(tensor: torch.Tensor, source: Any, key: str) -> torch.Tensor:
    """``tensor`` rounded to the dtype of ``key`` in a reply ``source`` (as the wire carried it)."""
    dtype = source.meta(key)[0]
    return tensor if tensor.dtype == dtype else tensor.to(dtype)


def lora_modules(keys: Iterable[str]) -> dict[str, tuple[str, str]]:
    """``{module: (key of A, key of B)}``; raises ``KeyError`` for unpaired or non-LoRA keys."""
    found: dict[str, dict[str, str]] = {}
    for key in keys:
        parts = lora_part(key)
        if parts is None:
            raise KeyError(f"{key!r} is not a LoRA factor key ('<module>.lora_A.weight' / '.lora_B.weight')")
        found.setdefault(parts[0], {})[parts[1]] = key
    out = {}
    for module, pair in found.items():
        if set(pair) != set(LORA_PARTS):
            raise KeyError(f"module {module!r} has only {sorted(pair)}, a LoRA module needs lora_A and lora_B")
        out[module] = (pair["lora_A"], pair["lora_B"])
    return out


@dataclass(frozen=True)
class BaseDelta:
    """The cumulative change of one frozen base weight, ``(d_out, d_in)``: factors ``B A`` or dense."""

    d_out: int
    d_in: int
    B: torch.Tensor | None = None  # (d_out, R)
    A: torch.Tensor | None = None  # (R, d_in)
    dense: torch.Tensor | None = None  # (d_out, d_in)

    @property
    def rank(self) -> int:
        return 0 if self.B is None else int(self.B.shape[1])

    def plus(self, B: torch.Tensor, A: torch.Tensor) -> BaseDelta:
        """This delta plus ``B A`` (fp32), kept factored while that is the smaller payload."""
        B, A = B.float(), A.float()
        if self.dense is not None:
            return BaseDelta(self.d_out, self.d_in, dense=self.dense + B @ A)
        if self.B is not None and self.A is not None:
            B, A = torch.cat([self.B, B], dim=1), torch.cat([self.A, A], dim=0)
        if B.shape[1] * (self.d_in + self.d_out) >= self.d_in * self.d_out:
            return BaseDelta(self.d_out, self.d_in, dense=B @ A)
        return BaseDelta(self.d_out, self.d_in, B=B.contiguous(), A=A.contiguous())

    def materialize(self) -> torch.Tensor:
        """The dense ``(d_out, d_in)`` delta."""
        if self.dense is not None:
            return self.dense
        if self.B is None or self.A is None:
            return torch.zeros(self.d_out, self.d_in)
        return self.B @ self.A

    def payload(self, module: str) -> dict[str, torch.Tensor]:
        """The tensors that carry this delta to a client."""
        if self.dense is not None:
            return {module + BASE_DELTA_DENSE: self.dense}
        if self.B is None or self.A is None:
            return {}
        return {module + BASE_DELTA_B: self.B, module + BASE_DELTA_A: self.A}


def split_downlink(payload: Mapping[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """Split a downlink into ``(adapters, {module: dense base delta})``."""
    adapters: dict[str, torch.Tensor] = {}
    factors: dict[str, dict[str, torch.Tensor]] = {}
    deltas: dict[str, torch.Tensor] = {}
    for key, value in payload.items():
        if key.endswith(BASE_DELTA_DENSE):
            deltas[key[: -len(BASE_DELTA_DENSE)]] = value.float()
        elif key.endswith(BASE_DELTA_A):
            factors.setdefault(key[: -len(BASE_DELTA_A)], {})["A"] = value
        elif key.endswith(BASE_DELTA_B):
            factors.setdefault(key[: -len(BASE_DELTA_B)], {})["B"] = value
        else:
            adapters[key] = value
    for module, pair in factors.items():
        if set(pair) != {"A", "B"}:
            raise KeyError(f"base delta of module {module!r} has only {sorted(pair)}; factors come in pairs")
        deltas[module] = pair["B"].float() @ pair["A"].float()
    return adapters, deltas


@dataclass
class ServerState:
    """What the server keeps for a rule between rounds."""

    lora: dict[str, torch.Tensor]  # the global adapters (peft keys)
    base_delta: dict[str, BaseDelta] = field(default_factory=dict)  # module → cumulative base-weight change
    round: int = 0  # number of aggregations so far
    info: dict[str, float] = field(default_factory=dict)  # diagnostics of the last aggregation

    def non_finite_parts(self) -> list[str]:
        """Names of the LoRA tensors and base-delta modules that hold NaN/Inf (empty when all is finite)."""
        bad = [k for k, v in self.lora.items() if not bool(torch.isfinite(v).all())]
        return bad + [m for m, d in self.base_delta.items() if not bool(torch.isfinite(d.materialize()).all())]

    def to_tensors(self) -> dict[str, torch.Tensor]:
        """Every tensor of the state (adapters and base deltas, downlink key names), e.g. for a checkpoint."""
        out = dict(self.lora)
        for module, delta in self.base_delta.items():
            out.update(delta.payload(module))
        return out

    @classmethod
    def from_tensors(cls, tensors: Mapping[str, torch.Tensor], round: int = 0) -> ServerState:
        """Inverse of :meth:`to_tensors` (copies the tensors)."""
        lora: dict[str, torch.Tensor] = {}
        factors: dict[str, dict[str, torch.Tensor]] = {}
        deltas: dict[str, BaseDelta] = {}
        for key, value in tensors.items():
            if key.endswith(BASE_DELTA_DENSE):
                dense = value.detach().float().clone()
                deltas[key[: -len(BASE_DELTA_DENSE)]] = BaseDelta(dense.shape[0], dense.shape[1], dense=dense)
            elif key.endswith(BASE_DELTA_A):
                factors.setdefault(key[: -len(BASE_DELTA_A)], {})["A"] = value.detach().float().clone()
            elif key.endswith(BASE_DELTA_B):
                factors.setdefault(key[: -len(BASE_DELTA_B)], {})["B"] = value.detach().float().clone()
            else:
                lora[key] = value.detach().clone()
        for module, pair in factors.items():
            if set(pair) != {"A", "B"}:
                raise KeyError(f"base delta of module {module!r} has only {sorted(pair)}; factors come in pairs")
            deltas[module] = BaseDelta(pair["B"].shape[0], pair["A"].shape[1], B=pair["B"], A=pair["A"])
        return cls(lora=lora, base_delta=deltas, round=round)


def ideal_delta(updates: Sequence[Update], weights: Sequence[float], alpha: float) -> dict[str, torch.Tensor]:
    """``{module: Σ_k p_k s_k B_k A_k}`` (fp64): the average of the clients' updates that an exact rule
    reproduces (``s_k = alpha / r_k``). Independent of every rule's code; for tests and diagnostics."""
    p = normalized_weights(weights, len(updates))
    sources = as_sources(updates)
    out: dict[str, torch.Tensor] = {}
    for module, (ka, kb) in lora_modules(sources[0].keys()).items():
        total = None
        for pk, src in zip(p, sources):
            a, b = src.tensor(ka).double(), src.tensor(kb).double()
            term = pk * (alpha / a.shape[0]) * (b @ a)
            total = term if total is None else total + term
        out[module] = total
    return out


class AggregationRule:
    """Base of the LoRA aggregation rules; subclasses set the class attributes and override a few hooks.

    Attributes describe the rule: ``uploads`` (LoRA parts a client sends), ``downloads`` (LoRA parts the
    server sends to a client that kept the rest; ``full_downloads`` to one that keeps nothing, or in the first
    round of a stage: devft's Flower server sends these every round, less the ``frozen`` parts its clients
    rebuild), ``exact`` (whether the new
    global model equals the example-weighted average of the clients' models; ``None`` when there is no
    single global model), ``heterogeneous_ranks`` (clients may use different ranks), ``changes_base``
    (the rule folds updates into the frozen base weights), ``personalised`` (clients keep parts of their
    own across rounds: there is no single global model), ``frozen`` (LoRA parts clients do not train),
    ``fresh_lora_each_round`` (clients restart from freshly initialised LoRA every round).
    """

    name: ClassVar[str] = ""
    paper: ClassVar[str] = ""
    uploads: ClassVar[tuple[str, ...]] = LORA_PARTS
    downloads: ClassVar[tuple[str, ...]] = LORA_PARTS
    full_downloads: ClassVar[tuple[str, ...] | None] = None  # None: same as downloads
    exact: ClassVar[bool | None] = False
    heterogeneous_ranks: ClassVar[bool] = False
    changes_base: ClassVar[bool] = False
    personalised: ClassVar[bool] = False
    frozen: ClassVar[tuple[str, ...]] = ()
    fresh_lora_each_round: ClassVar[bool] = False
    lora_pairs_only: ClassVar[bool] = False  # the rule works on (A, B) products: no other trainable tensor

    def __init__(self, *, alpha: float, backend: str = "auto", check_finite: bool = True,
                 threads: int | None = None) -> None:
        if isinstance(alpha, bool) or not isinstance(alpha, numbers.Real) or not (math.isfinite(alpha) and alpha > 0):
            raise ValueError(f"alpha must be a finite number > 0 (the LoRA alpha of the clients), got alpha={alpha!r}")
        if threads is not None and (isinstance(threads, bool) or int(threads) != threads or threads < 1):
            raise ValueError(f"threads must be a positive integer (CPU threads of the weighted sum), got threads={threads!r}")
        self.alpha = float(alpha)
        self.backend = backend
        self.check_finite = check_finite
        self.threads = None if threads is None else int(threads)

    def __repr__(self) -> str:
        return f"{type(self).__name__}(alpha={self.alpha})"

    # ---- keys -------------------------------------------------------------------------------------------
    def upload_keys(self, keys: Iterable[str]) -> list[str]:
        """The keys (of a client's LoRA state) a client uploads."""
        out = []
        for key in keys:
            parts = lora_part(key)
            if parts is None or parts[1] in self.uploads:
                out.append(key)
        return out

    def client_payload(self, lora: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """What a client sends: the uploaded subset of its LoRA state (detached)."""
        return {k: lora[k].detach() for k in self.upload_keys(lora.keys())}

    def expected_upload(self, state: ServerState) -> dict[str, tuple[int, ...]]:
        """Key → shape every reply must have (rank dimension free where ``heterogeneous_ranks``)."""
        return {k: tuple(state.lora[k].shape) for k in self.upload_keys(state.lora.keys())}

    # ---- server -----------------------------------------------------------------------------------------
    def init_state(self, lora: Mapping[str, torch.Tensor]) -> ServerState:
        """The state before round 1 from the initial global adapters (what clients start from)."""
        lora_modules(k for k in lora if lora_part(k) is not None)  # pairs check
        self._check_only_pairs(lora)
        return ServerState(lora={k: v.detach().clone() for k, v in lora.items()})

    def _check_only_pairs(self, lora: Mapping[str, torch.Tensor]) -> None:
        others = [k for k in lora if lora_part(k) is None]
        if self.lora_pairs_only and others:
            raise ValueError(f"rule {self.name!r} aggregates products B·A of LoRA factor pairs, so it cannot "
                             f"aggregate {len(others)} other tensor(s), e.g. {others[0]!r}; use fedit, ffa or "
                             "fedsa, or adapt only LoRA factors")

    def validate(self, state: ServerState, updates: Sequence[Update], weights: Sequence[float]) -> list[float]:
        """Check replies against the state (keys, shapes, dtypes, weights); return ``p_k = n_k / Σ n``."""
        p = normalized_weights(weights, len(updates))
        self._check_only_pairs(state.lora)
        validate_updates(updates, weights, expected=self.expected_upload(state),
                         rank_free=self.heterogeneous_ranks)
        return p

    def aggregate(self, state: ServerState, updates: Sequence[Update], weights: Sequence[float]) -> ServerState:
        """Validate the replies and return the next state. ``weights``: num-examples of each reply.

        With ``check_finite``, a NaN/Inf reply raises :class:`NonFiniteUpdateError` naming the client, and
        finite replies whose aggregate is not finite raise :class:`NonFiniteAggregateError` (``state`` is
        never changed: the caller keeps it)."""
        p = self.validate(state, updates, weights)
        new = self._aggregate(state, list(updates), p)
        if self.check_finite:
            bad = new.non_finite_parts()
            if bad:
                raise NonFiniteAggregateError(
                    f"the {self.name} aggregate of finite replies is not finite in {len(bad)} tensor(s), e.g. "
                    f"{bad[0]} (an overflow: the replies are too large)", parts=bad)
        new.round = state.round + 1
        return new

    def _aggregate(self, state: ServerState, updates: list[Update], p: list[float]) -> ServerState:
        """The rule itself: every rule (fedit.py, ffa.py, …) overrides this; the base class is not a rule."""
        raise TypeError(f"{type(self).__name__} is not an aggregation rule: it does not define _aggregate")

    def _average(self, updates: Sequence[Update], p: Sequence[float], keys: Sequence[str]) -> dict[str, torch.Tensor]:
        """``Σ p_k x_k`` of ``keys`` with the fused kernel (fp32 accumulation, NaN/Inf named per client)."""
        if not keys:
            return {}
        return weighted_sum_many(updates, p, keys=keys, check_finite=self.check_finite, backend=self.backend,
                                 threads=self.threads)

    # ---- norm bounding (devft.aggregation.norm_bound) ----------------------------------------------------
    def update_origin(self, state: ServerState, source: Any) -> dict[str, torch.Tensor]:
        """The uploaded tensors as the client received them this round (what its reply is an update of), in
        the reply's dtype: a float16 wire carries both ways, so a client that did not train has moved 0."""
        return {k: as_wire(state.lora[k], source, k) for k in self.upload_keys(state.lora)}

    def update_norms(self, state: ServerState, sources: Sequence[Any]) -> list[float]:
        """``‖x_k − o_k‖₂`` of each reply over its uploaded tensors: how far each client moved from
        :meth:`update_origin` (one pass over the replies)."""
        if not sources:
            return []
        return distances(sources, self.update_origin(state, sources[0]), backend=self.backend, threads=self.threads)

    def scale_update(self, state: ServerState, source: Any, factor: float) -> dict[str, torch.Tensor]:
        """The reply with its update scaled by ``factor`` (``o + factor · (x − o)``), as new tensors."""
        return moved_towards(source, self.update_origin(state, source), factor)

    def downlink(self, state: ServerState, *, full: bool = False, rank: int | None = None) -> dict[str, torch.Tensor]:
        """Tensors to send to a client this round. ``full`` also sends what a client may already hold (for a
        client that keeps nothing between rounds, or the first round of a stage); ``rank`` is the client's LoRA rank where ranks differ (svd)."""
        if rank is not None:
            raise ValueError(f"rule {self.name!r} sends one rank to every client; rank={rank} is not supported")
        parts = self.full_downloads if full and self.full_downloads is not None else self.downloads
        out = {}
        for key, value in state.lora.items():
            lp = lora_part(key)
            if lp is None or lp[1] in parts:
                out[key] = value
        for module, delta in state.base_delta.items():
            out.update(delta.payload(module))
        return out

    def effective_delta(self, state: ServerState) -> dict[str, torch.Tensor]:
        """``{module: total ΔW of the global model}`` = base delta + ``s · B A`` of the global adapters."""
        if self.personalised:
            raise ValueError(f"rule {self.name!r} is personalised (each client keeps its own "
                             f"{sorted(set(LORA_PARTS) - set(self.uploads))}): there is no single global "
                             "model; evaluate on the clients")
        out = {}
        for module, (ka, kb) in lora_modules(k for k in state.lora if lora_part(k) is not None).items():
            a, b = state.lora[ka].double(), state.lora[kb].double()
            delta = (self.alpha / a.shape[0]) * (b @ a)
            if module in state.base_delta:
                delta = delta + state.base_delta[module].materialize().double()
            out[module] = delta
        return out

    def payload_bytes(self, state: ServerState, client_lora: Mapping[str, torch.Tensor] | None = None,
                      *, full: bool = False, rank: int | None = None, wire_format: str = "arrays") -> tuple[int, int]:
        """``(up, down)`` bytes per client this round, as Flower counts the serialised records in
        ``wire_format`` (``arrays``: one array per tensor; ``packed``: :mod:`devft.aggregation.packed`);
        ``full`` and ``rank`` as in :meth:`downlink` (devft's Flower server sends ``full=True`` every round, except
        to FFA-LoRA's clients, which rebuild A: ``federation.rebuild_frozen``)."""
        count = {"arrays": payload_nbytes, "packed": packed_nbytes}.get(wire_format)
        if count is None:
            raise ValueError(f"unknown wire_format={wire_format!r}; choose 'arrays' or 'packed'")
        up = count(self.client_payload(client_lora if client_lora is not None else state.lora))
        down = count(self.downlink(state, full=full, rank=rank))
        return up, down


RULES: dict[str, type[AggregationRule]] = {}


def register(cls: type[AggregationRule]) -> type[AggregationRule]:
    """Class decorator adding a rule to :data:`RULES` under its ``name``."""
    if not cls.name or cls.name in RULES:
        raise ValueError(f"rule name {cls.name!r} is empty or already registered")
    RULES[cls.name] = cls
    return cls


def get_rule(name: str, *, alpha: float, **options: Any) -> AggregationRule:
    """The rule called ``name`` (``fedit``, ``ffa``, ``fedsa``, ``flora``, ``fedex``, ``svd``).

    ``alpha`` is the clients' LoRA alpha (scale ``alpha / r``); ``options`` go to the rule (``rank`` and ``solver`` for
    ``svd``; ``backend``, ``check_finite`` and ``threads``, the CPU threads of the weighted sum, for all).
    """
    if name not in RULES:
        raise ValueError(f"unknown aggregation rule={name!r}; choose one of {sorted(RULES)}")
    return RULES[name](alpha=alpha, **options)


__all__ = [
    "AggregationRule",
    "BaseDelta",
    "InvalidUpdateError",
    "RULES",
    "ServerState",
    "get_rule",
    "ideal_delta",
    "lora_modules",
    "lora_part",
    "register",
    "split_downlink",
]
