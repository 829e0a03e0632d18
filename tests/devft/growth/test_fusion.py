"""Fusion: DBLF against its formula, ablations, linearity, and the exact (SVD) LoRA fusion."""

import pytest
import torch

from devft.growth import check_same_lora_modules, fuse_base_layers, fuse_lora, fuse_tensors, fusion_weights
from devft.models import FAMILIES, LoraSettings, decoder_layers, load_model

LLAMA = FAMILIES["llama"]


def _members(n=3, shape=(5, 7), seed=0):
    gen = torch.Generator().manual_seed(seed)
    return [torch.randn(shape, generator=gen) for _ in range(n)]


def test_fusion_weights_by_hand():
    assert fusion_weights(3, "dblf", 0.1) == pytest.approx([0.8, 0.1, 0.1])
    assert fusion_weights(1, "dblf", 0.1) == [1.0]
    assert fusion_weights(4, "sum", 0.1) == [1.0] * 4
    assert fusion_weights(4, "r-one", 0.1) == [1.0]
    with pytest.raises(ValueError, match="mode='mean'"):
        fusion_weights(2, "mean", 0.1)


def test_dblf_is_anchor_plus_beta_times_differences():
    x = _members(4)
    expected = x[0] + 0.15 * sum(xj - x[0] for xj in x)
    torch.testing.assert_close(fuse_tensors(x, "dblf", 0.15), expected, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(fuse_tensors(x, "sum", 0.15), sum(x), rtol=1e-6, atol=1e-6)
    assert torch.equal(fuse_tensors(x, "r-one", 0.15), x[0])


def test_beta_zero_is_exactly_r_one():
    x = _members(5)
    assert torch.equal(fuse_tensors(x, "dblf", 0.0), fuse_tensors(x, "r-one", 0.1))


@pytest.mark.parametrize("mode", ["dblf", "sum", "r-one"])
def test_fusion_is_linear_in_its_inputs(mode):
    x, y = _members(3, seed=1), _members(3, seed=2)
    a, b = 0.7, -1.3
    combined = fuse_tensors([a * xi + b * yi for xi, yi in zip(x, y)], mode, 0.1)
    separate = a * fuse_tensors(x, mode, 0.1) + b * fuse_tensors(y, mode, 0.1)
    torch.testing.assert_close(combined, separate, rtol=1e-5, atol=1e-5)


def test_fused_base_layers_cover_every_parameter_of_the_layer():
    model = load_model("tiny-llama").model
    layers = decoder_layers(model)
    fused = fuse_base_layers(model, [(0, 1), (2, 5, 7)], "dblf", 0.1)
    names = {n for n, _ in layers[0].named_parameters()}
    assert [set(f) for f in fused] == [names, names]  # norms included
    p = [dict(layer.named_parameters()) for layer in layers]
    for name in names:
        torch.testing.assert_close(fused[0][name], 0.9 * p[0][name] + 0.1 * p[1][name])
        torch.testing.assert_close(fused[1][name], 0.8 * p[2][name] + 0.1 * (p[5][name] + p[7][name]))
        assert fused[1][name].data_ptr() != p[2][name].data_ptr()  # new tensors, base untouched


def _key(layer, module, kind):
    return f"base_model.model.model.layers.{layer}.{module}.lora_{kind}.weight"


def test_factor_fusion_renumbers_layers_and_fuses_a_and_b(make_lora):
    state = make_lora("tiny-llama", LoraSettings(r=4))
    groups = [(0, 3), (1, 2, 4, 5, 6, 7)]
    sub = fuse_lora(state, groups, LLAMA, "dblf", 0.1)
    assert len(sub) == 2 * 7 * 2  # 2 layers × 7 modules × (A, B)
    for kind in ("A", "B"):
        m = "self_attn.q_proj"
        torch.testing.assert_close(sub[_key(0, m, kind)], 0.9 * state[_key(0, m, kind)] + 0.1 * state[_key(3, m, kind)])


def test_svd_fusion_is_the_best_rank_r_approximation_of_the_fused_update(make_lora):
    state = make_lora("tiny-llama", LoraSettings(r=4))
    groups = [(0,), (1, 2, 3, 4, 5, 6, 7)]
    sub = fuse_lora(state, groups, LLAMA, "dblf", 0.1, lora_fusion="svd")
    m = "mlp.down_proj"
    w = fusion_weights(7, "dblf", 0.1)
    delta = sum(wj * (state[_key(j, m, "B")] @ state[_key(j, m, "A")]) for wj, j in zip(w, groups[1]))
    u, s, vh = torch.linalg.svd(delta.double())
    best = (u[:, :4] * s[:4]) @ vh[:4]
    got = (sub[_key(1, m, "B")] @ sub[_key(1, m, "A")]).double()
    torch.testing.assert_close(got, best, rtol=1e-4, atol=1e-5)
    assert sub[_key(1, m, "A")].shape == state[_key(1, m, "A")].shape
    # a singleton group is copied as it is
    assert torch.equal(sub[_key(0, m, "A")], state[_key(0, m, "A")])


def test_svd_fusion_is_exact_when_the_update_has_rank_r(make_lora):
    state = make_lora("tiny-llama", LoraSettings(r=4))
    shared_a = {k.replace(".3.", ".1."): v for k, v in state.items() if ".3." in k and "lora_A" in k}
    state.update(shared_a)  # layers 1 and 3 share A: their fused update has rank <= r
    sub = fuse_lora(state, [(0, 2, 4, 5, 6, 7), (1, 3)], LLAMA, "dblf", 0.25, lora_fusion="svd")
    for m in ("self_attn.q_proj", "mlp.up_proj"):
        delta = 0.75 * state[_key(1, m, "B")] @ state[_key(1, m, "A")] + 0.25 * state[_key(3, m, "B")] @ state[_key(3, m, "A")]
        torch.testing.assert_close(sub[_key(1, m, "B")] @ sub[_key(1, m, "A")], delta, rtol=1e-4, atol=1e-6)


def test_svd_fusion_of_a_fresh_lora_keeps_a_trainable_a():
    from devft.models import attach_lora, lora_state

    state = lora_state(attach_lora(load_model("tiny-llama").model, LoraSettings(r=4)))
    factors = fuse_lora(state, [(0, 1, 2, 3), (4, 5, 6, 7)], LLAMA, "dblf", 0.1)
    svd = fuse_lora(state, [(0, 1, 2, 3), (4, 5, 6, 7)], LLAMA, "dblf", 0.1, lora_fusion="svd")
    assert all(torch.equal(factors[k], svd[k]) for k in factors)
    assert all(bool(v.any()) for k, v in svd.items() if "lora_A" in k)


def test_svd_fusion_of_a_large_group_goes_through_the_iterative_solver(monkeypatch):
    import devft.growth.fusion as fusion

    # 12 similar layers (a group) of rank 2 on 64-wide projections: stacked rank 24 ≥ 6·(2r), where auto iterates
    g = torch.Generator().manual_seed(31)
    a0, b0 = torch.randn(2, 64, generator=g), torch.randn(64, 2, generator=g)
    factors = [(a0 + 0.05 * torch.randn(2, 64, generator=g), b0 + 0.05 * torch.randn(64, 2, generator=g))
               for _ in range(12)]
    solvers = []
    real = fusion.svd_of_product
    monkeypatch.setattr(fusion, "svd_of_product", lambda *a, **k: solvers.append(r := real(*a, **k)) or r)
    a, b = fusion._fuse_module(factors, "dblf", 0.05, "svd")
    assert [found.solver for found in solvers] == ["iterative"]
    w = fusion_weights(12, "dblf", 0.05)
    delta = sum(wj * (fb.double() @ fa.double()) for wj, (fa, fb) in zip(w, factors))
    u, s, vh = torch.linalg.svd(delta)
    best = (u[:, :2] * s[:2]) @ vh[:2]
    torch.testing.assert_close((b @ a).double(), best, rtol=0, atol=1e-6 * float(best.abs().max()))
    assert a.shape == (2, 64) and b.shape == (64, 2) and a.dtype == b.dtype == torch.float32



@pytest.mark.parametrize("group", [(3, 5), (0, 3)])  # layer 3 the group's anchor, or not
def test_a_module_only_one_layer_adapts_is_refused_not_dropped(make_lora, group):
    """LoRA on layer 3's down_proj alone (as a target ``layers.3.mlp.down_proj`` would give): fusing its group
    would drop that module from the submodel when layer 3 is not the anchor; refused either way."""
    state = {k: v for k, v in make_lora("tiny-llama", LoraSettings(r=4)).items()
             if "mlp.down_proj" not in k or ".layers.3." in k}
    rest = [(i,) for i in range(8) if i not in group]
    with pytest.raises(KeyError, match="a group's layers must adapt the same modules"):
        fuse_lora(state, [group, *rest], LLAMA, "dblf", 0.1)
    with pytest.raises(ValueError, match=r"lora.targets=\(\) adapts \[.*'mlp.down_proj'.*\] in layer 3 but "
                       r"\[.*\] in layer 0: growth fuses layers"):
        check_same_lora_modules(state, LLAMA, 8)
    check_same_lora_modules(make_lora("tiny-llama", LoraSettings(r=4)), LLAMA, 8)  # every layer the same: fine
