"""LoRA through peft: settings, attaching adapters, and the adapter state as named tensors."""

from __future__ import annotations

import dataclasses
import math
import re
import warnings
from collections.abc import Mapping
from dataclasses import dataclass, field

import torch
from peft import LoraConfig, PeftModel, get_peft_model, get_peft_model_state_dict, set_peft_model_state_dict
from torch import nn

from devft.models.families import Family, family_of

LoraState = dict[str, torch.Tensor]
"""Adapter tensors keyed as peft saves them, e.g. ``base_model.model.model.layers.3.self_attn.q_proj.lora_A.weight``."""


@dataclass
class LoraSettings:
    """Rank, scaling and targets of the LoRA adapters every client trains."""

    r: int = field(default=8, metadata={"help": "LoRA rank r (> 0)."})
    alpha: float = field(default=16.0, metadata={"help": "LoRA alpha; the update is scaled by alpha / r."})
    dropout: float = field(default=0.0, metadata={"help": "Dropout on the LoRA input, in [0, 1)."})
    targets: tuple[str, ...] = field(
        default=(), metadata={"help": "Module names to adapt; empty = the family preset (attention + MLP). With "
                                      "growth (devft, progfed) every decoder layer must adapt the same modules: "
                                      "q_proj, not layers.3.self_attn.q_proj."}
    )
    client_ranks: tuple[int, ...] = field(
        default=(),
        metadata={"help": "Rank of each client's LoRA by partition id, cycled ([4, 8, 16]: partition 3 has r=4); "
                          "empty = every client uses r. Needs a rank-heterogeneous federation.aggregation (flora, "
                          "svd; with svd none above r, the server's rank)."},
    )

    def __post_init__(self) -> None:
        self.targets = tuple(self.targets)
        if int(self.r) != self.r or self.r <= 0:
            raise ValueError(f"lora.r must be a positive integer, got r={self.r!r}")
        self.r = int(self.r)
        if isinstance(self.client_ranks, str | bytes) or any(
                isinstance(v, bool) or not isinstance(v, int | float) or not math.isfinite(v) or int(v) != v or v <= 0
                for v in self.client_ranks):
            raise ValueError(f"lora.client_ranks must be a list of positive integers, got "
                             f"client_ranks={self.client_ranks!r}")
        self.client_ranks = tuple(int(v) for v in self.client_ranks)
        if not (self.alpha > 0 and math.isfinite(self.alpha)):
            raise ValueError(f"lora.alpha must be a finite number > 0, got alpha={self.alpha!r}")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"lora.dropout must be in [0, 1), got dropout={self.dropout!r}")

    @property
    def scale(self) -> float:
        return float(self.alpha) / self.r

    def rank_of(self, partition: int) -> int:
        """The LoRA rank of the client holding ``partition`` (``client_ranks`` cycled, else ``r``)."""
        return self.client_ranks[partition % len(self.client_ranks)] if self.client_ranks else self.r

    def with_rank(self, rank: int) -> LoraSettings:
        """These settings for one client's adapters: rank ``rank``, same alpha, dropout and targets."""
        return dataclasses.replace(self, r=rank, client_ranks=())

    def peft_config(self, family: Family) -> LoraConfig:
        return LoraConfig(
            r=self.r,
            lora_alpha=self.alpha,
            lora_dropout=self.dropout,
            target_modules=list(self.targets or family.lora_targets),
            fan_in_fan_out=family.fan_in_fan_out,
            bias="none",
            task_type="CAUSAL_LM",
        )


def attach_lora(model: nn.Module, settings: LoraSettings, seed: int = 0) -> PeftModel:
    """Wrap ``model`` with fresh LoRA adapters (A seeded, B = 0, so the model's output is unchanged)."""
    family = family_of(model)
    _check_targets(model, settings.targets or family.lora_targets, family)
    with torch.random.fork_rng(devices=[]), warnings.catch_warnings():
        # peft asks transformers' deprecated is_gradient_checkpointing: one FutureWarning per wrap, nothing to act on
        warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*", category=FutureWarning)
        torch.manual_seed(seed)
        peft_model = get_peft_model(model, settings.peft_config(family))
    return peft_model


