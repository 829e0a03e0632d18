"""SVD (FlexLoRA-style): the exact average ``ΔW = Σ p_k s_k B_k A_k`` re-factored to rank r by a truncated
SVD (Bai et al., "Federated Fine-tuning of Large Language Models under Heterogeneous Tasks and Client
Resources", NeurIPS 2024).

``ΔW = U Σ Vᵀ``, keep the top ``r``: ``B = U_r Σ_r^{1/2} / √s``, ``A = Σ_r^{1/2} V_rᵀ / √s`` with ``s = alpha/r``,
so ``s B A`` is the best rank-r approximation of ``ΔW``: exact when ``rank ΔW ≤ r``, otherwise off by the tail
``‖ΔW − ΔW_r‖_F = (Σ_{i>r} σ_i²)^{1/2}`` (reported in ``state.info``). Clients may use different ranks: a client
of rank ``r_k ≤ r`` receives the top ``r_k`` components (``downlink(state, rank=r_k)``).

The SVD never forms ΔW when it need not: it works on the stacked factors ``ΔW = B_s A_s`` (rank
``R = Σ r_k``), exactly through their QR below 12 clients of rank r, by subspace iteration from there on,
started from the previous global A (``devft.aggregation.product_svd``: the same ``s B A`` to float32
rounding, though a column of B and its row of A may both flip sign; a fraction of the time).
Directions with ``σ = 0`` (numerically), or beyond the stacked rank, get a zero B column and a non-zero A row
(the previous A's, or a seeded draw like peft's initial A where the server's rank exceeds the previous one),
so a LoRA direction never dies (``ΔW`` is unchanged by it).

Client: load A and B (of its rank), train, send both.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import torch

from devft.aggregation.base import (
    AggregationRule,
    ServerState,
    Update,
    as_wire,
    lora_modules,
    lora_part,
    register,
)
from devft.aggregation.norm_bound import distances
from devft.aggregation.product_svd import SOLVERS, svd_of_product
from devft.aggregation.sources import as_sources
from devft.aggregation.validation import validate_updates


def _trainable_rows(prev_a: torch.Tensor, rows: list[int], seed: int) -> torch.Tensor:
    """A rows for directions without a component: the previous A's row where it has one, else a row drawn
    (seeded, so every server draws the same) like peft's initial A, ``U(−1/√d_in, 1/√d_in)``."""
    out = torch.empty(len(rows), prev_a.shape[1], dtype=torch.float64)
    bound = 1.0 / math.sqrt(prev_a.shape[1])
    generator = torch.Generator().manual_seed(seed)
    for j, i in enumerate(rows):
        out[j] = prev_a[i].double() if i < prev_a.shape[0] else torch.empty(
            prev_a.shape[1], dtype=torch.float64).uniform_(-bound, bound, generator=generator)
    return out


