"""Tests for devft/data/partition.py with the real flwr-datasets partitioners."""

from __future__ import annotations

import pytest

from devft.data.partition import family_histogram, format_histogram, partition_indices
from devft.data.tasks import TASK_FAMILIES, generate_task_suite

SUITE = generate_task_suite(500, seed=0)  # 50 examples of each of the 10 families


def _check_disjoint(partitions: list[list[int]], covers: int | None) -> None:
    flat = [i for p in partitions for i in p]
    assert len(flat) == len(set(flat))
    if covers is not None:
        assert sorted(flat) == list(range(covers))


def _mean_top_share(partitions: list[list[int]]) -> float:
    """Mean over clients of the share of the client's most frequent family (1/F when IID, 1 when one family)."""
    shares = [max(c.values()) / sum(c.values()) for c in family_histogram(SUITE, partitions)]
    return sum(shares) / len(shares)


def test_iid_equal_shards_of_a_shuffle() -> None:
    partitions = partition_indices(SUITE, 10, "iid", seed=1)
    assert [len(p) for p in partitions] == [50] * 10
    _check_disjoint(partitions, covers=len(SUITE))
    assert partitions[0] != list(range(50))  # shuffled, not the suite's round-robin order
    assert _mean_top_share(partitions) < 0.3


def test_dirichlet_covers_everything_and_is_skewed_for_small_alpha() -> None:
    skewed = partition_indices(SUITE, 10, "dirichlet", alpha=0.1, seed=0)
    _check_disjoint(skewed, covers=len(SUITE))
    assert min(len(p) for p in skewed) >= 10  # min(10, 500 // 20)
    assert _mean_top_share(skewed) > 0.5
    near_iid = partition_indices(SUITE, 10, "dirichlet", alpha=1000.0, seed=0)
    assert _mean_top_share(near_iid) < 0.3


def test_pathological_gives_each_client_exactly_k_families() -> None:
    for k in (1, 2, 3):
        partitions = partition_indices(SUITE, 10, "pathological", families_per_client=k, seed=0)
        _check_disjoint(partitions, covers=None)
        for client, counts in enumerate(family_histogram(SUITE, partitions)):
            held = {f for f, n in counts.items() if n > 0}
            assert len(held) == k
            # first-deterministic: client i's first family is the (i mod F)-th in alphabetical order
            assert sorted(TASK_FAMILIES)[client % len(TASK_FAMILIES)] in held
    one_each = partition_indices(SUITE, 10, "pathological", families_per_client=1, seed=0)
    assert [len(p) for p in one_each] == [50] * 10


@pytest.mark.parametrize("scheme", ["iid", "dirichlet", "pathological"])
def test_deterministic_for_a_seed(scheme: str) -> None:
    first = partition_indices(SUITE, 5, scheme, seed=3)
    assert first == partition_indices(SUITE, 5, scheme, seed=3)
    assert first != partition_indices(SUITE, 5, scheme, seed=4)


def test_one_client_gets_everything() -> None:
    assert sorted(partition_indices(SUITE[:20], 1, "dirichlet")[0]) == list(range(20))


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"alpha": 0.0}, "alpha=0.0"),
        ({"alpha": -1.0}, "alpha=-1.0"),
        ({"alpha": float("nan")}, "alpha=nan"),
        ({"num_clients": 0}, "num_clients=0"),
        ({"num_clients": 21}, "num_clients=21 is more than the 20 examples"),
        ({"scheme": "by_language"}, "scheme='by_language'"),
        ({"scheme": "pathological", "families_per_client": 11}, "families_per_client=11"),
        ({"scheme": "pathological", "families_per_client": 0}, "families_per_client=0"),
    ],
)
def test_bad_arguments_raise(kwargs: dict, message: str) -> None:
    arguments = {"examples": SUITE[:20], "num_clients": 4, "scheme": "dirichlet", **kwargs}
    with pytest.raises(ValueError, match=message):
        partition_indices(**arguments)


def test_family_histogram_and_table_by_hand() -> None:
    examples = [{"instruction": "", "input": "", "output": "", "family": f} for f in ("b", "a", "b", "c")]
    histogram = family_histogram(examples, [[0, 1], [2, 3], []])
    assert histogram == [{"b": 1, "a": 1, "c": 0}, {"b": 1, "a": 0, "c": 1}, {"b": 0, "a": 0, "c": 0}]
    assert format_histogram(histogram) == (
        "client  b  a  c  total\n"
        "------  -  -  -  -----\n"
        "     0  1  1  0      2\n"
        "     1  1  0  1      2\n"
        "     2  0  0  0      0\n"
        "   all  2  1  1      4"
    )


def test_pathological_reports_families_no_client_drew(caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level("WARNING", logger="devft.data.partition"):
        partitions = partition_indices(SUITE, 3, "pathological", families_per_client=1, seed=0)
    # Three clients, one family each (the first three in alphabetical order): 7 families are left out.
    assert [set(c for c, n in counts.items() if n) for counts in family_histogram(SUITE, partitions)] == [
        {"add"},
        {"change_case"},
        {"convert_units"},
    ]
    assert "will NOT be used" in caplog.text


@pytest.mark.parametrize("seed", range(20))
def test_dirichlet_over_one_family_skews_sizes_for_every_seed(seed: int) -> None:
    # user records without a 'family' field are one family: the Dirichlet draw can only skew the sizes
    # (flwr-datasets' family-wise split gave up for about 1 seed in 4 at these sizes)
    examples = [{"instruction": f"q{i}", "input": "", "output": "a", "family": "user"} for i in range(2000)]
    parts = partition_indices(examples, 10, "dirichlet", alpha=0.5, seed=seed)
    assert sorted(i for p in parts for i in p) == list(range(2000))  # nothing lost, nothing twice
    sizes = sorted(len(p) for p in parts)
    assert sizes[0] >= 10 and sizes[-1] > 2 * sizes[0]  # each at least the floor, and skewed
    assert parts == partition_indices(examples, 10, "dirichlet", alpha=0.5, seed=seed)
    assert parts != partition_indices(examples, 10, "dirichlet", alpha=0.5, seed=seed + 100)
