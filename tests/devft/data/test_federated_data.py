"""Tests for devft/data/federated.py: held-out test disjoint from training, identical on every call."""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import pytest

from devft.data.federated import build_federated_data
from devft.data.settings import DataSettings
from devft.data.tasks import TASK_FAMILIES


def _keys(examples: list[dict[str, str]]) -> set[tuple[str, str]]:
    return {(e["instruction"], e["input"]) for e in examples}


def test_task_suite_partitions_and_disjoint_balanced_test() -> None:
    settings = DataSettings(num_train=300, num_test=50, num_clients=4, seed=5)
    data = build_federated_data(settings)
    assert len(data.partitions) == 4 and sum(len(p) for p in data.partitions) == 300
    assert len(data.test) == 50
    train = [e for p in data.partitions for e in p]
    assert not _keys(train) & _keys(data.test)
    assert len(_keys(data.test)) == 50
    assert Counter(e["family"] for e in data.test) == dict.fromkeys(TASK_FAMILIES, 5)
    assert data == build_federated_data(settings)  # every client process sees the same data
    assert data != build_federated_data(DataSettings(num_train=300, num_test=50, num_clients=4, seed=6))


def test_histogram_counts_each_clients_families() -> None:
    settings = DataSettings(
        num_train=40, num_test=10, num_clients=3, partition="pathological", families_per_client=1
    )
    data = build_federated_data(settings)
    histogram = data.histogram()
    assert [sum(c.values()) for c in histogram] == [len(p) for p in data.partitions]
    for counts, part in zip(histogram, data.partitions, strict=True):
        assert {f for f, n in counts.items() if n} == {e["family"] for e in part}


def test_test_set_avoids_repeats_of_a_small_family() -> None:
    # format_name has 60 x 60 = 3600 distinct inputs: 3000 draws repeat many, and the test set must avoid all.
    data = build_federated_data(
        DataSettings(num_train=3000, num_test=200, families=("format_name",), num_clients=2)
    )
    train = [e for p in data.partitions for e in p]
    assert len(_keys(train)) < 3000
    assert not _keys(train) & _keys(data.test) and len(_keys(data.test)) == 200


def test_exhausted_family_raises() -> None:
    settings = DataSettings(
        num_train=40000, num_test=100, families=("format_name",), num_clients=2, partition="iid"
    )
    with pytest.raises(ValueError, match="family='format_name' unseen in training"):
        build_federated_data(settings)


def test_user_jsonl_seeded_split_without_leaks(tmp_path: Path) -> None:
    records = [{"instruction": f"Echo {i}.", "input": "", "output": str(i)} for i in range(30)]
    records += [records[0], records[1]]  # duplicates must not leak from test into train
    path = tmp_path / "d.jsonl"
    path.write_text("\n".join(json.dumps(r) for r in records), encoding="utf-8")
    settings = DataSettings(
        source=str(path), num_train=100, num_test=6, num_clients=3, partition="iid", seed=2
    )
    data = build_federated_data(settings)
    train = [e for p in data.partitions for e in p]
    assert len(data.test) == 6
    assert not _keys(train) & _keys(data.test)
    assert _keys(train) | _keys(data.test) == _keys(records)  # only copies of test records are dropped
    assert all(e["family"] == "user" for e in train + data.test)
    assert data == build_federated_data(settings)
    capped = build_federated_data(DataSettings(source=str(path), num_train=10, num_test=6, num_clients=3))
    assert sum(len(p) for p in capped.partitions) == 10


def test_user_data_too_small_for_the_test_set(tmp_path: Path) -> None:
    path = tmp_path / "d.jsonl"
    path.write_text(json.dumps({"instruction": "a", "output": "b"}), encoding="utf-8")
    with pytest.raises(ValueError, match="not enough for num_test=1"):
        build_federated_data(DataSettings(source=str(path), num_test=1, num_train=1, num_clients=1))


