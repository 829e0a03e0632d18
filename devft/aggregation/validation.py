"""Checks on client replies before they are aggregated; failures name the client, the key, what was expected.

Never ``assert`` on outside input: every check here raises :class:`InvalidUpdateError` (or its subclass
:class:`NonFiniteUpdateError`) with ``client`` (index in the list of replies) and ``key`` set, so the strategy
can drop or report that client. Checking values for NaN/Inf is fused into the aggregation kernels
(``check_finite=True``); :func:`validate_updates` checks keys, shapes, dtypes and weights without reading
the values unless ``check_finite=True`` is asked for here too.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import torch

from devft.aggregation.errors import InvalidUpdateError, NonFiniteUpdateError, UnsupportedArrayError
from devft.aggregation.sources import FLOAT_DTYPES, as_sources

__all__ = ["InvalidUpdateError", "NonFiniteUpdateError", "normalized_weights", "validate_updates"]


def normalized_weights(weights: Sequence[float] | torch.Tensor, count: int) -> list[float]:
    """Check ``weights`` (one positive finite number per client, e.g. num-examples) and return ``w / Σ w``."""
    if isinstance(weights, torch.Tensor):
        raw = weights.detach().flatten().tolist()  # bool tensors give bools, refused below
    else:
        raw = list(weights)
    if len(raw) != count:
        raise InvalidUpdateError(f"expected one weight per update ({count}), got {len(raw)} weights")
    values = []
    for k, w in enumerate(raw):
        try:  # a number, not a bool (True is not a count of examples) and not a string float() would parse
            value = math.nan if isinstance(w, bool | np.bool_ | str | bytes) else float(w)
        except (TypeError, ValueError, OverflowError):
            value = math.nan
        if not (math.isfinite(value) and value > 0):
            raise InvalidUpdateError(f"weight must be a positive finite number (e.g. num-examples), got "
                                     f"{repr(w)[:40]}", client=k)
        values.append(value)
    try:
        total = math.fsum(values)
    except OverflowError:  # weights near the float maximum: divide the largest out first
        top = max(values)
        total = math.fsum(w / top for w in values)
        return [(w / top) / total for w in values]
    return [w / total for w in values]


def _lora_rank_dim(key: str) -> int | None:
    if ".lora_A." in key or key.endswith(".lora_A"):
        return 0
    if ".lora_B." in key or key.endswith(".lora_B"):
        return 1
    return None


def validate_updates(
    updates: Sequence[Any],
    weights: Sequence[float] | torch.Tensor | None = None,
    *,
    expected: Mapping[str, Sequence[int]] | None = None,
    rank_free: bool = False,
    check_finite: bool = False,
) -> None:
    """Raise :class:`InvalidUpdateError` unless every update can be aggregated with the others.

    ``updates`` are mappings of tensors or Flower ArrayRecords. Every update must hold exactly the keys of
    ``expected`` (or, without it, of update 0), with the expected shape, one float dtype per key across
    clients, and (``weights`` given) a positive finite weight. With ``rank_free`` the LoRA rank dimension
    (dim 0 of ``lora_A``, dim 1 of ``lora_B``) may differ between clients but must be one rank across all the
    factors of one client's reply (heterogeneous ranks, as FLoRA and FlexLoRA allow: a client trains one rank,
    and what it is sent and measured against follows that rank). ``check_finite``
    reads every value (one extra pass); the aggregation kernels do that check fused, so it is off by default.
    """
    if len(updates) == 0:
        raise InvalidUpdateError("no updates to aggregate (0 replies)")
    if weights is not None:
        normalized_weights(weights, len(updates))
    sources = as_sources(updates)
    c, key = 0, None  # where an unreadable array is found, for the error (the loops below move them)
    try:
        if expected is None:
            ref = sources[0]
            expected = {}
            for key in ref.keys():
                expected[key] = ref.meta(key)[1]
        exp_keys = set(expected)
        dtypes: dict[str, torch.dtype] = {}
        for c, src in enumerate(sources):
            keys = set(src.keys())
            if keys != exp_keys:
                missing, extra = sorted(exp_keys - keys), sorted(keys - exp_keys)
                raise InvalidUpdateError(
                    f"keys differ from the expected {len(exp_keys)}: missing {missing[:3]}"
                    f"{'…' if len(missing) > 3 else ''}, unexpected {extra[:3]}{'…' if len(extra) > 3 else ''}",
                    client=c,
                )
            rank: int | None = None  # one LoRA rank per reply (with rank_free), set by its first factor
            rank_key = None
            for key, shape in expected.items():
                dtype, got = src.meta(key)
                want = tuple(int(s) for s in shape)
                if dtype not in FLOAT_DTYPES:
                    raise InvalidUpdateError(f"dtype {dtype} is not a float dtype", client=c, key=key)
                if dtypes.setdefault(key, dtype) != dtype:
                    raise InvalidUpdateError(f"dtype {dtype} differs from client 0's {dtypes[key]}", client=c, key=key)
                dim = _lora_rank_dim(key) if rank_free else None
                if dim is None:
                    if got != want:
                        raise InvalidUpdateError(f"shape {got}, expected {want}", client=c, key=key)
                    continue
                if len(got) != len(want) or any(g != w for i, (g, w) in enumerate(zip(got, want)) if i != dim):
                    shown = tuple("r" if i == dim else s for i, s in enumerate(want))
                    raise InvalidUpdateError(f"shape {got}, expected {shown} (any rank r)", client=c, key=key)
                if got[dim] < 1:
                    raise InvalidUpdateError(f"shape {got} has rank 0", client=c, key=key)
                if rank is None:
                    rank, rank_key = got[dim], key
                elif got[dim] != rank:
                    raise InvalidUpdateError(
                        f"rank {got[dim]} differs from the rank {rank} of {rank_key} in the same reply (a client "
                        "trains one LoRA rank for all its modules)", client=c, key=key,
                    )
        if check_finite:
            for c, src in enumerate(sources):
                for key in expected:
                    if not bool(torch.isfinite(src.tensor(key)).all()):
                        raise NonFiniteUpdateError("holds NaN or Inf values", client=c, key=key)
    except UnsupportedArrayError as err:
        raise InvalidUpdateError(str(err), client=c, key=key) from err
