"""Which rules combine with which methods: refused combinations name both and say why."""

from __future__ import annotations

import pytest

from devft.aggregation import METHODS, RULES, check_compatible, compatible_rules, get_rule

REFUSED = {("flora", "devft"), ("fedex", "devft")}


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("rule", sorted(RULES))
def test_every_combination_is_decided(rule, method):
    if (rule, method) in REFUSED:
        with pytest.raises(ValueError) as info:
            check_compatible(rule, method)
        message = str(info.value)
        assert f"'{rule}'" in message and f"'{method}'" in message and "frozen" in message
    else:
        check_compatible(rule, method)
        check_compatible(get_rule(rule, alpha=16.0), method)


def test_compatible_rules_and_unknown_names():
    assert compatible_rules("devft") == ["fedit", "fedsa", "ffa", "svd"]
    assert compatible_rules("fedit") == sorted(RULES)
    with pytest.raises(ValueError, match="unknown method='fedprox'"):
        check_compatible("fedit", "fedprox")
    with pytest.raises(ValueError, match="unknown aggregation rule='fedavg'"):
        check_compatible("fedavg", "devft")
