"""Knowledge transfer: write a trained submodel's LoRA back into the full model's LoRA state.

- ``copy`` (the paper): submodel layer ``k``'s adapters overwrite those of every layer of group ``k``.
- ``anchor``: only the group's anchor receives them; the other members keep their adapters.

Layers in no group (selection modes ``first`` / ``spaced``) keep their adapters under either rule.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING

import torch

from devft.models import FAMILIES, LoraState, layer_key, split_layer_key

if TYPE_CHECKING:
    from devft.growth.plan import GrowthPlan

TRANSFER_RULES = ("copy", "anchor")


def transfer_lora(
    full_lora: Mapping[str, torch.Tensor],
    sub_lora: Mapping[str, torch.Tensor],
    plan: GrowthPlan,
    rule: str | None = None,
) -> LoraState:
    """The full model's new LoRA state after the stage of ``plan`` (``rule`` defaults to ``plan.transfer``).

    Returns a new dict; written tensors are copies of ``sub_lora``'s, untouched ones are ``full_lora``'s own
    tensors (not copied). Raises ``KeyError`` / ``ValueError`` if the states do not fit the plan.
    """
    rule = plan.transfer if rule is None else rule
    if rule not in TRANSFER_RULES:
        raise ValueError(f"unknown transfer rule={rule!r}; choose one of {TRANSFER_RULES}")
    family = FAMILIES[plan.family]
    out: LoraState = dict(full_lora)
    written: set[tuple[int, str]] = set()
    for key, value in sub_lora.items():
        parts = split_layer_key(key, family)
        if parts is None:
            raise KeyError(f"submodel LoRA key {key!r} is not inside a decoder layer")
        prefix, k, suffix = parts
        if k >= plan.capacity:
            raise KeyError(f"submodel LoRA key {key!r} names layer {k}, but the submodel has {plan.capacity}")
        group = plan.groups[k]
        for j in group if rule == "copy" else group[:1]:
            target = layer_key(prefix, j, suffix)
            if target not in out:
                raise KeyError(f"the full LoRA state has no {target!r} to receive {key!r}")
            if tuple(out[target].shape) != tuple(value.shape):
                raise ValueError(
                    f"submodel LoRA {key!r} has shape {tuple(value.shape)}, full {target!r} has "
                    f"{tuple(out[target].shape)}"
                )
            out[target] = value.detach().to(out[target].dtype).clone()
        written.add((k, suffix))
    expected = {(k, s) for k in range(plan.capacity) for s in _suffixes(full_lora, plan.anchors[k], family)}
    if written != expected:
        raise KeyError(f"submodel LoRA does not cover the plan: missing {sorted(expected - written)[:3]}")
    return out


def _suffixes(state: Mapping[str, torch.Tensor], layer: int, family) -> set[str]:
    found = set()
    for key in state:
        parts = split_layer_key(key, family)
        if parts is not None and parts[1] == layer:
            found.add(parts[2])
    return found


def untrained_lora_for_plan(initial: Mapping[str, torch.Tensor], history: Sequence[GrowthPlan],
                            plan: GrowthPlan) -> LoraState:
    """The submodel LoRA of ``plan`` for tensors no stage trains (FFA-LoRA's shared A): ``initial`` (the full
    model's, e.g. its seeded A) fused into every earlier stage's submodel (``history``, in order) and transferred
    back, then fused for ``plan``: the same calls the server makes, so the same values, bit for bit, on the
    same arithmetic. A tensor that training changes cannot be rebuilt this way; nor can one fused through
    ``lora_fusion = "svd"`` (that fuses B·A, which needs the trained B)."""
    from devft.growth.submodel import submodel_lora

    for stage_plan in (*history, plan):
        if stage_plan.lora_fusion != "factors":
            raise ValueError(f"stage {stage_plan.stage} fuses LoRA with lora_fusion={stage_plan.lora_fusion!r}: "
                             "an untrained factor is rebuilt only through lora_fusion='factors'")
    full: LoraState = dict(initial)
    for stage_plan in history:
        full = transfer_lora(full, submodel_lora(full, stage_plan), stage_plan)
    return submodel_lora(full, plan)
