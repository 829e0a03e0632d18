"""Per-layer state of a submodel that *selects* layers (ProgFed: the first L_s, as they are), by layer index.

A selection plan (every group a single layer: ``grouping = first | spaced``, or the identity) neither fuses
nor transfers: submodel layer ``k`` is full-model layer ``plan.groups[k][0]`` itself. So anything kept per
layer of the full model, e.g. FLoRA's and FedEx-LoRA's cumulative base-weight deltas (keyed by module name,
``…layers.<i>.self_attn.q_proj``), maps one to one onto the submodel: :func:`select_layers` takes the
submodel's entries (renamed to its layer indices), :func:`put_layers` writes them back. A plan that fuses
layers is refused: a fused layer's state is not any one layer's.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import TYPE_CHECKING, TypeVar

from devft.models import FAMILIES, layer_key, split_layer_key

if TYPE_CHECKING:
    from devft.growth.plan import GrowthPlan

T = TypeVar("T")


def is_selection(plan: GrowthPlan) -> bool:
    """Whether every submodel layer is one full-model layer as it is (no fusion)."""
    return all(len(group) == 1 for group in plan.groups)


def select_layers(full: Mapping[str, T], plan: GrowthPlan, what: str = "per-layer state") -> dict[str, T]:
    """The entries of ``full`` that belong to the submodel's layers, keyed by the submodel's layer indices.

    ``full`` is keyed by names inside decoder layers of the full model; entries of unselected layers are left
    out. Raises ``ValueError`` naming ``what`` when ``full`` is not empty and the plan fuses layers.
    """
    if not full:
        return {}
    _check(plan, what)
    position = {group[0]: k for k, group in enumerate(plan.groups)}  # full layer -> submodel layer
    out: dict[str, T] = {}
    for key, value in full.items():
        prefix, layer, suffix = _split(key, plan, what)
        if layer in position:
            out[layer_key(prefix, position[layer], suffix)] = value
    return out


def put_layers(full: Mapping[str, T], sub: Mapping[str, T], plan: GrowthPlan, what: str = "per-layer state") -> dict[str, T]:
    """``full`` with the submodel's entries ``sub`` written back to their full-model layers (a new dict)."""
    if not sub:
        return dict(full)
    _check(plan, what)
    out = dict(full)
    for key, value in sub.items():
        prefix, k, suffix = _split(key, plan, what)
        if not 0 <= k < plan.capacity:
            raise KeyError(f"{what} {key!r} names submodel layer {k}, but the submodel has {plan.capacity}")
        out[layer_key(prefix, plan.groups[k][0], suffix)] = value
    return out


def _check(plan: GrowthPlan, what: str) -> None:
    if not is_selection(plan):
        raise ValueError(f"{what} is kept per layer of the full model, but the stage-{plan.stage} plan fuses layers "
                         f"(grouping={plan.grouping!r}, groups {plan.groups[:2]}…): only selection plans map it")


def _split(key: str, plan: GrowthPlan, what: str) -> tuple[str, int, str]:
    parts = split_layer_key(key, FAMILIES[plan.family])
    if parts is None:
        raise KeyError(f"{what} {key!r} is not inside a decoder layer")
    return parts
