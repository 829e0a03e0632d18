"""Submodels: exact where fusion is the identity, trainable with peft, generating with a consistent cache,
cached on disk bit for bit, and refused for another base model."""

import copy

import pytest
import torch

import devft.growth.submodel as submodel_module
from devft.growth import GrowthSettings, PlanMismatchError, build_submodel, make_plan, submodel_lora
from devft.growth._params import base_layer_tensors
from devft.models import (
    TINY_MODELS,
    LoraSettings,
    attach_lora,
    decoder_layers,
    load_lora_state,
    load_model,
    lora_state,
)

LORA = LoraSettings(r=4, alpha=8.0)


def _ids(tokenizer, text="The fox 12+30=42 jumps"):
    return tokenizer(text, return_tensors="pt")["input_ids"]


@pytest.mark.parametrize("name", TINY_MODELS)
def test_singleton_groups_reproduce_the_full_model_exactly(name, make_lora):
    loaded = load_model(name)
    plan = make_plan(loaded.model, stage=2, capacity=8, settings=GrowthSettings())
    assert plan.groups == tuple((i,) for i in range(8))
    sub = build_submodel(loaded.model, plan)
    ids = _ids(loaded.tokenizer)
    with torch.no_grad():
        assert torch.equal(sub(input_ids=ids).logits, loaded.model(input_ids=ids).logits)
    # with LoRA: the submodel's fused LoRA of singleton groups is the full LoRA
    state = make_lora(name, LORA)
    full = attach_lora(load_model(name).model, LORA)
    load_lora_state(full, state)
    peft_sub = attach_lora(sub, LORA)
    load_lora_state(peft_sub, submodel_lora(state, plan))
    with torch.no_grad():
        assert torch.equal(peft_sub(input_ids=ids).logits, full(input_ids=ids).logits)


def test_beta_zero_builds_exactly_the_r_one_submodel():
    loaded = load_model("tiny-llama")
    plans = [
        make_plan(loaded.model, 0, 3, GrowthSettings(grouping="even", fusion=f, beta=b))
        for f, b in (("dblf", 0.0), ("r-one", 0.1))
    ]
    assert plans[0].build_hash() != plans[1].build_hash()
    subs = [build_submodel(loaded.model, p) for p in plans]
    ids = _ids(loaded.tokenizer)
    with torch.no_grad():
        assert torch.equal(subs[0](input_ids=ids).logits, subs[1](input_ids=ids).logits)


@pytest.mark.parametrize("name", TINY_MODELS)
def test_submodel_is_consistent_trains_and_generates(name, make_lora):
    loaded = load_model(name)
    plan = make_plan(loaded.model, 0, 3, GrowthSettings(grouping="even", beta=0.2))
    assert plan.groups == ((0, 1, 2), (3, 4, 5), (6, 7))
    sub = build_submodel(loaded.model, plan)
    layers = decoder_layers(sub)
    assert len(layers) == 3 and sub.config.num_hidden_layers == 3
    attention = [getattr(layer, loaded.family.attention_attr) for layer in layers]
    assert [a.layer_idx for a in attention] == [0, 1, 2]
    source_types = getattr(loaded.model.config, "layer_types", None)
    if source_types is not None:
        assert sub.config.layer_types == [source_types[a] for a in plan.anchors]
    assert loaded.model.config.num_hidden_layers == 8  # the base model is untouched
    # layer k holds the fused tensors of group k
    base, fused = base_layer_tensors(loaded.model), base_layer_tensors(sub)
    for n in base[0]:
        torch.testing.assert_close(fused[2][n], 0.8 * base[6][n] + 0.2 * base[7][n])
    peft_sub = attach_lora(sub, LORA)
    load_lora_state(peft_sub, submodel_lora(make_lora(name, LORA), plan))
    ids = _ids(loaded.tokenizer)
    trainable = [p for p in peft_sub.parameters() if p.requires_grad]
    assert trainable and all("lora_" in n for n, p in peft_sub.named_parameters() if p.requires_grad)
    optimizer = torch.optim.SGD(trainable, lr=0.5)
    losses = []
    for _ in range(3):
        optimizer.zero_grad()
        loss = peft_sub(input_ids=ids, labels=ids).loss
        loss.backward()
        optimizer.step()
        losses.append(float(loss.detach()))
    assert losses[-1] < losses[0]
    peft_sub.eval()
    with torch.no_grad():
        cached = peft_sub.generate(input_ids=ids, max_new_tokens=8, do_sample=False, use_cache=True)
        uncached = peft_sub.generate(input_ids=ids, max_new_tokens=8, do_sample=False, use_cache=False)
    assert cached.shape[1] == ids.shape[1] + 8 and torch.equal(cached, uncached)


