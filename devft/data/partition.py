"""Split examples across federated clients with flwr-datasets partitioners, and show the family skew.

Schemes (all deterministic for a seed):

- ``iid``: the examples are shuffled with the seed and cut into equal contiguous shards
  (``IidPartitioner``).
- ``dirichlet``: for every family, client shares are drawn from Dirichlet(alpha)
  (``DirichletPartitioner`` with self-balancing); small alpha gives each client few families. Resampled
  (at most 10 times, by flwr-datasets) until every client holds at least ``min(10, n // (2 * clients))``
  examples, at least one.
- ``pathological``: each client gets exactly ``families_per_client`` families (``PathologicalPartitioner``,
  ``first-deterministic``: client ``i``'s first family is the ``i mod F``-th family in alphabetical order,
  the rest drawn at random), and each family's examples are split evenly among the clients that have it.
  Examples of a family no client drew are left out (logged as a warning).

The partitioners' own warnings (Dirichlet resampling, unused families) go to this module's logger.
"""

from __future__ import annotations

import logging
import math
import warnings
from collections.abc import Sequence

import numpy as np

from devft.data.tasks import Example

log = logging.getLogger(__name__)

PARTITION_SCHEMES = ("iid", "dirichlet", "pathological")
"""Names accepted by :func:`partition_indices`."""

_INDEX = "_devft_index"


def _families(examples: Sequence[Example]) -> list[str]:
    """Distinct families in order of first appearance."""
    return list(dict.fromkeys(e["family"] for e in examples))


def partition_indices(
    examples: Sequence[Example],
    num_clients: int,
    scheme: str,
    alpha: float = 0.5,
    families_per_client: int = 2,
    seed: int = 0,
) -> list[list[int]]:
    """Assign example indices to ``num_clients`` clients by ``scheme`` (``iid``, ``dirichlet``, ``pathological``).

    Returns one list of indices into ``examples`` per client; no index appears twice, and every client
    gets at least one example. Raises ``ValueError`` naming the offending argument and its value.
    """
    if scheme not in PARTITION_SCHEMES:
        raise ValueError(f"unknown partition scheme={scheme!r}; expected one of {list(PARTITION_SCHEMES)}")
    if int(num_clients) != num_clients or num_clients < 1:
        raise ValueError(f"num_clients must be an integer >= 1, got num_clients={num_clients!r}")
    if num_clients > len(examples):
        raise ValueError(
            f"num_clients={num_clients} is more than the {len(examples)} examples to partition: "
            "every client needs at least one example"
        )
    # Imported here: `datasets` and flwr-datasets cost ~3 s of start-up in every client process.
    import datasets
    from flwr_datasets.partitioner import DirichletPartitioner, IidPartitioner, PathologicalPartitioner

    families = _families(examples)
    dataset = datasets.Dataset.from_dict(
        {"family": [e["family"] for e in examples], _INDEX: list(range(len(examples)))}
    )
    if scheme == "iid":
        partitioner = IidPartitioner(num_partitions=num_clients)
        dataset = dataset.shuffle(seed=seed)
    elif scheme == "dirichlet":
        if not (isinstance(alpha, (int, float)) and math.isfinite(alpha) and alpha > 0):
            raise ValueError(f"alpha must be a finite number > 0, got alpha={alpha!r}")
        if len(families) < 2:  # nothing to skew over: the Dirichlet draw can only skew the clients' sizes
            log.info("dirichlet partition of one family (%r; records without a 'family' field are 'user'): the "
                     "clients differ in size only", families[0])
            return _quantity_skew(len(examples), num_clients, float(alpha), seed)
        partitioner = DirichletPartitioner(
            num_partitions=num_clients,
            partition_by="family",
            alpha=float(alpha),
            min_partition_size=max(1, min(10, len(examples) // (2 * num_clients))),
            self_balancing=True,
            shuffle=True,
            seed=seed,
        )
    else:
        if int(families_per_client) != families_per_client or not 1 <= families_per_client <= len(families):
            raise ValueError(
                f"families_per_client must be an integer in [1, {len(families)}] (the number of families), "
                f"got families_per_client={families_per_client!r}"
            )
        partitioner = PathologicalPartitioner(
            num_partitions=num_clients,
            partition_by="family",
            num_classes_per_partition=int(families_per_client),
            class_assignment_mode="first-deterministic",
            shuffle=True,
            seed=seed,
        )
    partitioner.dataset = dataset
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            partitions = [list(partitioner.load_partition(i)[_INDEX]) for i in range(num_clients)]
        for warning in caught:
            level = logging.DEBUG if "min_partition_size" in str(warning.message) else logging.WARNING
            log.log(level, "%s partitioner: %s", scheme, warning.message)
    except ValueError as err:
        raise ValueError(
            f"cannot partition {len(examples)} examples ({len(families)} families) into "
            f"num_clients={num_clients} with scheme={scheme!r} (alpha={alpha}, "
            f"families_per_client={families_per_client}): {err}"
        ) from err
    empty = [i for i, p in enumerate(partitions) if not p]
    if empty:
        raise ValueError(
            f"scheme={scheme!r} left clients {empty} without examples: use fewer clients "
            f"(num_clients={num_clients}) or more examples ({len(examples)})"
        )
    return partitions


def _quantity_skew(n: int, num_clients: int, alpha: float, seed: int) -> list[list[int]]:
    """``n`` shuffled indices cut into client shares of sizes ~ Dirichlet(alpha), each at least
    ``min(10, n // (2 · num_clients))`` and 1 (the floor the family-wise split uses), for a seed."""
    rng = np.random.default_rng(seed)
    floor = max(1, min(10, n // (2 * num_clients)))
    shares = rng.dirichlet([alpha] * num_clients) * (n - floor * num_clients)
    sizes = floor + np.floor(shares).astype(int)
    sizes[np.argsort(shares - np.floor(shares))[::-1][: n - int(sizes.sum())]] += 1  # largest remainders
    order = rng.permutation(n)
    cuts = np.cumsum(sizes)[:-1]
    return [sorted(int(i) for i in part) for part in np.split(order, cuts)]


def family_histogram(
    examples: Sequence[Example], partitions: Sequence[Sequence[int]]
) -> list[dict[str, int]]:
    """Per client, the number of its examples in each family (every family of ``examples`` is a key)."""
    families = _families(examples)
    histogram = []
    for indices in partitions:
        counts = dict.fromkeys(families, 0)
        for i in indices:
            counts[examples[i]["family"]] += 1
        histogram.append(counts)
    return histogram


def format_histogram(histogram: Sequence[dict[str, int]]) -> str:
    """A plain-text table of :func:`family_histogram`: one row per client, one column per family, and totals."""
    families = list(dict.fromkeys(f for counts in histogram for f in counts))
    header = ["client", *families, "total"]
    rows = [
        [str(i), *(str(c.get(f, 0)) for f in families), str(sum(c.values()))] for i, c in enumerate(histogram)
    ]
    totals = [sum(c.get(f, 0) for c in histogram) for f in families]
    rows.append(["all", *map(str, totals), str(sum(totals))])
    widths = [max(len(row[j]) for row in [header, *rows]) for j in range(len(header))]
    lines = ["  ".join(cell.rjust(w) for cell, w in zip(row, widths, strict=True)) for row in [header, *rows]]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)
