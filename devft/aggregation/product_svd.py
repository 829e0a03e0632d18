"""The top singular triples of a product ``M = b @ a`` of stacked LoRA factors, never forming ``M`` when it
need not (FlexLoRA's re-factorisation, ``devft.aggregation.svd``).

``b`` is ``(d_out, R)``, ``a`` is ``(R, d_in)``; ``R = Σ r_k`` grows with the clients while FlexLoRA keeps only
the top ``r``. Two solvers, both in float64:

- ``exact``: with ``R`` at most both sides, QR of both factors and the SVD of the ``R × R`` core; past a
  side, the SVD of ``b @ a``. Every singular value. Its cost grows like ``d · R²`` plus ``R³``.
- ``iterative``: block subspace iteration on ``M`` through its factors with Rayleigh–Ritz, ``k = 2r``
  vectors from a seeded random start (up to ``k − r`` of them taken from ``hint``: FlexLoRA passes the
  previous global A). Converged when every kept triple's residual ``‖M v_i − σ_i u_i‖`` is at most
  ``1e-10 · σ_1`` and the kept values moved by no more than that in the last step (a hinted subspace that
  is invariant but not the top one has residual 0 too; the power step moves it). The rank-r approximation
  then agrees with the exact one to about 1e-9 of ``σ_1`` where the spectrum has a gap at r (tested), far
  below the float32 the global adapters are stored in; without one, any answer is equally optimal.
  It runs through the factors, or through ``M`` once ``M`` has fewer entries than they do; its cost is
  ``‖M‖_F²`` (from the two ``R × R`` Gram matrices, or from ``M``) plus a few products with ``k`` columns,
  each one pass over the factors or ``M``.
  The exact solver answers instead when ``M`` is zero; when the rounding of ``‖M‖_F²`` (below
  ``4 R ε ‖b‖_F² ‖a‖_F²``) exceeds 1e-8 of it (replies that nearly cancel: the truncation's tail, reported
  as ``‖M‖_F²`` minus the kept ``σ²``, would be rounding; below that bound a tail under 1e-4 of ``‖M‖_F``
  may be rounding, at worst); and when the residual, falling at its latest
  rate, would not reach the target within ``max_iter`` steps (no gap after ``k``: a flat spectrum costs
  a few steps and then the exact solver's time).

``auto`` takes the iterative solver when the product's possible rank ``min(d_out, R, d_in)`` is at least
``6k`` (12 clients of rank r and more; about where the two cost the same on SmolLM2's shapes), the exact
one below.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import NamedTuple

import torch

SOLVERS = ("auto", "exact", "iterative")
RESIDUAL_TOL = 1e-10  # ‖M v_i − σ_i u_i‖ ≤ RESIDUAL_TOL · σ_1 for every kept triple
ENERGY_RESOLUTION = 1e-8  # ‖M‖_F²'s rounding bound at most this much of it (tails resolved to 1e-4 of ‖M‖ at worst), else exact


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

    ``hint`` (``(h, d_in)`` rows), e.g. the previous round's global LoRA A, is where
    the iterative solver starts (at most ``k − keep`` of them: the rest of the start stays random, so a hint
    that misses the top directions costs steps, not the answer)."""
    if solver not in SOLVERS:
        raise ValueError(f"svd solver must be one of {', '.join(SOLVERS)}, got solver={solver!r}")
    if int(keep) != keep or keep < 1:
        raise ValueError(f"keep must be a positive integer, got keep={keep!r}")
    b, a = b.double(), a.double()  # (d_out, R), (R, d_in)
    if hint is not None and (hint.dim() != 2 or hint.shape[1] != a.shape[1]):
        raise ValueError(f"hint must have rows of length {a.shape[1]} (a's columns), got hint of shape "
                         f"{tuple(hint.shape)}")
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

    With ``R`` at most both sides, ``b = Q_B R_B`` and ``aᵀ = Q_A R_A`` give ``b a = Q_B (R_B R_Aᵀ) Q_Aᵀ``, so
    only the ``R × R`` core is decomposed; past a side, ``b @ a`` itself (of rank at most that side).
    """
    b, a = b.double(), a.double()  # (d_out, R), (R, d_in)
    if b.shape[1] <= min(b.shape[0], a.shape[1]):
        qb, rb = torch.linalg.qr(b)  # (d_out, R), (R, R)
        qa, ra = torch.linalg.qr(a.T)  # (d_in, R), (R, R)
        u, s, vh = torch.linalg.svd(rb @ ra.T)  # (R, R) core
        u, v = qb @ u, qa @ vh.T  # mapped back whole, then cut: bit for bit what every run before ``keep`` did
    else:
        u, s, vh = torch.linalg.svd(b @ a, full_matrices=False)
        v = vh.T
    return u[:, :keep], s, v[:, :keep]


class _Operator(NamedTuple):
    """``M = b a`` as the iteration needs it: ``apply(x) = M x``, ``project(q) = qᵀ M`` and ``‖M‖_F²``."""

    apply: Callable[[torch.Tensor], torch.Tensor]
    project: Callable[[torch.Tensor], torch.Tensor]
    energy: float


def _operator(b: torch.Tensor, a: torch.Tensor) -> _Operator:
    """Through the factors, with ``‖M‖_F² = Σ (bᵀb) ⊙ (a aᵀ)`` from the two ``R × R`` Gram matrices; or, when
    ``M`` itself has fewer entries than the factors (``R`` above ``d_out·d_in / (d_out + d_in)``), through
    ``M``: one product to form it, then every pass reads fewer bytes."""
    d_out, rank, d_in = b.shape[0], b.shape[1], a.shape[1]
    if rank * (d_out + d_in) <= d_out * d_in:
        return _Operator(lambda x: b @ (a @ x), lambda q: (q.T @ b) @ a, float(((b.T @ b) * (a @ a.T)).sum()))
    m = b @ a  # (d_out, d_in)
    return _Operator(lambda x: m @ x, lambda q: q.T @ m, float(m.square().sum()))


def _orthonormal_columns(x: torch.Tensor) -> torch.Tensor:
    return torch.linalg.qr(x)[0]


def _iterative(b: torch.Tensor, a: torch.Tensor, keep: int, block: int, max_iter: int,
               hint: torch.Tensor | None) -> ProductSVD | None:
    """Subspace iteration with Rayleigh–Ritz on ``M = b a`` (see ``_operator``). None, for the exact solver to
    answer, when ``M`` is zero, when ``‖M‖_F²`` is lost in the rounding of factors far larger than their
    product (replies that nearly cancel), or when it has not converged within ``max_iter`` steps (or is
    on course not to)."""
    operator = _operator(b, a)
    energy = operator.energy
    # rounding of either route to ‖M‖_F² is below R·ε·‖b‖_F²‖a‖_F²: the tail needs it far below ‖M‖_F²
    rounding = 4 * b.shape[1] * torch.finfo(torch.float64).eps * float(b.square().sum()) * float(a.square().sum())
    if energy == 0.0 or rounding > ENERGY_RESOLUTION * energy:
        return None
    start = torch.randn(a.shape[1], block, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    hinted = 0 if hint is None else min(hint.shape[0], block - keep)
    if hinted > 0:  # at least keep random directions stay: the hint steers, it cannot trap
        start[:, :hinted] = hint[:hinted].T.double()
    q = _orthonormal_columns(operator.apply(start))  # (d_out, k): a basis of M's range, refined below
    previous, residuals = None, []
    for step in range(max_iter):
        projected = operator.project(q)  # Qᵀ M = Ũ Σ Vh, (k, d_in)
        ritz_u, sigma, ritz_vh = torch.linalg.svd(projected, full_matrices=False)
        u, v = q @ ritz_u[:, :keep], ritz_vh[:keep].T  # (d_out, keep), (d_in, keep)
        # one pass for both M V (the residual; Mᵀ u_i = σ_i v_i holds by construction) and M Mᵀ Q (the next
        # power step)
        applied = operator.apply(torch.cat([v, projected.T], dim=1))  # (d_out, keep + k)
        residual = float((applied[:, :keep] - u * sigma[:keep]).norm(dim=0).max())
        target = RESIDUAL_TOL * float(sigma[0])
        # converged: the kept triples are singular triples (residual) and the values have stopped rising
        # (an invariant subspace that is not the top one has residual 0 too, but the power step moves it)
        if previous is not None and residual <= target and float(
                (sigma[:keep] - previous).abs().max()) <= target:
            return ProductSVD(u, sigma, v, energy, "iterative")
        residuals.append(residual)
        if _on_course_to_miss(residuals, target, max_iter - step - 1):
            return None
        previous = sigma[:keep]
        q = _orthonormal_columns(applied[:, keep:])
    return None


def _on_course_to_miss(residuals: list[float], target: float, steps_left: int) -> bool:
    """From the third step on: whether the residual, falling at its latest rate, stays above ``target`` for
    the steps left (a spectrum without a gap after ``k``: hand over early rather than spend them)."""
    if len(residuals) < 3 or residuals[-1] <= target or residuals[-2] == 0.0:
        return False
    rate = residuals[-1] / residuals[-2]
    if rate >= 1.0:
        return True
    return residuals[-1] * rate ** steps_left > target
