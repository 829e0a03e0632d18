"""Fusing a group of layers into one representative layer (DBLF and its ablations), base weights and LoRA.

For a group ``g = (a, j_1, …)`` with anchor ``a`` (its first layer):

- ``dblf``: ``rep = θ_a + β Σ_{j∈g} (θ_j − θ_a) = (1 − β(|g|−1)) θ_a + β Σ_{j≠a} θ_j``
- ``r-one``: ``rep = θ_a`` (anchor only)
- ``sum``: ``rep = Σ_{j∈g} θ_j``

Every linear combination goes through :func:`devft.aggregation.weighted_sum` (the same primitive the
aggregation kernels provide). Base layers fuse every parameter of the decoder layer (attention, MLP,
norms). LoRA fuses either the factors A and B separately (``factors``, the paper's reading) or the update
``ΔW = B·A`` exactly, re-factored to rank r by a truncated SVD (``svd``: ``B = U_r Σ_r``, ``A = V_rᵀ``).
With ``svd``, a group whose fused ΔW is zero (fresh LoRA, B = 0) falls back to ``factors`` so A stays a
trainable random projection, and singleton groups are copied as they are.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch
from torch import nn

from devft.aggregation import weighted_sum
from devft.aggregation.product_svd import svd_of_product
from devft.growth._params import base_layer_tensors, lora_factors
from devft.models import Family, LoraState, layer_key, split_layer_key

FUSION_MODES = ("dblf", "r-one", "sum")
LORA_FUSION_MODES = ("factors", "svd")


def fusion_weights(group_size: int, mode: str, beta: float) -> list[float]:
    """The coefficient of each member (anchor first) in the fused tensor; ``r-one`` keeps only the anchor."""
    if group_size < 1:
        raise ValueError(f"group_size must be >= 1, got group_size={group_size}")
    if mode == "dblf":
        return [1.0 - beta * (group_size - 1)] + [float(beta)] * (group_size - 1)
    if mode == "r-one":
        return [1.0]
    if mode == "sum":
        return [1.0] * group_size
    raise ValueError(f"unknown fusion mode={mode!r}; choose one of {FUSION_MODES}")


def fuse_tensors(tensors: Sequence[torch.Tensor], mode: str, beta: float) -> torch.Tensor:
    """Fuse the same tensor of each member of a group (anchor first) into a new tensor."""
    weights = fusion_weights(len(tensors), mode, beta)
    return weighted_sum(list(tensors[: len(weights)]), weights)


def fuse_layer_tensors(
    members: Sequence[Mapping[str, torch.Tensor]], mode: str, beta: float
) -> dict[str, torch.Tensor]:
    """Fuse whole layers given as ``{name: tensor}`` (anchor first); every member must have the same names."""
    names = list(members[0])
    for i, member in enumerate(members[1:], start=1):
        if set(member) != set(names):
            raise ValueError(f"group member {i} has tensors {sorted(set(member) ^ set(names))} the anchor lacks")
    return {name: fuse_tensors([m[name] for m in members], mode, beta) for name in names}


def fuse_base_layers(
    model: nn.Module, groups: Sequence[Sequence[int]], mode: str, beta: float
) -> list[dict[str, torch.Tensor]]:
    """The fused base parameters of each group's representative layer (plain names, new tensors)."""
    params = base_layer_tensors(model)
    return [fuse_layer_tensors([params[i] for i in group], mode, beta) for group in groups]