@register
class SVD(AggregationRule):
    """Exact average of the products, then the best rank-r factorisation of it."""

    name = "svd"
    paper = "Bai et al., Federated Fine-tuning of LLMs under Heterogeneous Tasks and Client Resources (FlexLoRA), NeurIPS 2024"
    exact = False
    lora_pairs_only = True
    heterogeneous_ranks = True

    def __init__(self, *, alpha: float, rank: int | None = None, solver: str = "auto", backend: str = "auto",
                 check_finite: bool = True, threads: int | None = None) -> None:
        super().__init__(alpha=alpha, backend=backend, check_finite=check_finite, threads=threads)
        if rank is not None and (int(rank) != rank or rank < 1):
            raise ValueError(f"svd rank must be a positive integer, got rank={rank!r}")
        if solver not in SOLVERS:
            raise ValueError(f"svd solver must be one of {', '.join(SOLVERS)}, got solver={solver!r}")
        self.rank = rank
        self.solver = solver

    def _aggregate(self, state: ServerState, updates: list[Update], p: list[float]) -> ServerState:
        sources = as_sources(updates)
        lora = dict(state.lora)
        tails: list[float] = []
        for index, (ka, kb) in enumerate(lora_modules(self.upload_keys(state.lora)).values()):
            prev_a, prev_b = state.lora[ka], state.lora[kb]
            r = self.rank or prev_a.shape[0]
            b_parts, a_parts = [], []
            for pk, src in zip(p, sources):
                a = src.tensor(ka).double()
                a_parts.append((pk * self.alpha / a.shape[0]) * a)
                b_parts.append(src.tensor(kb).double())
            b_s, a_s = torch.cat(b_parts, dim=1), torch.cat(a_parts, dim=0)
            if self.check_finite and not (bool(torch.isfinite(b_s).all()) and bool(torch.isfinite(a_s).all())):
                validate_updates(updates, check_finite=True, rank_free=True)  # names the client and key
            found = svd_of_product(b_s, a_s, r, solver=self.solver, hint=prev_a)
            u, sigma, v = found.u, found.sigma, found.v
            tails.append(math.sqrt(found.tail_energy(r) / found.energy) if found.energy > 0 else 0.0)
            keep = min(r, sigma.numel())
            root = sigma[:keep].sqrt() / math.sqrt(self.alpha / r)
            new_b = torch.zeros(prev_b.shape[0], r, dtype=torch.float64)
            new_a = torch.zeros(r, prev_a.shape[1], dtype=torch.float64)
            new_b[:, :keep] = u[:, :keep] * root
            new_a[:keep] = root[:, None] * v[:, :keep].T
            floor = float(sigma[0]) * 1e-12 if sigma.numel() else 0.0
            dead = [i for i in range(r) if i >= keep or float(sigma[i]) <= floor]
            if dead:  # B column 0 (ΔW unchanged) and a non-zero A row, so the direction trains on
                new_b[:, dead] = 0.0
                new_a[dead] = _trainable_rows(prev_a, dead, seed=(state.round << 20) + index)
            lora[ka] = new_a.to(prev_a.dtype)
            lora[kb] = new_b.to(prev_b.dtype)
        info = {"svd_tail_rel_max": max(tails, default=0.0), "svd_tail_rel_mean": sum(tails) / max(1, len(tails))}
        return ServerState(lora=lora, base_delta=dict(state.base_delta), info=info)

    def update_origin(self, state: ServerState, source: Any) -> dict[str, torch.Tensor]:
        """What a client of the reply's rank received: the top components of the global adapters. A reply of
        a rank above the server's (aggregated all the same) is measured from the global adapters padded
        with zero components, rescaled to its ``alpha / rank`` (the same ``s B A``)."""
        keys = self.upload_keys(state.lora)
        rank = self._reply_rank(state, source)
        server_rank = next((state.lora[k].shape[0] for k in keys if (lora_part(k) or ("", ""))[1] == "lora_A"), None)
        if rank is None or server_rank is None or rank <= server_rank:
            sent = self.downlink(state, rank=rank)
            return {k: as_wire(sent[k], source, k) for k in keys}
        sent, factor = self.downlink(state), math.sqrt(rank / server_rank)
        out = {}
        for k in keys:
            part, value = (lora_part(k) or ("", ""))[1], sent[k]
            if part == "lora_A":  # (server_rank, d_in) → (rank, d_in)
                value = torch.cat([value * factor, value.new_zeros(rank - server_rank, value.shape[1])])
            elif part == "lora_B":  # (d_out, server_rank) → (d_out, rank)
                value = torch.cat([value * factor, value.new_zeros(value.shape[0], rank - server_rank)], dim=1)
            out[k] = as_wire(value, source, k)
        return out

    def update_norms(self, state: ServerState, sources: Sequence[Any]) -> list[float]:
        """Each reply's distance from what its rank received (one pass per rank)."""
        ranks = [self._reply_rank(state, src) for src in sources]
        out = [0.0] * len(sources)
        for rank in sorted(set(ranks), key=str):
            chosen = [i for i, r in enumerate(ranks) if r == rank]
            norms = distances([sources[i] for i in chosen], self.update_origin(state, sources[chosen[0]]),
                              backend=self.backend, threads=self.threads)
            for i, norm in zip(chosen, norms):
                out[i] = norm
        return out

    def _reply_rank(self, state: ServerState, source: Any) -> int | None:
        """The LoRA rank of a reply (of its first A), None when it has no LoRA A."""
        keys = self.upload_keys(state.lora)
        return next((source.meta(k)[1][0] for k in keys if (lora_part(k) or ("", ""))[1] == "lora_A"), None)

    def downlink(self, state: ServerState, *, full: bool = False, rank: int | None = None) -> dict[str, torch.Tensor]:
        """The global adapters, or their top ``rank`` components rescaled to the client's ``alpha / rank``."""
        out = super().downlink(state, full=full)
        if rank is None:
            return out
        for ka, kb in lora_modules(k for k in out if lora_part(k) is not None).values():
            r = out[ka].shape[0]
            if rank > r:
                raise ValueError(f"client rank {rank} exceeds the server's svd rank {r}; set the svd rank to the "
                                 "largest client rank")
            factor = math.sqrt(rank / r)  # s_r B A = s_k (cB)(cA) needs c² = s_r / s_k = rank / r
            out[ka] = out[ka][:rank] * factor
            out[kb] = out[kb][:, :rank] * factor
        return out
