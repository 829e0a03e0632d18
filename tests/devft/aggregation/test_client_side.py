"""Client-side steps of every rule on real peft models of tiny-llama (and tiny-gpt2 for transposed weights).

Each client takes one real SGD step; the exact rules are checked end to end: a fresh client prepared with
the server's downlink has, in every adapted module, exactly the average of the clients' effective weights.
"""

from __future__ import annotations

import pytest
import torch

from devft.aggregation import get_rule
from devft.aggregation.client_side import (
    finish_round,
    freeze_lora_A,
    lora_layers,
    prepare_round,
    reinit_lora,
    set_base_delta,
)
from devft.models import LoraSettings, attach_lora, load_model, lora_state

SETTINGS = LoraSettings(r=4, alpha=8.0)
SHARED_SEED = 7


def new_client(seed: int = SHARED_SEED, name: str = "tiny-llama", settings: LoraSettings = SETTINGS):
    loaded = load_model(name)
    return attach_lora(loaded.model, settings, seed=seed), loaded.tokenizer


def train_step(model, tokenizer, text: str, lr: float = 0.5) -> None:
    """One real SGD step on ``text`` over the trainable parameters."""
    ids = tokenizer(text, return_tensors="pt")["input_ids"]
    params = [p for p in model.parameters() if p.requires_grad]
    model.zero_grad()
    model(input_ids=ids, labels=ids).loss.backward()
    with torch.no_grad():
        for p in params:
            if p.grad is not None:
                p -= lr * p.grad


def effective_weights(model) -> dict[str, torch.Tensor]:
    """``{module: W_base + s B A}`` in (d_out, d_in) orientation, as the forward pass uses them."""
    out = {}
    for name, layer in lora_layers(model).items():
        adapter = layer.active_adapters[0]
        base = layer.get_base_layer().weight.detach().double()
        delta = layer.get_delta_weight(adapter).detach().double()
        out[name] = base + delta
    return out


def pristine_weights() -> dict[str, torch.Tensor]:
    model, _ = new_client()
    return {name: layer.get_base_layer().weight.detach().double() for name, layer in lora_layers(model).items()}


TEXTS = ["12+30=42", "the cat sat", "7*6=42 ok", "hello world"]


def run_round(rule, state, texts, *, seed=None, personal=None, models=None):
    """Each client: fresh model (or its cached one), prepare, one step, finish. Returns payloads, models."""
    payloads, keeps, used = [], [], []
    down = rule.downlink(state)
    for k, text in enumerate(texts):
        model, tok = models[k] if models else new_client()
        prepare_round(model, rule, down, personal=(personal or [None] * len(texts))[k], seed=seed)
        train_step(model, tok, text)
        payload, keep = finish_round(model, rule)
        payloads.append(payload)
        keeps.append(keep)
        used.append((model, tok))
    return payloads, keeps, used


@pytest.mark.parametrize("name", ["ffa", "fedex", "flora"])
def test_exact_rules_give_every_client_the_average_of_the_clients_models(name):
    rule = get_rule(name, alpha=SETTINGS.alpha)
    start, _ = new_client()
    state = rule.init_state(lora_state(start))
    w0 = pristine_weights()
    counts = [1, 3, 2]
    for rnd in range(2):
        payloads, _, models = run_round(rule, state, TEXTS[rnd: rnd + 3], seed=100 + rnd)
        client_eff = [effective_weights(m) for m, _ in models]
        state = rule.aggregate(state, payloads, counts)
        fresh, _ = new_client()
        prepare_round(fresh, rule, rule.downlink(state), seed=200 + rnd)
        got = effective_weights(fresh)
        server_view = rule.effective_delta(state)
        total = sum(counts)
        for module in got:
            average = sum((n / total) * e[module] for n, e in zip(counts, client_eff))
            torch.testing.assert_close(got[module], average, atol=2e-6, rtol=1e-5)
            torch.testing.assert_close(got[module] - w0[module], server_view[module], atol=2e-6, rtol=1e-5)
        moved = max(float((client_eff[0][m] - w0[m]).abs().max()) for m in got)
        assert moved > 1e-4  # the clients really trained


def test_fedit_is_not_exact_on_real_models():
    rule = get_rule("fedit", alpha=SETTINGS.alpha)
    start, _ = new_client()
    state = rule.init_state(lora_state(start))
    state = rule.aggregate(state, run_round(rule, state, TEXTS[:3])[0], [1, 1, 1])  # B ≠ 0 from here on
    payloads, _, models = run_round(rule, state, TEXTS[1:4])
    client_eff = [effective_weights(m) for m, _ in models]
    state = rule.aggregate(state, payloads, [1, 1, 1])
    fresh, _ = new_client()
    prepare_round(fresh, rule, rule.downlink(state))
    got = effective_weights(fresh)
    gap = max(float((got[m] - sum(e[m] for e in client_eff) / 3).abs().max()) for m in got)
    assert gap > 1e-7