def test_submodel_shares_embeddings_and_head_with_the_base_model():
    loaded = load_model("tiny-llama")
    sub = build_submodel(loaded.model, make_plan(loaded.model, 0, 2, GrowthSettings(grouping="even")))
    assert sub.model.embed_tokens.weight is loaded.model.model.embed_tokens.weight
    assert sub.lm_head.weight is sub.model.embed_tokens.weight  # still tied


def test_built_from_a_peft_wrapped_model_it_is_the_same_plain_submodel(make_lora):
    loaded = load_model("tiny-qwen2")
    plan = make_plan(loaded.model, 0, 4, GrowthSettings(grouping="random", seed=3))
    plain = build_submodel(loaded.model, plan, use_cache=False)
    wrapped = attach_lora(copy.deepcopy(loaded.model), LORA)
    load_lora_state(wrapped, make_lora("tiny-qwen2", LORA))
    from_wrapped = build_submodel(wrapped, plan, use_cache=False)
    assert not any("lora_" in n for n, _ in from_wrapped.named_parameters())
    assert not hasattr(from_wrapped, "peft_config")  # else peft sees a second adapter when LoRA is attached
    a, b = plain.state_dict(), from_wrapped.state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_cache_gives_the_same_submodel_bit_for_bit(isolated_submodel_cache, monkeypatch):
    loaded = load_model("tiny-llama")
    plan = make_plan(loaded.model, 1, 4, GrowthSettings(grouping="even", beta=0.3))
    first = build_submodel(loaded.model, plan)
    folder = submodel_module.submodel_cache_dir(plan)
    assert (folder / "layers.safetensors").exists() and (folder / "plan.json").read_text().strip() == plan.to_json()
    assert not [p for p in isolated_submodel_cache.iterdir() if p != folder]  # no staging left behind

    def must_not_fuse(*args, **kwargs):
        raise AssertionError("the cached submodel was fused again")

    monkeypatch.setattr(submodel_module, "fuse_base_layers", must_not_fuse)
    second = build_submodel(loaded.model, plan)
    a, b = first.state_dict(), second.state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.parametrize("content", ["wrong shapes", "garbage", "cut short", "empty"])
def test_a_corrupt_cache_entry_is_rebuilt(isolated_submodel_cache, content):
    from safetensors.torch import save_file

    loaded = load_model("tiny-llama")
    plan = make_plan(loaded.model, 0, 2, GrowthSettings(grouping="even"))
    reference = build_submodel(loaded.model, plan, use_cache=False)
    folder = submodel_module.submodel_cache_dir(plan)
    folder.mkdir(parents=True)
    path = folder / "layers.safetensors"
    save_file({"0.self_attn.q_proj.weight": torch.zeros(3, 3)}, str(path))
    if content == "garbage":
        path.write_bytes(b"\x00not a safetensors file" * 10)
    elif content == "cut short":
        path.write_bytes(path.read_bytes()[:-20])
    elif content == "empty":
        path.write_bytes(b"")
    rebuilt = build_submodel(loaded.model, plan)
    a, b = reference.state_dict(), rebuilt.state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert build_submodel(loaded.model, plan).state_dict().keys() == a.keys()  # the rewritten entry reads


def test_an_entry_of_another_cache_format_is_never_read(isolated_submodel_cache):
    # fused layers written by other code (another summation, another layout) may differ in the last bit:
    # the format is part of the folder's name, so they are not even looked at
    from safetensors.torch import save_file

    loaded = load_model("tiny-llama")
    plan = make_plan(loaded.model, 0, 2, GrowthSettings(grouping="even"))
    reference = build_submodel(loaded.model, plan, use_cache=False)
    folder = submodel_module.submodel_cache_dir(plan)
    assert folder.parent == isolated_submodel_cache and folder.name == f"v{submodel_module.CACHE_FORMAT}-{plan.build_hash()}"
    stale = isolated_submodel_cache / plan.build_hash()  # where version 1 kept it: same shapes, other values
    stale.mkdir(parents=True)
    save_file({f"{k}.{n}": t + 1.0 for k, layer in enumerate(base_layer_tensors(reference)) for n, t in layer.items()},
              str(stale / "layers.safetensors"))
    built = build_submodel(loaded.model, plan)
    a, b = reference.state_dict(), built.state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a) and (folder / "layers.safetensors").exists()


