"""How each method maps onto the one growth code path (so comparisons differ in nothing else).

- ``devft``: the configured growth (DGLG grouping, DBLF fusion, copy transfer by default; the ablations
  are ``growth.grouping = random|even`` and ``growth.fusion = r-one|sum``).
- ``fedit``: a single stage at full depth for all rounds (the plan is the identity; FedAvg of A and B).
- ``progfed``: the same stage capacities as DevFT, but each stage keeps the first ``L_s`` layers as they
  are (selection, no fusion) and their trained LoRA goes back to the same layers (no transfer to others).

Data, seed, clients, local steps and total rounds come from the same config for every method.

The LoRA aggregation rule (``federation.aggregation``) is orthogonal to the method; :func:`method_rule`
refuses combinations that cannot work (``devft.aggregation.check_compatible``) and the rules this strategy
does not run yet.
"""

from __future__ import annotations

import dataclasses

from devft.aggregation import AggregationRule, check_compatible, get_rule
from devft.config import RunConfig
from devft.growth import GrowthSettings, StageSchedule, make_schedule

SUPPORTED_RULES = ("fedit", "ffa", "svd")
"""Rules with one global LoRA and frozen base weights, which the strategy runs end to end."""

_UNSUPPORTED = {
    "fedsa": "FedSA-LoRA keeps each client's B on the client across rounds and stages (client-side state and "
    "client-side knowledge transfer), which the ClientApp does not implement yet",
    "flora": "FLoRA folds every round into the frozen base weights (base deltas on clients and server, and an "
    "adapter that cannot be saved in peft's format), which the strategy does not implement yet",
    "fedex": "FedEx-LoRA folds a residual into the frozen base weights (base deltas on clients and server), "
    "which the strategy does not implement yet",
}


def method_rule(config: RunConfig) -> AggregationRule:
    """The aggregation rule of the run; ``ValueError`` naming the field when it cannot run with the method."""
    name, method = config.federation.aggregation, config.federation.method
    try:
        check_compatible(name, method)
    except ValueError as err:
        raise ValueError(f"federation.aggregation={name!r} with federation.method={method!r}: {err}") from err
    if name not in SUPPORTED_RULES:
        raise ValueError(
            f"federation.aggregation={name!r} is not supported by the devft strategy: {_UNSUPPORTED.get(name, '')}; "
            f"use one of {SUPPORTED_RULES}"
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
