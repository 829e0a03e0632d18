"""Pure-PyTorch references of the one primitive every aggregation rule and DBLF fusion is built on.

Plain loops, one tensor at a time, fp32 accumulation (fp64 for fp64 inputs): slow, obviously right, and
with the same signatures as the fused kernels in :mod:`devft.aggregation.kernels`, which tests compare
against them.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import torch

from devft.aggregation._plan import check_weights, compute_dtype
from devft.aggregation.errors import InvalidUpdateError, NonFiniteUpdateError, UnsupportedArrayError
from devft.aggregation.sources import FLOAT_DTYPES, as_sources


def weighted_sum_reference(tensors: Sequence[torch.Tensor], weights: Sequence[float] | torch.Tensor) -> torch.Tensor:
    """Return ``Σ_k weights[k] · tensors[k]``, accumulated in fp32 (fp64 when ``tensors[0]`` is fp64), in the
    dtype of ``tensors[0]``.

    All tensors must have the same shape; ``len(weights) == len(tensors) >= 1``.
    """
    if len(tensors) == 0:
        raise ValueError("weighted_sum needs at least one tensor, got 0")
    w = check_weights(weights, len(tensors))  # one finite real number per tensor, as every backend asks
    shape = tensors[0].shape
    acc = torch.zeros(shape, dtype=compute_dtype(tensors[0].dtype), device=tensors[0].device)
    for k, t in enumerate(tensors):
        if t.shape != shape:
            raise ValueError(f"weighted_sum tensor {k} has shape {tuple(t.shape)}, expected {tuple(shape)}")
        acc += w[k] * t.to(acc.dtype)
    return acc.to(tensors[0].dtype)


def weighted_sum_many_reference(
    updates: Sequence[Any],
    weights: Sequence[float] | torch.Tensor,
    *,
    keys: Sequence[str] | None = None,
    clip_norm: float | None = None,
    check_finite: bool = True,
    out_dtype: torch.dtype | None = None,
) -> dict[str, torch.Tensor]:
    """``{key: Σ_k w_k · c_k · updates[k][key]}`` for every key of update 0 (or ``keys``).

    ``updates`` are mappings of tensors or Flower ArrayRecords. Weights are used as given (any finite real
    numbers). With ``clip_norm = C`` each client's update is first scaled by ``c_k = min(1, C / ‖x_k‖)``,
    ``‖x_k‖`` the L2 norm over all ``keys`` of that client; otherwise ``c_k = 1``. Accumulation is fp32
    (fp64 for fp64 inputs); results have the input's dtype unless ``out_dtype`` is given. With
    ``check_finite`` a NaN/Inf in any input raises :class:`NonFiniteUpdateError` naming client and key.
    """
    sources = as_sources(updates)
    w = check_weights(weights, len(sources))
    keys = list(sources[0].keys()) if keys is None else list(keys)
    tensors = []
    for c, src in enumerate(sources):
        row = {}
        for key in keys:
            if not src.has(key):
                raise InvalidUpdateError("missing", client=c, key=key)
            try:
                row[key] = src.tensor(key)
            except UnsupportedArrayError as err:
                raise InvalidUpdateError(str(err), client=c, key=key) from err
            if row[key].dtype not in FLOAT_DTYPES:
                raise InvalidUpdateError(f"dtype {row[key].dtype} is not a float dtype", client=c, key=key)
        tensors.append(row)
    for key in keys:
        for c, row in enumerate(tensors):
            if row[key].shape != tensors[0][key].shape or row[key].dtype != tensors[0][key].dtype:
                raise InvalidUpdateError(
                    f"{row[key].dtype}{tuple(row[key].shape)}, expected "
                    f"{tensors[0][key].dtype}{tuple(tensors[0][key].shape)}", client=c, key=key)
            if check_finite and not bool(torch.isfinite(row[key]).all()):
                raise NonFiniteUpdateError("holds NaN or Inf values", client=c, key=key)
    if clip_norm is not None:
        if not clip_norm > 0:
            raise ValueError(f"clip_norm must be > 0, got clip_norm={clip_norm!r}")
        for c, row in enumerate(tensors):
            norm = sum(float(t.double().pow(2).sum()) for t in row.values()) ** 0.5
            if not math.isfinite(norm):  # an overflowing norm: NaN, which the finite check reports
                w[c] = float("nan")
            else:
                w[c] *= min(1.0, clip_norm / norm) if norm > 0 else 1.0
    out = {}
    for key in keys:
        dtype = tensors[0][key].dtype
        acc = torch.zeros(tensors[0][key].shape, dtype=compute_dtype(dtype), device=tensors[0][key].device)
        for c, row in enumerate(tensors):
            acc += w[c] * row[key].to(acc.dtype)
        if check_finite and not bool(torch.isfinite(acc).all()):
            raise NonFiniteUpdateError("the weighted sum overflowed although every input is finite", key=key)
        out[key] = acc.to(out_dtype or dtype)
        if check_finite and not bool(torch.isfinite(out[key]).all()):
            raise NonFiniteUpdateError(
                f"the weighted sum overflows {str(out[key].dtype).removeprefix('torch.')}", key=key)
    return out
