"""A client's own B across stages: fused for each new plan, written back after training, chained over skips."""

import pytest
import torch

from devft.growth import (
    GrowthSettings,
    PersonalLoRA,
    PlanMismatchError,
    after_training,
    fuse_lora,
    make_plan,
    personal_for_plan,
    submodel_lora,
    transfer_lora,
)
from devft.models import FAMILIES, LoraSettings, attach_lora, load_model, lora_state

LORA = LoraSettings(r=4, alpha=8.0)


def _b(state):
    return {k: v for k, v in state.items() if ".lora_B." in k}


def _trained(template, seed):
    """What local training leaves in the submodel's B: random, deterministic for ``seed``."""
    gen = torch.Generator().manual_seed(seed)
    return {k: torch.randn(v.shape, generator=gen) for k, v in template.items()}


@pytest.fixture(scope="module")
def model():
    return load_model("tiny-llama").model


@pytest.fixture(scope="module")
def full_ab():
    """The full model's fresh LoRA (A random, B zero), as the server and every client start."""
    return {k: v.clone() for k, v in lora_state(attach_lora(load_model("tiny-llama").model, LORA)).items()}


@pytest.fixture(scope="module")
def plans(model):
    """Three stages as a DevFT run plans them: random groups (β = 0.3), then other groups, then the full model."""
    return [
        make_plan(model, 0, 3, GrowthSettings(grouping="random", seed=1, beta=0.3)),
        make_plan(model, 1, 5, GrowthSettings(grouping="random", seed=2, beta=0.3, fusion="sum", transfer="anchor")),
        make_plan(model, 2, 8, GrowthSettings()),
    ]


def _reference(full_ab, trained_by_plan, plan):
    """Independent: the server's path on whole (A, B) states (A kept as it is, B from the client's training)."""
    state = dict(full_ab)
    for done, trained in trained_by_plan:
        sub = submodel_lora(state, done)
        sub.update(trained)
        state = transfer_lora(state, sub, done)
    return _b(submodel_lora(state, plan))


def _assert_equal(got, want):
    assert got.keys() == want.keys()
    for key in want:
        assert torch.equal(got[key], want[key]), key


def test_first_round_starts_from_zero_and_the_same_plan_gets_the_trained_b_back(plans, full_ab):
    template = _b(submodel_lora(full_ab, plans[0]))
    start = personal_for_plan(None, plans[0], template)
    assert start.keys() == template.keys() and not any(v.any() for v in start.values())
    trained = _trained(template, seed=3)
    state = after_training(None, plans[0], trained)
    _assert_equal(personal_for_plan(state, plans[0], template), trained)  # as trained, not re-fused
    # The full-model B holds every layer; the trained B sits on every member of its group (copy transfer).
    assert len(state.full) == 8 * len(template) // 3
    _assert_equal(state.full, _b(transfer_lora(_b(full_ab), trained, plans[0])))


def test_stage_change_transfers_with_the_old_plan_then_fuses_with_the_new(plans, full_ab):
    t0 = _trained(_b(submodel_lora(full_ab, plans[0])), seed=3)
    state = after_training(None, plans[0], t0)
    template1 = _b(submodel_lora(full_ab, plans[1]))
    got = personal_for_plan(state, plans[1], template1)
    _assert_equal(got, _reference(full_ab, [(plans[0], t0)], plans[1]))
    assert any(v.any() for v in got.values())
    # Train stage 1 (sum fusion, anchor transfer), then move to the full model.
    t1 = _trained(template1, seed=4)
    state = after_training(state, plans[1], t1)
    template2 = _b(lora_state(attach_lora(load_model("tiny-llama").model, LORA)))
    _assert_equal(personal_for_plan(state, plans[2], template2),
                  _reference(full_ab, [(plans[0], t0), (plans[1], t1)], plans[2]))


def test_a_client_that_skips_a_stage_chains_from_its_last_full_b(plans, full_ab):
    t0 = _trained(_b(submodel_lora(full_ab, plans[0])), seed=5)
    state = after_training(None, plans[0], t0)  # trained stage 0, not sampled in stage 1
    template2 = _b(full_ab)
    _assert_equal(personal_for_plan(state, plans[2], template2), _reference(full_ab, [(plans[0], t0)], plans[2]))
    # A client first sampled in stage 1 starts from zero there, and its full B is zero outside stage 1's targets.
    t1 = _trained(_b(submodel_lora(full_ab, plans[1])), seed=6)
    late = after_training(None, plans[1], t1)
    anchors = set(plans[1].anchors)
    for key, value in late.full.items():
        layer = int(key.split(".layers.")[1].split(".")[0])
        assert bool(value.any()) == (layer in anchors), key  # anchor transfer: anchors only


def test_b_alone_fuses_as_it_fuses_next_to_a(plans, full_ab):
    gen = torch.Generator().manual_seed(7)
    state = {k: (torch.randn(v.shape, generator=gen) if ".lora_B." in k else v) for k, v in full_ab.items()}
    for plan in plans:
        both = fuse_lora(state, plan.groups, FAMILIES[plan.family], plan.fusion, plan.beta, plan.lora_fusion)
        alone = fuse_lora(_b(state), plan.groups, FAMILIES[plan.family], plan.fusion, plan.beta, plan.lora_fusion)
        _assert_equal(alone, _b(both))
    with pytest.raises(ValueError, match="lora_fusion='svd' fuses B·A"):
        fuse_lora(_b(state), plans[0].groups, FAMILIES["llama"], "dblf", 0.1, "svd")


def test_state_round_trips_and_refuses_foreign_input(plans, full_ab):
    t0 = _trained(_b(submodel_lora(full_ab, plans[0])), seed=8)
    state = after_training(None, plans[0], t0)
    tensors, metadata = state.to_flat()
    again = PersonalLoRA.from_flat(tensors, metadata)
    assert again.plan == state.plan
    _assert_equal(again.full, state.full)
    _assert_equal(again.sub, state.sub)
    with pytest.raises(ValueError, match="format=None"):
        PersonalLoRA.from_flat(t0, None)  # e.g. a bare B written by an older devft
    other = make_plan(load_model("tiny-llama", dtype=torch.float16).model, 1, 5, GrowthSettings(grouping="even"))
    with pytest.raises(PlanMismatchError, match="personal state was trained under a plan"):
        personal_for_plan(state, other, _b(submodel_lora(full_ab, plans[1])))
    with pytest.raises(ValueError, match="has shape"):
        personal_for_plan(state, plans[0], {k: torch.zeros(v.shape[0], 2) for k, v in t0.items()})
