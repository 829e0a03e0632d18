"""What every backend of the many-tensor weighted sum shares: consistency checks, dtype groups, outputs."""

from __future__ import annotations

import contextlib
import gc
import math
import numbers
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from devft.aggregation.errors import InvalidUpdateError, NonFiniteUpdateError, UnsupportedArrayError
from devft.aggregation.packed import PackedSource
from devft.aggregation.sources import FLOAT_DTYPES, ITEMSIZE, NpyLayout, RecordSource, Source


@dataclass
class Group:
    """The keys of one dtype, laid out back to back in one flat output buffer (element offsets), and each
    client's element buffers for them.

    The buffers are per *run*: ``runs`` are the element counts of consecutive stretches of the flat output
    that lie back to back in every client's payload (one run per key, except for packed payloads, where a
    whole payload is typically one run). ``elements[c][j]`` is client ``c``'s run ``j``: a byte view or an
    address for Flower records, a flat tensor otherwise."""

    dtype: torch.dtype
    keys: list[str] = field(default_factory=list)
    shapes: list[tuple[int, ...]] = field(default_factory=list)
    numels: list[int] = field(default_factory=list)
    offsets: list[int] = field(default_factory=list)
    layouts: list[NpyLayout] = field(default_factory=list)
    elements: list[list[Any]] = field(default_factory=list)
    runs: list[int] = field(default_factory=list)
    total: int = 0

    def add(self, key: str, shape: tuple[int, ...], layout: NpyLayout) -> None:
        n = math.prod(shape)
        self.keys.append(key)
        self.shapes.append(shape)
        self.numels.append(n)
        self.offsets.append(self.total)
        self.layouts.append(layout)
        self.runs.append(n)
        self.total += n

    @property
    def itemsize(self) -> int:
        return ITEMSIZE[self.dtype]


@contextlib.contextmanager
def gc_paused() -> Iterator[None]:
    """Pause Python's cyclic garbage collector while a round is aggregated.

    Aggregating creates tens of thousands of small views; with a round of replies alive, each automatic
    collection walks hundreds of thousands of objects, which measured 2-5x the cost of the sum itself.
    Nothing cyclic is created meanwhile, and the collector is restored on exit.
    """
    enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if enabled:
            gc.enable()


def check_weights(weights: Sequence[float] | torch.Tensor, count: int) -> list[float]:
    """One finite real weight per update (any sign: DBLF fusion uses ``1 − β(|g|−1)``, which can be < 0), as a
    1-D sequence, tensor or array; a weight that is no real number (a string, a bool, a nested list) is refused
    by its index."""
    if isinstance(weights, torch.Tensor | np.ndarray):
        if weights.ndim != 1 or not _real_dtype(weights.dtype):
            raise ValueError(f"weighted sum weights must be a 1-D sequence of real numbers, got a {weights.ndim}-D "
                             f"{type(weights).__name__} of {weights.dtype}")
        values = torch.as_tensor(weights).double().tolist()
    else:
        values = []
        for k, w in enumerate(weights):
            scalar = isinstance(w, torch.Tensor | np.ndarray) and w.ndim == 0 and _real_dtype(w.dtype)
            if not scalar and (isinstance(w, bool | np.bool_) or not isinstance(w, numbers.Real)):
                raise ValueError(f"weighted sum weight {k} must be a real number, got {w!r}")
            values.append(float(w))
    if len(values) != count:
        raise ValueError(f"weighted sum got {count} updates but {len(values)} weights")
    bad = [w for w in values if not math.isfinite(w)]
    if bad:
        raise ValueError(f"weighted sum weights must be finite, got {bad[0]!r}")
    return values


def _real_dtype(dtype: torch.dtype | np.dtype) -> bool:
    if isinstance(dtype, torch.dtype):
        return dtype != torch.bool and not dtype.is_complex
    return np.issubdtype(dtype, np.integer) or np.issubdtype(dtype, np.floating)


def plan_groups(
    sources: Sequence[Source], keys: Sequence[str] | None, record_views: bool = False
) -> tuple[list[Group], torch.device]:
    """Group ``keys`` (default: update 0's) by dtype and collect every client's element buffers for them,
    checking on the way that each client has each key with update 0's dtype, shape and device. Records
    give element addresses, or byte memoryviews with ``record_views``."""
    if len(sources) == 0:
        raise ValueError("weighted sum needs at least one update, got 0")
    ref = sources[0]
    if isinstance(ref, PackedSource) and all(
        isinstance(s, PackedSource) and s.manifest.raw == ref.manifest.raw for s in sources
    ):
        return _plan_packed(sources, keys), torch.device("cpu")
    keys = list(ref.keys()) if keys is None else list(keys)
    groups: dict[torch.dtype, Group] = {}
    device = torch.device("cpu")
    for i, key in enumerate(keys):
        if not ref.has(key):
            raise InvalidUpdateError("missing", client=0, key=key)
        try:
            dtype, shape = ref.meta(key)
        except UnsupportedArrayError as err:
            raise InvalidUpdateError(str(err), client=0, key=key) from err
        if dtype not in FLOAT_DTYPES:
            raise InvalidUpdateError(f"dtype {dtype} is not a float dtype", client=0, key=key)
        if i == 0:
            device = ref.device(key)
        elif ref.device(key) != device:
            raise ValueError(f"key {key!r} is on {ref.device(key)}, the others on {device}")
        layout = ref.layout(key) if isinstance(ref, RecordSource) else NpyLayout.make(dtype, shape, 0, False, b"")
        groups.setdefault(dtype, Group(dtype)).add(key, shape, layout)
    for group in groups.values():
        metas = [(lay.dtype, lay.shape) for lay in group.layouts]
        for c, src in enumerate(sources):
            if isinstance(src, RecordSource):
                if device.type != "cpu":
                    raise InvalidUpdateError(f"is a record in host memory, the others are on {device}", client=c)
                group.elements.append(src.elements(group.keys, group.layouts, c, views=record_views))
            else:
                group.elements.append(src.elements(group.keys, metas, c, device))
    return list(groups.values()), device


