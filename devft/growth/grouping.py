"""Which layers of the full model each submodel layer stands for: grouping (a partition) or selection.

Grouping modes partition all L layers into exactly ``k`` non-empty groups:

- ``dglg``: deconfliction-guided layer grouping, spectral clustering as scikit-learn's
  ``SpectralClustering(affinity="precomputed")`` does it. Affinity ``W = max(sim, 0)`` (negative
  similarity is a conflict) plus a tiny epsilon between neighbouring layers so the graph stays connected;
  the ``k`` smallest eigenvectors of the normalised Laplacian ``I − D^-½ W D^-½``, scaled by ``D^-½``,
  embed the layers; k-means (seeded, 10 restarts) on the embedding. It relaxes the normalised cut
  ``Σ_g cut(g, rest) / vol(g)``. Groups need not be contiguous.
- ``dglg-ratiocut``: the same with the unnormalised Laplacian ``D − W`` as the paper writes it (relaxes
  RatioCut ``Σ_g cut(g, rest) / |g|``). On SmolLM2 it isolates the few least similar layers as singletons
  and fuses all the others into one giant group (see docs/growth.md); kept for the record.
- ``contiguous``: runs of adjacent layers minimising the normalised cut that ``dglg`` relaxes, found
  exactly by dynamic programming.
- ``even``: contiguous runs of equal size (the first ``L mod k`` runs one layer longer).
- ``random``: a seeded random permutation cut into near-equal parts.

Selection modes keep ``k`` layers as singleton groups; the other layers are not in the submodel and keep
their LoRA through knowledge transfer (ProgFed-style growth):

- ``first``: layers ``0 … k−1``.
- ``spaced``: ``k`` evenly spaced layers, always including the first and the last.

Every result is a tuple of groups, each a sorted tuple of layer indices; groups are ordered by their anchor
(the first, lowest, layer), which is the order of the submodel's layers.
"""

from __future__ import annotations

import logging
import warnings

import numpy as np

log = logging.getLogger(__name__)

GROUPING_MODES = ("dglg", "dglg-ratiocut", "contiguous", "even", "random", "first", "spaced")
SIMILARITY_MODES = ("dglg", "dglg-ratiocut", "contiguous")
"""Modes that need a similarity matrix."""
SELECTION_MODES = ("first", "spaced")
"""Modes that keep a subset of layers instead of partitioning all of them."""

Groups = tuple[tuple[int, ...], ...]

NEIGHBOUR_EPSILON = 1e-6


def group_layers(
    num_layers: int, num_groups: int, mode: str, similarity: np.ndarray | None = None, seed: int = 0
) -> Groups:
    """Group (or select) ``num_groups`` of ``num_layers`` layers with ``mode``; see the module docstring."""
    if mode not in GROUPING_MODES:
        raise ValueError(f"unknown grouping mode={mode!r}; choose one of {GROUPING_MODES}")
    if not 1 <= num_groups <= num_layers:
        raise ValueError(f"num_groups={num_groups} must be in 1..num_layers={num_layers}")
    if mode in SIMILARITY_MODES:
        if similarity is None:
            raise ValueError(f"grouping mode={mode!r} needs a similarity matrix")
        similarity = np.asarray(similarity, dtype=np.float64)
        if similarity.shape != (num_layers, num_layers):
            raise ValueError(f"similarity has shape {similarity.shape}, expected ({num_layers}, {num_layers})")
        if not np.isfinite(similarity).all():
            raise ValueError("similarity matrix has non-finite entries")
        affinity = affinity_from_similarity(similarity)
        if mode == "contiguous":
            return contiguous_groups(affinity, num_groups)
        return spectral_groups(affinity, num_groups, seed, normalised=mode == "dglg")
    if mode == "even":
        return even_groups(num_layers, num_groups)
    if mode == "random":
        return random_groups(num_layers, num_groups, seed)
    if mode == "first":
        return tuple((i,) for i in range(num_groups))
    return spaced_layers(num_layers, num_groups)


def anchors_of(groups: Groups) -> tuple[int, ...]:
    """The anchor (first layer) of each group."""
    return tuple(g[0] for g in groups)


def _canonical(groups: list[list[int]]) -> Groups:
    return tuple(sorted((tuple(sorted(int(i) for i in g)) for g in groups if g), key=lambda g: g[0]))


def affinity_from_similarity(similarity: np.ndarray) -> np.ndarray:
    """``max(sim, 0)``, symmetrised, zero diagonal, plus :data:`NEIGHBOUR_EPSILON` between adjacent layers."""
    w = np.clip((similarity + similarity.T) / 2, 0.0, None)
    np.fill_diagonal(w, 0.0)
    idx = np.arange(len(w) - 1)
    w[idx, idx + 1] += NEIGHBOUR_EPSILON
    w[idx + 1, idx] += NEIGHBOUR_EPSILON
    return w


def spectral_embedding(affinity: np.ndarray, dims: int, normalised: bool = True) -> np.ndarray:
    """The ``dims`` eigenvectors of the Laplacian with the smallest eigenvalues, as rows per layer: (L, dims).

    Normalised: eigenvectors of ``I − D^-½ W D^-½`` times ``D^-½`` (scikit-learn's ``spectral_embedding``);
    unnormalised: eigenvectors of ``D − W``. Each vector's sign is fixed (largest entry positive).
    """
    degree = affinity.sum(axis=1)
    if normalised:
        inv_sqrt = 1.0 / np.sqrt(degree)
        laplacian = np.eye(len(affinity)) - inv_sqrt[:, None] * affinity * inv_sqrt[None, :]
    else:
        laplacian = np.diag(degree) - affinity
    _, vectors = np.linalg.eigh(laplacian)
    emb = vectors[:, :dims].copy()
    if normalised:
        emb *= inv_sqrt[:, None]
    for c in range(dims):
        pivot = int(np.argmax(np.abs(emb[:, c])))
        if emb[pivot, c] < 0:
            emb[:, c] = -emb[:, c]
    return emb


