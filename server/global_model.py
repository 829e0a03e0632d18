"""The server's own copy of the base model: plans stages, evaluates the global LoRA, saves the adapter.

The server holds one base model wrapped with LoRA (peft). It plans each stage from the current full-model
LoRA state (growth ignores the wrapper's adapters and uses the state it is given), evaluates the full model
with the global LoRA on the held-out set, evaluates the current submodel (built from the same base model),
and finally saves the global LoRA in peft's format.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from devft.config import RunConfig
from devft.data import Example
from devft.growth import GrowthPlan, build_submodel, plan_stage, submodel_lora, transfer_lora
from devft.models import LoadedModel, LoraState, attach_lora, load_lora_state, load_model, lora_state
from devft.training import EvalResult, eval_loss, evaluate
from server.methods import check_run, method_growth, method_rule, method_schedule

log = logging.getLogger(__name__)

_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


@dataclass
class StagePlan:
    """A planned stage: the plan clients build from, and the similarity matrix it was grouped on."""

    plan: GrowthPlan
    similarity: np.ndarray | None

    def record(self) -> dict[str, Any]:
        """JSON record for ``stages/stage-<s>.json``."""
        return {
            "plan": self.plan.to_dict(),
            "similarity": None if self.similarity is None else np.round(self.similarity, 6).tolist(),
        }


class GlobalModel:
    """Base model + global LoRA on the server (``test`` is the held-out set every method is evaluated on)."""

    def __init__(self, config: RunConfig, test: list[Example]) -> None:
        check_run(config)  # refuses bad combinations before any model is loaded (and before Ray starts)
        self.config = config
        self.test = test
        self.growth = method_growth(config)
        self.rule = method_rule(config)  # refuses impossible method/aggregation pairs before anything starts
        self.loaded: LoadedModel = load_model(config.model.name, dtype=_DTYPES[config.model.dtype])
        self.num_layers = self.loaded.num_layers
        self.schedule = method_schedule(config, self.num_layers)
        self.model = attach_lora(self.loaded.model, config.lora, seed=config.federation.seed)
        self._submodel: tuple[str, torch.nn.Module] | None = None

    @property
    def tokenizer(self):
        return self.loaded.tokenizer

    def initial_lora(self) -> LoraState:
        """The seeded fresh LoRA of the full model (A random from ``federation.seed``, B = 0): a copy."""
        return {k: v.clone() for k, v in lora_state(self.model).items()}

    def plan(self, stage: int, full_lora: LoraState) -> StagePlan:
        """Plan ``stage`` from the current full LoRA state."""
        plan, similarity = plan_stage(
            self.model,
            self.schedule,
            stage,
            self.growth,
            lora=full_lora,
            lora_scale=self.config.lora.scale,
            tokenizer=self.tokenizer,
        )
        return StagePlan(plan=plan, similarity=similarity)

    @staticmethod
    def submodel_lora(full_lora: LoraState, plan: GrowthPlan) -> LoraState:
        """The submodel's starting LoRA for ``plan`` (fused from the full state)."""
        return {k: v.float().contiguous() for k, v in submodel_lora(full_lora, plan).items()}

    @staticmethod
    def transfer(full_lora: LoraState, sub_lora: LoraState, plan: GrowthPlan) -> LoraState:
        """Knowledge transfer of the submodel's LoRA back into the full state."""
        return transfer_lora(full_lora, sub_lora, plan)

    def is_identity(self, plan: GrowthPlan) -> bool:
        """Whether the plan's submodel is the full model itself (every layer its own group, in order)."""
        return plan.capacity == self.num_layers and all(g == (i,) for i, g in enumerate(plan.groups))

    def evaluate_full(self, full_lora: LoraState) -> EvalResult:
        """Held-out loss (and exact-match accuracy when ``eval.generate``) of the full model + ``full_lora``."""
        load_lora_state(self.model, full_lora)
        return evaluate(self.model, self.tokenizer, self.test, self.config.eval, self.config.data.max_length)

    def evaluate_submodel(self, plan: GrowthPlan, sub_lora: LoraState) -> float:
        """Held-out loss of the stage's submodel with ``sub_lora`` (teacher forcing only, no generation)."""
        key = plan.to_json()
        if self._submodel is None or self._submodel[0] != key:
            self._submodel = None
            sub = build_submodel(self.model, plan)
            self._submodel = (key, attach_lora(sub, self.config.lora, seed=self.config.federation.seed))
        model = self._submodel[1]
        load_lora_state(model, sub_lora)
        examples = self.test[: self.config.eval.max_examples] if self.config.eval.max_examples else self.test
        return eval_loss(model, self.tokenizer, examples, self.config.eval.batch_size, self.config.data.max_length)

    def save_adapter(self, full_lora: LoraState, path: Path) -> None:
        """Save the global LoRA in peft's format (loads with ``PeftModel.from_pretrained`` on the base model)."""
        load_lora_state(self.model, full_lora)
        self.model.save_pretrained(str(path))
