"""Layer similarity: each weight view against an independent computation on materialised weights,
functional views against a model with the LoRA merged in."""

import copy

import numpy as np
import pytest
import torch
from peft import set_peft_model_state_dict

from devft.growth import SIMILARITY_VIEWS, calibration_batch, layer_similarity
from devft.models import LoraSettings, attach_lora, decoder_layers, load_model

SETTINGS = LoraSettings(r=4, alpha=8.0)


def _cos(x: torch.Tensor, y: torch.Tensor) -> float:
    """Cosine, 0 when either vector is zero (the convention of layer_similarity)."""
    x, y = x.double().flatten(), y.double().flatten()
    norms = x.norm() * y.norm()
    return float(x @ y / norms) if norms > 0 else 0.0


def _merged(name, state):
    """The base model with ``state`` merged into its weights (W0 + s·B·A), by peft."""
    peft_model = attach_lora(load_model(name).model, SETTINGS)
    set_peft_model_state_dict(peft_model, state)
    return peft_model.merge_and_unload()


@pytest.mark.parametrize("name", ["tiny-llama", "tiny-gpt2"])
def test_flat_base_view_is_the_cosine_of_flattened_layers(name):
    model = load_model(name).model
    flat = [torch.cat([p.flatten() for p in layer.parameters()]) for layer in decoder_layers(model)]
    expected = np.array([[_cos(a, b) for b in flat] for a in flat])
    np.testing.assert_allclose(layer_similarity(model, "flat-base"), expected, atol=1e-6)


@pytest.mark.parametrize("name", ["tiny-llama", "tiny-gpt2"])
def test_effective_views_equal_the_views_of_the_merged_model(name, make_lora):
    state = make_lora(name, SETTINGS)
    model, merged = load_model(name).model, _merged(name, state)
    for view in ("flat", "module"):
        with_lora = layer_similarity(model, view, lora=state, lora_scale=SETTINGS.scale)
        np.testing.assert_allclose(with_lora, layer_similarity(merged, view + "-base"), atol=1e-5)
        assert not np.allclose(with_lora, layer_similarity(model, view + "-base"), atol=1e-4)


def test_module_view_averages_per_tensor_cosines():
    model = load_model("tiny-qwen2").model  # its q/k/v biases are zero: those cosines count as 0
    layers = [dict(layer.named_parameters()) for layer in decoder_layers(model)]
    expected = np.array([[np.mean([_cos(a[n], b[n]) for n in a]) for b in layers] for a in layers])
    np.fill_diagonal(expected, 1.0)  # a layer is fully similar to itself, zero tensors included
    np.testing.assert_allclose(layer_similarity(model, "module-base"), expected, atol=1e-6)


def test_lora_view_is_the_mean_cosine_of_updates(make_lora):
    state = make_lora("tiny-llama", SETTINGS)
    model = load_model("tiny-llama").model
    modules = ["self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
               "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj"]  # fmt: skip

    def delta(i, m):
        key = f"base_model.model.model.layers.{i}.{m}.lora_"
        return state[key + "B.weight"] @ state[key + "A.weight"]

    expected = np.array([[np.mean([_cos(delta(i, m), delta(j, m)) for m in modules]) for j in range(8)] for i in range(8)])
    np.testing.assert_allclose(layer_similarity(model, "lora", lora=state), expected, atol=1e-5)


def test_lora_view_refuses_a_fresh_lora():
    model = load_model("tiny-llama").model
    from devft.models import lora_state

    fresh = lora_state(attach_lora(load_model("tiny-llama").model, SETTINGS))
    with pytest.raises(ValueError, match="non-zero B"):
        layer_similarity(model, "lora", lora=fresh)


@pytest.mark.parametrize("view", ["hidden", "cka", "update-cka"])
@pytest.mark.parametrize("name", ["tiny-llama", "tiny-gpt2"])
def test_functional_views_apply_lora_like_a_merged_model(name, view, make_lora):
    loaded = load_model(name)
    state = make_lora(name, SETTINGS)
    batch = calibration_batch(loaded.tokenizer, num_sequences=4, max_length=24)
    with_lora = layer_similarity(loaded.model, view, lora=state, lora_scale=SETTINGS.scale, calibration=batch)
    merged = layer_similarity(_merged(name, state), view, calibration=batch)
    np.testing.assert_allclose(with_lora, merged, atol=1e-5)
    assert not np.allclose(with_lora, layer_similarity(loaded.model, view, calibration=batch), atol=1e-4)


def test_a_peft_wrapper_own_adapters_are_ignored(make_lora):
    loaded = load_model("tiny-llama")
    state = make_lora("tiny-llama", SETTINGS)
    plain = layer_similarity(loaded.model, "hidden", lora=state, lora_scale=SETTINGS.scale, tokenizer=loaded.tokenizer)
    wrapped = attach_lora(copy.deepcopy(loaded.model), SETTINGS, seed=5)
    set_peft_model_state_dict(wrapped, make_lora("tiny-llama", SETTINGS, seed=7))  # other adapters
    again = layer_similarity(wrapped, "hidden", lora=state, lora_scale=SETTINGS.scale, tokenizer=loaded.tokenizer)
    np.testing.assert_allclose(again, plain, atol=1e-6)
    for view in ("flat", "module"):
        np.testing.assert_allclose(
            layer_similarity(wrapped, view, lora=state, lora_scale=SETTINGS.scale),
            layer_similarity(loaded.model, view, lora=state, lora_scale=SETTINGS.scale),
            atol=1e-6,
        )


