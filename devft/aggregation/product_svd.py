"""The top singular triples of a product ``M = b @ a`` of stacked LoRA factors, never forming ``M`` when it
need not (FlexLoRA's re-factorisation, ``devft.aggregation.svd``).

``b`` is ``(d_out, R)``, ``a`` is ``(R, d_in)``; ``R = Σ r_k`` grows with the clients while FlexLoRA keeps only
the top ``r``. Two solvers, both in float64:

- ``exact``: QR of each side longer than ``R``, then the SVD of the (at most ``R × R``) core; every singular
  value. Its cost grows like ``d · R²`` plus ``R³``.
- ``iterative``: block subspace iteration on ``M`` through its factors with Rayleigh–Ritz, ``k = 2r``
  vectors from a seeded random start (its first vectors taken from ``hint``: FlexLoRA passes the previous
  global A), run until every kept triple's residual ``‖M v_i − σ_i u_i‖`` is at most ``1e-10 · σ_1``; if
  that does not happen within ``max_iter`` steps (no spectral gap after ``k``), the exact solver answers
  instead. The rank-r approximation then agrees with the exact one to about 1e-9 of ``σ_1`` (tested), far
  below the float32 the global adapters are stored in. Its cost is ``‖M‖_F²`` (two Gram matrices, or ``M``
  itself, whichever is fewer operations: the truncation's tail is reported exactly) plus a few products
  with ``k`` columns, each one pass over the factors.

``auto`` takes the iterative solver when the product's possible rank ``min(d_out, R, d_in)`` is at least
``6k`` (12 clients of rank r and more; about where the two cost the same on SmolLM2's shapes), the exact
one below.
"""

from __future__ import annotations

from typing import NamedTuple

import torch

SOLVERS = ("auto", "exact", "iterative")
RESIDUAL_TOL = 1e-10  # ‖M v_i − σ_i u_i‖ ≤ RESIDUAL_TOL · σ_1 for every kept triple


class ProductSVD(NamedTuple):
    """``u`` (d_out, ≤ keep), ``sigma`` (descending, at least the kept values), ``v`` (d_in, ≤ keep) and
    ``energy = ‖M‖_F²``; the best rank-``keep`` approximation is ``u diag(σ) vᵀ`` and its squared error is
    ``energy − Σ σ_i²`` over the kept values."""

    u: torch.Tensor
    sigma: torch.Tensor
    v: torch.Tensor
    energy: float
    solver: str

    def tail_energy(self, keep: int) -> float:
        """``‖M − M_keep‖_F²``: the sum of the dropped σ² where every value is known (exact), else what the
        kept ones leave of ``‖M‖_F²``."""
        if self.solver == "exact":
            return float(self.sigma[keep:].pow(2).sum())
        return max(self.energy - float(self.sigma[:keep].pow(2).sum()), 0.0)


def svd_of_product(b: torch.Tensor, a: torch.Tensor, keep: int, *, solver: str = "auto", max_iter: int = 30,
                   hint: torch.Tensor | None = None) -> ProductSVD:
    """The top ``keep`` singular triples of ``b @ a`` (see the module docstring for the solvers).

    ``hint`` (rows in ``b @ a``'s row space, ``(h, d_in)``), e.g. the previous round's global LoRA A, is where
    the iterative solver starts: the clients' average moved from it, so the top directions are near it and
    fewer steps are needed. It changes the steps, not what they converge to."""
    if solver not in SOLVERS:
        raise ValueError(f"svd solver must be one of {', '.join(SOLVERS)}, got solver={solver!r}")
    if int(keep) != keep or keep < 1:
        raise ValueError(f"keep must be a positive integer, got keep={keep!r}")
    b, a = b.double(), a.double()  # (d_out, R), (R, d_in)
    possible_rank = min(b.shape[0], b.shape[1], a.shape[1])
    block = min(2 * keep, possible_rank)
    if solver == "iterative" or (solver == "auto" and possible_rank >= 6 * block):
        found = _iterative(b, a, keep, block, max_iter, hint)
        if found is not None:
            return found
    u, sigma, v = truncated_svd_of_product(b, a, keep=keep)
    return ProductSVD(u, sigma, v, float(sigma.pow(2).sum()), "exact")


