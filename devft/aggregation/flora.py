"""FLoRA: stacking, exact and rank-heterogeneous (Wang et al., "FLoRA: Federated Fine-Tuning Large Language
Models with Heterogeneous Low-Rank Adaptations", NeurIPS 2024).

Each round the server stacks the clients' adapters, ``A = [p_1 s_1 A_1; …; p_N s_N A_N]`` (rank ``Σ r_k``) and
``B = [B_1 … B_N]``, so ``B A = Σ p_k s_k B_k A_k`` exactly, whatever each client's rank. As in the paper,
clients merge that product into their frozen base weights and start the next round from fresh LoRA.

Our choice for what travels down: the *cumulative* merged update of every module since the pristine base,
as the stacked factors while they are smaller than the dense ``(d_out, d_in)`` matrix and as the dense
product afterwards (:class:`~devft.aggregation.base.BaseDelta`); the scale ``p_k s_k`` is folded into the
stacked A. Cumulative, because Flower clients reload their base model in each new process and may skip
rounds: ``set_base_delta`` then puts every client on the same weights. No adapters travel down.
Client: :func:`~devft.aggregation.client_side.set_base_delta`, then
:func:`~devft.aggregation.client_side.reinit_lora` (A fresh from a round seed, B = 0), train, send A and B.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

import torch

from devft.aggregation.base import (
    AggregationRule,
    BaseDelta,
    ServerState,
    Update,
    lora_modules,
    lora_part,
    register,
)
from devft.aggregation.norm_bound import moved_towards
from devft.aggregation.sources import as_sources
from devft.aggregation.validation import validate_updates


@register
class FLoRA(AggregationRule):
    """Stack every client's (possibly different-rank) adapters and fold the product into the base."""

    name = "flora"
    paper = "Wang et al., FLoRA: Federated Fine-Tuning LLMs with Heterogeneous Low-Rank Adaptations, NeurIPS 2024"
    downloads = ()
    fresh_lora_each_round = True
    exact = True
    lora_pairs_only = True
    heterogeneous_ranks = True
    changes_base = True

    def init_state(self, lora: Mapping[str, torch.Tensor]) -> ServerState:
        """Fold a non-zero initial ``s B₀ A₀`` into the base delta and zero B: clients start from fresh LoRA."""
        state = super().init_state(lora)
        for module, (ka, kb) in lora_modules(k for k in lora if lora_part(k) is not None).items():
            a, b = state.lora[ka], state.lora[kb]
            if bool(b.abs().sum() > 0):
                zero = BaseDelta(b.shape[0], a.shape[1])
                state.base_delta[module] = zero.plus((self.alpha / a.shape[0]) * b.float(), a.float())
                state.lora[kb] = torch.zeros_like(b)
        return state

    def update_norms(self, state: ServerState, sources: Sequence[Any]) -> list[float]:
        """``(Σ_modules ‖s B_k A_k‖_F²)^{1/2}`` of each reply: what it folds into the model (its LoRA started
        at ``B = 0``). ``‖B A‖_F² = Σ (BᵀB) ⊙ (A Aᵀ)``: ``r × r`` products, no ``d_out × d_in`` matrix."""
        modules = lora_modules(self.upload_keys(state.lora)).values()
        out = []
        for source in sources:
            total = 0.0
            for ka, kb in modules:
                a, b = source.tensor(ka).double(), source.tensor(kb).double()  # (r, d_in), (d_out, r)
                s = self.alpha / a.shape[0]
                total += s * s * float(((b.T @ b) * (a @ a.T)).sum())
            out.append(math.sqrt(max(total, 0.0)))  # rounding can make a zero product's sum -1e-300
        return out

    def scale_update(self, state: ServerState, source: Any, factor: float) -> dict[str, torch.Tensor]:
        """The reply with every B scaled by ``factor`` (so each ``s B A`` is), A unchanged."""
        modules = lora_modules(self.upload_keys(state.lora))
        origins = {kb: torch.zeros(()) for _, kb in modules.values()}  # B started at 0
        return moved_towards(source, origins, factor)

    def _aggregate(self, state: ServerState, updates: list[Update], p: list[float]) -> ServerState:
        sources = as_sources(updates)
        deltas = dict(state.base_delta)
        for module, (ka, kb) in lora_modules(self.upload_keys(state.lora)).items():
            a_parts, b_parts = [], []
            for pk, src in zip(p, sources):
                a = src.tensor(ka).float()  # (r_k, d_in)
                a_parts.append((pk * self.alpha / a.shape[0]) * a)
                b_parts.append(src.tensor(kb).float())  # (d_out, r_k)
            stacked_b = torch.cat(b_parts, dim=1)  # (d_out, Σ r_k)
            stacked_a = torch.cat(a_parts, dim=0)  # (Σ r_k, d_in)
            if self.check_finite and not (bool(torch.isfinite(stacked_a).all()) and bool(torch.isfinite(stacked_b).all())):
                validate_updates(updates, check_finite=True, rank_free=True)  # names the client and key
            current = deltas.get(module, BaseDelta(stacked_b.shape[0], stacked_a.shape[1]))
            deltas[module] = current.plus(stacked_b, stacked_a)
        return ServerState(lora=dict(state.lora), base_delta=deltas)
