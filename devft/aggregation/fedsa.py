"""FedSA-LoRA: share A, keep B personal (Guo et al., "Selective Aggregation for Low-Rank Adaptation in
Federated Learning", ICLR 2025).

``Ā = Σ p_k A_k`` is shared; each client's ``B_k`` never leaves it and persists across rounds (A learns
general knowledge, B client-specific knowledge). No single global model (``exact = None``): evaluation
happens on the clients, each with ``(Ā, B_k)``. Client: load Ā and its own B
(:func:`~devft.aggregation.client_side.prepare_round` with ``personal=``), train both, send A, keep B
(:func:`~devft.aggregation.client_side.finish_round`). With DevFT or ProgFed the server fuses and transfers Ā
between stages like any shared LoRA, and each client does the same with its own B
(:mod:`devft.growth.personal`).
"""

from __future__ import annotations

from devft.aggregation.base import AggregationRule, ServerState, Update, register


@register
class FedSA(AggregationRule):
    """Average A only; B stays on each client."""

    name = "fedsa"
    paper = "Guo et al., Selective Aggregation for Low-Rank Adaptation in Federated Learning, ICLR 2025"
    uploads = ("lora_A",)
    downloads = ("lora_A",)
    exact = None
    personalised = True

    def _aggregate(self, state: ServerState, updates: list[Update], p: list[float]) -> ServerState:
        avg = self._average(updates, p, self.upload_keys(state.lora))
        return ServerState(lora={**state.lora, **avg}, base_delta=dict(state.base_delta))
