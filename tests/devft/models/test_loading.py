"""The model substrate: embedded names, families, clear errors, and LoRA state round trips."""

import re

import huggingface_hub
import pytest
import torch
from transformers import GPT2Config, GPT2LMHeadModel

from devft.models import (
    TINY_MODELS,
    LoraSettings,
    UnsupportedArchitectureError,
    attach_lora,
    decoder_layers,
    family_of,
    load_lora_state,
    load_model,
    lora_by_layer,
    lora_state,
    replace_decoder_layers,
    split_layer_key,
)


@pytest.mark.parametrize("name", TINY_MODELS)
def test_tiny_models_are_deterministic_and_train_a_step(name):
    first, second = load_model(name), load_model(name)
    for (k, a), (_, b) in zip(first.model.state_dict().items(), second.model.state_dict().items()):
        assert torch.equal(a, b), k
    peft_model = attach_lora(first.model, LoraSettings(r=4))
    ids = first.tokenizer("12+30=42", return_tensors="pt")["input_ids"]
    loss = peft_model(input_ids=ids, labels=ids).loss
    loss.backward()
    grads = [p.grad for n, p in peft_model.named_parameters() if "lora_" in n]
    assert grads and all(g is not None for g in grads)
    assert all(not p.requires_grad for n, p in peft_model.named_parameters() if "lora_" not in n)


def test_unknown_model_name_is_refused_with_the_name():
    with pytest.raises(ValueError, match="name='no-such-model'"):
        load_model("no-such-model")


def test_unsupported_architecture_is_named():
    class Odd(GPT2LMHeadModel):
        pass

    model = Odd(GPT2Config(n_layer=1, n_embd=8, n_head=2, vocab_size=10))
    model.config.model_type = "odd-arch"
    with pytest.raises(UnsupportedArchitectureError, match="odd-arch"):
        family_of(model)


def test_lora_state_round_trip_and_layer_keys():
    loaded = load_model("tiny-llama")
    model = attach_lora(loaded.model, LoraSettings(r=4, alpha=8))
    state = lora_state(model)
    by_layer = lora_by_layer(state, loaded.family)
    assert sorted(by_layer) == list(range(loaded.num_layers))
    assert len(by_layer[0]) == 2 * 7  # A and B of the seven llama projections
    changed = {k: torch.full_like(v, 0.5) for k, v in state.items()}
    load_lora_state(model, changed)
    assert all(torch.equal(v, torch.full_like(v, 0.5)) for v in lora_state(model).values())
    prefix, idx, suffix = split_layer_key(next(iter(state)), loaded.family)
    assert (idx, suffix) == (0, "self_attn.q_proj.lora_A.weight")
    with pytest.raises(KeyError, match="missing"):
        load_lora_state(model, dict(list(state.items())[1:]))
    key = next(iter(state))
    with pytest.raises(ValueError, match="shape"):
        load_lora_state(model, {**state, key: torch.zeros(1, 1)})


def test_replace_decoder_layers_keeps_config_and_cache_consistent():
    loaded = load_model("tiny-llama")
    model = loaded.model
    layers = list(decoder_layers(model))
    replace_decoder_layers(model, [layers[5], layers[2]], source_indices=[5, 2])
    assert model.config.num_hidden_layers == 2
    assert [layer.self_attn.layer_idx for layer in decoder_layers(model)] == [0, 1]
    ids = loaded.tokenizer("abc", return_tensors="pt")["input_ids"]
    out = model.generate(ids, max_new_tokens=3, do_sample=False, pad_token_id=loaded.tokenizer.pad_token_id)
    assert out.shape[1] == ids.shape[1] + 3


def test_lora_settings_validation_names_field_and_value():
    with pytest.raises(ValueError, match="r=0"):
        LoraSettings(r=0)
    with pytest.raises(ValueError, match="dropout=1.5"):
        LoraSettings(dropout=1.5)


@pytest.mark.slow
def test_smollm2_loads_from_cache_generates_paris_and_trains_a_step():
    import time

    load_model("smollm2-135m")  # populate the cache (first use converts the GGUF)
    start = time.perf_counter()
    loaded = load_model("smollm2-135m")
    assert time.perf_counter() - start < 15
    assert loaded.num_layers == 30 and loaded.family.name == "llama"
    tok = loaded.tokenizer
    ids = tok("The capital of France is", return_tensors="pt")
    out = loaded.model.generate(**ids, max_new_tokens=4, do_sample=False)
    assert "Paris" in tok.decode(out[0, ids["input_ids"].shape[1] :])
    model = attach_lora(loaded.model, LoraSettings())
    batch = tok(["2+2=4", "red is a colour"], return_tensors="pt", padding=True)
    loss = model(**batch, labels=batch["input_ids"]).loss
    loss.backward()
    assert torch.isfinite(loss)


def test_any_local_checkpoint_loads_by_path(tmp_path):
    source = load_model("tiny-qwen2")
    source.model.save_pretrained(tmp_path / "ckpt")
    source.tokenizer.chat_template = source.tokenizer.chat_template + "{# this checkpoint's own #}"
    source.tokenizer.save_pretrained(tmp_path / "ckpt")
    loaded = load_model(str(tmp_path / "ckpt"))
    assert loaded.family.name == "qwen2" and loaded.num_layers == source.num_layers
    for (k, a), (_, b) in zip(source.model.state_dict().items(), loaded.model.state_dict().items()):
        assert torch.equal(a, b), k
    assert loaded.tokenizer.chat_template.endswith("{# this checkpoint's own #}")  # its own, not the fallback


def test_a_checkpoint_under_home_loads_by_a_tilde_path(tmp_path, monkeypatch):
    source = load_model("tiny-llama")
    source.model.save_pretrained(tmp_path / "models" / "mine")
    source.tokenizer.save_pretrained(tmp_path / "models" / "mine")
    monkeypatch.setenv("HOME", str(tmp_path))
    assert load_model("~/models/mine").num_layers == source.num_layers


def test_a_folder_that_is_no_model_is_named_as_model_name(tmp_path):
    (tmp_path / "adapter").mkdir()
    (tmp_path / "adapter" / "adapter_config.json").write_text("{}")
    with pytest.raises(ValueError, match=r"could not load model name='.*adapter' \(is '.*adapter' a causal LM's "
                                         r"folder or hub id\?\)"):
        load_model(str(tmp_path / "adapter"))


def test_a_mistyped_relative_path_says_it_was_read_as_a_hub_id(tmp_path, monkeypatch):
    (tmp_path / "models").mkdir()
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)  # no test waits on the hub
    with pytest.raises(ValueError, match=rf"there is no folder {re.escape(str(tmp_path / 'models' / 'mnie'))}, "
                                         r"so it was read as a Hugging Face id"):
        load_model("models/mnie")
