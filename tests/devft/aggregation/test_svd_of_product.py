"""FlexLoRA's SVD of a stacked product against a dense SVD of the product, in each of its four layouts:
the inner rank ``R`` below both sides (QR of both factors), at or above one side (QR of the other only),
at or above both (the product's own SVD)."""

from __future__ import annotations

import pytest
import torch

from devft.aggregation.product_svd import svd_of_product, truncated_svd_of_product


@pytest.mark.parametrize(("d_out", "rank", "d_in"), [
    (48, 12, 40),   # R below both sides
    (12, 20, 40),   # R above d_out only (a k/v projection with many clients)
    (40, 20, 12),   # R above d_in only
    (16, 16, 30),   # R equal to d_out
    (10, 30, 14),   # R above both: rank ΔW ≤ 10
])
@pytest.mark.parametrize("keep", [None, 3])
def test_agrees_with_a_dense_svd_of_the_product(d_out, rank, d_in, keep):
    g = torch.Generator().manual_seed(d_out * 1000 + rank * 10 + d_in)
    b = torch.randn(d_out, rank, generator=g, dtype=torch.float64)
    a = torch.randn(rank, d_in, generator=g, dtype=torch.float64)
    u, sigma, v = truncated_svd_of_product(b.float(), a.float())  # float32 factors come back in float64
    assert u.dtype == sigma.dtype == v.dtype == torch.float64
    u, sigma, v = truncated_svd_of_product(b, a, keep=keep)
    product = b @ a
    expected = torch.linalg.svdvals(product)
    stacked_rank = min(d_out, rank, d_in)
    assert sigma.shape == (stacked_rank,)  # every singular value the product can have, kept or not
    torch.testing.assert_close(sigma, expected[:stacked_rank], atol=1e-12 * float(expected[0]), rtol=0)
    assert float(expected[stacked_rank:].abs().sum()) < 1e-12 * float(expected[0])
    columns = stacked_rank if keep is None else keep
    assert u.shape == (d_out, columns) and v.shape == (d_in, columns)
    torch.testing.assert_close(u.T @ u, torch.eye(columns, dtype=torch.float64), atol=1e-12, rtol=0)
    torch.testing.assert_close(v.T @ v, torch.eye(columns, dtype=torch.float64), atol=1e-12, rtol=0)
    # each kept triple is a singular triple of the product (up to the sign shared by u_i and v_i)
    torch.testing.assert_close(product @ v, u * sigma[:columns], atol=1e-10 * float(expected[0]), rtol=0)
    if keep is None:
        torch.testing.assert_close(u @ torch.diag(sigma) @ v.T, product, atol=1e-10 * float(expected[0]), rtol=0)


def test_a_product_of_lower_rank_has_zero_trailing_values():
    g = torch.Generator().manual_seed(5)
    shared = torch.randn(24, 2, generator=g, dtype=torch.float64)
    b = torch.cat([shared, 2 * shared, -shared], dim=1)  # 3 clients, one direction pair: rank ΔW = 2
    a = torch.randn(6, 30, generator=g, dtype=torch.float64)
    _, sigma, _ = truncated_svd_of_product(b, a, keep=2)
    assert float(sigma[1]) > 1e-3 * float(sigma[0])
    assert float(sigma[2:].abs().max()) < 1e-12 * float(sigma[0])


def federated_factors(d_out: int, d_in: int, clients: int, rank: int, seed: int, spread: float = 0.05):
    """Stacked factors of ``clients`` replies that started from one global LoRA and moved apart, weighted:
    a product with a strong rank-``rank`` part and a decaying tail, like FlexLoRA's real rounds."""
    g = torch.Generator().manual_seed(seed)
    b0 = torch.randn(d_out, rank, generator=g, dtype=torch.float64) * torch.logspace(0, -1, rank, dtype=torch.float64)
    a0 = torch.randn(rank, d_in, generator=g, dtype=torch.float64)
    weights = torch.rand(clients, generator=g, dtype=torch.float64) + 0.5
    weights = weights / weights.sum()
    b = torch.cat([b0 + spread * torch.randn(d_out, rank, generator=g, dtype=torch.float64) for _ in range(clients)], 1)
    a = torch.cat([w * (a0 + spread * torch.randn(rank, d_in, generator=g, dtype=torch.float64)) for w in weights])
    return b, a


