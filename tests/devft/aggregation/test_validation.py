"""Reply validation: every failure names the client, the key, what was expected and what came."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from aggregation_cases import SMALL_MODULES, lora_key, random_lora
from flwr.app import ArrayRecord

from devft.aggregation import InvalidUpdateError, NonFiniteUpdateError, normalized_weights, validate_updates


def clients(n=3, rank=4):
    return [random_lora(2, rank, SMALL_MODULES, seed=k) for k in range(n)]


def test_consistent_replies_pass_as_tensors_and_records():
    ups = clients()
    validate_updates(ups, [1, 2, 3], check_finite=True)
    validate_updates([ArrayRecord(u) for u in ups], [1, 2, 3], check_finite=True)


def test_missing_and_unexpected_keys_are_named():
    ups = clients()
    key = lora_key(1, "mlp.down_proj", "lora_B")
    del ups[2][key]
    ups[2]["something.else"] = torch.zeros(1)
    with pytest.raises(InvalidUpdateError, match="missing") as info:
        validate_updates(ups)
    assert info.value.client == 2 and key in str(info.value) and "something.else" in str(info.value)


def test_shape_and_dtype_mismatches_are_named():
    ups = clients()
    key = lora_key(0, "self_attn.k_proj", "lora_A")
    expected = {k: tuple(v.shape) for k, v in ups[0].items()}
    ups[1][key] = torch.zeros(4, 25)
    with pytest.raises(InvalidUpdateError, match=r"shape \(4, 25\), expected \(4, 24\)") as info:
        validate_updates(ups, expected=expected)
    assert (info.value.client, info.value.key) == (1, key)
    ups = clients()
    ups[2][key] = ups[2][key].half()
    with pytest.raises(InvalidUpdateError, match="dtype") as info:
        validate_updates([ArrayRecord(u) for u in ups])
    assert (info.value.client, info.value.key) == (2, key)


def test_rank_free_accepts_other_ranks_but_not_inconsistent_factors():
    ups = [random_lora(2, r, SMALL_MODULES, seed=r) for r in (2, 4, 8)]
    expected = {k: tuple(v.shape) for k, v in ups[1].items()}
    with pytest.raises(InvalidUpdateError, match="shape"):
        validate_updates(ups, expected=expected)  # ranks differ: refused unless rank_free
    validate_updates(ups, expected=expected, rank_free=True)
    key_a = lora_key(1, "self_attn.q_proj", "lora_A")
    first = next(k for k in expected if ".lora_" in k)
    ups[2][key_a] = torch.zeros(3, 24)  # A of rank 3, B of rank 8
    with pytest.raises(InvalidUpdateError, match=f"rank 3 differs from the rank 8 of {first}") as info:
        validate_updates(ups, expected=expected, rank_free=True)
    assert (info.value.client, info.value.key) == (2, key_a)
    # both factors of one module at rank 3 while the others are at 8: a client trains one rank (what it is
    # sent and what its update is measured from follow that rank), so the reply is refused by name too
    key_b = key_a.replace("lora_A", "lora_B")
    ups[2][key_b] = torch.zeros(ups[2][key_b].shape[0], 3)
    with pytest.raises(InvalidUpdateError, match="rank 3 differs from the rank 8") as info:
        validate_updates(ups, expected=expected, rank_free=True)
    assert info.value.client == 2 and info.value.key in (key_a, key_b)
    ups[2] = random_lora(2, 8, SMALL_MODULES, seed=8)
    ups[2][key_a] = torch.zeros(8, 23)  # wrong d_in
    with pytest.raises(InvalidUpdateError, match="any rank r"):
        validate_updates(ups, expected=expected, rank_free=True)


def test_weights_empty_and_non_finite_values():
    with pytest.raises(InvalidUpdateError, match="no updates"):
        validate_updates([])
    ups = clients()
    with pytest.raises(InvalidUpdateError, match="one weight per update"):
        validate_updates(ups, [1, 2])
    key = lora_key(0, "mlp.down_proj", "lora_A")
    ups[0][key][0, 0] = float("nan")
    validate_updates(ups, [1, 1, 1])  # values are not read unless asked (the kernels check them fused)
    with pytest.raises(NonFiniteUpdateError) as info:
        validate_updates(ups, [1, 1, 1], check_finite=True)
    assert (info.value.client, info.value.key) == (0, key)


@pytest.mark.parametrize("bad,client", [([1, True, 2], 1), ([10**400, 1, 1], 0), ([1, 2, "x"], 2), ([1, 0, 1], 1),
                                        ([1, -3, 1], 1), ([1, 1, float("inf")], 2), ([None, 1, 1], 0),
                                        ([1, "10", 1], 1), ([b"5", 1, 1], 0), ([1, 1, np.True_], 2),
                                        (torch.tensor([True, True, True]), 0)])
def test_every_bad_weight_is_named_by_client(bad, client):
    with pytest.raises(InvalidUpdateError, match="weight must be a positive finite number") as info:
        normalized_weights(bad, 3)
    assert info.value.client == client and len(str(info.value)) < 200


def test_weights_near_the_float_maximum_or_minimum_normalise_without_overflow():
    assert normalized_weights([1.7e308, 1.7e308], 2) == [0.5, 0.5]
    assert normalized_weights([5e-324, 5e-324], 2) == [0.5, 0.5]
    assert normalized_weights(torch.tensor([1.0, 3.0]), 2) == [0.25, 0.75]
