"""How each method maps onto the one growth code path (so comparisons differ in nothing else).

- ``devft``: the configured growth (DGLG grouping, DBLF fusion, copy transfer by default; the ablations
  are ``growth.grouping = random|even`` and ``growth.fusion = r-one|sum``).
- ``fedit``: a single stage at full depth for all rounds (the plan is the identity; FedAvg of A and B).
- ``progfed``: the same stage capacities as DevFT, but each stage keeps the first ``L_s`` layers as they
  are (selection, no fusion) and their trained LoRA goes back to the same layers (no transfer to others).

Data, seed, clients, local steps and total rounds come from the same config for every method.

The LoRA aggregation rule (``federation.aggregation``) is orthogonal to the method; :func:`method_rule`
refuses combinations that cannot work (``devft.aggregation.check_compatible``) and those this strategy
does not run yet (:data:`RULE_METHODS`): FLoRA, FedEx-LoRA (base-weight deltas) and FedSA-LoRA (personal B
on each client) run with ``fedit`` only.
"""

from __future__ import annotations

import dataclasses

from devft.aggregation import AggregationRule, check_compatible, get_rule
from devft.config import RunConfig
from devft.growth import GrowthSettings, StageSchedule, make_schedule

SUPPORTED_RULES = ("fedit", "ffa", "svd", "fedsa", "flora", "fedex")
"""Rules the strategy runs end to end (each with the methods :data:`RULE_METHODS` allows)."""

RULE_METHODS: dict[str, tuple[str, ...]] = {
    "fedit": ("fedit", "progfed", "devft"),
    "ffa": ("fedit", "progfed", "devft"),
    "svd": ("fedit", "progfed", "devft"),
    "flora": ("fedit",),
    "fedex": ("fedit",),
    "fedsa": ("fedit",),
}
"""Methods each rule runs with in this Flower app (``check_compatible`` refuses more on principle)."""

_NOT_YET = {
    "flora": "the server keeps FLoRA's base-weight delta for the full model only; carrying it across ProgFed's "
    "growing submodels (and into the submodel evaluation) is not implemented",
    "fedex": "the server keeps FedEx-LoRA's base-weight delta for the full model only; carrying it across "
    "ProgFed's growing submodels (and into the submodel evaluation) is not implemented",
    "fedsa": "each client keeps its own B for one fixed model; moving it with the stage plan (client-side "
    "fusion and knowledge transfer of the personal B between stages) is not implemented",
}


def method_rule(config: RunConfig) -> AggregationRule:
    """The aggregation rule of the run; ``ValueError`` naming the field when it cannot run with the method."""
    name, method = config.federation.aggregation, config.federation.method
    try:
        check_compatible(name, method)
    except ValueError as err:
        raise ValueError(f"federation.aggregation={name!r} with federation.method={method!r}: {err}") from err
    if method not in RULE_METHODS.get(name, ()):
        raise ValueError(
            f"federation.aggregation={name!r} with federation.method={method!r} is not supported by the devft "
            f"strategy: {_NOT_YET.get(name, 'unknown rule')}; use federation.method in {list(RULE_METHODS.get(name, ()))} "
            f"or one of {[r for r, m in RULE_METHODS.items() if method in m]} with {method!r}"
        )
    return get_rule(name, alpha=config.lora.alpha)


def check_run(config: RunConfig) -> None:
    """Cross-field checks that need no model: ``ValueError`` naming the fields and values."""
    faulty = sorted(p for p in config.federation.faults() if p >= config.data.num_clients)
    if faulty:
        raise ValueError(
            f"federation.fault_injection={config.federation.fault_injection!r} names partitions {faulty}, but "
            f"data.num_clients={config.data.num_clients}"
        )
    method_rule(config)


def method_growth(config: RunConfig) -> GrowthSettings:
    """The growth settings the method actually runs with."""
    method = config.federation.method
    if method == "devft":
        return config.growth
    if method == "fedit":
        return dataclasses.replace(config.growth, num_stages=1, capacities=(), rounds_per_stage=())
    if method == "progfed":
        return dataclasses.replace(config.growth, grouping="first", transfer="copy")
    raise ValueError(f"federation.method={method!r} is not one of devft, fedit, progfed")


def method_schedule(config: RunConfig, num_layers: int) -> StageSchedule:
    """Stages (capacities, rounds) of the run for a base model with ``num_layers`` decoder layers.

    Raises ``ValueError`` naming the offending field when the growth settings do not fit the model or the
    round budget.
    """
    growth = method_growth(config)
    rounds = config.federation.num_rounds
    if config.federation.method == "fedit":
        return make_schedule(num_layers, rounds, num_stages=1, capacities=(num_layers,))
    try:
        return make_schedule(
            num_layers,
            rounds,
            num_stages=growth.num_stages,
            capacities=growth.capacities,
            rounds_per_stage=growth.rounds_per_stage,
        )
    except ValueError as err:
        raise ValueError(
            f"growth settings do not fit a {num_layers}-layer model and federation.num_rounds={rounds}: {err} "
            f"(growth.num_stages={growth.num_stages}, growth.capacities={growth.capacities}, "
            f"growth.rounds_per_stage={growth.rounds_per_stage})"
        ) from err