def assert_same_triples(found, exact, keep: int, scale: float):
    torch.testing.assert_close(found.sigma[:keep], exact.sigma[:keep], atol=1e-11 * scale, rtol=0)
    # the rank-keep approximation, which is what FlexLoRA sends (signs of u_i and v_i cancel in it)
    approx = found.u @ torch.diag(found.sigma[:keep]) @ found.v.T
    best = exact.u @ torch.diag(exact.sigma[:keep]) @ exact.v.T
    torch.testing.assert_close(approx, best, atol=1e-9 * scale, rtol=0)
    assert found.energy == pytest.approx(exact.energy, rel=1e-12)


@pytest.mark.parametrize(("d_out", "d_in", "clients", "rank"), [
    (200, 160, 16, 4),  # R = 64 ≥ 6·(2r): auto goes iterative; through the factors and their Gram matrices
    (96, 80, 16, 4),   # the same R: through ΔW itself, which has fewer entries than the factors
    (40, 72, 16, 2),   # R above d_out: possible rank d_out
    (120, 60, 30, 3),  # R above both sides: the energy through b @ a, not the Grams
])
def test_iterative_solver_agrees_with_the_exact_one(d_out, d_in, clients, rank):
    b, a = federated_factors(d_out, d_in, clients, rank, seed=d_out + d_in)
    exact = svd_of_product(b, a, rank, solver="exact")
    found = svd_of_product(b, a, rank, solver="iterative")
    assert (exact.solver, found.solver) == ("exact", "iterative")
    assert found.u.shape == (d_out, rank) and found.v.shape == (d_in, rank)
    assert_same_triples(found, exact, rank, float(exact.sigma[0]))
    assert svd_of_product(b, a, rank).solver == "iterative"  # auto, at this many clients
    again = svd_of_product(b, a, rank, solver="iterative")
    assert torch.equal(again.u, found.u) and torch.equal(again.v, found.v)  # seeded: the same every call


def test_auto_stays_exact_for_few_clients():
    b, a = federated_factors(96, 80, 11, 4, seed=3)  # R = 44 < 6·(2r)
    assert svd_of_product(b, a, 4).solver == "exact"


def test_iterative_solver_on_a_product_of_lower_rank_than_kept():
    g = torch.Generator().manual_seed(11)
    shared_b = torch.randn(64, 2, generator=g, dtype=torch.float64)
    b = torch.cat([shared_b, 3 * shared_b] * 8, dim=1)  # 16 clients, all in one rank-2 plane: rank ΔW = 2
    a = torch.randn(32, 48, generator=g, dtype=torch.float64)
    found = svd_of_product(b, a, 4, solver="iterative")
    assert found.solver == "iterative"
    product = b @ a
    torch.testing.assert_close(found.u @ torch.diag(found.sigma[:4]) @ found.v.T, product,
                               atol=1e-10 * float(found.sigma[0]), rtol=0)
    assert float(found.sigma[2:4].abs().max()) < 1e-12 * float(found.sigma[0])


def test_without_a_gap_the_iterative_solver_hands_over_to_the_exact_one_early(monkeypatch):
    import devft.aggregation.product_svd as product_svd

    # singular values 1.00, 0.99, ... evenly spaced: no gap after k, the residual falls ~3 % a step
    g = torch.Generator().manual_seed(2)
    left, _ = torch.linalg.qr(torch.randn(64, 64, generator=g, dtype=torch.float64))
    right, _ = torch.linalg.qr(torch.randn(64, 64, generator=g, dtype=torch.float64))
    values = torch.linspace(1.0, 0.37, 64, dtype=torch.float64)
    b, a = left * values, right.T
    steps = []
    real = product_svd._on_course_to_miss
    monkeypatch.setattr(product_svd, "_on_course_to_miss", lambda *args: steps.append(args) or real(*args))
    found = svd_of_product(b, a, 4, solver="iterative")
    assert found.solver == "exact"
    assert len(steps) < 10  # on course to miss: handed over long before the 30 steps it may take
    torch.testing.assert_close(found.sigma, values, atol=1e-12, rtol=0)
    product = found.u @ torch.diag(found.sigma[:4]) @ found.v.T
    assert (b @ a - product).norm().item() == pytest.approx(float(values[4:].square().sum()) ** 0.5, rel=1e-10)


def test_equal_singular_values_give_a_best_approximation_at_once():
    # an orthogonal product: every subspace is invariant, any 4 directions are a best rank-4 approximation
    g = torch.Generator().manual_seed(4)
    q, _ = torch.linalg.qr(torch.randn(64, 64, generator=g, dtype=torch.float64))
    found = svd_of_product(q, torch.eye(64, dtype=torch.float64), 4, solver="iterative", max_iter=2)
    assert found.solver == "iterative"
    torch.testing.assert_close(found.sigma[:4], torch.ones(4, dtype=torch.float64), atol=1e-12, rtol=0)
    product = found.u @ torch.diag(found.sigma[:4]) @ found.v.T
    assert (q - product).norm().item() == pytest.approx(60 ** 0.5, rel=1e-10)


