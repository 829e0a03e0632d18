"""The stage schedule: how many layers each stage's submodel has and how many federated rounds it runs."""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass


def doubling_capacities(num_layers: int, num_stages: int) -> tuple[int, ...]:
    """``L_s = ceil(L / 2^(S - s))`` for s = 1..S, e.g. (4, 8, 15, 30) for L = 30, S = 4.

    Raises ``ValueError`` when the stages would not be strictly increasing (too many stages for L).
    """
    if num_layers < 1:
        raise ValueError(f"num_layers must be >= 1, got num_layers={num_layers!r}")
    if num_stages < 1:
        raise ValueError(f"num_stages must be >= 1, got num_stages={num_stages!r}")
    caps = tuple(math.ceil(num_layers / 2 ** (num_stages - s)) for s in range(1, num_stages + 1))
    if any(b <= a for a, b in zip(caps, caps[1:])):
        raise ValueError(
            f"num_stages={num_stages} is too many for num_layers={num_layers}: doubling gives capacities {caps}, "
            "which are not strictly increasing"
        )
    return caps


def split_rounds(total_rounds: int, num_stages: int) -> tuple[int, ...]:
    """Split ``total_rounds`` equally over the stages; the remainder goes to the last (largest) stages."""
    if total_rounds < num_stages:
        raise ValueError(
            f"total_rounds={total_rounds} cannot give each of the {num_stages} stages at least one round"
        )
    base, extra = divmod(total_rounds, num_stages)
    return tuple(base + (1 if s >= num_stages - extra else 0) for s in range(num_stages))


@dataclass(frozen=True)
class StageSchedule:
    """Capacities (layers) and rounds of each stage; stages are indexed from 0, Flower rounds from 1."""

    num_layers: int
    capacities: tuple[int, ...]
    rounds: tuple[int, ...]

    def __post_init__(self) -> None:
        caps, rounds = tuple(self.capacities), tuple(self.rounds)
        object.__setattr__(self, "capacities", caps)
        object.__setattr__(self, "rounds", rounds)
        if not caps:
            raise ValueError("a schedule needs at least one stage, got capacities=()")
        for c in caps:
            if int(c) != c or c < 1:
                raise ValueError(f"every capacity must be an integer >= 1, got capacity {c!r} in {caps}")
        for a, b in zip(caps, caps[1:]):
            if b <= a:
                raise ValueError(f"capacities must be strictly increasing, got {b} after {a} in {caps}")
        if caps[-1] > self.num_layers:
            raise ValueError(f"capacity {caps[-1]} exceeds the model's {self.num_layers} layers in {caps}")
        if caps[-1] != self.num_layers:
            raise ValueError(f"the last capacity must be the full depth {self.num_layers}, got {caps[-1]} in {caps}")
        if len(rounds) != len(caps):
            raise ValueError(f"rounds {rounds} must have one entry per stage ({len(caps)} stages)")
        for r in rounds:
            if int(r) != r or r < 1:
                raise ValueError(f"every stage needs at least one round, got {r!r} in rounds {rounds}")

    @property
    def num_stages(self) -> int:
        return len(self.capacities)

    @property
    def total_rounds(self) -> int:
        return sum(self.rounds)

    def first_round(self, stage: int) -> int:
        """The Flower round (1-based) that starts ``stage``."""
        self._check_stage(stage)
        return 1 + sum(self.rounds[:stage])

    def stage_of_round(self, server_round: int) -> int:
        """The stage (0-based) that Flower round ``server_round`` (1-based) belongs to."""
        if not 1 <= server_round <= self.total_rounds:
            raise ValueError(f"server_round={server_round} is outside 1..{self.total_rounds}")
        end = 0
        for stage, r in enumerate(self.rounds):
            end += r
            if server_round <= end:
                return stage
        raise AssertionError("unreachable")  # pragma: no cover

    def is_last_round_of_stage(self, server_round: int) -> bool:
        """Whether knowledge transfer follows ``server_round`` (the last round of its stage)."""
        stage = self.stage_of_round(server_round)
        return server_round == self.first_round(stage) + self.rounds[stage] - 1

    def _check_stage(self, stage: int) -> None:
        if not 0 <= stage < self.num_stages:
            raise ValueError(f"stage={stage} is outside 0..{self.num_stages - 1}")


def make_schedule(
    num_layers: int,
    total_rounds: int | None = None,
    num_stages: int = 4,
    capacities: Sequence[int] = (),
    rounds_per_stage: Sequence[int] = (),
) -> StageSchedule:
    """Build a schedule: explicit capacities or doubling; explicit rounds or an equal split of ``total_rounds``."""
    caps = tuple(capacities) if capacities else doubling_capacities(num_layers, num_stages)
    if rounds_per_stage:
        rounds = tuple(rounds_per_stage)
        if total_rounds is not None and sum(rounds) != total_rounds:
            raise ValueError(f"rounds_per_stage={rounds} sums to {sum(rounds)}, not total_rounds={total_rounds}")
    elif total_rounds is not None:
        rounds = split_rounds(total_rounds, len(caps))
    else:
        raise ValueError("give total_rounds or rounds_per_stage")
    return StageSchedule(num_layers=num_layers, capacities=caps, rounds=rounds)
