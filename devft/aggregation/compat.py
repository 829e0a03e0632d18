"""Which aggregation rules combine with which federated methods, and why (``check_compatible``).

Methods (the strategy's ``method``): ``fedit`` (one stage, the full model), ``progfed`` (stages that add
the next layers, no fusion, no transfer) and ``devft`` (fused submodels, knowledge transfer of LoRA
between stages). DevFT's contract: each stage the client rebuilds the fused base layers from its own
pristine base model, and knowledge transfer carries LoRA only (docs/design.md §1, §2.5).

| rule  | fedit | progfed | devft | why |
|-------|-------|---------|-------|-----|
| fedit | yes | yes | yes | the paper's default |
| ffa   | yes | yes | yes | A is fused and transferred like B, deterministically, so the clients rebuild it from the seed and the plans (``federation.rebuild_frozen``) and only B travels |
| fedsa | yes | yes | yes | the paper's own ablation (FedSA-LoRA + DevFT); the server fuses and transfers Ā, each client its own B with the stage plan the server sends (``devft.growth.personal``), and keeps its full-model B; factor-wise LoRA fusion only (``svd`` needs B·A in one place) |
| svd   | yes | yes | yes | plain rank-r LoRA between rounds, as DevFT expects |
| flora | yes | yes | **no** | merges every round's update into the frozen weights and restarts LoRA from zero: at a DevFT stage boundary the fused base is rebuilt from the pristine weights and only LoRA (now empty) is transferred, so all learning is lost |
| fedex | yes | yes | **no** | the residual lives in the frozen weights of the fused representative layers; rebuilding the fused base at the next stage drops it (no longer exact), and carrying it would mean transferring dense base-weight deltas, which knowledge transfer (LoRA only) does not do |
"""

from __future__ import annotations

from devft.aggregation.base import RULES, AggregationRule

METHODS = ("fedit", "progfed", "devft")

_REFUSED: dict[tuple[str, str], str] = {
    ("flora", "devft"): (
        "FLoRA merges every round's update into the frozen base weights and restarts LoRA from zero, but "
        "DevFT rebuilds the fused base layers from the pristine base model at each stage and transfers only "
        "LoRA between stages, so everything learned would be lost at the first stage boundary"
    ),
    ("fedex", "devft"): (
        "FedEx-LoRA folds its exact residual into the frozen weights of the fused representative layers, but "
        "DevFT rebuilds the fused base layers from the pristine base model at each stage and transfers only "
        "LoRA, so the residual (and exactness) would be dropped at the first stage boundary"
    ),
}


def check_compatible(rule: str | AggregationRule, method: str) -> None:
    """Raise ``ValueError`` naming both when aggregation ``rule`` cannot be used with ``method``."""
    name = rule.name if isinstance(rule, AggregationRule) else rule
    if name not in RULES:
        raise ValueError(f"unknown aggregation rule={name!r}; choose one of {sorted(RULES)}")
    if method not in METHODS:
        raise ValueError(f"unknown method={method!r}; choose one of {list(METHODS)}")
    reason = _REFUSED.get((name, method))
    if reason:
        usable = [r for r in sorted(RULES) if (r, method) not in _REFUSED]
        raise ValueError(
            f"aggregation rule {name!r} cannot be combined with method {method!r}: {reason}. "
            f"Use one of {usable} with {method!r}, or {name!r} with {[m for m in METHODS if (name, m) not in _REFUSED]}."
        )


def compatible_rules(method: str) -> list[str]:
    """The rules usable with ``method``."""
    if method not in METHODS:
        raise ValueError(f"unknown method={method!r}; choose one of {list(METHODS)}")
    return [r for r in sorted(RULES) if (r, method) not in _REFUSED]