def _plan_packed(sources: Sequence[Any], keys: Sequence[str] | None) -> list[Group]:
    """Groups for packed payloads with one manifest: the requested keys of each dtype cut into the runs that
    lie back to back in the packed arrays (checked once, on the shared manifest), one view per run and client."""
    manifest = sources[0].manifest
    groups: dict[torch.dtype, Group] = {}
    for key in manifest.keys if keys is None else keys:
        i = manifest.index.get(key)
        if i is None:
            raise InvalidUpdateError("missing", client=0, key=key)
        dtype, shape = manifest.dtypes[i], manifest.shapes[i]
        groups.setdefault(dtype, Group(dtype)).add(key, shape, NpyLayout.make(dtype, shape, 0, False, b""))
    for group in groups.values():
        runs = manifest.runs(group.keys)
        group.runs = [n for _, n in runs]
        group.elements = [src.run_views(group.dtype, runs) for src in sources]
    return list(groups.values())


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """Accumulate half precision in fp32, and float64 in float64."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def split_output(flat: torch.Tensor, group: Group, out_dtype: torch.dtype | None,
                 check_finite: bool = False) -> dict[str, torch.Tensor]:
    """Views of ``flat`` (cast once to ``out_dtype`` or the group's dtype) per key, in the key's shape. With
    ``check_finite``, a dtype too small for the (finite) sums raises (:func:`cast_checked`): fp32 sums of
    fp16 inputs beyond 65504, or a narrower ``out_dtype``."""
    target = out_dtype or group.dtype
    if flat.dtype != target:
        flat = cast_checked(flat, group, target) if check_finite else flat.to(target)
    return {
        key: flat[off : off + n].view(shape)
        for key, shape, n, off in zip(group.keys, group.shapes, group.numels, group.offsets)
    }


def cast_checked(flat: torch.Tensor, group: Group, target: torch.dtype) -> torch.Tensor:
    """``flat`` (finite sums in the accumulation dtype) cast to ``target``; raises
    :class:`NonFiniteUpdateError` naming the first key whose sum is too large for ``target`` (fp32 sums of
    fp16 inputs, or a narrower ``out_dtype``)."""
    out = flat.to(target)
    if out is flat or torch.finfo(target).max >= torch.finfo(flat.dtype).max or is_finite(out):
        return out
    for key, n, off in zip(group.keys, group.numels, group.offsets):
        if not bool(torch.isfinite(out[off : off + n]).all()):
            raise NonFiniteUpdateError(f"the weighted sum overflows {str(target).removeprefix('torch.')}", key=key)
    raise NonFiniteUpdateError(f"the weighted sum overflows {str(target).removeprefix('torch.')}")


def narrows(group: Group) -> bool:
    """Whether the group's sums are accumulated in a wider dtype than the group's own (fp16, bf16)."""
    return compute_dtype(group.dtype) != group.dtype


def is_finite(flat: torch.Tensor) -> bool:
    """Whether every element is finite: one sum (NaN and Inf propagate through it), and an exact elementwise
    check only when that sum is not finite."""
    if flat.numel() == 0:
        return True
    if math.isfinite(float(flat.sum())):  # an overflowing sum of finite values falls through to the exact check
        return True
    return bool(torch.isfinite(flat).all())


def raise_nonfinite(sources: Sequence[Source], group: Group, flat: torch.Tensor) -> None:
    """The sum is not finite: name the first client and key holding NaN/Inf (a rescan of the bad keys only)."""
    for key, n, off in zip(group.keys, group.numels, group.offsets):
        if bool(torch.isfinite(flat[off : off + n]).all()):
            continue
        for c, src in enumerate(sources):
            if not bool(torch.isfinite(src.tensor(key)).all()):
                raise NonFiniteUpdateError("holds NaN or Inf values", client=c, key=key)
        raise NonFiniteUpdateError("the weighted sum overflowed although every input is finite", key=key)
    raise NonFiniteUpdateError("the weighted sum is not finite")
