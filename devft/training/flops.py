"""Training-FLOP estimate for LoRA fine-tuning of a causal LM (matmuls and attention scores)."""

from __future__ import annotations

from torch import nn


def matmul_parameter_counts(model: nn.Module) -> tuple[int, int]:
    """Return ``(frozen, trainable)`` weight counts of every matmul (Linear / GPT-2 Conv1D) in ``model``.

    The LM head counts even when tied to the embedding (it is a matmul over the vocabulary); embedding
    lookups do not.
    """
    frozen = trainable = 0
    for module in model.modules():
        weight = getattr(module, "weight", None)
        if weight is None or weight.dim() != 2 or isinstance(module, nn.Embedding):
            continue
        if not isinstance(module, nn.Linear) and type(module).__name__ != "Conv1D":
            continue
        if weight.requires_grad:
            trainable += weight.numel()
        else:
            frozen += weight.numel()
    return frozen, trainable


def attention_width(config) -> int:
    """Query heads × head size: the width of the attention scores' and the values' products. It is
    ``hidden_size`` for most families; Qwen3 (and others) set ``head_dim`` apart from ``hidden_size / heads``."""
    hidden = int(getattr(config, "hidden_size", 0) or 0)
    heads = int(getattr(config, "num_attention_heads", 0) or 0)
    head_dim = getattr(config, "head_dim", None)
    if heads and isinstance(head_dim, int) and not isinstance(head_dim, bool) and head_dim > 0:
        return heads * head_dim
    return hidden


def lora_training_flops(
    frozen_params: int, trainable_params: int, tokens: int, num_layers: int, width: int, seq_len: float
) -> float:
    """FLOPs of forward + backward over ``tokens`` tokens.

    Frozen matmuls cost 2 FLOPs/weight/token forward and 2 backward (input gradients only); trainable
    ones 2 forward and 4 backward (input and weight gradients). Attention scores and the weighted sum of
    values add ``4 · seq_len · width`` per layer per token forward (``width``: :func:`attention_width`),
    twice that backward.
    """
    matmul = (4 * frozen_params + 6 * trainable_params) * tokens
    attention = 3 * 4 * seq_len * width * num_layers * tokens
    return float(matmul + attention)
