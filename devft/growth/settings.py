"""Settings of developmental growth: the stage schedule, grouping, fusion and knowledge transfer."""

from __future__ import annotations

import math
from dataclasses import dataclass, field

from devft.growth.fusion import FUSION_MODES, LORA_FUSION_MODES
from devft.growth.grouping import GROUPING_MODES
from devft.growth.similarity import SIMILARITY_VIEWS
from devft.growth.transfer import TRANSFER_RULES


@dataclass
class GrowthSettings:
    """How the model grows: stages and their capacities, how layers are grouped and fused, how LoRA returns."""

    num_stages: int = field(
        default=4, metadata={"help": "Number of stages S (>= 1); ignored when `capacities` is given."}
    )
    capacities: tuple[int, ...] = field(
        default=(),
        metadata={"help": "Layers per stage, strictly increasing, ending at the full depth; empty = doubling."},
    )
    rounds_per_stage: tuple[int, ...] = field(
        default=(), metadata={"help": "Federated rounds of each stage (each >= 1); empty = equal split."}
    )
    grouping: str = field(
        default="dglg",
        metadata={"help": f"How layers are grouped or selected: one of {', '.join(GROUPING_MODES)}."},
    )
    similarity: str = field(
        default="cka",
        metadata={"help": f"Layer-similarity view for dglg/contiguous: one of {', '.join(SIMILARITY_VIEWS)}."},
    )
    fusion: str = field(
        default="dblf", metadata={"help": f"How a group's layers are fused: one of {', '.join(FUSION_MODES)}."}
    )
    beta: float = field(default=0.1, metadata={"help": "DBLF coefficient: rep = anchor + beta * sum(diffs), >= 0."})
    lora_fusion: str = field(
        default="factors",
        metadata={"help": "LoRA fusion: 'factors' (A and B separately) or 'svd' (fuse B·A, re-factor to rank r)."},
    )
    transfer: str = field(
        default="copy",
        metadata={"help": "Knowledge transfer: 'copy' (to every layer of the group) or 'anchor' (anchor only)."},
    )
    calibration_sequences: int = field(
        default=16, metadata={"help": "Built-in calibration texts for functional similarity views (>= 1)."}
    )
    calibration_max_length: int = field(
        default=64, metadata={"help": "Token length cap of each calibration text (>= 8)."}
    )
    seed: int = field(default=0, metadata={"help": "Seed of spectral clustering and random grouping."})

    def __post_init__(self) -> None:
        self.capacities = tuple(self.capacities)
        self.rounds_per_stage = tuple(self.rounds_per_stage)
        if int(self.num_stages) != self.num_stages or self.num_stages < 1:
            raise ValueError(f"growth.num_stages must be an integer >= 1, got num_stages={self.num_stages!r}")
        for name, values in (("capacities", self.capacities), ("rounds_per_stage", self.rounds_per_stage)):
            for v in values:
                if int(v) != v or v < 1:
                    raise ValueError(f"growth.{name} must hold integers >= 1, got {name}={values!r}")
        if self.capacities and any(b <= a for a, b in zip(self.capacities, self.capacities[1:])):
            raise ValueError(f"growth.capacities must be strictly increasing, got capacities={self.capacities!r}")
        stages = len(self.capacities) or self.num_stages
        if self.rounds_per_stage and len(self.rounds_per_stage) != stages:
            raise ValueError(
                f"growth.rounds_per_stage must have one entry per stage ({stages}), "
                f"got rounds_per_stage={self.rounds_per_stage!r}"
            )
        choices = {
            "grouping": GROUPING_MODES,
            "similarity": SIMILARITY_VIEWS,
            "fusion": FUSION_MODES,
            "lora_fusion": LORA_FUSION_MODES,
            "transfer": TRANSFER_RULES,
        }
        for name, allowed in choices.items():
            if getattr(self, name) not in allowed:
                raise ValueError(f"growth.{name} must be one of {allowed}, got {name}={getattr(self, name)!r}")
        if not (self.beta >= 0 and math.isfinite(self.beta)):
            raise ValueError(f"growth.beta must be a finite number >= 0, got beta={self.beta!r}")
        if self.seed < 0:
            raise ValueError(f"growth.seed must be >= 0, got seed={self.seed!r}")
        if self.calibration_sequences < 1:
            raise ValueError(
                f"growth.calibration_sequences must be >= 1, got calibration_sequences={self.calibration_sequences!r}"
            )
        if self.calibration_max_length < 8:
            raise ValueError(
                "growth.calibration_max_length must be >= 8, "
                f"got calibration_max_length={self.calibration_max_length!r}"
            )