@pytest.mark.parametrize("view", [v for v in SIMILARITY_VIEWS if v != "lora"])
def test_every_view_is_symmetric_bounded_with_unit_diagonal(view):
    loaded = load_model("tiny-mistral")
    sim = layer_similarity(loaded.model, view, tokenizer=loaded.tokenizer)
    assert sim.shape == (8, 8)
    np.testing.assert_allclose(sim, sim.T, atol=1e-12)
    np.testing.assert_allclose(np.diag(sim), 1.0)
    assert (sim <= 1.0).all() and (sim >= -1.0).all()


def test_unknown_view_and_missing_calibration_are_refused():
    model = load_model("tiny-llama").model
    with pytest.raises(ValueError, match="view='raw'"):
        layer_similarity(model, "raw")
    with pytest.raises(ValueError, match="calibration batch or a tokenizer"):
        layer_similarity(model, "cka")


def _linear_cka(x: torch.Tensor, y: torch.Tensor) -> float:
    """Linear CKA of (tokens, features) matrices, the feature-space form ‖YᵀX‖² / (‖XᵀX‖ ‖YᵀY‖)."""
    x, y = x - x.mean(0), y - y.mean(0)
    return float((y.T @ x).norm() ** 2 / ((x.T @ x).norm() * (y.T @ y).norm()))


def test_functional_views_equal_an_independent_computation_from_hidden_states():
    # transformers' own hidden states (embeddings, then each layer's output; the last one after the final
    # norm, so left out), over the real tokens without the first one (the attention sink)
    loaded = load_model("tiny-llama")
    batch = calibration_batch(loaded.tokenizer, num_sequences=6, max_length=32)
    with torch.no_grad():
        states = loaded.model(**batch, output_hidden_states=True).hidden_states
    tokens = batch["attention_mask"].bool().clone()
    tokens[:, 0] = False
    outs = [h[tokens].double() for h in states[1:-1]]
    ins = [h[tokens].double() for h in states[:-2]]
    n = len(outs)
    expected = {
        "cka": [[_linear_cka(a, b) for b in outs] for a in outs],
        "update-cka": [[_linear_cka(oa - ia, ob - ib) for ob, ib in zip(outs, ins)] for oa, ia in zip(outs, ins)],
        "hidden": [[float(torch.nn.functional.cosine_similarity(a, b, dim=-1).mean()) for b in outs] for a in outs],
    }
    for view, matrix in expected.items():
        got = layer_similarity(loaded.model, view, calibration=batch)[:n, :n]
        np.testing.assert_allclose(got, np.array(matrix), atol=1e-6, err_msg=view)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("view", ["flat-base", "module-base", "flat", "module"])
def test_weight_views_of_16_bit_models_with_large_layers(view, dtype, make_lora):
    """Layers whose squared norm is past float16's largest number (65 504; SmolLM2-135M's largest is at 65 % of
    it, larger models pass it), even and odd layers sharing opposite directions: the 16-bit model's matrix is
    the float32 model's, to 16-bit rounding of the weights."""
    state = make_lora("tiny-llama", SETTINGS)
    model = load_model("tiny-llama").model
    generator = torch.Generator().manual_seed(0)
    shared = torch.randn(128, 64, generator=generator)
    with torch.no_grad():
        for i, layer in enumerate(decoder_layers(model)):
            own = torch.randn(128, 64, generator=generator)
            layer.mlp.gate_proj.weight.copy_(0.9 * (shared if i % 2 == 0 else -shared) + 3.0 * own)
    assert float(decoder_layers(model)[0].mlp.gate_proj.weight.double().square().sum()) > 65504
    lora = {} if view.endswith("-base") else {"lora": state, "lora_scale": SETTINGS.scale}
    reference = layer_similarity(model, view, **lora)
    got = layer_similarity(model.to(dtype), view, **lora)
    assert np.isfinite(got).all()
    np.testing.assert_allclose(got, reference, atol=2e-3)
    assert got[0, 2] > got[0, 1] + 0.01  # layers 0 and 2 share a direction, 0 and 1 opposite ones: seen, not lost


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("view", ["hidden", "cka", "update-cka"])
def test_functional_views_with_lora_run_on_16_bit_models(view, dtype, make_lora):
    # peft keeps LoRA in float32 on a 16-bit model: the added term must not turn the layer's output float32
    state = make_lora("tiny-llama", SETTINGS)
    loaded = load_model("tiny-llama")
    batch = calibration_batch(loaded.tokenizer, num_sequences=4, max_length=24)
    reference = layer_similarity(loaded.model, view, lora=state, lora_scale=SETTINGS.scale, calibration=batch)
    low = load_model("tiny-llama", dtype=dtype).model
    got = layer_similarity(low, view, lora=state, lora_scale=SETTINGS.scale, calibration=batch)
    np.testing.assert_allclose(got, reference, atol=0.05)
