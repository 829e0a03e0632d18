"""LoRA aggregation rules and the fused weighted-sum primitive they (and DBLF fusion) are built on."""

from devft.aggregation import fedex, fedit, fedsa, ffa, flora, svd  # noqa: F401  (each registers its rule)
from devft.aggregation.base import (
    RULES,
    AggregationRule,
    BaseDelta,
    ServerState,
    get_rule,
    ideal_delta,
    lora_modules,
    lora_part,
    split_downlink,
)
from devft.aggregation.compat import METHODS, check_compatible, compatible_rules
from devft.aggregation.errors import (
    InvalidUpdateError,
    NonFiniteAggregateError,
    NonFiniteUpdateError,
    UnsupportedArrayError,
)
from devft.aggregation.kernels import available_backends, client_sq_norms, weighted_sum, weighted_sum_many
from devft.aggregation.kernels.torch_blocked import server_threads
from devft.aggregation.packed import WIRE_FORMATS, is_packed, pack_arrayrecord, packed_nbytes, wire_record
from devft.aggregation.records import (
    aggregate_arrayrecords,
    npy_nbytes,
    payload_nbytes,
    record_state,
    record_tensors,
    to_arrayrecord,
)
from devft.aggregation.reference import weighted_sum_many_reference, weighted_sum_reference
from devft.aggregation.validation import normalized_weights, validate_updates

__all__ = [
    "METHODS",
    "WIRE_FORMATS",
    "RULES",
    "AggregationRule",
    "BaseDelta",
    "InvalidUpdateError",
    "NonFiniteAggregateError",
    "NonFiniteUpdateError",
    "ServerState",
    "UnsupportedArrayError",
    "aggregate_arrayrecords",
    "available_backends",
    "check_compatible",
    "client_sq_norms",
    "compatible_rules",
    "get_rule",
    "is_packed",
    "ideal_delta",
    "lora_modules",
    "lora_part",
    "normalized_weights",
    "pack_arrayrecord",
    "server_threads",
    "packed_nbytes",
    "npy_nbytes",
    "payload_nbytes",
    "record_state",
    "record_tensors",
    "split_downlink",
    "to_arrayrecord",
    "validate_updates",
    "weighted_sum",
    "weighted_sum_many",
    "weighted_sum_many_reference",
    "weighted_sum_reference",
    "wire_record",
]
