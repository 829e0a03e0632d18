"""Several seeds of each compared config: the spread of a figure over seeds, and paired differences.

``devft compare --seeds`` runs every config once per seed. With the same seed, two configs sample the same
clients in the same rounds and draw their LoRA initialisation and data order from the same seed (the same
initial values when their LoRA shapes agree), so the fair question is paired: per seed, how much lower is
one config's final eval loss than the baseline's? The interval is a
Student t interval of the mean over seeds (95 %), which is honest about how few seeds there are: with three
seeds its half-width is 2.5 standard deviations.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from scipy import stats


@dataclass(frozen=True)
class Spread:
    """Mean, sample standard deviation (None for one value), range and 95 % t half-width of some values."""

    n: int
    mean: float
    sd: float | None
    low: float
    high: float
    ci95: float | None  # half-width: the mean's 95 % interval is mean ± ci95 (None for one value)


def spread(values: Sequence[float]) -> Spread | None:
    """:class:`Spread` of ``values`` (None when there are none)."""
    xs = [float(v) for v in values]
    if not xs:
        return None
    n = len(xs)
    mean = math.fsum(xs) / n
    if n == 1:
        return Spread(1, mean, None, mean, mean, None)
    sd = math.sqrt(math.fsum((x - mean) ** 2 for x in xs) / (n - 1))
    return Spread(n, mean, sd, min(xs), max(xs), float(stats.t.ppf(0.975, n - 1)) * sd / math.sqrt(n))


@dataclass(frozen=True)
class Paired:
    """``other − baseline`` over the seeds both have: the differences' spread and how many are below 0."""

    seeds: tuple[int, ...]
    diffs: tuple[float, ...]
    spread: Spread
    lower: int  # seeds where other < baseline

    @property
    def significant(self) -> bool:
        """Whether the 95 % interval of the mean difference excludes 0."""
        s = self.spread
        return s.ci95 is not None and abs(s.mean) > s.ci95


def paired(baseline: Mapping[int, float | None], other: Mapping[int, float | None]) -> Paired | None:
    """Per-seed differences ``other[s] − baseline[s]`` over the seeds where both have a value (None when
    they share none)."""
    seeds = tuple(sorted(s for s in baseline if s in other and baseline[s] is not None and other[s] is not None))
    if not seeds:
        return None
    diffs = tuple(float(other[s]) - float(baseline[s]) for s in seeds)
    return Paired(seeds, diffs, spread(diffs), sum(d < 0 for d in diffs))
