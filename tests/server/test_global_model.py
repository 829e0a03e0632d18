"""The server's own model under a base delta (FLoRA, FedEx-LoRA): evaluations give its weights ``W₀ + Δ``, and
nothing planned or built afterwards may see those weights as the base, or copy them."""

from __future__ import annotations

import pytest
import torch

from devft.aggregation.client_side import lora_layers
from devft.growth import build_submodel, model_fingerprint
from devft.models import decoder_layers


def test_a_base_delta_never_leaks_into_plans_or_submodels(smoke_config, private_env):
    from server.global_model import GlobalModel

    config = smoke_config(federation__method="progfed", federation__aggregation="flora", model__name="tiny-llama",
                          eval__generate=False)
    first = GlobalModel(config, test=[])
    planned = first.plan(0, first.initial_lora()).plan  # made by the first process, on pristine weights
    pristine = {k: v.clone() for k, v in first.model.state_dict().items() if "lora_" not in k}
    sub_lora = first.submodel_lora(first.initial_lora(), planned)

    from devft.data import generate_task_suite

    test = generate_task_suite(2, seed=3)
    resumed = GlobalModel(config, test=test)  # a resumed process: its first evaluation applies the delta
    module = next(iter(lora_layers(resumed.model)))
    weight = lora_layers(resumed.model)[module].get_base_layer().weight
    delta = {module: torch.full(tuple(weight.shape), 1e-2)}
    resumed.evaluate_full(resumed.initial_lora(), delta)
    assert not torch.equal(weight, pristine[next(k for k in pristine if k.startswith(module) and "weight" in k)])
    assert model_fingerprint(resumed.model) == planned.base_fingerprint
    resumed.evaluate_submodel(planned, sub_lora, {})  # no PlanMismatchError: the plan names the pristine model
    built = resumed._submodel[1]
    expected = build_submodel(first.model, planned, use_cache=False)
    for got, want in zip(decoder_layers(built), decoder_layers(expected), strict=True):
        base = {n.replace(".base_layer", ""): t for n, t in got.state_dict().items() if "lora_" not in n}
        assert base.keys() == want.state_dict().keys()
        for name, tensor in want.state_dict().items():
            assert torch.equal(base[name], tensor), name  # fused from W₀, not W₀ + Δ
    base_ptrs = {p.data_ptr() for p in decoder_layers(resumed.model).parameters()}
    assert all(p.data_ptr() in base_ptrs for p in decoder_layers(built).parameters() if not p.requires_grad)
    assert not any(hasattr(m, "_devft_pristine_weight") for m in built.modules())  # no hidden copy of W₀ either
    again = resumed.plan(0, resumed.initial_lora()).plan
    assert again == planned


def test_growth_refuses_lora_targets_of_one_layer_before_anything_trains(smoke_config, private_env):
    """``lora.targets`` naming one layer's module: growth would fuse it away or transfer into layers without
    it, so the server refuses it at start; FedIT, which never fuses, runs with it."""
    from server.global_model import GlobalModel

    targets = "q_proj,v_proj,layers.3.mlp.down_proj"
    config = smoke_config(model__name="tiny-llama", lora__targets=targets)
    with pytest.raises(ValueError, match=r"lora.targets=\('q_proj', 'v_proj', 'layers.3.mlp.down_proj'\) adapts "
                                         r"\['mlp.down_proj', 'self_attn.q_proj', 'self_attn.v_proj'\] in layer 3"):
        GlobalModel(config, test=[])
    GlobalModel(smoke_config(model__name="tiny-llama", lora__targets=targets, federation__method="fedit"), test=[])