def fuse_lora(
    state: Mapping[str, torch.Tensor],
    groups: Sequence[Sequence[int]],
    family: Family,
    mode: str,
    beta: float,
    lora_fusion: str = "factors",
) -> LoraState:
    """The submodel's LoRA state: group ``k``'s fused adapters under layer index ``k`` (peft keys).

    ``state`` may hold only one factor of a module (a client's personal B under FedSA-LoRA): it is then fused
    on its own, exactly as ``factors`` fuses it next to the other. ``svd`` fuses the product B·A, so it needs
    both factors of every module of a group with more than one member.
    """
    if lora_fusion not in LORA_FUSION_MODES:
        raise ValueError(f"unknown lora_fusion={lora_fusion!r}; choose one of {LORA_FUSION_MODES}")
    prefix = _layer_prefix(state, family)
    by_layer = lora_factors(state, family)
    out: LoraState = {}
    for k, group in enumerate(groups):
        missing = [i for i in group if i not in by_layer]
        if missing:
            raise KeyError(f"the LoRA state has no adapters for layers {missing} of group {tuple(group)}")
        for i in group[1:]:  # a module only some members adapt would be dropped from the fused layer
            if set(by_layer[i]) != set(by_layer[group[0]]):
                raise KeyError(f"layer {i} has LoRA on {sorted(by_layer[i])}, its group's anchor {group[0]} on "
                               f"{sorted(by_layer[group[0]])}: a group's layers must adapt the same modules")
        for module, parts in by_layer[group[0]].items():
            members = [by_layer[i].get(module, {}) for i in group]  # anchor first
            for i, member in zip(group, members):
                if set(member) != set(parts):
                    raise KeyError(f"layer {i} holds LoRA factors {sorted(member)} of {module!r}, its group's "
                                   f"anchor {group[0]} holds {sorted(parts)}")
            if set(parts) == {"A", "B"}:
                a, b = _fuse_module([(m["A"], m["B"]) for m in members], mode, beta, lora_fusion)
                fused = {"A": a, "B": b}
            elif lora_fusion == "svd" and len(group) > 1 and mode != "r-one":
                raise ValueError(f"lora_fusion='svd' fuses B·A, but the LoRA state holds only lora_{sorted(parts)[0]} "
                                 f"of {module!r}; use lora_fusion='factors'")
            else:
                fused = {part: fuse_tensors([m[part] for m in members], mode, beta) for part in parts}
            for part in sorted(fused):  # A before B
                out[layer_key(prefix, k, f"{module}.lora_{part}.weight")] = fused[part]
    return out


def check_same_lora_modules(state: Mapping[str, torch.Tensor], family: Family, num_layers: int,
                            targets: Sequence[str] = ()) -> None:
    """Growth fuses any layers together and transfers LoRA back to every layer of a group, so every decoder
    layer must carry LoRA on the same modules: ``ValueError`` naming ``lora.targets`` and the first layer
    that differs from layer 0 otherwise (e.g. a target ``layers.5.mlp.down_proj``)."""
    by_layer = lora_factors(state, family)
    first = sorted(by_layer.get(0, {}))
    for layer in range(num_layers):
        modules = sorted(by_layer.get(layer, {}))
        if modules != first:
            raise ValueError(
                f"lora.targets={tuple(targets)!r} adapts {modules} in layer {layer} but {first} in layer 0: "
                "growth fuses layers and transfers LoRA between them, so every decoder layer must adapt the same "
                "modules (name modules, e.g. 'down_proj', not one layer's); or run federation.method='fedit'")


def _fuse_module(
    factors: Sequence[tuple[torch.Tensor, torch.Tensor]], mode: str, beta: float, lora_fusion: str
) -> tuple[torch.Tensor, torch.Tensor]:
    a = fuse_tensors([f[0] for f in factors], mode, beta)
    b = fuse_tensors([f[1] for f in factors], mode, beta)
    if lora_fusion == "factors" or len(factors) == 1 or mode == "r-one":
        return a, b
    weights = fusion_weights(len(factors), mode, beta)
    # ΔW = Σ w_j B_j A_j = [B_1 … B_n] [w_1 A_1; …; w_n A_n], of rank ≤ |g|·r: its SVD through the factors
    stacked_b = torch.cat([fb.double() for _, fb in factors], dim=1)  # (d_out, |g|·r)
    stacked_a = torch.cat([w * fa.double() for w, (fa, _) in zip(weights, factors)], dim=0)  # (|g|·r, d_in)
    rank = factors[0][0].shape[0]
    found = svd_of_product(stacked_b, stacked_a, rank)
    if found.energy == 0.0:
        return a, b  # nothing learnt yet: keep the fused random A and the zero B
    dtype = factors[0][0].dtype
    sigma = found.sigma[:rank]
    return found.v.T.to(dtype).contiguous(), (found.u * sigma).to(dtype).contiguous()


def _layer_prefix(state: Mapping[str, torch.Tensor], family: Family) -> str:
    for key in state:
        parts = split_layer_key(key, family)
        if parts is not None:
            return parts[0]
    raise KeyError(f"the LoRA state has no decoder-layer keys for family {family.name!r}")
