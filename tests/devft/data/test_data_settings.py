"""Tests for devft/data/settings.py: defaults, normalisation and every check naming its field."""

from __future__ import annotations

import dataclasses

import pytest

from devft.data.settings import DataSettings


def test_defaults() -> None:
    s = DataSettings()
    assert (s.source, s.num_train, s.num_test, s.families, s.max_length) == ("tasks", 2000, 200, (), 128)
    assert (s.num_clients, s.partition, s.alpha, s.families_per_client, s.seed) == (
        10,
        "dirichlet",
        0.5,
        2,
        0,
    )


def test_every_field_has_help() -> None:
    assert all(f.metadata.get("help") for f in dataclasses.fields(DataSettings))


def test_families_from_a_comma_separated_string_and_list() -> None:
    assert DataSettings(families="add, sentiment").families == ("add", "sentiment")
    assert DataSettings(families=["add"]).families == ("add",)


def test_integral_floats_become_ints() -> None:  # TOML and Flower run configs may give 10.0
    s = DataSettings(num_clients=4.0, alpha=1)
    assert s.num_clients == 4 and type(s.num_clients) is int and type(s.alpha) is float


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"source": ""}, "data.source"),
        ({"num_train": 0}, "num_train=0"),
        ({"num_test": 0}, "num_test=0"),
        ({"num_test": 2.5}, "num_test=2.5"),
        ({"max_length": 1}, "max_length=1"),
        ({"num_clients": 0}, "num_clients=0"),
        ({"num_clients": True}, "num_clients=True"),
        ({"partition": "random"}, "partition='random'"),
        ({"alpha": 0}, "alpha=0"),
        ({"alpha": -0.5}, "alpha=-0.5"),
        ({"alpha": float("inf")}, "alpha=inf"),
        ({"families_per_client": 0}, "families_per_client=0"),
        ({"seed": "zero"}, "seed='zero'"),
        ({"num_train": 5, "num_clients": 6}, "num_clients=6 is more than num_train=5"),
        ({"families": ("add", "haiku")}, "family='haiku'"),
        (
            {"partition": "pathological", "families": ("add",), "families_per_client": 2},
            "families_per_client=2",
        ),
        ({"source": "my.jsonl", "families": ("add",)}, "needs source='tasks'"),
    ],
)
def test_bad_values_name_field_and_value(kwargs: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        DataSettings(**kwargs)
