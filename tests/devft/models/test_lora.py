"""LoRA targets: what peft would adapt must lie inside the decoder layers that growth fuses and transfers."""

from __future__ import annotations

import pytest

from devft.models import LoraSettings, attach_lora, load_model


@pytest.mark.parametrize("targets,match", [
    (("q_proj", "nosuch_proj"), "'nosuch_proj' names no module of this llama model"),
    (("q_proj", "lm_head"), "'lm_head' matches 'lm_head', outside the decoder layers"),
    (("embed_tokens",), "'embed_tokens' matches 'model.embed_tokens' \\(Embedding\\), not a linear layer"),
    (("self_attn",), "'self_attn' matches 'model.layers.0.self_attn' \\(LlamaAttention\\), not a linear layer"),
    (("input_layernorm",), "'input_layernorm' matches 'model.layers.0.input_layernorm' \\(LlamaRMSNorm\\), not a"),
])
def test_lora_targets_outside_the_decoder_layers_are_refused_by_name(targets, match):
    model = load_model("tiny-llama").model
    with pytest.raises(ValueError, match=r"lora.targets=\(.*\): " + match):
        attach_lora(model, LoraSettings(r=2, targets=targets))
    attach_lora(load_model("tiny-llama").model, LoraSettings(r=2, targets=("q_proj", "mlp.down_proj")))


def test_attaching_lora_prints_no_deprecation_notice_of_the_libraries_below(recwarn):
    """peft's wrap asks transformers' deprecated is_gradient_checkpointing: every client of every round used to
    print that FutureWarning; it is silenced around the wrap (and only there)."""
    import warnings

    model = load_model("tiny-llama").model
    with warnings.catch_warnings():
        warnings.simplefilter("error", FutureWarning)
        attach_lora(model, LoraSettings(r=2))
    assert not [w for w in recwarn if "is_gradient_checkpointing" in str(w.message)]
