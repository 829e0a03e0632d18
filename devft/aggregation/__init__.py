"""LoRA aggregation rules and the fused weighted-sum primitive they (and DBLF fusion) are built on."""

from devft.aggregation.reference import weighted_sum_reference

weighted_sum = weighted_sum_reference  # replaced by the dispatching fused implementation

__all__ = ["weighted_sum", "weighted_sum_reference"]
