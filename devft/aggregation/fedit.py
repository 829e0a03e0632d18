"""FedIT: average A and B separately (Zhang et al., "Towards Building the Federated GPT: Federated
Instruction Tuning", ICASSP 2024).

``Ā = Σ p_k A_k``, ``B̄ = Σ p_k B_k``. Not exact: ``B̄ Ā ≠ Σ p_k B_k A_k`` in general, the difference being
``Σ p_k B_k A_k − B̄ Ā = ½ Σ_{k,l} p_k p_l (B_k − B_l)(A_k − A_l)`` (zero only when the clients agree).
Client: load the global adapters, train both, send both.
"""

from __future__ import annotations

from devft.aggregation.base import AggregationRule, ServerState, Update, register


@register
class FedIT(AggregationRule):
    """Average every uploaded tensor (LoRA A and B, and any other adapter tensor) with the fused kernel."""

    name = "fedit"
    paper = "Zhang et al., Towards Building the Federated GPT: Federated Instruction Tuning, ICASSP 2024"
    exact = False

    def _aggregate(self, state: ServerState, updates: list[Update], p: list[float]) -> ServerState:
        avg = self._average(updates, p, self.upload_keys(state.lora))
        return ServerState(lora={**state.lora, **avg}, base_delta=dict(state.base_delta))