def truncated_svd_of_product(b: torch.Tensor, a: torch.Tensor, keep: int | None = None
                             ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``U, σ, V`` with ``b @ a = U diag(σ) Vᵀ`` (fp64, thin, σ descending): all the singular values, and the
    first ``keep`` singular vectors (all when None).

    A side longer than the inner rank ``R`` is replaced by the triangle of its QR (``b = Q_B R_B``,
    ``aᵀ = Q_A R_A``), so the SVD is of the core ``R_B R_Aᵀ`` (at most ``R × R``), never of ``b @ a`` unless
    ``R`` reaches both sides.
    """
    b, a = b.double(), a.double()  # (d_out, R), (R, d_in)
    rank = b.shape[1]
    qb, left = torch.linalg.qr(b) if rank < b.shape[0] else (None, b)  # left: (min(d_out, R), R)
    qa, right = torch.linalg.qr(a.T) if rank < a.shape[1] else (None, a.T)  # right: (min(d_in, R), R)
    u, s, vh = torch.linalg.svd(left @ right.T, full_matrices=False)
    # mapped back whole, then cut: the same rounding as every run before ``keep`` existed (bit for bit)
    u, v = (u if qb is None else qb @ u), (vh.T if qa is None else qa @ vh.T)
    return u[:, :keep], s, v[:, :keep]


def frobenius_sq_of_product(b: torch.Tensor, a: torch.Tensor) -> float:
    """``‖b @ a‖_F² = Σ (bᵀb) ⊙ (a aᵀ)`` through the two ``R × R`` Gram matrices, or through ``b @ a`` when
    that takes fewer operations (``R`` above ``d_out·d_in / (d_out + d_in)``)."""
    d_out, rank, d_in = b.shape[0], b.shape[1], a.shape[1]
    if rank * (d_out + d_in) <= d_out * d_in:
        return float(((b.T @ b) * (a @ a.T)).sum())
    return float((b @ a).pow(2).sum())


def _orthonormal_columns(x: torch.Tensor) -> torch.Tensor:
    return torch.linalg.qr(x)[0]


def _iterative(b: torch.Tensor, a: torch.Tensor, keep: int, block: int, max_iter: int,
               hint: torch.Tensor | None) -> ProductSVD | None:
    """Subspace iteration with Rayleigh–Ritz on ``M = b a`` (``M x = b (a x)``); None when it has not converged
    within ``max_iter`` steps or ``M`` is zero."""
    energy = frobenius_sq_of_product(b, a)
    if energy == 0.0:
        return None
    start = torch.randn(a.shape[1], block, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    if hint is not None:
        if hint.dim() != 2 or hint.shape[1] != a.shape[1]:
            raise ValueError(f"hint must have rows of length {a.shape[1]}, got shape {tuple(hint.shape)}")
        rows = min(hint.shape[0], block)
        start[:, :rows] = hint[:rows].T.double()  # the rest stays random: directions the hint lacks
    q = _orthonormal_columns(b @ (a @ start))  # (d_out, k): a basis of M's range, refined below
    for _ in range(max_iter):
        projected = (q.T @ b) @ a  # Qᵀ M = Ũ Σ Vh, (k, d_in)
        ritz_u, sigma, ritz_vh = torch.linalg.svd(projected, full_matrices=False)
        u, v = q @ ritz_u[:, :keep], ritz_vh[:keep].T  # (d_out, keep), (d_in, keep)
        # one pass over b and a for both M V (the residual; Mᵀ u_i = σ_i v_i holds by construction) and
        # M Mᵀ Q (the next power step)
        applied = b @ (a @ torch.cat([v, projected.T], dim=1))  # (d_out, keep + k)
        residual = (applied[:, :keep] - u * sigma[:keep]).norm(dim=0).max()
        if float(residual) <= RESIDUAL_TOL * float(sigma[0]):
            return ProductSVD(u, sigma, v, energy, "iterative")
        q = _orthonormal_columns(applied[:, keep:])
    return None
