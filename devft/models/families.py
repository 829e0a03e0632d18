"""Where each supported architecture keeps its decoder layers, and which modules LoRA adapts by default."""

from __future__ import annotations

from dataclasses import dataclass

from torch import nn


@dataclass(frozen=True)
class Family:
    """How devft finds and replaces the decoder layers of one architecture family."""

    name: str
    layers_path: str  # dotted attribute path from the *base* causal-LM model to its ModuleList of layers
    lora_targets: tuple[str, ...]  # default LoRA target module names (attention + MLP projections)
    attention_attr: str  # attribute of a layer holding the attention module (carries `layer_idx`)
    fan_in_fan_out: bool = False  # GPT-2's Conv1D stores weights transposed

    def layer_key_prefix(self) -> str:
        """Prefix of a layer's parameters in the causal LM's state dict, e.g. ``model.layers.``."""
        return self.layers_path + "."


_LLAMA_LIKE = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")

FAMILIES: dict[str, Family] = {
    "llama": Family("llama", "model.layers", _LLAMA_LIKE, "self_attn"),
    "mistral": Family("mistral", "model.layers", _LLAMA_LIKE, "self_attn"),
    "qwen2": Family("qwen2", "model.layers", _LLAMA_LIKE, "self_attn"),
    "qwen3": Family("qwen3", "model.layers", _LLAMA_LIKE, "self_attn"),
    "gpt2": Family("gpt2", "transformer.h", ("c_attn", "c_proj", "c_fc"), "attn", fan_in_fan_out=True),
}


class UnsupportedArchitectureError(ValueError):
    """The model's architecture has no entry in :data:`FAMILIES`."""


def family_of(model: nn.Module) -> Family:
    """Return the :class:`Family` of a transformers causal LM (or a peft model wrapping one)."""
    base = unwrap(model)
    model_type = getattr(getattr(base, "config", None), "model_type", None)
    if model_type not in FAMILIES:
        raise UnsupportedArchitectureError(
            f"unsupported architecture model_type={model_type!r} ({type(base).__name__}); "
            f"supported: {sorted(FAMILIES)}"
        )
    return FAMILIES[model_type]


def unwrap(model: nn.Module) -> nn.Module:
    """The transformers model under a peft wrapper (or the model itself)."""
    get_base = getattr(model, "get_base_model", None)
    return get_base() if callable(get_base) else model


def _resolve(root: nn.Module, dotted: str) -> nn.Module:
    obj = root
    for part in dotted.split("."):
        obj = getattr(obj, part)
    return obj


def decoder_layers(model: nn.Module) -> nn.ModuleList:
    """The ModuleList of decoder layers of ``model`` (peft-wrapped or not)."""
    base = unwrap(model)
    return _resolve(base, family_of(base).layers_path)  # type: ignore[return-value]


def replace_decoder_layers(
    model: nn.Module, layers: list[nn.Module], source_indices: list[int] | None = None
) -> None:
    """Install ``layers`` as the model's decoder stack and make config, layer indices and caches agree.

    ``source_indices[i]`` is the index in the original stack that layer ``i`` stands for (its anchor);
    it picks the layer's entry of ``config.layer_types`` (sliding vs full attention). Layer ``i`` gets
    ``layer_idx = i`` (KV caches are indexed by it) and ``config.num_hidden_layers`` becomes ``len(layers)``.
    """
    base = unwrap(model)
    family = family_of(base)
    if source_indices is None:
        source_indices = list(range(len(layers)))
    if len(source_indices) != len(layers):
        raise ValueError(f"source_indices has {len(source_indices)} entries for {len(layers)} layers")
    parent_path, _, attr = family.layers_path.rpartition(".")
    parent = _resolve(base, parent_path) if parent_path else base
    for i, layer in enumerate(layers):
        attention = getattr(layer, family.attention_attr, None)
        if attention is not None and hasattr(attention, "layer_idx"):
            attention.layer_idx = i
        if hasattr(layer, "layer_idx"):
            layer.layer_idx = i
    setattr(parent, attr, nn.ModuleList(layers))
    old_types = getattr(base.config, "layer_types", None)
    if old_types is not None:
        base.config.layer_types = [old_types[j] for j in source_indices]
    base.config.num_hidden_layers = len(layers)
