"""How each method maps onto the one growth code path (so comparisons differ in nothing else).

- ``devft``: the configured growth (DGLG grouping, DBLF fusion, copy transfer by default; the ablations
  are ``growth.grouping = random|even`` and ``growth.fusion = r-one|sum``).
- ``fedit``: a single stage at full depth for all rounds (the plan is the identity; FedAvg of A and B).
- ``progfed``: the same stage capacities as DevFT, but each stage keeps the first ``L_s`` layers as they
  are (selection, no fusion) and their trained LoRA goes back to the same layers (no transfer to others).

Data, seed, clients, local steps and total rounds come from the same config for every method.

The LoRA aggregation rule (``federation.aggregation``) is orthogonal to the method; :func:`method_rule`
refuses the combinations that cannot work (``devft.aggregation.check_compatible``); every other one runs
end to end. FLoRA and FedEx-LoRA (base-weight deltas) run with ``fedit`` and ``progfed``:
ProgFed's submodel is the full model's first L_s layers as they are, so the server sends each stage its layers'
share of the full model's base delta and writes the aggregated share back (:mod:`devft.growth.selection`);
DevFT refuses them on principle. FedSA-LoRA runs with every method: the server fuses and transfers Ā
between stages, each client its own B (:mod:`devft.growth.personal`); DevFT's ``growth.lora_fusion = "svd"``
is refused with it, since fusing ``B·A`` needs both factors in one place.
"""

from __future__ import annotations

import dataclasses

from devft.aggregation import AggregationRule, check_compatible, get_rule, server_threads
from devft.config import RunConfig
from devft.growth import SIMILARITY_MODES, GrowthSettings, StageSchedule, make_schedule


def method_rule(config: RunConfig) -> AggregationRule:
    """The aggregation rule of the run; ``ValueError`` naming the field when it cannot run with the method."""
    name, method = config.federation.aggregation, config.federation.method
    try:
        check_compatible(name, method)
    except ValueError as err:
        raise ValueError(f"federation.aggregation={name!r} with federation.method={method!r}: {err}") from err
    rule = get_rule(name, alpha=config.lora.alpha, threads=server_threads(config.federation.aggregation_threads))
    if rule.changes_base and config.model.dtype != "float32":
        raise ValueError(
            f"federation.aggregation={name!r} with model.dtype={config.model.dtype!r}: {name!r} folds every round's "
            f"update into the frozen base weights, and {config.model.dtype} weights round a LoRA-sized change "
            "away (a change of 1e-4 on weights of 0.02 moves about a third of bfloat16 entries not at all), so the "
            "rule would silently lose training signal; use model.dtype='float32'"
        )
    ranks = config.lora.client_ranks
    if ranks and not rule.heterogeneous_ranks:
        raise ValueError(
            f"lora.client_ranks={list(ranks)!r} with federation.aggregation={name!r}: {name!r} combines the clients' "
            "A and B factor by factor, which needs one rank for all; use a rank-heterogeneous rule (flora, svd) "
            "or leave lora.client_ranks empty"
        )
    if ranks and name == "svd" and max(ranks) > config.lora.r:
        raise ValueError(
            f"lora.client_ranks={list(ranks)!r} with federation.aggregation='svd' and lora.r={config.lora.r}: svd "
            f"keeps the global adapters at rank lora.r and sends each client their top components, so no client "
            f"rank may exceed it; set lora.r={max(ranks)}"
        )
    lora_fusion = method_growth(config).lora_fusion
    if rule.personalised and method == "devft" and lora_fusion == "svd":
        raise ValueError(
            f"growth.lora_fusion={lora_fusion!r} with federation.aggregation={name!r} and federation.method="
            f"{method!r}: svd fusion re-factors each group's B·A, but with {name!r} the server holds A and every "
            "client its own B, so neither side can fuse the product; use growth.lora_fusion='factors'"
        )
    return rule


def check_run(config: RunConfig) -> None:
    """Cross-field checks that need no model: ``ValueError`` naming the fields and values."""
    faulty = sorted(p for p in config.federation.faults() if p >= config.data.num_clients)
    if faulty:
        raise ValueError(
            f"federation.fault_injection={config.federation.fault_injection!r} names partitions {faulty}, but "
            f"data.num_clients={config.data.num_clients}"
        )
    method_rule(config)
    growth = method_growth(config)
    if config.federation.method == "devft" and growth.similarity == "lora" and growth.grouping in SIMILARITY_MODES:
        raise ValueError(
            f"growth.similarity='lora' with growth.grouping={growth.grouping!r}: the lora view compares the layers' "
            "trained updates B·A, but stage 0 starts from a fresh LoRA (B = 0) and has none"
            + (f", and with federation.aggregation={config.federation.aggregation!r} the server never holds a B"
               if config.federation.aggregation == "fedsa" else "")
            + "; use a view of the weights or activations (cka, hidden, flat, ...)"
        )


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
