"""Tests for devft/data/tasks.py: determinism, balance, and answers checked by an independent solver."""

from __future__ import annotations

from collections import Counter
from datetime import datetime

import pytest

from devft.data.tasks import TASK_FAMILIES, generate_task_suite

_FACTORS = {
    "km": ("metres", 1000),
    "m": ("centimetres", 100),
    "kg": ("grams", 1000),
    "L": ("millilitres", 1000),
}


def _solve(example: dict[str, str]) -> str:
    """Answer a suite record from its instruction and input alone, independently of the generators."""
    family, instruction, text = example["family"], example["instruction"], example["input"]
    if family == "add":
        a, b = text.split(" + ")
        return str(int(a) + int(b))
    if family == "subtract":
        a, b = text.split(" - ")
        return str(int(a) - int(b))
    if family == "convert_units":
        value, unit = text.split(" ")
        target, factor = _FACTORS[unit]
        assert instruction == f"Convert to {target}."
        return str(int(value) * factor)
    if family == "sort_numbers":
        return ", ".join(str(n) for n in sorted(int(x) for x in text.split(", ")))
    if family == "count_items":
        return str(len(text.split(", ")))
    if family == "change_case":
        return text.upper() if "uppercase" in instruction else text.lower()
    if family == "reverse_words":
        return " ".join(reversed(text.split(" ")))
    if family == "sentiment":
        negative = {"awful", "terrible", "dreadful", "poor", "horrible", "disappointing", "bland", "rude",
                    "dirty", "boring", "broken", "noisy"}  # fmt: skip
        words = set(text.rstrip(".").split(" "))
        return "negative" if words & negative else "positive"
    if family == "format_date":
        for layout in ("%B %d, %Y", "%d %B %Y"):
            try:
                return datetime.strptime(text, layout).date().isoformat()
            except ValueError:
                pass
        raise AssertionError(f"unparseable date {text!r}")
    if family == "format_name":
        first, last = text.split(" ")
        return f"{last}, {first}"
    raise AssertionError(f"no solver for family {family!r}")


def test_at_least_eight_distinct_families() -> None:
    assert len(TASK_FAMILIES) >= 8
    assert len(set(TASK_FAMILIES)) == len(TASK_FAMILIES)


def test_every_answer_matches_an_independent_solver() -> None:
    suite = generate_task_suite(1000, seed=3)
    wrong = [e for e in suite if _solve(e) != e["output"]]
    assert wrong == []


def test_first_record_of_each_family_for_seed_0() -> None:
    # Pinned so that a change of generator (which would change every calibration number) is noticed.
    suite = generate_task_suite(len(TASK_FAMILIES), seed=0)
    assert [(e["family"], e["input"], e["output"]) for e in suite] == [
        ("add", "58 + 63", "121"),
        ("subtract", "91 - 14", "77"),
        ("convert_units", "638 kg", "638000"),
        ("sort_numbers", "20, 53, 94, 86", "20, 53, 86, 94"),
        ("count_items", "book, fork, sock, peach, bowl", "5"),
        ("change_case", "windy planet", "WINDY PLANET"),
        ("reverse_words", "into over cold book", "book cold over into"),
        ("sentiment", "The book was perfect and the bed was pleasant.", "positive"),
        ("format_date", "10 June 1965", "1965-06-10"),
        ("format_name", "Chloe Thomas", "Thomas, Chloe"),
    ]


def test_deterministic_for_a_seed_and_different_across_seeds() -> None:
    assert generate_task_suite(50, seed=7) == generate_task_suite(50, seed=7)
    assert generate_task_suite(50, seed=7) != generate_task_suite(50, seed=8)


def test_round_robin_families_and_prefix_property() -> None:
    suite = generate_task_suite(3 * len(TASK_FAMILIES) + 2, seed=1)
    assert [e["family"] for e in suite] == [TASK_FAMILIES[i % len(TASK_FAMILIES)] for i in range(len(suite))]
    assert suite[:7] == generate_task_suite(7, seed=1)
    counts = Counter(e["family"] for e in generate_task_suite(3 * len(TASK_FAMILIES), seed=1))
    assert set(counts.values()) == {3}


def test_a_family_does_not_depend_on_the_others() -> None:
    alone = generate_task_suite(5, seed=2, families=["sentiment"])
    full = [e for e in generate_task_suite(5 * len(TASK_FAMILIES), seed=2) if e["family"] == "sentiment"]
    assert alone == full
    subset = generate_task_suite(4, seed=2, families=["format_name", "add"])
    assert [e["family"] for e in subset] == ["format_name", "add", "format_name", "add"]


def test_records_have_the_example_keys_and_all_outcomes_occur() -> None:
    suite = generate_task_suite(400, seed=0)
    assert all(set(e) == {"instruction", "input", "output", "family"} for e in suite)
    assert all(len(e["output"]) <= 32 for e in suite)
    sentiments = Counter(e["output"] for e in suite if e["family"] == "sentiment")
    assert set(sentiments) == {"positive", "negative"}
    cases = Counter(e["instruction"] for e in suite if e["family"] == "change_case")
    assert set(cases) == {"Write the text in uppercase.", "Write the text in lowercase."}


def test_empty_and_none_families_mean_all() -> None:
    assert (
        generate_task_suite(12, 0, families=())
        == generate_task_suite(12, 0)
        == generate_task_suite(12, 0, None)
    )
    assert generate_task_suite(0, 0) == []


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"num_examples": -1}, "num_examples=-1"),
        ({"num_examples": 2.5}, "num_examples=2.5"),
        ({"families": ["add", "poetry"]}, "family='poetry'"),
        ({"families": ["add", "add"]}, "family='add' is listed twice"),
        ({"families": "add"}, "families='add'"),
    ],
)
def test_bad_arguments_raise(kwargs: dict, message: str) -> None:
    arguments = {"num_examples": 10, "seed": 0, **kwargs}
    with pytest.raises(ValueError, match=message):
        generate_task_suite(**arguments)