def _check_targets(model: nn.Module, targets: tuple[str, ...], family: Family) -> None:
    """Every target names linear modules of the decoder layers (peft's rule: the module's name or its last
    dotted parts); growth fuses and transfers decoder layers only, so a module outside them is refused."""
    from transformers.pytorch_utils import Conv1D

    inside = family.layers_path + "."
    modules = {name.removeprefix("base_model.model."): m for name, m in model.named_modules()}
    for target in targets:
        matched = [n for n in modules if n == target or n.endswith("." + target)]
        for name in matched:
            module = modules[name]
            base = module.get_base_layer() if callable(getattr(module, "get_base_layer", None)) else module
            if not isinstance(base, nn.Linear | Conv1D):
                raise ValueError(f"lora.targets={tuple(targets)!r}: {target!r} matches {name!r} "
                                 f"({type(base).__name__}), not a linear layer (e.g. {list(family.lora_targets)})")
        if not matched:
            raise ValueError(f"lora.targets={tuple(targets)!r}: {target!r} names no module of this "
                             f"{family.name} model (its layers have e.g. {list(family.lora_targets)})")
        outside = [n for n in matched if not n.startswith(inside)]
        if outside:
            raise ValueError(f"lora.targets={tuple(targets)!r}: {target!r} matches {outside[0]!r}, outside the "
                             f"decoder layers ({family.layers_path}.N); devft grows, fuses and transfers decoder "
                             "layers only, so LoRA must stay inside them")


def lora_state(model: nn.Module) -> LoraState:
    """The adapter tensors of a peft model (detached views of the live parameters, no copies)."""
    return {k: v.detach() for k, v in get_peft_model_state_dict(model).items()}


def load_lora_state(model: nn.Module, state: Mapping[str, torch.Tensor]) -> None:
    """Copy ``state`` into the model's adapters; every adapter key must be present with its shape."""
    expected = get_peft_model_state_dict(model)
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    if missing or unexpected:
        raise KeyError(
            f"LoRA state does not match the model: missing {missing[:3]}{'…' if len(missing) > 3 else ''}, "
            f"unexpected {unexpected[:3]}{'…' if len(unexpected) > 3 else ''}"
        )
    for key, value in expected.items():
        if tuple(state[key].shape) != tuple(value.shape):
            raise ValueError(f"LoRA tensor {key} has shape {tuple(state[key].shape)}, expected {tuple(value.shape)}")
    set_peft_model_state_dict(model, {k: torch.as_tensor(v) for k, v in state.items()})


_LAYER_RE_CACHE: dict[str, re.Pattern[str]] = {}


def _layer_pattern(family: Family) -> re.Pattern[str]:
    if family.name not in _LAYER_RE_CACHE:
        _LAYER_RE_CACHE[family.name] = re.compile(r"^(.*?\b" + re.escape(family.layers_path) + r")\.(\d+)\.(.+)$")
    return _LAYER_RE_CACHE[family.name]


def split_layer_key(key: str, family: Family) -> tuple[str, int, str] | None:
    """Split ``…model.layers.7.self_attn.q_proj.lora_A.weight`` into (prefix, 7, suffix); None if no layer."""
    match = _layer_pattern(family).match(key)
    if match is None:
        return None
    return match.group(1), int(match.group(2)), match.group(3)


def layer_key(prefix: str, index: int, suffix: str) -> str:
    """Inverse of :func:`split_layer_key`."""
    return f"{prefix}.{index}.{suffix}"


def lora_by_layer(state: Mapping[str, torch.Tensor], family: Family) -> dict[int, dict[str, torch.Tensor]]:
    """Group a LoRA state by decoder layer: ``{layer: {suffix: tensor}}``; non-layer keys are refused."""
    out: dict[int, dict[str, torch.Tensor]] = {}
    for key, value in state.items():
        parts = split_layer_key(key, family)
        if parts is None:
            raise KeyError(f"LoRA key {key!r} is not inside a decoder layer of family {family.name!r}")
        out.setdefault(parts[1], {})[parts[2]] = value
    return out


def count_parameters(state: Mapping[str, torch.Tensor]) -> int:
    return sum(int(v.numel()) for v in state.values())
