"""Plans: JSON round trips, clear refusals, planning each mode, and the base-model fingerprint."""

import json

import numpy as np
import pytest
import torch

from devft.growth import (
    GROUPING_MODES,
    SIMILARITY_MODES,
    GrowthPlan,
    GrowthSettings,
    PlanError,
    make_plan,
    make_schedule,
    model_fingerprint,
    plan_stage,
)
from devft.models import LoraSettings, attach_lora, decoder_layers, load_model


@pytest.fixture(scope="module")
def tiny():
    return load_model("tiny-llama")


@pytest.mark.parametrize("grouping", GROUPING_MODES)
def test_plans_round_trip_through_json(tiny, grouping):
    schedule = make_schedule(8, total_rounds=3, num_stages=3)
    settings = GrowthSettings(grouping=grouping, beta=0.123456789, lora_fusion="svd", transfer="anchor")
    plan, sim = plan_stage(tiny.model, schedule, 1, settings, tokenizer=tiny.tokenizer)
    assert (sim is not None) == (grouping in SIMILARITY_MODES)
    text = plan.to_json()
    again = GrowthPlan.from_json(text)
    assert again == plan and again.to_json() == text and again.build_hash() == plan.build_hash()
    data = json.loads(text)
    assert data["anchors"] == [g[0] for g in data["groups"]] and data["version"] == 1
    assert data["capacity"] == 4 and len(data["groups"]) == 4


def test_full_capacity_plans_are_singletons_without_similarity(tiny):
    schedule = make_schedule(8, total_rounds=3, num_stages=3)
    plan, sim = plan_stage(tiny.model, schedule, 2, GrowthSettings(), tokenizer=tiny.tokenizer)
    assert sim is None and plan.groups == tuple((i,) for i in range(8)) and plan.similarity is None


def _data(tiny):
    return make_plan(tiny.model, 0, 2, GrowthSettings(grouping="even")).to_dict()


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"version": 2}, "version=2 is not supported"),
        ({"anchors": [0, 5]}, "anchors=.0, 5. disagree"),
        ({"groups": [[0, 1, 2, 3], [3, 4, 5, 6, 7]]}, "more than one group"),
        ({"groups": [[0, 1, 2], [4, 5, 6, 7]], "anchors": [0, 4]}, r"miss layers \[3\]"),
        ({"groups": [[4, 5, 6, 7], [0, 1, 2, 3]], "anchors": [4, 0]}, "not ordered by anchor"),
        ({"groups": [[0, 1, 2, 3, 4, 5, 6, 7]], "anchors": [0]}, "expected 2 groups"),
        ({"fusion": "mean"}, "fusion='mean'"),
        ({"beta": -1.0}, "beta=-1.0"),
        ({"base_fingerprint": "md5:00"}, "not a devft fingerprint"),
        ({"extra": 1}, r"unknown \['extra'\]"),
    ],
)
def test_malformed_plans_are_refused(tiny, change, message):
    data = _data(tiny) | change
    with pytest.raises(PlanError, match=message):
        GrowthPlan.from_json(json.dumps(data))


def test_non_json_is_refused():
    with pytest.raises(PlanError, match="not valid JSON"):
        GrowthPlan.from_json("{groups")
    with pytest.raises(PlanError, match="must be an object"):
        GrowthPlan.from_json("[1, 2]")


def test_selection_plans_need_not_cover_every_layer(tiny):
    plan = make_plan(tiny.model, 0, 3, GrowthSettings(grouping="spaced"))
    assert plan.groups == ((0,), (4,), (7,))
    assert GrowthPlan.from_json(plan.to_json()) == plan


def test_build_hash_depends_only_on_what_builds_the_submodel(tiny):
    base = make_plan(tiny.model, 0, 2, GrowthSettings(grouping="even"))
    same = make_plan(tiny.model, 3, 2, GrowthSettings(grouping="even", transfer="anchor", lora_fusion="svd"))
    assert same.build_hash() == base.build_hash()
    for other in (GrowthSettings(grouping="even", beta=0.2), GrowthSettings(grouping="even", fusion="sum")):
        assert make_plan(tiny.model, 0, 2, other).build_hash() != base.build_hash()
    assert make_plan(tiny.model, 0, 2, GrowthSettings(grouping="first")).build_hash() != base.build_hash()


def test_fingerprint_is_stable_ignores_adapters_and_sees_one_changed_weight():
    first, second = load_model("tiny-llama").model, load_model("tiny-llama").model
    fp = model_fingerprint(first)
    assert fp.startswith("sha256:") and model_fingerprint(second) == fp
    assert model_fingerprint(attach_lora(second, LoraSettings(r=2))) == fp
    changed = load_model("tiny-llama").model
    with torch.no_grad():
        decoder_layers(changed)[0].input_layernorm.weight[3] += 1e-6
    assert model_fingerprint(changed) != fp
    assert model_fingerprint(load_model("tiny-mistral").model) != fp  # same weights, other architecture
    assert model_fingerprint(load_model("tiny-llama", dtype=torch.bfloat16).model) != fp


def test_make_plan_records_the_settings(tiny):
    sim = np.eye(8)
    plan = make_plan(tiny.model, 0, 2, GrowthSettings(grouping="contiguous", similarity="cka", beta=0.3), sim)
    assert (plan.grouping, plan.similarity, plan.beta, plan.family) == ("contiguous", "cka", 0.3, "llama")
    assert plan.base_fingerprint == model_fingerprint(tiny.model)
