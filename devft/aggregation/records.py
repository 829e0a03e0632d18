"""Flower ``ArrayRecord`` helpers: zero-copy views, fast serialisation, the drop-in aggregation, payload bytes.

Flower is imported lazily inside the functions that build records, so ``devft.aggregation`` imports without
it. Reading needs no Flower at all: records are duck-typed (values with ``.data`` bytes and ``.stype``).

Byte accounting follows Flower's own :meth:`ArrayRecord.count_bytes`: for every array, its serialised
``.npy`` bytes (header + elements) plus the length of its key. :func:`payload_nbytes` returns exactly that
for a record, or for a mapping of tensors before it is serialised (tested equal).
"""

from __future__ import annotations

import functools
import io
import logging
import math
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from devft.aggregation.kernels import resolve_backend, weighted_sum_many
from devft.aggregation.kernels.native import native_kernels
from devft.aggregation.kernels.torch_blocked import weighted_sum_flat_torch
from devft.aggregation.packed import is_packed, pack_arrayrecord, pack_flats
from devft.aggregation.sources import NPY_STYPE, as_source
from devft.aggregation.validation import normalized_weights

if TYPE_CHECKING:
    from flwr.app import ArrayRecord

log = logging.getLogger(__name__)

_NUMPY_DTYPES = {torch.float16: np.float16, torch.float32: np.float32, torch.float64: np.float64,
                 torch.uint8: np.uint8}
_DTYPE_NAMES = {t: np.dtype(n).name for t, n in _NUMPY_DTYPES.items()}  # "float32": numpy's .name is slow
_DTYPE_STRS = {t: np.dtype(n).str for t, n in _NUMPY_DTYPES.items()}  # "<f4"


def record_tensors(record: Any) -> dict[str, torch.Tensor]:
    """Zero-copy tensors over a record's arrays, keyed like the record.

    They alias the received bytes and are **read-only**: never write into them (copy first).
    """
    src = as_source(record)
    return {key: src.tensor(key) for key in src.keys()}


def record_state(record: Any, dtype: torch.dtype = torch.float32) -> dict[str, torch.Tensor]:
    """Writable ``dtype`` copies of a record's tensors (either wire format), keyed like the record."""
    return {key: t.to(dtype=dtype, copy=True) for key, t in record_tensors(record).items()}


@functools.lru_cache(maxsize=4096)
def _npy_header(dtype_str: str, shape: tuple[int, ...]) -> bytes:
    # the header np.save writes (and Flower sends), without materialising the array
    dtype = np.dtype(dtype_str)
    probe = np.lib.stride_tricks.as_strided(np.zeros(1, dtype), shape=shape, strides=(0,) * len(shape))
    header = io.BytesIO()
    meta = np.lib.format.header_data_from_array_1_0(probe)
    meta["fortran_order"] = False
    try:
        np.lib.format.write_array_header_1_0(header, meta)
    except ValueError:  # header longer than 65535 bytes (absurd shapes): np.save switches to format 2.0
        header = io.BytesIO()
        np.lib.format.write_array_header_2_0(header, meta)
    return header.getvalue()


def npy_nbytes(dtype: torch.dtype, shape: Sequence[int]) -> int:
    """Length of ``np.save`` of an array of ``dtype`` and ``shape``: what one Flower ``Array`` carries."""
    np_dtype = _numpy_dtype(dtype, "?")
    shape = tuple(int(s) for s in shape)
    return len(_npy_header(np.dtype(np_dtype).str, shape)) + math.prod(shape) * np.dtype(np_dtype).itemsize


def _numpy_dtype(dtype: torch.dtype, key: str) -> Any:
    if dtype not in _NUMPY_DTYPES:
        raise ValueError(
            f"tensor {key!r} has dtype {dtype}; Flower Arrays carry numpy dtypes only (convert bfloat16 to "
            "float16 or float32 first)"
        )
    return _NUMPY_DTYPES[dtype]


def payload_nbytes(payload: Mapping[str, Any]) -> int:
    """Bytes a payload occupies on the wire, as Flower counts them (``ArrayRecord.count_bytes``).

    ``payload`` is a record (its arrays' ``.data`` lengths are summed) or a mapping of tensors (counted as
    they will be serialised: ``.npy`` header + elements), plus each key's length.
    """
    total = 0
    for key, value in payload.items():
        if isinstance(value, torch.Tensor):
            total += npy_nbytes(value.dtype, tuple(value.shape)) + len(key)
        else:
            total += len(value.data) + len(key)
    return total


