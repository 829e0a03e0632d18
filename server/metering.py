"""Honest byte counts: the size of a message as Flower's transport serialises it.

Flower ≥ 1.20 ships a message as a tree of content-addressed objects (Message → RecordDict → records →
Arrays → ArrayChunks); each object travels as its ``deflate()`` bytes, and an object already sent in the
same message (identical chunks, e.g. runs of zeros) travels once. :func:`wire_bytes` sums exactly those
bytes, so it counts array payloads, their headers, configs, metrics and the message envelope.
"""

from __future__ import annotations

from flwr.app import Message
from flwr.supercore.inflatable.inflatable_object import get_all_nested_objects


def wire_bytes(message: Message) -> int:
    """Bytes Flower's transport sends for ``message`` (unique deflated objects of its tree)."""
    return sum(len(obj.deflate()) for obj in get_all_nested_objects(message).values())


def serialise(message: Message) -> tuple[str, dict[str, bytes]]:
    """``(root object id, {object id: deflated bytes})``: the message exactly as it goes on the wire."""
    objects = get_all_nested_objects(message)
    return message.object_id, {oid: obj.deflate() for oid, obj in objects.items()}


def deserialise(root_id: str, contents: dict[str, bytes]) -> Message:
    """Rebuild a message from :func:`serialise`'s output (what the receiving side does)."""
    from flwr.supercore.inflatable.inflatable_utils import inflate_object_from_contents

    message = inflate_object_from_contents(root_id, dict(contents), keep_object_contents=False)
    if not isinstance(message, Message):
        raise TypeError(f"object {root_id} inflated to {type(message).__name__}, expected Message")
    return message
