"""Settings of local LoRA training and of evaluation."""

from __future__ import annotations

import math
from dataclasses import dataclass, field

SCHEDULES = ("constant", "linear", "cosine")


@dataclass
class TrainSettings:
    """One local training call: optimiser, schedule and budget (a client runs this every round)."""

    lr: float = field(default=1e-3, metadata={"help": "Peak AdamW learning rate (> 0)."})
    max_steps: int = field(default=10, metadata={"help": "Optimiser steps per call; 0 = use `epochs`."})
    epochs: float = field(default=1.0, metadata={"help": "Passes over the data when max_steps = 0 (> 0)."})
    batch_size: int = field(default=8, metadata={"help": "Examples per micro-batch (>= 1)."})
    grad_accum: int = field(default=1, metadata={"help": "Micro-batches per optimiser step (>= 1)."})
    max_grad_norm: float = field(default=1.0, metadata={"help": "Gradient clipping norm; 0 disables."})
    weight_decay: float = field(default=0.0, metadata={"help": "AdamW weight decay (>= 0)."})
    warmup_steps: int = field(default=0, metadata={"help": "Linear warm-up steps before the schedule."})
    schedule: str = field(default="constant", metadata={"help": "LR schedule: constant, linear or cosine."})
    seed: int = field(default=0, metadata={"help": "Seed of data order and dropout."})

    def __post_init__(self) -> None:
        for name in ("lr", "epochs", "max_grad_norm", "weight_decay"):
            if not math.isfinite(getattr(self, name)):
                raise ValueError(f"train.{name} must be a finite number, got {name}={getattr(self, name)!r}")
        if not self.lr > 0:
            raise ValueError(f"train.lr must be > 0, got lr={self.lr!r}")
        if self.max_steps < 0:
            raise ValueError(f"train.max_steps must be >= 0, got max_steps={self.max_steps!r}")
        if self.max_steps == 0 and not self.epochs > 0:
            raise ValueError(f"train.epochs must be > 0 when max_steps = 0, got epochs={self.epochs!r}")
        if self.batch_size < 1:
            raise ValueError(f"train.batch_size must be >= 1, got batch_size={self.batch_size!r}")
        if self.grad_accum < 1:
            raise ValueError(f"train.grad_accum must be >= 1, got grad_accum={self.grad_accum!r}")
        if self.max_grad_norm < 0:
            raise ValueError(f"train.max_grad_norm must be >= 0, got max_grad_norm={self.max_grad_norm!r}")
        if self.weight_decay < 0:
            raise ValueError(f"train.weight_decay must be >= 0, got weight_decay={self.weight_decay!r}")
        if self.warmup_steps < 0:
            raise ValueError(f"train.warmup_steps must be >= 0, got warmup_steps={self.warmup_steps!r}")
        if self.seed < 0:
            raise ValueError(f"train.seed must be >= 0, got seed={self.seed!r}")
        if self.schedule not in SCHEDULES:
            raise ValueError(f"train.schedule must be one of {SCHEDULES}, got schedule={self.schedule!r}")


@dataclass
class EvalSettings:
    """How the global model is evaluated on the held-out set."""

    batch_size: int = field(default=16, metadata={"help": "Examples per evaluation batch (>= 1)."})
    max_new_tokens: int = field(default=16, metadata={"help": "Greedy generation length for accuracy."})
    max_examples: int = field(default=0, metadata={"help": "Evaluate on the first N held-out examples; 0 = all."})
    generate: bool = field(default=True, metadata={"help": "Also compute exact-match accuracy by generation."})

    def __post_init__(self) -> None:
        if self.batch_size < 1:
            raise ValueError(f"eval.batch_size must be >= 1, got batch_size={self.batch_size!r}")
        if self.max_new_tokens < 1:
            raise ValueError(f"eval.max_new_tokens must be >= 1, got max_new_tokens={self.max_new_tokens!r}")
        if self.max_examples < 0:
            raise ValueError(f"eval.max_examples must be >= 0, got max_examples={self.max_examples!r}")
