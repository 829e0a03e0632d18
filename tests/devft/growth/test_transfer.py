"""Knowledge transfer: where the submodel's LoRA goes, what stays, and that re-fusing gives it back."""

import pytest
import torch

from devft.growth import (
    GrowthSettings,
    build_submodel,
    make_plan,
    make_schedule,
    plan_stage,
    submodel_lora,
    transfer_lora,
)
from devft.models import LoraSettings, attach_lora, load_lora_state, load_model, lora_state

LORA = LoraSettings(r=4, alpha=8.0)


def _key(layer, module="self_attn.q_proj", kind="A"):
    return f"base_model.model.model.layers.{layer}.{module}.lora_{kind}.weight"


def _trained_sub(plan, seed=11):
    """A submodel LoRA state as if trained: random A and B with the plan's layout."""
    sub = submodel_lora(_fresh(), plan)
    gen = torch.Generator().manual_seed(seed)
    return {k: torch.randn(v.shape, generator=gen) for k, v in sub.items()}


def _fresh():
    return lora_state(attach_lora(load_model("tiny-llama").model, LORA))


@pytest.fixture(scope="module")
def model():
    return load_model("tiny-llama").model


def test_copy_writes_every_member_and_anchor_only_the_anchor(model, make_lora):
    full = make_lora("tiny-llama", LORA)
    plan = make_plan(model, 0, 3, GrowthSettings(grouping="even"))  # (0,1,2) (3,4,5) (6,7)
    sub = _trained_sub(plan)
    copied = transfer_lora(full, sub, plan)
    for layer, k in [(0, 0), (1, 0), (2, 0), (3, 1), (5, 1), (6, 2), (7, 2)]:
        for kind in "AB":
            assert torch.equal(copied[_key(layer, kind=kind)], sub[_key(k, kind=kind)])
    anchored = transfer_lora(full, sub, plan, rule="anchor")
    assert torch.equal(anchored[_key(3)], sub[_key(1)])
    assert anchored[_key(4)] is full[_key(4)]
    assert set(copied) == set(full) == set(anchored)
    assert copied[_key(0)] is not sub[_key(0)]  # copies, not aliases of the submodel state


def test_layers_outside_a_selection_keep_their_lora(model, make_lora):
    full = make_lora("tiny-llama", LORA)
    plan = make_plan(model, 0, 3, GrowthSettings(grouping="first"))
    new = transfer_lora(full, _trained_sub(plan), plan)
    assert all(new[k] is full[k] for k in full if ".layers.3." in k or ".layers.7." in k)
    assert not torch.equal(new[_key(2)], full[_key(2)])


@pytest.mark.parametrize("lora_fusion", ["factors", "svd"])
def test_transfer_then_refusing_gives_the_submodel_lora_back(model, make_lora, lora_fusion):
    full = make_lora("tiny-llama", LORA)
    plan = make_plan(model, 0, 3, GrowthSettings(grouping="random", seed=2, lora_fusion=lora_fusion, beta=0.3))
    sub = _trained_sub(plan)
    again = submodel_lora(transfer_lora(full, sub, plan), plan)
    assert again.keys() == sub.keys()
    for key in sub:
        if lora_fusion == "factors":
            torch.testing.assert_close(again[key], sub[key], rtol=1e-5, atol=1e-6)
    if lora_fusion == "svd":  # the factors may differ, the update B·A may not
        for k in range(3):
            for m in ("self_attn.q_proj", "mlp.down_proj"):
                torch.testing.assert_close(
                    again[_key(k, m, "B")] @ again[_key(k, m, "A")], sub[_key(k, m, "B")] @ sub[_key(k, m, "A")],
                    rtol=1e-4, atol=1e-5,
                )


def test_mismatched_states_are_refused(model, make_lora):
    full = make_lora("tiny-llama", LORA)
    plan = make_plan(model, 0, 2, GrowthSettings(grouping="even"))
    sub = _trained_sub(plan)
    with pytest.raises(KeyError, match="does not cover the plan"):
        transfer_lora(full, {k: v for k, v in sub.items() if "q_proj" not in k}, plan)
    with pytest.raises(KeyError, match="names layer 2"):
        transfer_lora(full, {**sub, _key(2): sub[_key(0)]}, plan)
    with pytest.raises(ValueError, match="has shape"):
        transfer_lora(full, {**sub, _key(0): torch.zeros(2, 2)}, plan)
    with pytest.raises(ValueError, match="rule='scale'"):
        transfer_lora(full, sub, plan, rule="scale")


def test_two_stages_end_to_end_next_stage_plans_from_the_transferred_state(model):
    """Server and client roles in sequence: plan, build, train, transfer, plan again (on the LoRA view)."""
    loaded = load_model("tiny-llama")
    schedule = make_schedule(8, total_rounds=3, num_stages=3)
    full = _fresh()
    settings = GrowthSettings(grouping="dglg", similarity="hidden")
    plan, _ = plan_stage(loaded.model, schedule, 0, settings, full, LORA.scale, loaded.tokenizer)
    peft_sub = attach_lora(build_submodel(loaded.model, plan), LORA)
    load_lora_state(peft_sub, submodel_lora(full, plan))
    ids = loaded.tokenizer("abc abc abc abc", return_tensors="pt")["input_ids"]
    optimizer = torch.optim.AdamW([p for p in peft_sub.parameters() if p.requires_grad], lr=1e-2)
    for _ in range(3):
        optimizer.zero_grad()
        peft_sub(input_ids=ids, labels=ids).loss.backward()
        optimizer.step()
    full = transfer_lora(full, lora_state(peft_sub), plan)
    assert any(bool(v.any()) for k, v in full.items() if "lora_B" in k)
    lora_settings = GrowthSettings(grouping="dglg", similarity="lora")
    plan1, sim = plan_stage(loaded.model, schedule, 1, lora_settings, full, LORA.scale, loaded.tokenizer)
    assert sim is not None and plan1.capacity == 4 and plan1.similarity == "lora"
    # members of a stage-0 group now share their LoRA: the LoRA view says they are identical
    for group in plan.groups:
        for j in group[1:]:
            assert sim[group[0], j] == pytest.approx(1.0)
