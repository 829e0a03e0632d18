"""Per-layer state of a selection plan's submodel (ProgFed's base deltas): taken and put back by layer index."""

import pytest

from devft.growth import GrowthSettings, is_selection, make_plan, put_layers, select_layers
from devft.models import load_model

PREFIX = "base_model.model.model.layers"


def _module(layer, name="self_attn.q_proj"):
    return f"{PREFIX}.{layer}.{name}"


@pytest.fixture(scope="module")
def model():
    return load_model("tiny-llama").model


def test_first_layers_map_to_themselves_and_the_rest_stay(model):
    plan = make_plan(model, 0, 4, GrowthSettings(grouping="first"))
    full = {_module(i, m): (i, m) for i in range(0, 8, 2) for m in ("self_attn.q_proj", "mlp.up_proj")}
    sub = select_layers(full, plan)
    assert sub == {k: v for k, v in full.items() if int(k.split(".")[4]) < 4}
    back = put_layers(full, {k: ("new", v) for k, v in sub.items()}, plan)
    assert back.keys() == full.keys()
    assert all(back[k] == (("new", full[k]) if k in sub else full[k]) for k in full)
    assert put_layers({}, {_module(5): 1}, make_plan(model, 1, 8, GrowthSettings(grouping="first"))) == {_module(5): 1}


def test_spaced_layers_are_renamed_to_the_submodel_index(model):
    plan = make_plan(model, 0, 3, GrowthSettings(grouping="spaced"))
    assert is_selection(plan) and plan.groups[-1] == (7,)
    full = {_module(i): i for i in range(8)}
    sub = select_layers(full, plan)
    assert sub == {_module(k): g[0] for k, g in enumerate(plan.groups)}
    assert put_layers({}, sub, plan) == {_module(g[0]): g[0] for g in plan.groups}


def test_fused_plans_are_refused_unless_there_is_nothing_to_map(model):
    plan = make_plan(model, 0, 3, GrowthSettings(grouping="even"))
    assert not is_selection(plan)
    assert select_layers({}, plan, "the base delta") == {} and put_layers({"x": 1}, {}, plan) == {"x": 1}
    with pytest.raises(ValueError, match="the base delta is kept per layer.*fuses layers"):
        select_layers({_module(0): 1}, plan, "the base delta")
    with pytest.raises(KeyError, match="names submodel layer 5"):
        put_layers({}, {_module(5): 1}, make_plan(model, 0, 4, GrowthSettings(grouping="first")))
    with pytest.raises(KeyError, match="not inside a decoder layer"):
        select_layers({"lm_head": 1}, make_plan(model, 0, 4, GrowthSettings(grouping="first")))