def test_a_plan_for_another_base_model_is_refused():
    loaded = load_model("tiny-llama")
    plan = make_plan(loaded.model, 0, 2, GrowthSettings(grouping="even"))
    other = load_model("tiny-llama").model
    with torch.no_grad():
        decoder_layers(other)[5].mlp.up_proj.weight[0, 0] += 1e-3
    with pytest.raises(PlanMismatchError, match="same base model"):
        build_submodel(other, plan)
    with pytest.raises(PlanMismatchError, match="'llama' model cannot be applied to a 8-layer 'gpt2'"):
        build_submodel(load_model("tiny-gpt2").model, plan)


@pytest.mark.slow
def test_smollm2_stage_submodels_build_fast_and_work():
    import time

    from devft.growth import make_schedule, plan_stage

    loaded = load_model("smollm2-135m")
    schedule = make_schedule(30, total_rounds=4)
    full_lora = lora_state(attach_lora(load_model("smollm2-135m").model, LoraSettings()))
    ids = _ids(loaded.tokenizer, "The capital of France is")
    for stage in range(schedule.num_stages - 1):
        plan, sim = plan_stage(loaded.model, schedule, stage, GrowthSettings(), full_lora, 2.0, loaded.tokenizer)
        assert sim.shape == (30, 30) and len(plan.groups) == schedule.capacities[stage]
        start = time.perf_counter()
        sub = build_submodel(loaded.model, plan)
        assert time.perf_counter() - start < 20.0
        peft_sub = attach_lora(sub, LoraSettings())
        load_lora_state(peft_sub, submodel_lora(full_lora, plan))
        with torch.no_grad():
            loss = peft_sub(input_ids=ids, labels=ids).loss
            out = peft_sub.generate(input_ids=ids, max_new_tokens=3, do_sample=False)
        assert torch.isfinite(loss) and out.shape[1] == ids.shape[1] + 3
    full = make_plan(loaded.model, 3, 30, GrowthSettings())
    with torch.no_grad():
        assert torch.equal(build_submodel(loaded.model, full)(input_ids=ids).logits, loaded.model(input_ids=ids).logits)


@pytest.mark.parametrize("grouping,fusion", [("even", "dblf"), ("first", "dblf"), ("even", "r-one")])
def test_layers_that_need_no_fusion_share_the_base_tensors_and_stay_untouched(
        isolated_submodel_cache, grouping, fusion):
    # the full-depth stage (FedIT's only one) holds the weights once; a base delta (FLoRA, FedEx-LoRA) set on
    # the submodel gives its layers new tensors and leaves the base model's as they were
    from devft.aggregation.client_side import lora_layers, set_base_delta

    loaded = load_model("tiny-llama")
    base_ptrs = {t.data_ptr() for layer in base_layer_tensors(loaded.model) for t in layer.values()}
    pristine = copy.deepcopy(loaded.model.state_dict())
    for capacity in (8, 3):
        plan = make_plan(loaded.model, 0, capacity, GrowthSettings(grouping=grouping, fusion=fusion))
        sub = build_submodel(loaded.model, plan)
        unfused = [k for k, g in enumerate(plan.groups) if len(g) == 1 or fusion == "r-one"]
        for k, layer in enumerate(base_layer_tensors(sub)):
            assert all((t.data_ptr() in base_ptrs) == (k in unfused) for t in layer.values()), (capacity, k)
        cached = list(isolated_submodel_cache.glob("*/layers.safetensors"))
        assert bool(cached) == (len(unfused) < capacity)  # nothing fused, nothing cached
        model = attach_lora(sub, LORA)
        deltas = {name: torch.full(tuple(layer.get_base_layer().weight.shape), 0.5)
                  for name, layer in lora_layers(model).items()}
        set_base_delta(model, deltas)
        for layer in lora_layers(model).values():
            base = layer.get_base_layer()
            assert base.weight.data_ptr() not in base_ptrs
            assert float((base.weight - base._devft_pristine_weight).abs().max()) == pytest.approx(0.5)
        after = loaded.model.state_dict()
        assert all(torch.equal(after[k], v) for k, v in pristine.items())
        set_base_delta(model, {})  # back to W₀: the shared tensors again, and nothing else kept
        assert not any(hasattr(layer.get_base_layer(), "_devft_pristine_weight")
                       for layer in lora_layers(model).values())
        for layer in base_layer_tensors(sub)[: 1 if 0 in unfused else 0]:
            assert all(t.data_ptr() in base_ptrs for t in layer.values())
