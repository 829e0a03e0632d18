"""Load examples from the built-in task suite, an Alpaca-style JSONL file, or a dataset saved to disk.

User records need ``instruction`` and ``output`` strings; ``input`` is optional (empty when absent) and
``family`` is the record's own ``family`` field or column when it has one, otherwise ``"user"``.
"""

from __future__ import annotations

import json
import logging
import random
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from devft.data.tasks import Example, generate_task_suite

log = logging.getLogger(__name__)

USER_FAMILY = "user"
"""Family of user records that carry no ``family`` of their own."""

_REQUIRED = ("instruction", "output")


def load_examples(source: str, num_examples: int | None = None, seed: int = 0) -> list[Example]:
    """Load examples from ``source``.

    ``source`` is ``"tasks"`` (the built-in suite: ``num_examples`` records generated from ``seed``), the
    path of a ``.jsonl`` file with one Alpaca record per line, or a directory written by
    ``datasets.Dataset.save_to_disk`` (a ``DatasetDict`` must have a ``train`` split; these are its
    records, and :func:`load_user_splits` also gives its ``test`` split). For user data,
    ``num_examples`` (if given) draws that many records with ``seed``, kept in file order.

    Raises ``ValueError`` for an unknown source, a malformed record (naming the file, line and field) or
    more requested examples than the source holds.
    """
    if num_examples is not None and (int(num_examples) != num_examples or num_examples < 0):
        raise ValueError(
            f"num_examples must be a non-negative integer or None, got num_examples={num_examples!r}"
        )
    if source == "tasks":
        if num_examples is None:
            raise ValueError("source='tasks' generates examples: pass num_examples")
        return generate_task_suite(num_examples, seed)
    examples, _ = load_user_splits(source)
    if num_examples is None:
        return examples
    if num_examples > len(examples):
        raise ValueError(
            f"num_examples={num_examples} is more than the {len(examples)} examples in data.source={source!r}"
        )
    chosen = sorted(random.Random(seed).sample(range(len(examples)), num_examples))
    return [examples[i] for i in chosen]


def load_user_splits(source: str) -> tuple[list[Example], list[Example] | None]:
    """User data at ``source`` as ``(records, held-out records)``: a ``save_to_disk`` ``DatasetDict`` gives
    its ``train`` split and its ``test`` split (``None`` without one); a single dataset or a ``.jsonl`` file
    gives all its records and ``None`` (the caller holds some of them out). Errors as :func:`load_examples`."""
    path = Path(source).expanduser()  # ~/data.jsonl is a path, as the shell would read it
    if path.is_dir():
        examples, held_out = _load_saved_dataset(path)
    elif path.is_file() and path.suffix == ".jsonl":
        examples, held_out = _load_jsonl(path), None
    elif path.exists():
        raise ValueError(f"unsupported data.source={source!r}: expected a .jsonl file or a save_to_disk directory")
    else:
        raise ValueError(
            f"unknown data.source={source!r}: not 'tasks' and no such file or directory (looked for "
            f"{path.absolute()}; expected 'tasks', a .jsonl file, or a directory saved with datasets' save_to_disk)"
        )
    if not examples:
        raise ValueError(f"data.source={source!r} holds no examples")
    if held_out == []:
        raise ValueError(f"data.source={source!r}: its 'test' split holds no examples")
    return examples, held_out


def _example(record: Mapping[str, Any], where: str) -> Example:
    """Validate one user record (``where`` names it in errors) and return it as an Example."""
    for field in _REQUIRED:
        if field not in record or record[field] is None:
            raise ValueError(f"{where}: missing field {field!r}")
    example: Example = {}
    for field in ("instruction", "input", "output"):
        value = record.get(field)
        value = "" if value is None else value
        if not isinstance(value, str):
            raise ValueError(
                f"{where}: field {field!r} must be a string, got {type(value).__name__} {value!r}"
            )
        example[field] = value
    for field in ("instruction", "output"):  # an empty answer trains only the end of the turn
        if not example[field].strip():
            raise ValueError(f"{where}: field {field!r} is empty")
    family = record.get("family")
    if family is not None and not isinstance(family, str | int) or isinstance(family, bool):
        raise ValueError(f"{where}: field 'family' must be a string, got {type(family).__name__} {family!r}")
    example["family"] = USER_FAMILY if family is None or family == "" else str(family)
    return example


def _load_jsonl(path: Path) -> list[Example]:
    examples = []
    with path.open(encoding="utf-8") as f:
        for line_number, line in enumerate(f, start=1):
            if not line.strip():
                continue
            where = f"{path}, line {line_number}"
            try:
                record = json.loads(line)
            except json.JSONDecodeError as err:
                raise ValueError(f"{where}: malformed JSON ({err.msg} at column {err.colno})") from err
            if not isinstance(record, dict):
                raise ValueError(f"{where}: expected a JSON object, got {type(record).__name__}")
            examples.append(_example(record, where))
    return examples


def _load_saved_dataset(path: Path) -> tuple[list[Example], list[Example] | None]:
    """A ``save_to_disk`` directory's records: a ``DatasetDict``'s ``train`` and ``test`` splits (other splits
    are left out, and the log says so), or a single dataset's records and ``None``."""
    import datasets

    try:
        loaded = datasets.load_from_disk(str(path))
    except FileNotFoundError as err:
        raise ValueError(f"directory {path} is not a dataset saved with save_to_disk: {err}") from err
    except Exception as err:  # noqa: BLE001 - datasets' own failures (an empty split: IndexError), named here
        raise ValueError(f"directory {path}: datasets cannot load it ({type(err).__name__}: {err})") from err
    if not isinstance(loaded, datasets.DatasetDict):
        return _dataset_examples(loaded, str(path)), None
    if "train" not in loaded:
        raise ValueError(f"dataset at {path} has splits {list(loaded)} but no 'train' split")
    unused = [name for name in loaded if name not in ("train", "test")]
    if unused:
        log.info("dataset at %s: reading its 'train' and 'test' splits only, not %s", path, unused)
    test = _dataset_examples(loaded["test"], f"{path}, split 'test'") if "test" in loaded else None
    return _dataset_examples(loaded["train"], f"{path}, split 'train'"), test


def _dataset_examples(loaded: Any, path: str) -> list[Example]:
    """Every row of one ``datasets.Dataset`` as an Example (``path`` names it in errors)."""
    for column in _REQUIRED:
        if column not in loaded.column_names:
            raise ValueError(f"dataset at {path}: missing column {column!r} (columns: {loaded.column_names})")
    family = loaded.features.get("family")
    names = getattr(family, "names", None)  # a ClassLabel column holds ids: read them as their names
    rows = ({**row, "family": _class_name(names, row["family"], f"{path}, row {i}")}
            if names and row.get("family") is not None else row for i, row in enumerate(loaded))
    return [_example(row, f"{path}, row {i}") for i, row in enumerate(rows)]


def _class_name(names: list[str], label: int, where: str) -> str | None:
    """A ClassLabel id as its name; -1 (how ``datasets`` writes a missing label) is no family."""
    if label == -1:
        return None
    if not 0 <= label < len(names):
        raise ValueError(f"{where}: field 'family' is class id {label}, outside the {len(names)} names {names}")
    return names[label]
