"""Grouping and selection: partitions with the right anchors, determinism, and obvious blocks found."""

import itertools

import numpy as np
import pytest

from devft.growth import GROUPING_MODES, SELECTION_MODES, SIMILARITY_MODES, group_layers
from devft.growth.grouping import affinity_from_similarity, contiguous_groups

PARTITION_MODES = [m for m in GROUPING_MODES if m not in SELECTION_MODES]


def _noisy_similarity(n: int, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(n, 6))
    sim = np.corrcoef(x)
    return sim


def _blocks(blocks, n, inside=0.9, outside=0.05, noise=0.02, seed=0):
    """A similarity matrix with high similarity inside each block, low (or negative) across."""
    rng = np.random.default_rng(seed)
    sim = np.full((n, n), outside)
    for block in blocks:
        sim[np.ix_(block, block)] = inside
    sim += rng.uniform(-noise, noise, size=(n, n))
    sim = (sim + sim.T) / 2
    np.fill_diagonal(sim, 1.0)
    return sim


@pytest.mark.parametrize("mode", PARTITION_MODES)
@pytest.mark.parametrize(("n", "k"), [(30, 4), (30, 8), (30, 15), (8, 1), (8, 8), (13, 5)])
def test_partition_modes_give_exactly_k_nonempty_groups_covering_all_layers(mode, n, k):
    groups = group_layers(n, k, mode, _noisy_similarity(n), seed=3)
    assert len(groups) == k and all(groups)
    assert sorted(i for g in groups for i in g) == list(range(n))
    assert all(list(g) == sorted(g) for g in groups)
    anchors = [g[0] for g in groups]
    assert anchors == sorted(anchors) and anchors[0] == 0


@pytest.mark.parametrize("mode", GROUPING_MODES)
def test_deterministic_for_a_seed(mode):
    sim = _noisy_similarity(30, seed=1)
    assert group_layers(30, 8, mode, sim, seed=7) == group_layers(30, 8, mode, sim.copy(), seed=7)


def test_random_grouping_depends_on_the_seed():
    outcomes = {group_layers(30, 8, "random", seed=s) for s in range(5)}
    assert len(outcomes) == 5


def test_even_and_selection_modes_by_hand():
    assert [len(g) for g in group_layers(30, 4, "even")] == [8, 8, 7, 7]
    assert group_layers(10, 3, "even") == ((0, 1, 2, 3), (4, 5, 6), (7, 8, 9))
    assert group_layers(30, 4, "first") == ((0,), (1,), (2,), (3,))
    assert group_layers(30, 4, "spaced") == ((0,), (10,), (19,), (29,))  # round(linspace(0, 29, 4))
    assert group_layers(30, 30, "spaced") == tuple((i,) for i in range(30))


@pytest.mark.parametrize("mode", ["dglg", "dglg-ratiocut"])
def test_spectral_grouping_finds_obvious_non_contiguous_blocks(mode):
    blocks = [[0, 3, 6, 9], [1, 4, 7, 10, 11], [2, 5, 8]]
    sim = _blocks(blocks, 12, outside=-0.3)  # negative across blocks: a conflict, clipped to 0
    assert group_layers(12, 3, mode, sim, seed=0) == tuple(tuple(b) for b in blocks)


def test_spectral_grouping_finds_unequal_contiguous_blocks():
    blocks = [list(range(0, 2)), list(range(2, 12)), list(range(12, 17)), list(range(17, 30))]
    sim = _blocks(blocks, 30)
    expected = tuple(tuple(b) for b in blocks)
    for mode in SIMILARITY_MODES:
        assert group_layers(30, 4, mode, sim, seed=0) == expected, mode


def _ncut(affinity, groups):
    degree = affinity.sum(axis=1)
    total = 0.0
    for g in groups:
        inside = affinity[np.ix_(g, g)].sum()
        total += (degree[list(g)].sum() - inside) / degree[list(g)].sum()
    return total


def test_contiguous_grouping_is_the_best_contiguous_normalised_cut():
    affinity = affinity_from_similarity(_noisy_similarity(9, seed=4))
    best = min(
        (
            tuple(tuple(range(a, b)) for a, b in zip((0, *cuts), (*cuts, 9)))
            for cuts in itertools.combinations(range(1, 9), 3)
        ),
        key=lambda groups: _ncut(affinity, groups),
    )
    found = contiguous_groups(affinity, 4)
    assert np.isclose(_ncut(affinity, found), _ncut(affinity, best))
    assert found == best


def test_similarity_modes_need_a_valid_matrix():
    with pytest.raises(ValueError, match="needs a similarity matrix"):
        group_layers(8, 2, "dglg")
    with pytest.raises(ValueError, match=r"shape \(7, 7\)"):
        group_layers(8, 2, "contiguous", np.eye(7))
    with pytest.raises(ValueError, match="non-finite"):
        group_layers(2, 1, "dglg", np.array([[1.0, np.nan], [np.nan, 1.0]]))
    with pytest.raises(ValueError, match="num_groups=9"):
        group_layers(8, 9, "even")
    with pytest.raises(ValueError, match="mode='kmeans'"):
        group_layers(8, 2, "kmeans")


@pytest.mark.parametrize("normalised", [True, False])
@pytest.mark.parametrize("n,k", [(30, 4), (19, 11), (8, 3)])
def test_spectral_embedding_is_scikit_learns(normalised, n, k):
    # normalised (dglg): eigenvectors of I − D^-½ W D^-½ scaled by D^-½; unnormalised (dglg-ratiocut): of D − W
    from sklearn.manifold import spectral_embedding as sklearn_embedding

    from devft.growth.grouping import spectral_embedding

    rng = np.random.default_rng(n * k)
    x = rng.normal(size=(n, 5)) + np.linspace(0, 3, n)[:, None] * rng.normal(size=(1, 5))  # a drift over depth
    affinity = affinity_from_similarity(np.corrcoef(x))
    ours = spectral_embedding(affinity, k, normalised=normalised)
    theirs = sklearn_embedding(affinity, n_components=k, norm_laplacian=normalised, drop_first=False, random_state=0)
    for c in range(k):  # each eigenvector up to its sign
        assert min(np.abs(ours[:, c] - theirs[:, c]).max(), np.abs(ours[:, c] + theirs[:, c]).max()) < 1e-9, c
    other = spectral_embedding(affinity, k, normalised=not normalised)
    assert np.abs(np.abs(other) - np.abs(ours)).max() > 1e-3  # the two Laplacians are told apart