def test_a_hint_near_the_answer_saves_steps_and_changes_nothing_else():
    b, a = federated_factors(96, 80, 16, 4, seed=3, spread=0.3)
    exact = svd_of_product(b, a, 4, solver="exact")
    # the previous round's global A: the top right directions, moved a little (the clients trained from it)
    g = torch.Generator().manual_seed(9)
    previous_a = exact.v.T + 0.01 * torch.randn(4, 80, generator=g, dtype=torch.float64)
    hinted = svd_of_product(b, a, 4, solver="iterative", hint=previous_a.float(), max_iter=4)
    assert hinted.solver == "iterative"
    assert svd_of_product(b, a, 4, solver="iterative", max_iter=4).solver == "exact"  # unhinted: 5 steps
    assert_same_triples(hinted, exact, 4, float(exact.sigma[0]))
    for solver in ("exact", "iterative"):
        with pytest.raises(ValueError, match=r"hint must have rows of length 80.*\(4, 79\)"):
            svd_of_product(b, a, 4, solver=solver, hint=torch.ones(4, 79))


def test_a_hint_on_the_wrong_directions_costs_steps_not_the_answer():
    # the hint spans right singular vectors 5..8 exactly: an invariant subspace, residual 0, not the top one
    g = torch.Generator().manual_seed(12)
    left, _ = torch.linalg.qr(torch.randn(96, 64, generator=g, dtype=torch.float64))
    right, _ = torch.linalg.qr(torch.randn(80, 64, generator=g, dtype=torch.float64))
    values = torch.logspace(0, -3, 64, dtype=torch.float64)
    b, a = left * values, right.T  # (96, 64), (64, 80)
    for rows in (4, 8):  # as many as kept, and a whole block's worth (only k − keep are taken)
        found = svd_of_product(b, a, 4, solver="iterative", hint=right[:, 4:4 + rows].T)
        torch.testing.assert_close(found.sigma[:4], values[:4], atol=1e-12, rtol=0)  # by either solver


def test_replies_that_nearly_cancel_are_left_to_the_exact_solver():
    # two replies whose products cancel to 1e-5 of their size, leaving a rank-2 ΔW: its ‖ΔW‖_F² is lost
    # in the rounding of the Gram matrices, and the truncation tail (0 here) would not be
    g = torch.Generator().manual_seed(14)
    b1, a1 = federated_factors(96, 80, 8, 4, seed=13)  # (96, 32), (32, 80)
    leftover = torch.randn(32, 2, generator=g, dtype=torch.float64) @ torch.randn(2, 80, generator=g, dtype=torch.float64)
    b, a = torch.cat([b1, b1], dim=1), torch.cat([a1, -a1 + 1e-5 * leftover])
    found = svd_of_product(b, a, 4, solver="iterative")
    assert found.solver == "exact"
    assert found.tail_energy(4) < 1e-20 * found.energy


def test_a_zero_product_is_answered_exactly():
    b, a = torch.zeros(48, 32, dtype=torch.float64), torch.randn(32, 40, dtype=torch.float64)
    found = svd_of_product(b, a, 4, solver="iterative")
    assert found.solver == "exact" and found.energy == 0.0 and float(found.sigma.abs().max()) == 0.0


@pytest.mark.parametrize(("field", "kwargs"), [("solver", {"solver": "lanczos"}), ("keep", {"keep": 0})])
def test_bad_arguments_name_the_field(field, kwargs):
    b, a = torch.ones(8, 2), torch.ones(2, 8)
    with pytest.raises(ValueError, match=field):
        svd_of_product(b, a, **({"keep": 2} | kwargs))


def test_a_residual_of_zero_before_the_values_settle_is_not_a_rate():
    from devft.aggregation.product_svd import _on_course_to_miss

    assert not _on_course_to_miss([1.0, 0.0, 0.5], target=1e-10, steps_left=5)  # no rate from a zero
    assert _on_course_to_miss([1.0, 0.5, 0.6], target=1e-10, steps_left=5)  # rising: gives up
    assert _on_course_to_miss([1.0, 0.5, 0.25], target=1e-10, steps_left=5)  # halving: 0.25/2⁵ > 1e-10
    assert not _on_course_to_miss([1.0, 1e-3, 1e-6], target=1e-10, steps_left=5)  # 1e-6·1e-15 < 1e-10
