"""The server's own copy of the base model: plans stages, evaluates the global LoRA, saves the adapter.

The server holds one base model wrapped with LoRA (peft). It plans each stage from the current full-model
LoRA state (growth ignores the wrapper's adapters and uses the state it is given), evaluates the full model
with the global LoRA on the held-out set, evaluates the current submodel (built from the same base model),
and finally saves the global LoRA in peft's format.

Rules that change the frozen base weights (FLoRA, FedEx-LoRA) give the server a cumulative base delta
``{module: (d_out, d_in)}`` of the full model besides the LoRA (a ProgFed submodel gets its layers' share,
:meth:`GlobalModel.submodel_delta`, and gives it back, :meth:`GlobalModel.merge_delta`): evaluation of the
full model and of the submodel applies it (``W = W₀ + Δ`` with
:func:`~devft.aggregation.client_side.set_base_delta`, then the LoRA on top: the rule's ``effective_delta``),
and :meth:`GlobalModel.save_adapter` exports the effective ``ΔW = Δ + s·B A`` of every module as a plain peft
LoRA of a higher rank, refactored by SVD without truncation below the exact rank (see ``_EXPORT_README``).
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from devft.aggregation import BaseDelta
from devft.aggregation.client_side import set_base_delta
from devft.config import RunConfig
from devft.data import Example
from devft.growth import (
    GrowthPlan,
    build_submodel,
    check_same_lora_modules,
    make_plan,
    model_fingerprint,
    plan_stage,
    put_layers,
    select_layers,
    submodel_lora,
    transfer_lora,
)
from devft.models import LoadedModel, LoraState, attach_lora, load_lora_state, load_model, lora_state
from devft.training import EvalResult, eval_loss, evaluate
from server.methods import check_run, method_growth, method_rule, method_schedule

log = logging.getLogger(__name__)

_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}

_EXPORT_README = """# Adapter of a {rule} run (base weights changed during training)

{rule} folds updates into the frozen base weights, so the learned model is ``W = W0 + D + s B A`` per adapted
module (``D`` the cumulative base delta the server kept, ``s B A`` the global LoRA). A peft adapter cannot hold
a dense base delta, so this adapter holds the *effective* change ``dW = D + s B A`` of every module,
refactored by SVD: ``dW = U S V^T``, ``lora_B = U S`` and ``lora_A = V^T``, at rank r = {rank} with
``lora_alpha = r`` (scale 1). The rank is an upper bound of every module's true rank (the base delta's
factored rank plus the LoRA rank, or ``min(d_out, d_in)`` once the delta is dense; zero-padded where a
module's bound is smaller), so nothing is truncated: the adapter reproduces the server's final model up to
float32 rounding. It loads with ``PeftModel.from_pretrained`` (and ``devft eval --adapter``) like any other.
"""
"""README written into the adapter directory of runs whose rule changes the base weights."""

_PERSONAL_README = """# Adapter of a FedSA-LoRA run (personalised: no global model)

