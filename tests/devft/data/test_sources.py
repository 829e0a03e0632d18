"""Tests for devft/data/sources.py: the task suite, Alpaca JSONL files and datasets saved to disk."""

from __future__ import annotations

import json
from pathlib import Path

import datasets
import pytest

from devft.data.sources import load_examples
from devft.data.tasks import generate_task_suite

RECORDS = [
    {"instruction": "Greet.", "input": "Ana", "output": "Hello, Ana"},
    {"instruction": "Say yes.", "output": "yes"},  # no input: allowed, becomes ""
    {"instruction": "Shout.", "input": "hi", "output": "HI", "family": "case"},
    {"instruction": "Count.", "input": "a b", "output": "2"},
    {"instruction": "Echo.", "input": "x", "output": "x"},
]


def _write_jsonl(path: Path, lines: list[str]) -> Path:
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


@pytest.fixture
def jsonl(tmp_path: Path) -> Path:
    lines = [json.dumps(r) for r in RECORDS]
    lines.insert(2, "   ")  # blank lines are skipped
    return _write_jsonl(tmp_path / "data.jsonl", lines)


def test_tasks_source_is_the_suite() -> None:
    assert load_examples("tasks", num_examples=15, seed=4) == generate_task_suite(15, seed=4)


def test_tasks_source_needs_num_examples() -> None:
    with pytest.raises(ValueError, match="num_examples"):
        load_examples("tasks")


def test_jsonl_records_with_defaults(jsonl: Path) -> None:
    examples = load_examples(str(jsonl))
    assert examples[0] == {"instruction": "Greet.", "input": "Ana", "output": "Hello, Ana", "family": "user"}
    assert examples[1] == {"instruction": "Say yes.", "input": "", "output": "yes", "family": "user"}
    assert examples[2]["family"] == "case"
    assert len(examples) == 5


def test_num_examples_draws_a_seeded_subset_in_file_order(jsonl: Path) -> None:
    everything = load_examples(str(jsonl))
    drawn = load_examples(str(jsonl), num_examples=3, seed=1)
    assert drawn == load_examples(str(jsonl), num_examples=3, seed=1)
    assert len(drawn) == 3
    positions = [everything.index(e) for e in drawn]
    assert positions == sorted(positions)
    with pytest.raises(ValueError, match="num_examples=6 is more than the 5 examples"):
        load_examples(str(jsonl), num_examples=6)


def test_malformed_line_names_file_and_line(tmp_path: Path) -> None:
    path = _write_jsonl(
        tmp_path / "bad.jsonl", [json.dumps(RECORDS[0]), "", '{"instruction": "x", "output": ']
    )
    with pytest.raises(ValueError, match=r"bad\.jsonl, line 3: malformed JSON"):
        load_examples(str(path))


@pytest.mark.parametrize(
    ("record", "message"),
    [
        ('{"instruction": "x", "input": "y"}', "line 2: missing field 'output'"),
        ('{"input": "y", "output": "z"}', "line 2: missing field 'instruction'"),
        ('{"instruction": "x", "output": 3}', "line 2: field 'output' must be a string"),
        ('{"instruction": "  ", "output": "z"}', "line 2: field 'instruction' is empty"),
        ('{"instruction": "x", "output": ""}', "line 2: field 'output' is empty"),
        ('{"instruction": "x", "output": "z", "family": ["a"]}', "line 2: field 'family' must be a string, got list"),
        ('{"instruction": "x", "output": "z", "family": true}', "line 2: field 'family' must be a string, got bool"),
        ('["instruction", "output"]', "line 2: expected a JSON object"),
    ],
)
def test_bad_record_names_line_and_field(tmp_path: Path, record: str, message: str) -> None:
    path = _write_jsonl(tmp_path / "bad.jsonl", [json.dumps(RECORDS[0]), record])
    with pytest.raises(ValueError, match=message):
        load_examples(str(path))


def test_empty_jsonl_raises(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="holds no examples"):
        load_examples(str(_write_jsonl(tmp_path / "empty.jsonl", [""])))


def test_saved_dataset_with_and_without_family(tmp_path: Path) -> None:
    columns = {"instruction": ["A.", "B."], "input": ["1", ""], "output": ["one", "two"]}
    datasets.Dataset.from_dict(columns).save_to_disk(str(tmp_path / "plain"))
    datasets.Dataset.from_dict({**columns, "family": ["f1", "f2"]}).save_to_disk(str(tmp_path / "tagged"))
    assert load_examples(str(tmp_path / "plain")) == [
        {"instruction": "A.", "input": "1", "output": "one", "family": "user"},
        {"instruction": "B.", "input": "", "output": "two", "family": "user"},
    ]
    assert [e["family"] for e in load_examples(str(tmp_path / "tagged"))] == ["f1", "f2"]
    labelled = datasets.Dataset.from_dict({**columns, "family": [1, 0]}, features=datasets.Features({
        **{k: datasets.Value("string") for k in columns}, "family": datasets.ClassLabel(names=["maths", "words"])}))
    labelled.save_to_disk(str(tmp_path / "labelled"))
    assert [e["family"] for e in load_examples(str(tmp_path / "labelled"))] == ["words", "maths"]  # names, not ids
    missing = datasets.Dataset.from_dict({**columns, "family": [-1, 0]}, features=labelled.features)
    missing.save_to_disk(str(tmp_path / "missing"))  # -1: how datasets writes a missing label
    assert [e["family"] for e in load_examples(str(tmp_path / "missing"))] == ["user", "maths"]
    from devft.data.sources import _class_name

    with pytest.raises(ValueError, match=r"row 3: field 'family' is class id 2, outside the 2 names"):
        _class_name(["maths", "words"], 2, "data, row 3")  # a column whose features were edited by hand


def test_saved_dataset_dict_uses_train_split(tmp_path: Path) -> None:
    train = datasets.Dataset.from_dict({"instruction": ["A."], "output": ["a"]})
    datasets.DatasetDict({"train": train, "test": train}).save_to_disk(str(tmp_path / "dd"))
    assert load_examples(str(tmp_path / "dd")) == [
        {"instruction": "A.", "input": "", "output": "a", "family": "user"}
    ]
    datasets.DatasetDict({"validation": train}).save_to_disk(str(tmp_path / "no_train"))
    with pytest.raises(ValueError, match="no 'train' split"):
        load_examples(str(tmp_path / "no_train"))


def test_saved_dataset_missing_column_is_named(tmp_path: Path) -> None:
    datasets.Dataset.from_dict({"instruction": ["A."], "response": ["a"]}).save_to_disk(str(tmp_path / "d"))
    with pytest.raises(ValueError, match="missing column 'output'"):
        load_examples(str(tmp_path / "d"))


def test_unknown_sources_raise(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match=r"unknown data.source='no/such/file.jsonl': .*looked for /.*no/such/file.jsonl"):
        load_examples("no/such/file.jsonl")
    text = tmp_path / "notes.txt"
    text.write_text("hello")
    with pytest.raises(ValueError, match="unsupported data.source"):
        load_examples(str(text))
    (tmp_path / "empty_dir").mkdir()
    with pytest.raises(ValueError, match="not a dataset saved with save_to_disk"):
        load_examples(str(tmp_path / "empty_dir"))