def test_user_data_holds_out_distinct_examples_and_says_when_training_falls_short(tmp_path: Path, caplog) -> None:
    # 8 distinct pairs, each written 5 times: a held-out set of 4 must be 4 different pairs
    records = [{"instruction": f"Echo {i % 8}.", "input": "", "output": str(i % 8)} for i in range(40)]
    path = tmp_path / "d.jsonl"
    path.write_text("\n".join(json.dumps(r) for r in records), encoding="utf-8")
    with caplog.at_level("WARNING"):
        data = build_federated_data(DataSettings(source=str(path), num_train=30, num_test=4, num_clients=2,
                                                 partition="iid"))
    assert len(data.test) == 4 and len(_keys(data.test)) == 4
    train = [e for p in data.partitions for e in p]
    assert len(train) == 20 and not _keys(train) & _keys(data.test)  # the 4 other pairs, 5 copies each
    assert "leaves 20 training examples besides the 4 held out" in caplog.text and "num_train=30" in caplog.text
    with pytest.raises(ValueError, match="has 8 distinct .* not enough for num_test=9"):
        build_federated_data(DataSettings(source=str(path), num_train=30, num_test=9, num_clients=2))


def _save_splits(path: Path, **splits: list[dict[str, str]]) -> str:
    import datasets

    datasets.DatasetDict({name: datasets.Dataset.from_list(rows) for name, rows in splits.items()}).save_to_disk(
        str(path))
    return str(path)


def test_a_saved_test_split_is_the_held_out_set_and_never_trained_on(tmp_path: Path, caplog) -> None:
    train = [{"instruction": f"Echo {i}.", "input": "", "output": str(i)} for i in range(30)]
    test = [{"instruction": f"Say {i}.", "input": "", "output": str(i)} for i in range(10)]
    test += [test[0], dict(train[3])]  # a repeat inside the test split, and a pair the train split has too
    source = _save_splits(tmp_path / "dd", train=train, test=test, validation=train[:2])
    settings = DataSettings(source=source, num_train=100, num_test=11, num_clients=3, partition="iid", seed=2)
    with caplog.at_level("INFO"):
        data = build_federated_data(settings)
    trained = [e for p in data.partitions for e in p]
    assert _keys(data.test) == _keys(test) and len(data.test) == 11  # the 11 distinct pairs of the test split
    assert _keys(trained) == _keys(train) - {("Echo 3.", "")} and len(trained) == 29
    assert "1 records of the 'train' split repeat an (instruction, input) pair of the 11 held-out" in caplog.text
    assert "reading its 'train' and 'test' splits only, not ['validation']" in caplog.text
    assert data == build_federated_data(settings)
    some = build_federated_data(DataSettings(source=source, num_train=100, num_test=4, num_clients=3, seed=2))
    assert len(some.test) == 4 and _keys(some.test) <= _keys(test)
    assert len([e for p in some.partitions for e in p]) == 30 - (("Echo 3.", "") in _keys(some.test))


def test_a_saved_test_split_too_small_or_empty_is_named(tmp_path: Path, monkeypatch) -> None:
    rows = [{"instruction": f"Echo {i}.", "input": "", "output": str(i)} for i in range(5)]
    source = _save_splits(tmp_path / "dd", train=rows, test=rows[:2])
    with pytest.raises(ValueError, match=r"the 'test' split of data.source=.* has 2 distinct .* not enough for num_test=3"):
        build_federated_data(DataSettings(source=source, num_train=5, num_test=3, num_clients=1))
    import datasets

    empty = datasets.Dataset.from_list(rows).select([])
    datasets.DatasetDict({"train": datasets.Dataset.from_list(rows), "test": empty}).save_to_disk(str(tmp_path / "e"))
    with pytest.raises(ValueError, match=r"/e: datasets cannot load it \(IndexError"):  # datasets' bug, named
        build_federated_data(DataSettings(source=str(tmp_path / "e"), num_train=5, num_test=1, num_clients=1))
    only_test = _save_splits(tmp_path / "t", train=rows[:2], test=rows[:2])
    with pytest.raises(ValueError, match="leaves no training examples besides the 2 held out"):
        build_federated_data(DataSettings(source=only_test, num_train=2, num_test=2, num_clients=1))
    monkeypatch.setattr("devft.data.sources._load_saved_dataset", lambda path: (rows, []))
    with pytest.raises(ValueError, match="its 'test' split holds no examples"):
        build_federated_data(DataSettings(source=source, num_train=5, num_test=1, num_clients=1))
