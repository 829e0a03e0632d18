"""FedEx-LoRA: FedIT's average plus the residual folded into the frozen weights, exact (Singhal et al.,
"FedEx-LoRA: Exact Aggregation for Federated and Efficient Fine-Tuning of Foundation Models", ACL 2025).

``Ā = Σ p_k A_k``, ``B̄ = Σ p_k B_k`` as FedIT, and the residual ``ΔW_res = s (Σ p_k B_k A_k − B̄ Ā)`` is
added to every client's frozen weight, so ``W₀ + ΔW_res + s B̄ Ā = W₀ + s Σ p_k B_k A_k`` exactly.

What travels down: the averaged adapters plus the *cumulative* residual of every module (the residual of
one round is the rank-``(N+1) r`` product ``[B_1 … B_N, B̄] · [s p_1 A_1; …; s p_N A_N; −s Ā]``; sums over
rounds are sent factored while smaller than dense, dense afterwards). Cumulative for the same reason as
FLoRA: a client that reloads its base model or skipped rounds still ends on the exact weights. The price
is the paper's: a dense ``d_out × d_in`` matrix per module soon travels down every round.
Client: load Ā and B̄, :func:`~devft.aggregation.client_side.set_base_delta`, train, send A and B.
"""

from __future__ import annotations

import torch

from devft.aggregation.base import AggregationRule, BaseDelta, ServerState, Update, lora_modules, register
from devft.aggregation.sources import as_sources


@register
class FedEx(AggregationRule):
    """FedIT plus the exact residual, accumulated into the base delta of every module."""

    name = "fedex"
    paper = "Singhal et al., FedEx-LoRA: Exact Aggregation for Federated Fine-Tuning of Foundation Models, ACL 2025"
    exact = True
    lora_pairs_only = True
    changes_base = True

    def _aggregate(self, state: ServerState, updates: list[Update], p: list[float]) -> ServerState:
        keys = self.upload_keys(state.lora)
        avg = self._average(updates, p, keys)  # validates values (NaN/Inf) on the way
        sources = as_sources(updates)
        deltas = dict(state.base_delta)
        for module, (ka, kb) in lora_modules(keys).items():
            a_bar, b_bar = avg[ka].float(), avg[kb].float()
            s = self.alpha / a_bar.shape[0]
            b_parts = [src.tensor(kb).float() for src in sources] + [b_bar]  # (d_out, r) each
            a_parts = [(s * pk) * src.tensor(ka).float() for pk, src in zip(p, sources)] + [-s * a_bar]
            current = deltas.get(module, BaseDelta(b_bar.shape[0], a_bar.shape[1]))
            deltas[module] = current.plus(torch.cat(b_parts, dim=1), torch.cat(a_parts, dim=0))
        return ServerState(lora={**state.lora, **avg}, base_delta=deltas)
