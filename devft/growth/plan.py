"""The stage plan: a small, versioned JSON description from which any holder of the base model builds the
same submodel bit for bit, and the base-model fingerprint that ties a plan to its model."""

from __future__ import annotations

import hashlib
import json
import logging
import time
import weakref
from collections.abc import Mapping
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np
import torch
from torch import nn
from transformers import PreTrainedTokenizerBase

from devft.growth._params import strip_peft_name
from devft.growth.fusion import FUSION_MODES, LORA_FUSION_MODES
from devft.growth.grouping import (
    GROUPING_MODES,
    SELECTION_MODES,
    SIMILARITY_MODES,
    Groups,
    anchors_of,
    check_groups,
    group_layers,
)
from devft.growth.schedule import StageSchedule
from devft.growth.settings import GrowthSettings
from devft.growth.similarity import SIMILARITY_VIEWS, calibration_batch, layer_similarity
from devft.growth.transfer import TRANSFER_RULES
from devft.models import FAMILIES, decoder_layers, family_of, unwrap

log = logging.getLogger(__name__)

PLAN_VERSION = 1

# Runtime switches that do not change what a model computes from its weights.
_VOLATILE_CONFIG_KEYS = (
    "_name_or_path", "transformers_version", "_commit_hash", "dtype", "torch_dtype", "use_cache",
    "output_hidden_states", "output_attentions", "return_dict", "architectures",
)  # fmt: skip


class PlanError(ValueError):
    """A plan is malformed, of an unknown version, or inconsistent with itself."""


class PlanMismatchError(PlanError):
    """A plan was made for another base model than the one it is applied to."""


_FINGERPRINTS: weakref.WeakKeyDictionary[nn.Module, str] = weakref.WeakKeyDictionary()


def model_fingerprint(model: nn.Module) -> str:
    """``sha256:<hex>`` of the base model's config and every base tensor (name, dtype, shape, bytes).

    Peft adapters are ignored (a wrapped and a plain model agree). Computed once per model object and
    process; the base weights are assumed frozen (devft never changes them).
    """
    base = unwrap(model)
    cached = _FINGERPRINTS.get(base)
    if cached is not None:
        return cached
    start = time.perf_counter()
    digest = hashlib.sha256()
    config = {k: v for k, v in base.config.to_dict().items() if k not in _VOLATILE_CONFIG_KEYS}
    digest.update(json.dumps(config, sort_keys=True, default=str).encode())
    seen: dict[tuple[int, int, tuple[int, ...]], str] = {}
    for name, tensor in sorted(base.state_dict().items()):
        plain = strip_peft_name(name)
        if plain is None:
            continue
        ident = (tensor.untyped_storage().data_ptr(), tensor.storage_offset(), tuple(tensor.shape))
        header = f"{plain}|{tensor.dtype}|{tuple(tensor.shape)}"
        if ident in seen:  # a tied tensor (embeddings / LM head): hash the tie, not the bytes again
            digest.update(f"{header}=tied:{seen[ident]}\n".encode())
            continue
        seen[ident] = plain
        digest.update(f"{header}\n".encode())
        digest.update(tensor.detach().contiguous().cpu().view(torch.uint8).numpy().tobytes())
    result = "sha256:" + digest.hexdigest()[:32]
    _FINGERPRINTS[base] = result
    log.info("fingerprinted %s in %.2fs: %s", type(base).__name__, time.perf_counter() - start, result)
    return result


