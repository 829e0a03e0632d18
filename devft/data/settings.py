"""Settings of the data every client trains on and the held-out test set, validated on construction."""

from __future__ import annotations

import math
from dataclasses import dataclass, field

from devft.data.partition import PARTITION_SCHEMES
from devft.data.tasks import check_families


@dataclass
class DataSettings:
    """Where the examples come from, how they are encoded and how they are split across clients."""

    source: str = field(
        default="tasks",
        metadata={
            "help": "'tasks' (the built-in suite), a .jsonl file in Alpaca form, or a save_to_disk directory."
        },
    )
    num_train: int = field(
        default=2000,
        metadata={"help": "Training examples: generated for 'tasks'; for user data, at most this many."},
    )
    num_test: int = field(
        default=200, metadata={"help": "Held-out test examples that no client trains on (>= 1)."}
    )
    families: tuple[str, ...] = field(
        default=(), metadata={"help": "Task families of the built-in suite to use; empty = all of them."}
    )
    max_length: int = field(default=128, metadata={"help": "Maximum tokens per encoded example (>= 2)."})
    num_clients: int = field(default=10, metadata={"help": "Number of federated clients (partitions)."})
    partition: str = field(
        default="dirichlet", metadata={"help": f"Partition scheme, one of {', '.join(PARTITION_SCHEMES)}."}
    )
    alpha: float = field(
        default=0.5,
        metadata={"help": "Dirichlet concentration over task families (> 0); smaller = more skewed."},
    )
    families_per_client: int = field(
        default=2, metadata={"help": "Families each client holds under the pathological partition (>= 1)."}
    )
    seed: int = field(default=0, metadata={"help": "Seed of generation, the test split and partitioning."})

    def __post_init__(self) -> None:
        if isinstance(self.families, str):  # "add,subtract" from a command line or a run config
            self.families = tuple(f.strip() for f in self.families.split(",") if f.strip())
        self.families = tuple(self.families)
        if not isinstance(self.source, str) or not self.source:
            raise ValueError(f"data.source must be a non-empty string, got source={self.source!r}")
        for name in ("num_train", "num_test", "max_length", "num_clients", "families_per_client", "seed"):
            value = getattr(self, name)
            if isinstance(value, bool) or not (
                isinstance(value, int) or (isinstance(value, float) and value.is_integer())
            ):
                raise ValueError(f"data.{name} must be an integer, got {name}={value!r}")
            setattr(self, name, int(value))
        minimum = {"num_train": 1, "num_test": 1, "max_length": 2, "num_clients": 1, "families_per_client": 1,
                   "seed": 0}
        for name, low in minimum.items():
            if getattr(self, name) < low:
                raise ValueError(f"data.{name} must be >= {low}, got {name}={getattr(self, name)!r}")
        if self.partition not in PARTITION_SCHEMES:
            raise ValueError(
                f"data.partition must be one of {list(PARTITION_SCHEMES)}, got partition={self.partition!r}"
            )
        if (
            isinstance(self.alpha, bool)
            or not isinstance(self.alpha, (int, float))
            or not (math.isfinite(self.alpha) and self.alpha > 0)
        ):
            raise ValueError(f"data.alpha must be a finite number > 0, got alpha={self.alpha!r}")
        self.alpha = float(self.alpha)
        if self.num_clients > self.num_train:
            raise ValueError(
                f"data.num_clients={self.num_clients} is more than num_train={self.num_train}: "
                "every client needs at least one training example"
            )
        if self.source == "tasks":
            try:
                chosen = check_families(self.families)
            except ValueError as err:
                raise ValueError(f"data.families: {err}") from err
            if self.partition == "pathological" and self.families_per_client > len(chosen):
                raise ValueError(
                    f"data.families_per_client={self.families_per_client} is more than the {len(chosen)} "
                    "task families in use"
                )
        elif self.families:
            raise ValueError(
                f"data.families selects built-in task families and needs source='tasks', "
                f"got families={self.families!r} with source={self.source!r}"
            )
