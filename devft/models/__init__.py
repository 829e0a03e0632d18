"""Model substrate: embedded and Hugging Face causal LMs, their decoder layers, and LoRA adapters."""

from devft.models.families import (
    FAMILIES,
    Family,
    UnsupportedArchitectureError,
    decoder_layers,
    family_of,
    replace_decoder_layers,
    unwrap,
)
from devft.models.loading import DEFAULT_MODEL, EMBEDDED_MODELS, TINY_MODELS, LoadedModel, load_model
from devft.models.lora import (
    LoraSettings,
    LoraState,
    attach_lora,
    count_parameters,
    layer_key,
    load_lora_state,
    lora_by_layer,
    lora_state,
    split_layer_key,
)
from devft.models.smollm2 import ModelUnavailableError, cache_root

__all__ = [
    "DEFAULT_MODEL",
    "EMBEDDED_MODELS",
    "FAMILIES",
    "Family",
    "LoadedModel",
    "LoraSettings",
    "LoraState",
    "ModelUnavailableError",
    "TINY_MODELS",
    "UnsupportedArchitectureError",
    "attach_lora",
    "cache_root",
    "count_parameters",
    "decoder_layers",
    "family_of",
    "layer_key",
    "load_lora_state",
    "load_model",
    "lora_by_layer",
    "lora_state",
    "replace_decoder_layers",
    "split_layer_key",
    "unwrap",
]