@dataclass(frozen=True)
class GrowthPlan:
    """What a client needs, besides the base model and the submodel LoRA, to build a stage's submodel.

    ``groups[k]`` (sorted layer indices) is fused into submodel layer ``k``; ``anchors[k] = groups[k][0]``.
    Stages are 0-based. For selection modes (``first``, ``spaced``) the groups are singletons of the kept
    layers and do not cover every layer.
    """

    stage: int
    capacity: int
    num_layers: int
    groups: Groups
    fusion: str
    beta: float
    lora_fusion: str
    transfer: str
    grouping: str
    similarity: str | None
    family: str
    base_fingerprint: str
    version: int = PLAN_VERSION

    def __post_init__(self) -> None:
        groups = tuple(tuple(int(i) for i in g) for g in self.groups)
        object.__setattr__(self, "groups", groups)
        object.__setattr__(self, "beta", float(self.beta))
        if self.version != PLAN_VERSION:
            raise PlanError(f"plan version={self.version!r} is not supported (this devft reads {PLAN_VERSION})")
        if self.stage < 0:
            raise PlanError(f"plan stage={self.stage!r} must be >= 0")
        if not 1 <= self.capacity <= self.num_layers:
            raise PlanError(f"plan capacity={self.capacity!r} must be in 1..num_layers={self.num_layers}")
        for name, allowed in (
            ("fusion", FUSION_MODES),
            ("lora_fusion", LORA_FUSION_MODES),
            ("transfer", TRANSFER_RULES),
            ("grouping", GROUPING_MODES),
            ("family", tuple(FAMILIES)),
        ):
            if getattr(self, name) not in allowed:
                raise PlanError(f"plan {name}={getattr(self, name)!r} is not one of {allowed}")
        if self.similarity is not None and self.similarity not in SIMILARITY_VIEWS:
            raise PlanError(f"plan similarity={self.similarity!r} is not one of {SIMILARITY_VIEWS}")
        if not (np.isfinite(self.beta) and self.beta >= 0):
            raise PlanError(f"plan beta={self.beta!r} must be finite and >= 0")
        if not str(self.base_fingerprint).startswith("sha256:"):
            raise PlanError(f"plan base_fingerprint={self.base_fingerprint!r} is not a devft fingerprint")
        partition = self.grouping not in SELECTION_MODES
        try:
            check_groups(groups, self.num_layers, self.capacity, partition=partition)
        except ValueError as err:
            raise PlanError(f"plan groups are invalid: {err}") from err

    @property
    def anchors(self) -> tuple[int, ...]:
        return anchors_of(self.groups)

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data["groups"] = [list(g) for g in self.groups]
        data["anchors"] = list(self.anchors)
        return data

    def to_json(self) -> str:
        """Canonical JSON (sorted keys, no whitespace): equal plans give equal strings."""
        return json.dumps(self.to_dict(), sort_keys=True, separators=(",", ":"))

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> GrowthPlan:
        data = dict(data)
        version = data.get("version")
        if version != PLAN_VERSION:
            raise PlanError(f"plan version={version!r} is not supported (this devft reads {PLAN_VERSION})")
        anchors = data.pop("anchors", None)
        expected = set(cls.__dataclass_fields__)
        missing, unknown = sorted(expected - set(data)), sorted(set(data) - expected)
        if missing or unknown:
            raise PlanError(f"plan fields do not match version {PLAN_VERSION}: missing {missing}, unknown {unknown}")
        plan = cls(**data)
        if anchors is not None and list(anchors) != list(plan.anchors):
            raise PlanError(f"plan anchors={anchors} disagree with its groups (anchors {list(plan.anchors)})")
        return plan

    @classmethod
    def from_json(cls, text: str) -> GrowthPlan:
        try:
            data = json.loads(text)
        except json.JSONDecodeError as err:
            raise PlanError(f"plan is not valid JSON: {err}") from err
        if not isinstance(data, dict):
            raise PlanError(f"plan JSON must be an object, got {type(data).__name__}")
        return cls.from_dict(data)

    def build_hash(self) -> str:
        """Hash of what determines the submodel's base weights (the on-disk cache key)."""
        key = {
            "version": self.version,
            "base_fingerprint": self.base_fingerprint,
            "groups": [list(g) for g in self.groups],
            "fusion": self.fusion,
            "beta": self.beta,
        }
        return hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:24]

    def check_model(self, model: nn.Module) -> None:
        """Raise :class:`PlanMismatchError` unless ``model`` is the base model this plan was made for."""
        family = family_of(model).name
        num_layers = len(decoder_layers(model))
        if family != self.family or num_layers != self.num_layers:
            raise PlanMismatchError(
                f"plan for a {self.num_layers}-layer {self.family!r} model cannot be applied to a "
                f"{num_layers}-layer {family!r} model"
            )
        fingerprint = model_fingerprint(model)
        if fingerprint != self.base_fingerprint:
            raise PlanMismatchError(
                f"plan was made for base model {self.base_fingerprint} but this model is {fingerprint}: "
                "client and server must hold the same base model (same weights, same dtype)"
            )


def make_plan(
    model: nn.Module,
    stage: int,
    capacity: int,
    settings: GrowthSettings,
    similarity: np.ndarray | None = None,
) -> GrowthPlan:
    """The plan of ``stage`` with ``capacity`` layers, grouped by ``settings.grouping`` (on ``similarity``)."""
    num_layers = len(decoder_layers(model))
    uses_similarity = settings.grouping in SIMILARITY_MODES and capacity < num_layers
    groups = group_layers(
        num_layers, capacity, settings.grouping, similarity if uses_similarity else None, settings.seed
    ) if capacity < num_layers else tuple((i,) for i in range(num_layers))
    return GrowthPlan(
        stage=stage,
        capacity=capacity,
        num_layers=num_layers,
        groups=groups,
        fusion=settings.fusion,
        beta=settings.beta,
        lora_fusion=settings.lora_fusion,
        transfer=settings.transfer,
        grouping=settings.grouping,
        similarity=settings.similarity if uses_similarity else None,
        family=family_of(model).name,
        base_fingerprint=model_fingerprint(model),
    )


def plan_stage(
    model: nn.Module,
    schedule: StageSchedule,
    stage: int,
    settings: GrowthSettings,
    lora: Mapping[str, torch.Tensor] | None = None,
    lora_scale: float = 1.0,
    tokenizer: PreTrainedTokenizerBase | None = None,
) -> tuple[GrowthPlan, np.ndarray | None]:
    """Plan ``stage`` of ``schedule`` from the current full-model LoRA state (what the server does).

    Returns the plan and the similarity matrix it grouped on (None when the mode needs none, or at full
    capacity). Functional views need ``tokenizer`` (for the built-in calibration texts).
    """
    capacity = schedule.capacities[stage]
    similarity = None
    if settings.grouping in SIMILARITY_MODES and capacity < schedule.num_layers:
        calibration = None
        if tokenizer is not None:
            calibration = calibration_batch(
                tokenizer, num_sequences=settings.calibration_sequences, max_length=settings.calibration_max_length
            )
        start = time.perf_counter()
        similarity = layer_similarity(
            model, settings.similarity, lora=lora, lora_scale=lora_scale, calibration=calibration
        )
        log.info("stage %d: %s similarity in %.2fs", stage, settings.similarity, time.perf_counter() - start)
    plan = make_plan(model, stage, capacity, settings, similarity)
    log.info("stage %d plan: %d layers, groups %s", stage, capacity, plan.groups)
    return plan, similarity
