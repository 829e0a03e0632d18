"""The federated data of a run: one training partition per client and a held-out global test set.

:func:`build_federated_data` is a pure function of :class:`DataSettings`: every client process calls it
and gets the same partitions. The test set shares no ``(instruction, input)`` with any training example:

- built-in suite: training is generated with ``seed``, the test set with a separate seed
  (``seed + TEST_SEED_OFFSET``), dropping records seen in training or already in the test set; families
  are balanced as in the suite (round-robin quotas).
- user data: the records are shuffled with ``seed``; the first ``num_test`` distinct ``(instruction,
  input)`` pairs form the test set, and the training set is the next ``num_train`` records whose pair is
  not in the test set. A ``save_to_disk`` ``DatasetDict`` with a ``test`` split gives the test set from that
  split instead (its first ``num_test`` distinct pairs after the same shuffle), and the training set from
  its ``train`` split, again without any test pair.
"""

from __future__ import annotations

import logging
import random
from dataclasses import dataclass
from itertools import accumulate

from devft.data.partition import family_histogram, partition_indices
from devft.data.settings import DataSettings
from devft.data.sources import load_user_splits
from devft.data.tasks import Example, check_families, generate_task_suite

log = logging.getLogger(__name__)

TEST_SEED_OFFSET = 1_000_003
"""The task-suite test set is generated with ``seed + TEST_SEED_OFFSET``."""

_MAX_DRAWS_PER_TEST_EXAMPLE = 64


@dataclass
class FederatedData:
    """Training partitions (one list of examples per client) and the global held-out test set."""

    partitions: list[list[Example]]
    test: list[Example]

    def histogram(self) -> list[dict[str, int]]:
        """Per client, the number of its training examples in each family (see ``family_histogram``)."""
        flat = [e for p in self.partitions for e in p]
        ends = list(accumulate(len(p) for p in self.partitions))
        return family_histogram(
            flat, [range(end - len(p), end) for end, p in zip(ends, self.partitions, strict=True)]
        )


def _key(example: Example) -> tuple[str, str]:
    return example["instruction"], example["input"]


def _task_test_set(
    num_test: int, seed: int, families: tuple[str, ...], seen: set[tuple[str, str]]
) -> list[Example]:
    """``num_test`` suite records from the test seed, none in ``seen`` and no two alike, families round-robin."""
    per_family: dict[str, list[Example]] = {}
    for j, family in enumerate(families):
        quota = len(range(j, num_test, len(families)))
        kept: list[Example] = []
        draws = quota
        while len(kept) < quota:
            if draws > _MAX_DRAWS_PER_TEST_EXAMPLE * quota:
                raise ValueError(
                    f"cannot draw {quota} test examples of family={family!r} unseen in training: its inputs are "
                    f"exhausted; lower num_train or num_test (num_test={num_test})"
                )
            # A family's stream does not depend on the others, so drawing it alone extends the same records.
            candidates = generate_task_suite(draws, seed + TEST_SEED_OFFSET, [family])
            kept, keys = [], set()
            for example in candidates:
                if _key(example) not in seen and _key(example) not in keys:
                    kept.append(example)
                    keys.add(_key(example))
                    if len(kept) == quota:
                        break
            draws *= 2
        per_family[family] = kept
    return [per_family[families[i % len(families)]][i // len(families)] for i in range(num_test)]


def _shuffled(examples: list[Example], seed: int) -> list[Example]:
    order = list(range(len(examples)))
    random.Random(seed).shuffle(order)
    return [examples[i] for i in order]


def _distinct_prefix(examples: list[Example], count: int, where: str) -> list[Example]:
    """The first ``count`` examples of ``examples`` with distinct ``(instruction, input)`` pairs."""
    test, keys = [], set()
    for example in examples:
        if len(test) == count:
            break
        if _key(example) not in keys:
            test.append(example)
            keys.add(_key(example))
    if len(test) < count:
        raise ValueError(f"{where} has {len(keys)} distinct (instruction, input) pairs: not enough for "
                         f"num_test={count} held-out examples")
    return test


def _user_split(settings: DataSettings) -> tuple[list[Example], list[Example]]:
    """(training, test) examples of user data (the module docstring says how)."""
    records, held_out = load_user_splits(settings.source)
    records = _shuffled(records, settings.seed)
    if held_out is None:
        if len(records) <= settings.num_test:
            raise ValueError(
                f"data.source={settings.source!r} has {len(records)} examples: not enough for num_test="
                f"{settings.num_test} held-out examples plus training"
            )
        test = _distinct_prefix(records, settings.num_test, f"data.source={settings.source!r}")
    else:
        test = _distinct_prefix(_shuffled(held_out, settings.seed), settings.num_test,
                                f"the 'test' split of data.source={settings.source!r}")
    test_keys = {_key(e) for e in test}
    train = [e for e in records if _key(e) not in test_keys]
    if held_out is not None and len(train) < len(records):
        log.warning("source=%r: %d records of the 'train' split repeat an (instruction, input) pair of the %d "
                    "held-out ones and are left out of training", settings.source, len(records) - len(train),
                    len(test))
    if not train:
        raise ValueError(f"data.source={settings.source!r} leaves no training examples besides the {len(test)} held out")
    if len(train) < settings.num_train:
        log.warning("source=%r leaves %d training examples besides the %d held out (repeats of a held-out "
                    "pair are left out too): fewer than num_train=%d", settings.source, len(train),
                    len(test), settings.num_train)
    return train[: settings.num_train], test


def build_federated_data(settings: DataSettings) -> FederatedData:
    """Load or generate the examples of ``settings``, hold out the test set, and partition the rest."""
    if settings.source == "tasks":
        families = check_families(settings.families)
        train = generate_task_suite(settings.num_train, settings.seed, families)
        test = _task_test_set(settings.num_test, settings.seed, families, {_key(e) for e in train})
    else:
        train, test = _user_split(settings)
    indices = partition_indices(
        train,
        settings.num_clients,
        settings.partition,
        alpha=settings.alpha,
        families_per_client=settings.families_per_client,
        seed=settings.seed,
    )
    return FederatedData(partitions=[[train[i] for i in part] for part in indices], test=test)
