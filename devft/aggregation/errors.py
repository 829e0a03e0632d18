"""The named exceptions of aggregation: a reply that cannot be aggregated says who, where and why."""

from __future__ import annotations


class InvalidUpdateError(ValueError):
    """A client's reply cannot be aggregated; ``client`` (index among the replies) and ``key`` say where."""

    def __init__(self, message: str, *, client: int | None = None, key: str | None = None) -> None:
        where = []
        if client is not None:
            where.append(f"client {client}")
        if key is not None:
            where.append(f"key {key!r}")
        super().__init__(f"{', '.join(where)}: {message}" if where else message)
        self.client = client
        self.key = key


class NonFiniteUpdateError(InvalidUpdateError):
    """A client's reply holds NaN or Inf (or the weighted sum overflowed; then ``client`` is None)."""


class NonFiniteAggregateError(NonFiniteUpdateError):
    """Finite replies whose aggregate is not (e.g. ``B·A`` of huge factors overflows float32); ``parts``
    names the LoRA tensors and base-delta modules that hold NaN/Inf."""

    def __init__(self, message: str, *, parts: list[str] | None = None) -> None:
        super().__init__(message)
        self.parts = list(parts or [])

    def __reduce__(self):  # picklable (Ray, multiprocessing) with its parts
        return (_aggregate_error, (self.args[0], self.parts))


def _aggregate_error(message: str, parts: list[str]) -> NonFiniteAggregateError:
    return NonFiniteAggregateError(message, parts=parts)


class UnsupportedArrayError(ValueError):
    """An array devft cannot aggregate in place (not numpy-serialised, not a little-endian float, a
    malformed header, fewer bytes than the header promises, …). Code that knows whose reply it is reading
    re-raises it as an :class:`InvalidUpdateError` naming the client and key."""
