"""Turn train replies into validated client updates, or into recorded failures.

A reply is accepted only if it carries no error, exactly the LoRA keys the aggregation rule expects with the
expected shapes (in either wire format: one array per tensor or packed), the run's wire dtype (float32 or float16),
finite values, and a MetricRecord with a positive
integer ``num-examples`` (at most 2**53) and a finite ``train-loss``. Anything else raises :class:`InvalidReply` inside :func:`parse_train_reply` and
is recorded as a failure of that client: it never reaches the global model.
"""

from __future__ import annotations

import logging
import math
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import torch
from flwr.app import ArrayRecord, Message
from flwr.common.constant import SUPERLINK_NODE_ID

from devft.aggregation import InvalidUpdateError, validate_updates
from devft.aggregation.sources import UnsupportedArrayError, as_source

log = logging.getLogger(__name__)

WIRE_DTYPES = (torch.float32, torch.float16)
MAX_EXAMPLES = 2**53  # integers a float64 holds exactly; the example-weighted sums stay finite


_ANSI = re.compile(r"\x1b\[[0-9;]*m")
_FLOWER_REASON = re.compile(r"<class '([\w.]+)'>:<'(.*)'>", re.DOTALL)
_EXCEPTION_LINE = re.compile(r"^([A-Za-z_]\w*(?:\.[A-Za-z_]\w*)*(?:Error|Exception|Fault|Exit|Interrupt)): (.*\S)\s*$")
_WRAPPERS = ("ray.", "RayTaskError", "ClientAppException")  # what the simulation wraps a client's error in


def client_error(reason: str) -> str:
    """A client's error as ``ExceptionName: message``, read out of what Flower reports.

    A SuperNode reports ``<class 'pkg.Error'>:<'message'>``; the simulation wraps that in Ray's task error,
    whose text holds ANSI colours and whole tracebacks, the client's own exception line among them (the last
    one before Flower's wrapper: a chained error's cause is printed first). Anything else is returned
    without colours."""
    text = _ANSI.sub("", reason).strip()
    raised = None  # the last exception line before the wrapper's: with chained errors the cause comes first
    for line in text.splitlines():
        if raised is not None and "ClientAppException" in line:
            break
        found = _EXCEPTION_LINE.match(line.strip())
        if found and not any(w in found.group(1) for w in _WRAPPERS):
            raised = found
    if raised is not None:
        return f"{raised.group(1).rsplit('.', 1)[-1]}: {raised.group(2)}"
    flower = _FLOWER_REASON.fullmatch(text)
    if flower and "\n" not in flower.group(2):
        return f"{flower.group(1).rsplit('.', 1)[-1]}: {flower.group(2)}"
    return text


class InvalidReply(ValueError):
    """A client reply that must not be aggregated; the message says what was expected and what came."""


@dataclass
class ClientUpdate:
    """One client's accepted contribution to a round."""

    node_id: int
    partition_id: int
    num_examples: int
    record: ArrayRecord  # the LoRA tensors it sent (validated; read in place by the aggregation)
    metrics: dict[str, Any]
    wire_bytes: int = 0


@dataclass
class ClientFailure:
    """A client that raised, timed out or replied with something unusable."""

    node_id: int
    partition_id: int | None
    reason: str
    metrics: dict[str, Any] = field(default_factory=dict)


def parse_train_reply(
    reply: Message, expected: Mapping[str, tuple[int, ...]], rank_free: bool = False,
    wire_dtype: torch.dtype | None = None,
) -> ClientUpdate:
    """Validate ``reply`` against the expected LoRA ``{key: shape}``; raise :class:`InvalidReply` if unusable.

    The arrays are checked by :func:`devft.aggregation.validate_updates` (keys, shapes, finite values; with
    ``rank_free`` the LoRA rank may differ), the envelope, the dtype and ``num-examples`` here: every array
    must be ``wire_dtype`` (the run's ``federation.wire_dtype``, so all replies of a round agree and can be
    summed), or, without it, one of :data:`WIRE_DTYPES`.
    """
    allowed = WIRE_DTYPES if wire_dtype is None else (wire_dtype,)
    node = reply.metadata.src_node_id
    if reply.has_error():
        if reply.metadata.src_node_id == SUPERLINK_NODE_ID:  # the node is gone, or its reply expired
            raise InvalidReply(f"no reply; the SuperLink answered for the node: {reply.error.reason}")
        raise InvalidReply(f"client raised: {client_error(reply.error.reason)}")
    content = reply.content
    if len(content.array_records) != 1 or len(content.metric_records) != 1:
        raise InvalidReply(
            f"expected one ArrayRecord and one MetricRecord, got {len(content.array_records)} and "
            f"{len(content.metric_records)}"
        )
    metrics = dict(next(iter(content.metric_records.values())))
    num_examples = metrics.get("num-examples")
    if isinstance(num_examples, bool) or not isinstance(num_examples, int | float) or not math.isfinite(num_examples):
        raise InvalidReply(f"metric num-examples must be a number, got {num_examples!r}")
    if num_examples <= 0 or int(num_examples) != num_examples or num_examples > MAX_EXAMPLES:
        raise InvalidReply(f"metric num-examples must be a positive integer <= 2**53, got {num_examples!r}")
    loss = metrics.get("train-loss")
    if isinstance(loss, bool) or not isinstance(loss, int | float) or not math.isfinite(loss):
        raise InvalidReply(f"metric train-loss must be a finite number, got {loss!r}")
    record = next(iter(content.array_records.values()))
    try:  # either wire format (one array per tensor, or packed); read in place, never deserialised
        source = as_source(record)
        for key in source.keys():
            dtype = source.meta(key)[0]
            if dtype not in allowed:
                raise InvalidReply(f"{key} has dtype {str(dtype).removeprefix('torch.')}, expected "
                                   f"{' or '.join(str(d).removeprefix('torch.') for d in allowed)} (the run's wire "
                                   "dtype)")
    except InvalidReply:
        raise
    except UnsupportedArrayError as err:
        raise InvalidReply(f"unreadable arrays: {err}") from err
    except Exception as err:  # whatever a hostile payload provokes is this reply's fault, never the round's
        log.warning("reading a reply raised %s (traceback: in case it is the server's bug)", type(err).__name__,
                    exc_info=True)
        raise InvalidReply(f"unreadable arrays: {type(err).__name__}: {str(err)[:300]}") from err
    try:
        validate_updates([record], [num_examples], expected=expected, rank_free=rank_free, check_finite=True)
    except InvalidUpdateError as err:
        raise InvalidReply(str(err).removeprefix("client 0, ")) from err
    except Exception as err:  # as above
        log.warning("checking a reply raised %s (traceback: in case it is the server's bug)", type(err).__name__,
                    exc_info=True)
        raise InvalidReply(f"unreadable arrays: {type(err).__name__}: {str(err)[:300]}") from err
    return ClientUpdate(node_id=node, partition_id=-1, num_examples=int(num_examples), record=record, metrics=metrics)
