"""Random-initialised small models of each supported family, identical in every process, for fast tests."""

from __future__ import annotations

import torch
from transformers import (
    AutoModelForCausalLM,
    GPT2Config,
    LlamaConfig,
    MistralConfig,
    PretrainedConfig,
    Qwen2Config,
)

from devft.models.byte_tokenizer import byte_tokenizer

TINY_LAYERS = 8
_VOCAB = 259  # byte_tokenizer(): 256 bytes + 3 special tokens
_SEED = 1234  # fixed: every client process must build the same "pretrained" weights


def tiny_config(family: str, num_layers: int = TINY_LAYERS) -> PretrainedConfig:
    """A small config of ``family`` (llama, qwen2, mistral or gpt2) with ``num_layers`` decoder layers."""
    common = dict(vocab_size=_VOCAB, bos_token_id=257, eos_token_id=258, pad_token_id=256)
    if family == "llama":
        return LlamaConfig(
            hidden_size=64, intermediate_size=128, num_hidden_layers=num_layers, num_attention_heads=4,
            num_key_value_heads=2, max_position_embeddings=512, tie_word_embeddings=True, **common,
        )
    if family == "qwen2":
        return Qwen2Config(
            hidden_size=64, intermediate_size=128, num_hidden_layers=num_layers, num_attention_heads=4,
            num_key_value_heads=2, max_position_embeddings=512, tie_word_embeddings=True, **common,
        )
    if family == "mistral":
        return MistralConfig(
            hidden_size=64, intermediate_size=128, num_hidden_layers=num_layers, num_attention_heads=4,
            num_key_value_heads=2, max_position_embeddings=512, sliding_window=None, **common,
        )
    if family == "gpt2":
        return GPT2Config(n_embd=64, n_layer=num_layers, n_head=4, n_positions=512, **common)
    raise ValueError(f"tiny model family={family!r} is not one of llama, qwen2, mistral, gpt2")


def tiny_model(family: str = "llama", num_layers: int = TINY_LAYERS):
    """Return ``(model, tokenizer)``: a deterministic random-init causal LM and the byte tokenizer."""
    config = tiny_config(family, num_layers)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(_SEED)
        model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.eval()
    return model, byte_tokenizer()
