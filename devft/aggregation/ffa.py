"""FFA-LoRA: A frozen at a shared random initialisation, only B trained and averaged (Sun et al.,
"Improving LoRA in Privacy-preserving Federated Learning", ICLR 2024).

Every client initialises A from the same seed and freezes it; ``B̄ = Σ p_k B_k``. Exact, because A is
common: ``B̄ A = Σ p_k B_k A``. Half FedIT's traffic.
Client: attach LoRA with the shared seed, :func:`~devft.aggregation.client_side.freeze_lora_A`, load B̄,
train, send B. Down, ``downlink()`` is B alone, for a client that holds A; ``downlink(full=True)`` adds A.
devft's Flower clients keep nothing between rounds but rebuild A themselves: the seeded initial A of the full
model, fused and transferred through the stage plans as the server did
(:func:`devft.growth.untrained_lora_for_plan`), checked against the server's digest
(:func:`~devft.aggregation.client_side.lora_digest`). So the server sends B alone, ``r · d_out`` per module
each way; it sends A too with ``federation.rebuild_frozen = false`` or ``growth.lora_fusion = "svd"``
(docs/design.md §3).
"""

from __future__ import annotations

from devft.aggregation.base import AggregationRule, ServerState, Update, register


@register
class FFA(AggregationRule):
    """Average B only; A stays the shared, frozen initialisation."""

    name = "ffa"
    paper = "Sun et al., Improving LoRA in Privacy-preserving Federated Learning, ICLR 2024"
    uploads = ("lora_B",)
    downloads = ("lora_B",)
    full_downloads = ("lora_A", "lora_B")
    frozen = ("lora_A",)
    exact = True

    def _aggregate(self, state: ServerState, updates: list[Update], p: list[float]) -> ServerState:
        avg = self._average(updates, p, self.upload_keys(state.lora))
        return ServerState(lora={**state.lora, **avg}, base_delta=dict(state.base_delta))
