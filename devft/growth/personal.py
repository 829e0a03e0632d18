"""A client's own LoRA part across growth stages (FedSA-LoRA's B on DevFT and ProgFed submodels).

The server moves the shared LoRA part between stages with :func:`~devft.growth.submodel_lora` (fusion at a
stage's start) and :func:`~devft.growth.transfer_lora` (knowledge transfer at its end). A client moves the part
it keeps for itself with the same two functions, on the plans the server sends:

- it keeps a :class:`PersonalLoRA`: its part for every layer of the full model (``full``), the part of the
  submodel it last trained (``sub``) and that submodel's plan;
- after training under plan P, :func:`after_training` writes the trained part into ``full`` with P's transfer
  rule, so ``full`` always is the client's current full-model part (the stored ``sub`` is already in it);
- for a message under plan P', :func:`personal_for_plan` returns ``sub`` when P' is P, and otherwise fuses
  ``full`` with P'. A stage change is thus "transfer with the plan it was trained under, fuse with the new
  one"; a client that was not sampled for whole stages fuses its last ``full`` with whichever plan comes next.

Every client's part starts at zero (peft's initial B). Flower-free and disk-free: :mod:`client.runtime`
stores the state (:meth:`PersonalLoRA.to_flat` / :meth:`PersonalLoRA.from_flat`).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

import torch

from devft.growth.plan import GrowthPlan, PlanMismatchError
from devft.growth.submodel import submodel_lora
from devft.growth.transfer import transfer_lora
from devft.models import FAMILIES, LoraState, layer_key, split_layer_key

PERSONAL_FORMAT = "devft-personal-1"
"""``format`` in the metadata of a stored personal state."""

_FULL, _SUB = "full/", "sub/"


@dataclass(frozen=True)
class PersonalLoRA:
    """A client's own LoRA tensors: ``full`` (every layer, peft keys), ``sub`` (the submodel of ``plan``)."""

    full: LoraState
    sub: LoraState
    plan: GrowthPlan

    def to_flat(self) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
        """``(tensors, metadata)`` for one safetensors file: keys prefixed ``full/`` and ``sub/``, the plan as JSON."""
        tensors = {_FULL + k: v for k, v in self.full.items()} | {_SUB + k: v for k, v in self.sub.items()}
        return tensors, {"format": PERSONAL_FORMAT, "plan": self.plan.to_json()}

    @classmethod
    def from_flat(cls, tensors: Mapping[str, torch.Tensor], metadata: Mapping[str, str] | None) -> PersonalLoRA:
        """Inverse of :meth:`to_flat`; ``ValueError`` for another format or foreign keys."""
        found = (metadata or {}).get("format")
        if found != PERSONAL_FORMAT or "plan" not in (metadata or {}):
            raise ValueError(f"personal state format={found!r} is not {PERSONAL_FORMAT!r} (or it has no plan)")
        foreign = sorted(k for k in tensors if not k.startswith((_FULL, _SUB)))
        if foreign:
            raise ValueError(f"personal state has tensors outside 'full/' and 'sub/': {foreign[:3]}")
        full = {k[len(_FULL):]: v for k, v in tensors.items() if k.startswith(_FULL)}
        sub = {k[len(_SUB):]: v for k, v in tensors.items() if k.startswith(_SUB)}
        return cls(full=full, sub=sub, plan=GrowthPlan.from_json(str(metadata["plan"])))  # type: ignore[index]


def personal_for_plan(
    stored: PersonalLoRA | None, plan: GrowthPlan, template: Mapping[str, torch.Tensor]
) -> LoraState:
    """The client's own part to train or evaluate the submodel of ``plan`` with.

    ``template``: the submodel's own-part tensors (the keys and shapes to return; values ignored); zeros of it
    before the client's first round. Raises :class:`~devft.growth.PlanMismatchError` when ``stored`` was
    trained on another base model, ``KeyError`` / ``ValueError`` when it does not fit the submodel.
    """
    if stored is None:
        return {k: torch.zeros_like(v) for k, v in template.items()}
    if stored.plan.to_json() == plan.to_json():
        out = dict(stored.sub)
    else:
        _check_same_base(stored.plan, plan)
        out = submodel_lora(stored.full, plan)
    missing, unknown = sorted(set(template) - set(out)), sorted(set(out) - set(template))
    if missing or unknown:
        raise KeyError(f"the personal state does not fit the stage-{plan.stage} submodel: missing {missing[:3]}, "
                       f"unknown {unknown[:3]}")
    for key, value in template.items():
        if tuple(out[key].shape) != tuple(value.shape):
            raise ValueError(f"personal tensor {key!r} has shape {tuple(out[key].shape)}, the submodel's is "
                             f"{tuple(value.shape)} (another lora.r?)")
    return out


def after_training(stored: PersonalLoRA | None, plan: GrowthPlan, trained: Mapping[str, torch.Tensor]) -> PersonalLoRA:
    """The state to keep after training the submodel of ``plan``: ``trained`` written into the full part."""
    if stored is None:
        full = _zero_full(trained, plan)
    else:
        _check_same_base(stored.plan, plan)
        full = stored.full
    sub = {k: v.detach().cpu().clone() for k, v in trained.items()}
    return PersonalLoRA(full=transfer_lora(full, sub, plan), sub=sub, plan=plan)


def _zero_full(sub: Mapping[str, torch.Tensor], plan: GrowthPlan) -> LoraState:
    """Zeros for every layer of the full model, laid out like one submodel layer (decoder layers share shapes:
    fusion already needs it)."""
    family = FAMILIES[plan.family]
    layout: dict[str, torch.Tensor] = {}
    prefix = ""
    for key, value in sub.items():
        parts = split_layer_key(key, family)
        if parts is None:
            raise KeyError(f"personal LoRA key {key!r} is not inside a decoder layer")
        prefix, _, suffix = parts
        if suffix in layout and tuple(layout[suffix].shape) != tuple(value.shape):
            raise ValueError(f"submodel layers differ in the shape of {suffix!r}: {tuple(layout[suffix].shape)} "
                             f"and {tuple(value.shape)}")
        layout.setdefault(suffix, value)
    return {layer_key(prefix, j, s): torch.zeros(t.shape, dtype=t.dtype) for j in range(plan.num_layers)
            for s, t in layout.items()}


def _check_same_base(old: GrowthPlan, new: GrowthPlan) -> None:
    if (old.base_fingerprint, old.num_layers, old.family) != (new.base_fingerprint, new.num_layers, new.family):
        raise PlanMismatchError(
            f"the personal state was trained under a plan for a {old.num_layers}-layer {old.family!r} base model "
            f"{old.base_fingerprint}, the message's plan is for a {new.num_layers}-layer {new.family!r} model "
            f"{new.base_fingerprint}"
        )
