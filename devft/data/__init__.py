"""Data: the built-in task suite, user datasets, chat-template encoding and federated partitions."""

from devft.data.federated import FederatedData, build_federated_data
from devft.data.formatting import (
    IGNORE_INDEX,
    answers_match,
    collate,
    collate_prompts,
    encode_for_training,
    encode_prompt,
    normalise_answer,
    prompt_messages,
)
from devft.data.partition import PARTITION_SCHEMES, family_histogram, format_histogram, partition_indices
from devft.data.settings import DataSettings
from devft.data.sources import load_examples
from devft.data.tasks import TASK_FAMILIES, Example, generate_task_suite

__all__ = [
    "DataSettings",
    "Example",
    "FederatedData",
    "IGNORE_INDEX",
    "PARTITION_SCHEMES",
    "TASK_FAMILIES",
    "answers_match",
    "build_federated_data",
    "collate",
    "collate_prompts",
    "encode_for_training",
    "encode_prompt",
    "family_histogram",
    "format_histogram",
    "generate_task_suite",
    "load_examples",
    "normalise_answer",
    "partition_indices",
    "prompt_messages",
]
