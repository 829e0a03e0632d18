"""The federated data of a run: one training partition per client and a held-out global test set.

:func:`build_federated_data` is a pure function of :class:`DataSettings`: every client process calls it
and gets the same partitions. The test set shares no ``(instruction, input)`` with any training example:

- built-in suite: training is generated with ``seed``, the test set with a separate seed
  (``seed + TEST_SEED_OFFSET``), dropping records seen in training or already in the test set; families
  are balanced as in the suite (round-robin quotas).
- user data: the records are shuffled with ``seed``; the first ``num_test`` form the test set, and the
  training set is the next ``num_train`` records whose ``(instruction, input)`` is not in the test set.
"""

from __future__ import annotations

import logging
import random
from dataclasses import dataclass
from itertools import accumulate

from devft.data.partition import family_histogram, partition_indices
from devft.data.settings import DataSettings
from devft.data.sources import load_examples
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


def build_federated_data(settings: DataSettings) -> FederatedData:
    """Load or generate the examples of ``settings``, hold out the test set, and partition the rest."""
    if settings.source == "tasks":
        families = check_families(settings.families)
        train = generate_task_suite(settings.num_train, settings.seed, families)
        test = _task_test_set(settings.num_test, settings.seed, families, {_key(e) for e in train})
    else:
        examples = load_examples(settings.source)
        order = list(range(len(examples)))
        random.Random(settings.seed).shuffle(order)
        if len(examples) <= settings.num_test:
            raise ValueError(
                f"source={settings.source!r} has {len(examples)} examples: not enough for num_test="
                f"{settings.num_test} held-out examples plus training"
            )
        test, test_keys = [], set()
        for i in order:  # the first num_test distinct (instruction, input) pairs of the shuffle
            if len(test) == settings.num_test:
                break
            if _key(examples[i]) not in test_keys:
                test.append(examples[i])
                test_keys.add(_key(examples[i]))
        if len(test) < settings.num_test:
            raise ValueError(f"source={settings.source!r} has {len(test_keys)} distinct (instruction, input) pairs: "
                             f"not enough for num_test={settings.num_test} held-out examples plus training")
        train = [examples[i] for i in order if _key(examples[i]) not in test_keys]
        if len(train) < settings.num_train:
            log.warning("source=%r leaves %d training examples besides the %d held out (repeats of a held-out "
                        "pair are left out too): fewer than num_train=%d", settings.source, len(train),
                        settings.num_test, settings.num_train)
        train = train[: settings.num_train]
    indices = partition_indices(
        train,
        settings.num_clients,
        settings.partition,
        alpha=settings.alpha,
        families_per_client=settings.families_per_client,
        seed=settings.seed,
    )
    return FederatedData(partitions=[[train[i] for i in part] for part in indices], test=test)