def to_arrayrecord(tensors: Mapping[str, torch.Tensor]) -> ArrayRecord:
    """An ``ArrayRecord`` of ``tensors`` (CPU copies), byte for byte what ``ArrayRecord(state_dict)`` makes.

    One copy per tensor (header and elements joined once); bfloat16 is refused as Flower refuses it.
    """
    from flwr.app import ArrayRecord

    record = ArrayRecord()  # filled item by item: ArrayRecord(dict) would rebuild every Array once more
    for key, t in tensors.items():
        record[key] = npy_bytes(t, key)
    return record


def npy_bytes(t: torch.Tensor, key: str = "?") -> Any:
    """One Flower ``Array`` of ``t`` (a CPU copy): header and elements joined once, the bytes ``np.save``
    writes. bfloat16 is refused as Flower refuses it."""
    from flwr.app import Array

    _numpy_dtype(t.dtype, key)  # refuses bfloat16
    arr = t.detach().cpu().contiguous().numpy()
    shape = tuple(int(s) for s in arr.shape)
    header = _npy_header(_DTYPE_STRS[t.dtype], shape)
    data = b"".join([header, memoryview(arr).cast("B")]) if arr.size else header
    return Array(dtype=_DTYPE_NAMES[t.dtype], shape=shape, stype=NPY_STYPE, data=data)


def aggregate_arrayrecords(
    records: Sequence[Any],
    weights: Sequence[float],
    *,
    keys: Sequence[str] | None = None,
    clip_norm: float | None = None,
    check_finite: bool = True,
    backend: str = "auto",
    threads: int | None = None,
) -> ArrayRecord:
    """Weighted mean of Flower records, ``Σ_k (w_k / Σ w) · record_k``: a drop-in for Flower's
    ``aggregate_arrayrecords`` (which takes the weights from each reply's MetricRecord) that reads the
    received bytes in place, accumulates in fp32 in one pass, and checks for NaN/Inf on the way. Records in
    the packed format (:mod:`devft.aggregation.packed`) give a packed record, others one array per key.

    Weights must be positive and finite (e.g. num-examples); raises
    :class:`~devft.aggregation.errors.InvalidUpdateError` naming the offending client otherwise.
    """
    p = normalized_weights(weights, len(records))
    chosen = resolve_backend(backend, torch.device("cpu"))
    if chosen not in ("torch", "native"):
        out = weighted_sum_many(records, p, keys=keys, clip_norm=clip_norm, check_finite=check_finite,
                                backend=backend)
        return pack_arrayrecord(out) if is_packed(records[0]) else to_arrayrecord(out)
    flats = weighted_sum_flat_torch(records, p, keys=keys, clip_norm=clip_norm, check_finite=check_finite,
                                    threads=threads, native=native_kernels() if chosen == "native" else None)
    first = as_source(records[0])
    order = list(keys) if keys is not None else first.keys()
    if is_packed(records[0]):
        return pack_flats(flats, order, first.manifest)
    return _record_from_flats(flats, order)


def _record_from_flats(flats: list, order: list[str]) -> ArrayRecord:
    """Serialise flat sums straight into an ``ArrayRecord`` (cast once to each group's dtype, then one
    header + bytes join per key), the same bytes :func:`to_arrayrecord` writes."""
    from flwr.app import Array, ArrayRecord

    arrays = {}
    for group, flat in flats:
        _numpy_dtype(group.dtype, group.keys[0] if group.keys else "?")  # refuses bfloat16, naming a key
        data = memoryview(flat.to(group.dtype).numpy()).cast("B")
        isz = group.itemsize
        dtype_str, dtype_name = _DTYPE_STRS[group.dtype], _DTYPE_NAMES[group.dtype]
        for key, shape, n, off in zip(group.keys, group.shapes, group.numels, group.offsets):
            header = _npy_header(dtype_str, shape)
            arrays[key] = Array(dtype=dtype_name, shape=shape, stype=NPY_STYPE,
                                data=b"".join([header, data[off * isz : (off + n) * isz]]))
    record = ArrayRecord()
    for key in order:
        record[key] = arrays[key]
    return record