def spectral_groups(affinity: np.ndarray, num_groups: int, seed: int = 0, normalised: bool = True) -> Groups:
    """Spectral clustering: k-means (seeded, 10 restarts) on the Laplacian embedding; exactly ``num_groups``."""
    from sklearn.cluster import KMeans

    n = len(affinity)
    if num_groups == n:
        return tuple((i,) for i in range(n))
    if num_groups == 1:
        return (tuple(range(n)),)
    emb = spectral_embedding(affinity, num_groups, normalised)
    with warnings.catch_warnings():  # duplicate embedding points: handled below
        warnings.simplefilter("ignore")
        labels = KMeans(n_clusters=num_groups, n_init=10, random_state=seed).fit_predict(emb)
    groups = [list(np.flatnonzero(labels == c)) for c in range(num_groups)]
    return _split_to(groups, num_groups)


def _split_to(groups: list[list[int]], num_groups: int) -> Groups:
    """Split the largest group (lower half / upper half by index) until there are ``num_groups`` groups."""
    groups = [g for g in groups if g]
    while len(groups) < num_groups:
        groups.sort(key=lambda g: (-len(g), min(g)))
        big = sorted(groups.pop(0))
        half = len(big) // 2
        log.info("k-means returned an empty cluster: splitting group %s", big)
        groups += [big[:half], big[half:]]
    return _canonical(groups)


def contiguous_groups(affinity: np.ndarray, num_groups: int) -> Groups:
    """Runs of adjacent layers minimising the normalised cut ``Σ_g cut(g, rest) / vol(g)`` (exact DP)."""
    n = len(affinity)
    degree = affinity.sum(axis=1)
    # prefix[a, b] = Σ_{i<a, j<b} W[i, j], so a run's internal weight takes four lookups
    prefix = np.zeros((n + 1, n + 1))
    prefix[1:, 1:] = affinity.cumsum(axis=0).cumsum(axis=1)
    deg_prefix = np.concatenate([[0.0], degree.cumsum()])

    def cost(a: int, b: int) -> float:  # run a..b-1
        assoc = prefix[b, b] - prefix[a, b] - prefix[b, a] + prefix[a, a]
        volume = deg_prefix[b] - deg_prefix[a]
        return (volume - assoc) / volume

    best = np.full((num_groups + 1, n + 1), np.inf)  # best[k, b]: layers 0..b-1 in k runs
    back = np.zeros((num_groups + 1, n + 1), dtype=int)
    best[0, 0] = 0.0
    for k in range(1, num_groups + 1):
        for b in range(k, n + 1):
            for a in range(k - 1, b):
                value = best[k - 1, a] + cost(a, b)
                if value < best[k, b] - 1e-12:
                    best[k, b], back[k, b] = value, a
    bounds = [n]
    for k in range(num_groups, 0, -1):
        bounds.append(back[k, bounds[-1]])
    bounds.reverse()
    return tuple(tuple(range(a, b)) for a, b in zip(bounds, bounds[1:]))


def even_groups(num_layers: int, num_groups: int) -> Groups:
    """Contiguous runs of near-equal size, the longer ones first: 30 into 4 -> 8, 8, 7, 7."""
    return _canonical([list(part) for part in np.array_split(np.arange(num_layers), num_groups)])


def random_groups(num_layers: int, num_groups: int, seed: int = 0) -> Groups:
    """A seeded random permutation of the layers cut into near-equal parts."""
    perm = np.random.default_rng(seed).permutation(num_layers)
    return _canonical([list(part) for part in np.array_split(perm, num_groups)])


def spaced_layers(num_layers: int, num_groups: int) -> Groups:
    """``num_groups`` evenly spaced singleton layers including the first and the last (one group: layer 0)."""
    picks = np.round(np.linspace(0, num_layers - 1, num_groups)).astype(int)
    return tuple((int(i),) for i in picks)


def check_groups(groups: Groups, num_layers: int, num_groups: int, partition: bool) -> None:
    """Raise ``ValueError`` unless ``groups`` are ``num_groups`` sorted, disjoint, non-empty groups of valid
    layers ordered by anchor, covering all ``num_layers`` layers when ``partition``."""
    if len(groups) != num_groups:
        raise ValueError(f"expected {num_groups} groups, got {len(groups)}: {groups}")
    seen: set[int] = set()
    for g in groups:
        if not g:
            raise ValueError(f"empty group in {groups}")
        if list(g) != sorted(set(g)):
            raise ValueError(f"group {g} is not sorted without repeats")
        if g[0] < 0 or g[-1] >= num_layers:
            raise ValueError(f"group {g} has a layer outside 0..{num_layers - 1}")
        if seen & set(g):
            raise ValueError(f"layers {sorted(seen & set(g))} appear in more than one group")
        seen |= set(g)
    if list(anchors_of(groups)) != sorted(anchors_of(groups)):
        raise ValueError(f"groups are not ordered by anchor: {groups}")
    if partition and seen != set(range(num_layers)):
        raise ValueError(f"groups miss layers {sorted(set(range(num_layers)) - seen)}")