FedSA-LoRA shares A and keeps every client's B on that client; the server never sees a B. This adapter holds
the shared, averaged ``lora_A`` and the initial ``lora_B`` (zero unless the run started from other adapters),
so on its own it is (close to) the base model, not the result of training. The personalised models
``(A, B_k)`` live on the clients, under ``<DEVFT_CACHE>/clients/<client-state key>/<partition id>/`` (the key is
in the checkpoint as ``client_state_key``): each client's newest ``personal-r<round>.safetensors`` holds its B of
every layer of the full model under ``full/`` (pair it with this adapter's A) and the B of the submodel it last
trained under ``sub/``. The run's ``eval_loss`` is the mean held-out loss of the personalised models of the
clients sampled in the evaluated round (see docs/federated.md).
"""
"""README written into the adapter directory of a personalised (FedSA-LoRA) run."""


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
        if self.schedule.num_stages > 1:  # stages build submodels: layers fused, selected, transferred into
            check_same_lora_modules(lora_state(self.model), self.loaded.family, self.num_layers, config.lora.targets)
        # plans name the base model by a fingerprint of its weights, which evaluations with a base delta
        # (FLoRA, FedEx-LoRA) change in place: take it now, from the pristine weights, once per process
        model_fingerprint(self.model)
        self._submodel: tuple[str, torch.nn.Module] | None = None
        self._full_plans: dict[int, GrowthPlan] = {}

    @property
    def tokenizer(self):
        return self.loaded.tokenizer

    def initial_lora(self) -> LoraState:
        """The seeded fresh LoRA of the full model (A random from ``federation.seed``, B = 0): a copy."""
        return {k: v.clone() for k, v in lora_state(self.model).items()}

    def plan(self, stage: int, full_lora: LoraState) -> StagePlan:
        """Plan ``stage`` from the current full LoRA state (and the pristine base weights)."""
        set_base_delta(self.model, {})
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

    @staticmethod
    def submodel_delta(base_delta: Mapping[str, BaseDelta], plan: GrowthPlan) -> dict[str, BaseDelta]:
        """The cumulative base delta of the submodel's modules, under its layer names (ProgFed's first L_s
        layers are the full model's own: the delta maps by layer index; fusing plans are refused)."""
        return select_layers(base_delta, plan, "the base delta (FLoRA, FedEx-LoRA)")

    @staticmethod
    def merge_delta(base_delta: Mapping[str, BaseDelta], sub_delta: Mapping[str, BaseDelta], plan: GrowthPlan
                    ) -> dict[str, BaseDelta]:
        """The full model's base delta with the submodel's (aggregated) one written back to its layers."""
        return put_layers(base_delta, sub_delta, plan, "the base delta (FLoRA, FedEx-LoRA)")

    def full_plan(self, stage: int) -> GrowthPlan:
        """The plan whose "submodel" is the full model (every layer its own group), labelled ``stage``: what
        clients build to evaluate their personalised full model (FedSA-LoRA) during an earlier stage."""
        cached = self._full_plans.get(stage)
        if cached is None:
            cached = self._full_plans[stage] = make_plan(self.model, stage, self.num_layers, self.growth)
        return cached

    def is_identity(self, plan: GrowthPlan) -> bool:
        """Whether the plan's submodel is the full model itself (every layer its own group, in order)."""
        return plan.capacity == self.num_layers and all(g == (i,) for i, g in enumerate(plan.groups))

    def evaluate_full(self, full_lora: LoraState, base_delta: dict[str, torch.Tensor] | None = None) -> EvalResult:
        """Held-out loss (and exact-match accuracy when ``eval.generate``) of the full model + ``full_lora``.

        ``base_delta``: ``{module: dense (d_out, d_in)}`` cumulative change of the frozen weights (FLoRA,
        FedEx-LoRA), applied as ``W₀ + Δ`` before the LoRA; None or empty = the pristine base weights.
        """
        set_base_delta(self.model, base_delta or {})
        load_lora_state(self.model, full_lora)
        return evaluate(self.model, self.tokenizer, self.test, self.config.eval, self.config.data.max_length)

    def evaluate_submodel(self, plan: GrowthPlan, sub_lora: LoraState, base_delta: dict[str, torch.Tensor] | None = None
                          ) -> float:
        """Held-out loss of the stage's submodel with ``sub_lora`` (teacher forcing only, no generation).

        ``base_delta``: the submodel's own ``{module: dense (d_out, d_in)}`` (:meth:`submodel_delta`), applied
        as in :meth:`evaluate_full`.
        """
        key = plan.to_json()
        if self._submodel is None or self._submodel[0] != key:
            self._submodel = None
            set_base_delta(self.model, {})  # built from W₀, as clients do: the submodel's own Δ goes on top
            sub = build_submodel(self.model, plan)
            self._submodel = (key, attach_lora(sub, self.config.lora, seed=self.config.federation.seed))
        model = self._submodel[1]
        set_base_delta(model, base_delta or {})
        load_lora_state(model, sub_lora)
        examples = self.test[: self.config.eval.max_examples] if self.config.eval.max_examples else self.test
        return eval_loss(model, self.tokenizer, examples, self.config.eval.batch_size, self.config.data.max_length)

    def save_adapter(self, full_lora: LoraState, path: Path, base_delta: Mapping[str, BaseDelta] | None = None) -> None:
        """Save the global LoRA in peft's format (loads with ``PeftModel.from_pretrained`` on the base model).

        With a non-empty ``base_delta`` the saved adapter is the effective ``ΔW`` of every module refactored
        exactly as a higher-rank LoRA (:data:`_EXPORT_README`, also written into ``path``). For a personalised
        rule a README says what the adapter is not.
        """
        set_base_delta(self.model, {})
        load_lora_state(self.model, full_lora)
        self.model.save_pretrained(str(path))
        if base_delta:
            rank = self._export_effective(full_lora, base_delta, path)
            (path / "README.md").write_text(_EXPORT_README.format(rule=self.rule.name, rank=rank))
            log.info("adapter: effective base delta + LoRA exported as a rank-%d LoRA to %s", rank, path)
        elif self.rule.personalised:
            (path / "README.md").write_text(_PERSONAL_README)

    def _export_effective(self, full_lora: LoraState, base_delta: Mapping[str, BaseDelta], path: Path) -> int:
        """Overwrite the adapter in ``path`` with ``SVD(Δ + s B A)`` per module at one exact rank; return it."""
        import json

        from safetensors.torch import save_file

        from devft.aggregation import lora_modules, lora_part

        modules = lora_modules(k for k in full_lora if lora_part(k) is not None)
        unknown = sorted(set(base_delta) - set(modules))
        if unknown:
            raise KeyError(f"base delta for modules without LoRA: {unknown[:3]}")
        lora_rank = {m: int(full_lora[ka].shape[0]) for m, (ka, _) in modules.items()}
        bounds = {}
        for module, (ka, kb) in modules.items():
            d_out, d_in = full_lora[kb].shape[0], full_lora[ka].shape[1]
            delta = base_delta.get(module)
            # factored: its stacked rank; dense: min(d_out, d_in) is the only bound that needs no tolerance
            delta_rank = 0 if delta is None else (delta.rank if delta.dense is None else min(d_out, d_in))
            bounds[module] = min(d_out, d_in, delta_rank + lora_rank[module])
        rank = max(bounds.values())
        tensors: dict[str, torch.Tensor] = {}
        for module, (ka, kb) in modules.items():
            a, b = full_lora[ka].double(), full_lora[kb].double()
            effective = (self.config.lora.scale * (b @ a))  # (d_out, d_in)
            if module in base_delta:
                effective = effective + base_delta[module].materialize().double()
            u, s, vh = torch.linalg.svd(effective, full_matrices=False)  # (d_out, k), (k,), (k, d_in)
            k = min(rank, s.shape[0])
            new_b = torch.zeros(effective.shape[0], rank, dtype=torch.float64)
            new_a = torch.zeros(rank, effective.shape[1], dtype=torch.float64)
            new_b[:, :k] = u[:, :k] * s[:k]
            new_a[:k] = vh[:k]
            tensors[ka], tensors[kb] = new_a.float().contiguous(), new_b.float().contiguous()
        save_file(tensors, str(path / "adapter_model.safetensors"), metadata={"format": "pt"})
        cfg_path = path / "adapter_config.json"
        cfg = json.loads(cfg_path.read_text())
        cfg.update(r=rank, lora_alpha=rank, use_rslora=False, rank_pattern={}, alpha_pattern={})
        cfg_path.write_text(json.dumps(cfg, indent=2, sort_keys=True))
        return rank