def test_set_base_delta_changes_the_forward_pass_like_merged_weights():
    rule = get_rule("fedex", alpha=SETTINGS.alpha)
    start, tok = new_client()
    state = rule.init_state(lora_state(start))
    payloads, _, _ = run_round(rule, state, TEXTS[:3])
    state = rule.aggregate(state, payloads, [1, 1, 1])
    client, _ = new_client()
    prepare_round(client, rule, rule.downlink(state))
    # an independent model: plain transformers, no peft, weights W0 + total ΔW written by hand
    plain = load_model("tiny-llama").model
    deltas = rule.effective_delta(state)
    with torch.no_grad():
        for name, param in plain.named_parameters():
            module = "base_model.model." + name.removesuffix(".weight")
            if module in deltas:
                param += deltas[module].to(param.dtype)
    ids = tok("12+30=42 and 7*6=42", return_tensors="pt")["input_ids"]
    with torch.no_grad():
        torch.testing.assert_close(client(input_ids=ids).logits, plain(input_ids=ids).logits, atol=1e-4, rtol=1e-4)


def test_set_base_delta_is_idempotent_restores_and_transposes_gpt2():
    model, _ = new_client(name="tiny-gpt2")
    layers = lora_layers(model)
    name = next(n for n in layers if n.endswith("c_attn"))
    layer = layers[name]
    assert layer.fan_in_fan_out
    w0 = layer.get_base_layer().weight.detach().clone()  # Conv1D: (d_in, d_out)
    delta = torch.randn(w0.shape[1], w0.shape[0])  # (d_out, d_in) as the server sends it
    set_base_delta(model, {name: delta})
    set_base_delta(model, {name: delta})  # set, not add
    torch.testing.assert_close(layer.get_base_layer().weight, w0 + delta.T)
    set_base_delta(model, {})
    assert torch.equal(layer.get_base_layer().weight, w0)
    with pytest.raises(KeyError, match="does not adapt"):
        set_base_delta(model, {"no.such.module": delta})


def test_ffa_freezes_a_and_a_real_step_leaves_it_untouched():
    rule = get_rule("ffa", alpha=SETTINGS.alpha)
    model, tok = new_client()
    state = rule.init_state(lora_state(model))
    before = {k: v.clone() for k, v in lora_state(model).items()}
    prepare_round(model, rule, rule.downlink(state, full=True))
    assert freeze_lora_A(model) == len(lora_layers(model))
    train_step(model, tok, TEXTS[0])
    after = lora_state(model)
    assert all(torch.equal(after[k], before[k]) for k in after if ".lora_A." in k)
    assert any(not torch.equal(after[k], before[k]) for k in after if ".lora_B." in k)
    payload, keep = finish_round(model, rule)
    assert keep == {} and set(payload) == {k for k in after if ".lora_B." in k}


def test_fedsa_clients_keep_their_own_b_across_rounds():
    rule = get_rule("fedsa", alpha=SETTINGS.alpha)
    start, _ = new_client()
    state = rule.init_state(lora_state(start))
    payloads, keeps, _ = run_round(rule, state, TEXTS[:2])
    assert all(".lora_A." in k for k in payloads[0]) and all(".lora_B." in k for k in keeps[0])
    assert not torch.equal(next(iter(keeps[0].values())), next(iter(keeps[1].values())))
    state = rule.aggregate(state, payloads, [1, 1])
    for k in range(2):  # next round, in fresh processes
        model, _ = new_client()
        prepare_round(model, rule, rule.downlink(state), personal=keeps[k])
        now = lora_state(model)
        assert all(torch.equal(now[key], keeps[k][key]) for key in keeps[k])
        assert all(torch.equal(now[key], state.lora[key]) for key in payloads[0])


def test_flora_reinitialises_lora_from_the_round_seed():
    rule = get_rule("flora", alpha=SETTINGS.alpha)
    a, _ = new_client(seed=1)
    b, _ = new_client(seed=2)
    reinit_lora(a, seed=5)
    reinit_lora(b, seed=5)
    sa, sb = lora_state(a), lora_state(b)
    assert all(torch.equal(sa[k], sb[k]) for k in sa)
    assert all(float(v.abs().sum()) == 0 for k, v in sa.items() if ".lora_B." in k)
    with pytest.raises(ValueError, match="seed"):
        prepare_round(a, rule, {})


def test_svd_client_of_smaller_rank_gets_its_truncation():
    rule = get_rule("svd", alpha=SETTINGS.alpha)
    start, _ = new_client()
    state = rule.init_state(lora_state(start))
    state = rule.aggregate(state, run_round(rule, state, TEXTS[:3])[0], [1, 1, 1])
    small_settings = LoraSettings(r=2, alpha=SETTINGS.alpha)
    small, _ = new_client(settings=small_settings)
    prepare_round(small, rule, rule.downlink(state, rank=2))
    got, full = effective_weights(small), rule.effective_delta(state)
    w0 = pristine_weights()
    for module in got:
        u, s, vh = torch.linalg.svd(full[module], full_matrices=False)
        torch.testing.assert_close(got[module] - w0[module], u[:, :2] @ torch.diag(s[:2]) @ vh[:2], atol=1e-6,
                                   rtol=1e-4)
