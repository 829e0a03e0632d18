"""Read a model's decoder-layer tensors and a LoRA state per layer, whether or not peft wraps the model."""

from __future__ import annotations

from collections.abc import Mapping

import torch
from torch import nn

from devft.models import Family, decoder_layers, lora_by_layer

_LORA_MARKERS = ("lora_", "lora_magnitude_vector")


def strip_peft_name(name: str) -> str | None:
    """``q_proj.base_layer.weight`` -> ``q_proj.weight``; None for a peft adapter tensor (``…lora_A…``)."""
    parts = name.split(".")
    if any(p.startswith(_LORA_MARKERS) for p in parts):
        return None
    return ".".join(p for p in parts if p != "base_layer")


def layer_base_tensors(layer: nn.Module) -> dict[str, torch.Tensor]:
    """The base (non-LoRA) parameters of one decoder layer, by their plain name (``self_attn.q_proj.weight``)."""
    out: dict[str, torch.Tensor] = {}
    for name, param in layer.named_parameters():
        plain = strip_peft_name(name)
        if plain is not None:
            out[plain] = param.detach()
    return out


def base_layer_tensors(model: nn.Module) -> list[dict[str, torch.Tensor]]:
    """:func:`layer_base_tensors` of every decoder layer of ``model`` (plain or peft-wrapped), in order."""
    return [layer_base_tensors(layer) for layer in decoder_layers(model)]


def lora_factors(state: Mapping[str, torch.Tensor], family: Family) -> dict[int, dict[str, dict[str, torch.Tensor]]]:
    """``{layer: {module: {"A": A, "B": B}}}`` from a peft LoRA state that may hold only some factors
    (e.g. a client's personal B); module names like ``self_attn.q_proj``."""
    out: dict[int, dict[str, dict[str, torch.Tensor]]] = {}
    for layer, tensors in lora_by_layer(state, family).items():
        modules: dict[str, dict[str, torch.Tensor]] = {}
        for suffix, value in tensors.items():
            module, _, kind = suffix.rpartition(".lora_")
            if not module or kind not in ("A.weight", "B.weight"):
                raise KeyError(f"unexpected LoRA tensor {suffix!r} in layer {layer} (only lora_A / lora_B supported)")
            modules.setdefault(module, {})[kind[0]] = value
        out[layer] = modules
    return out


def lora_modules(
    state: Mapping[str, torch.Tensor], family: Family
) -> dict[int, dict[str, tuple[torch.Tensor, torch.Tensor]]]:
    """``{layer: {module: (A, B)}}`` from a peft LoRA state; module names like ``self_attn.q_proj``.

    A is (r, d_in) and B is (d_out, r) for every family (peft keeps this layout for GPT-2's Conv1D too).
    """
    out: dict[int, dict[str, tuple[torch.Tensor, torch.Tensor]]] = {}
    for layer, modules in lora_factors(state, family).items():
        pairs: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
        for module, ab in modules.items():
            if set(ab) != {"A", "B"}:
                raise KeyError(f"LoRA module {module!r} of layer {layer} lacks lora_{'B' if 'A' in ab else 'A'}")
            pairs[module] = (ab["A"], ab["B"])
        out[layer] = pairs
    return out
