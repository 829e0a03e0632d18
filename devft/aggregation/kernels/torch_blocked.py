"""The vectorised torch backend: long runs accumulated in place; many small tensors staged side by side
and reduced with one matrix-vector product per block.

**Long runs** (a packed payload, :mod:`devft.aggregation.packed`, is one run per client; large tensors such
as the layers DBLF fuses): the output is cut into cache-sized blocks and each block takes ``w_0 x_0`` and
one in-place ``add_(x_k, alpha=w_k)`` per client, read straight from the received bytes. Main memory sees
each input byte read once and each output byte written once, with no staging copy.

**Many small arrays** (Flower's usual one-array-per-tensor payload):

Per-array torch ops cost microseconds each, and one round of SmolLM2-135M LoRA from 32 clients is 13 440
arrays, so the sum never touches arrays one by one with torch. The flat space of all keys (of one dtype) is
cut into blocks of ``L`` elements; for each block every client's element ranges are copied into row ``k`` of
a small scratch matrix ``(clients, L)`` that stays in cache (``memmove`` straight out of the received
``.npy`` bytes for Flower records, one ``torch.cat`` for tensors), and ``out[block] = scratchᵀ · w`` is one
BLAS gemv in fp32 (fp64 for fp64 inputs). Main memory sees each input byte read once and each output byte
written once. With several threads, blocks are spread over them: ``memmove``, ``torch.cat`` and the gemv
all run without the GIL, so the copies of different blocks overlap; with one thread the copies are
memoryview slice assignments, which cost less per call. Arrays that lie back to back in every payload are
copied as one run.
"""

from __future__ import annotations

import ctypes
import logging
import os
import threading
from collections.abc import Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import numpy as np
import torch

from devft.aggregation._plan import (
    Group,
    cast_checked,
    check_weights,
    compute_dtype,
    gc_paused,
    is_finite,
    plan_groups,
    raise_nonfinite,
    split_output,
)
from devft.aggregation.kernels.native import NativeKernels, run_table
from devft.aggregation.sources import as_source, as_sources

log = logging.getLogger(__name__)

DEFAULT_BLOCK_BYTES = 4 << 20  # scratch (clients, L) of about 4 MiB per thread: cache-resident (measured best)
_memmove = ctypes.memmove  # a ctypes foreign function: releases the GIL while it copies

Segment = tuple[int, int, int, int]  # (run index, start element in run, end element in run, offset in block)
ACCUMULATE_MIN_RUN = 1 << 17  # mean run length (elements) from which tensors are accumulated in place (measured)
NATIVE_NORM_PART = 1 << 20  # elements per part of the native norms, whichever thread measures it


def default_threads() -> int:
    """Threads of a library call that asks for none (DBLF fusion, a rule built without ``threads``): one.

    Such calls may run in several client processes at once (a simulation's clients share the machine), so
    they take one thread each. The server's sum takes :func:`server_threads` instead.
    """
    return 1


SERVER_THREADS_CAP = 4
"""The most threads ``federation.aggregation_threads = 0`` takes. Two were measured (the 2-vCPU development
VM, docs/benchmarks.md); beyond four is unmeasured: a server with more memory channels may gain from more,
set ``federation.aggregation_threads`` there after ``bench_aggregation.py --agg-threads N``."""


def server_threads(requested: int = 0) -> int:
    """The server's weighted-sum threads: ``requested`` if >= 1, else one per CPU this process may use, at
    most :data:`SERVER_THREADS_CAP`.

    The server sums while its clients wait for the next round, so the machine's cores are free then. On the
    2-vCPU development VM two threads summed 32 clients' SmolLM2 LoRA 1.4-1.7x faster than one
    (docs/benchmarks.md, session 13). Any count gives the same bits: each output element is summed in the
    same order whichever thread sums it, and norms are summed over fixed parts.
    """
    if requested >= 1:
        return requested
    usable = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    return max(1, min(usable, SERVER_THREADS_CAP))


def _blocks(group: Group, length: int) -> list[tuple[int, int, list[Segment]]]:
    """Cut the group's flat space into ``(start, count, segments)`` blocks of at most ``length`` elements.

    Whole runs (a tensor, or tensors lying back to back in every payload) are packed into a block while
    they fit (one copy per client and run); only runs longer than a block are cut. Blocks are consecutive
    ranges of the flat output; a segment's first field indexes ``group.runs`` (and every client's elements).
    """
    blocks: list[tuple[int, int, list[Segment]]] = []
    segs: list[Segment] = []
    filled, start = 0, 0

    def close() -> None:
        nonlocal segs, filled, start
        if segs:
            blocks.append((start, filled, segs))
            start, segs, filled = start + filled, [], 0

    for index, n in enumerate(group.runs):
        if n == 0:
            continue
        if filled + n > length:
            close()
        pos = 0
        while n - pos > length - filled:  # longer than what is left of the block: cut
            take = length - filled
            segs.append((index, pos, pos + take, filled))
            filled, pos = filled + take, pos + take
            close()
        if pos < n:
            segs.append((index, pos, n, filled))
            filled += n - pos
    close()
    return blocks


def _row_length(clients: int, group: Group, block_bytes: int) -> int:
    return max(1024, min(group.total, block_bytes // max(1, clients * group.itemsize)))


class _Scratch:
    """One thread's ``(clients, length)`` staging matrix (plus its fp32 twin for half-precision inputs)."""

    def __init__(self, group: Group, length: int, device: torch.device) -> None:
        self.group = group
        self.matrix = torch.empty((len(group.elements), length), dtype=group.dtype, device=device)
        self.rows = list(self.matrix.unbind(0))
        self.row_addresses = [self.matrix.data_ptr() + c * length * group.itemsize for c in range(len(self.rows))]
        self.row_bytes = [memoryview(row.numpy()).cast("B") if els and isinstance(els[0], memoryview) else None
                          for row, els in zip(self.rows, group.elements)]
        cdt = compute_dtype(group.dtype)
        self.converted = self.matrix if cdt == group.dtype else torch.empty_like(self.matrix, dtype=cdt)

    def stage(self, count: int, segments: list[Segment]) -> torch.Tensor:
        """Fill the rows with the block's segments; return the ``(clients, count)`` block in compute dtype."""
        isz = self.group.itemsize
        byte_segs: list[tuple[int, int, int, int]] | None = None
        for els, row, row_address, row_bytes in zip(self.group.elements, self.rows, self.row_addresses,
                                                    self.row_bytes):
            if row_bytes is not None:  # byte views of the received bytes: slice assignment (holds the GIL)
                if byte_segs is None:
                    byte_segs = [(i, a * isz, d * isz, (b - a) * isz) for i, a, b, d in segments]
                for i, a, d, n in byte_segs:
                    row_bytes[d : d + n] = els[i][a : a + n]
            elif els and isinstance(els[0], int):  # addresses inside the received bytes: memmove without the GIL
                if byte_segs is None:
                    byte_segs = [(i, a * isz, d * isz, (b - a) * isz) for i, a, b, d in segments]
                for i, a, d, n in byte_segs:
                    _memmove(row_address + d, els[i] + a, n)
            elif len(segments) == 1:
                i, a, b, _ = segments[0]
                row[:count].copy_(els[i][a:b])
            else:
                torch.cat([els[i][a:b] for i, a, b, _ in segments], out=row[:count])
        block = self.matrix[:, :count]
        if self.converted is not self.matrix:
            converted = self.converted[:, :count]
            converted.copy_(block)
            return converted
        return block


def _for_each_block(group: Group, device: torch.device, block_bytes: int, threads: int, fn: Any) -> None:
    """Call ``fn(start, count, block)`` for every staged block, spread over ``threads`` threads."""
    clients = len(group.elements)
    length = _row_length(clients, group, block_bytes)
    local = threading.local()

    def work(item: tuple[int, int, list[Segment]]) -> None:
        scratch = getattr(local, "scratch", None)
        if scratch is None:
            scratch = local.scratch = _Scratch(group, length, device)
        start, count, segs = item
        fn(start, count, scratch.stage(count, segs))

    _map_blocks(_blocks(group, length), work, threads, device)


def _map_blocks(blocks: list[tuple[int, int, list[Segment]]], work: Any, threads: int, device: torch.device) -> None:
    """``work(block)`` for every block, in order on this thread or spread over ``threads`` threads."""
    if threads <= 1 or len(blocks) < 2 or device.type != "cpu":
        for item in blocks:
            work(item)
        return
    with ThreadPoolExecutor(max_workers=min(threads, len(blocks)), thread_name_prefix="devft-wsum") as pool:
        for _ in pool.map(work, blocks):
            pass


def _accumulates(group: Group) -> bool:
    """Whether ``group`` is summed by accumulating in place: its clients' elements are tensors (not record
    bytes) in runs of at least :data:`ACCUMULATE_MIN_RUN` elements on average (packed payloads, large tensors).

    Measured on SmolLM2 r=8 LoRA packed from 32 clients (docs/benchmarks.md): accumulating reads each input
    byte once straight from the payload, with no staging copy, and ran at about twice the speed of staging
    + gemv on the same bytes; with short runs the per-call cost of the small ``add_`` calls dominates.
    """
    if not group.runs or group.total < ACCUMULATE_MIN_RUN * len(group.runs):
        return False
    return all(els and isinstance(els[0], torch.Tensor) for els in group.elements)


def _accumulate(group: Group, weights: list[float], flat: torch.Tensor, block_bytes: int, threads: int) -> None:
    """``flat = Σ_k w_k · x_k`` block by block: each output block (``block_bytes``, cache-resident) takes
    ``w_0 x_0`` and then one in-place ``add_`` per client and run segment, converting half precision to the
    fp32 accumulator on the fly."""
    length = max(1024, block_bytes // flat.element_size())

    def work(item: tuple[int, int, list[Segment]]) -> None:
        start, _, segs = item
        for k, (els, wk) in enumerate(zip(group.elements, weights)):
            for i, a, b, d in segs:
                dst, src = flat[start + d : start + d + b - a], els[i][a:b]
                if k > 0:
                    dst.add_(src, alpha=wk)
                elif src.dtype == dst.dtype:
                    torch.mul(src, wk, out=dst)
                else:
                    dst.copy_(src).mul_(wk)

    _map_blocks(_blocks(group, length), work, threads, flat.device)


def client_sq_norms_torch(updates: Sequence[Any], keys: Sequence[str] | None = None,
                          block_bytes: int = DEFAULT_BLOCK_BYTES, threads: int | None = None,
                          origin: Mapping[str, torch.Tensor] | None = None,
                          native: NativeKernels | None = None) -> torch.Tensor:
    """``‖x_k‖²`` over all ``keys`` of each client, fp64, one pass over memory (clipping needs them first);
    ``‖x_k − o‖²`` with ``origin`` ``{key: o}`` (norm bounding: how far each client moved from ``o``).
    ``native``: the C loops for the fp32/fp64 groups they can read (:mod:`.native`)."""
    sources = as_sources(updates)
    threads = threads or default_threads()
    with gc_paused():
        groups, device = plan_groups(sources, keys, record_views=threads == 1 and native is None)
        centres = None if origin is None else [_flat_origin(origin, group, device) for group in groups]
        return _sq_norms(groups, len(sources), device, block_bytes, threads, centres, native)


def _flat_origin(origin: Mapping[str, torch.Tensor], group: Group, device: torch.device) -> torch.Tensor:
    """``origin``'s tensors of ``group``'s keys back to back, in the group's compute dtype."""
    parts = []
    for key, numel in zip(group.keys, group.numels):
        o = origin.get(key)
        if o is None or o.numel() != numel:
            got = "nothing" if o is None else f"{o.numel()} elements"
            raise ValueError(f"origin of key {key!r} must have {numel} elements (the update's), got {got}")
        parts.append(o.detach().reshape(-1).to(device=device, dtype=compute_dtype(group.dtype)))
    return torch.cat(parts) if parts else torch.zeros(0, dtype=compute_dtype(group.dtype), device=device)


def _sq_norms(groups: list[Group], clients: int, device: torch.device, block_bytes: int,
              threads: int, centres: list[torch.Tensor] | None = None,
              native: NativeKernels | None = None) -> torch.Tensor:
    parts: dict[tuple[int, int], torch.Tensor] = {}  # (group, first element) → that block's squares

    for g, group in enumerate(groups):
        centre = None if centres is None else centres[g]
        table = run_table(group) if native is not None and group.total > 0 else None
        if table is not None:  # parts of a fixed size: the same partial sums for any thread count
            pieces = _native_parts(group, table, NATIVE_NORM_PART)
            for start in pieces:
                parts[(g, start)] = torch.zeros(clients, dtype=torch.float64)

            def measure(start: int, g: int = g, centre: torch.Tensor | None = centre, pieces=pieces,
                        dtype: torch.dtype = group.dtype) -> None:
                native.sq_norms(parts[(g, start)], *pieces[start], dtype, centre)

            _map_blocks(list(pieces), measure, threads, device)
            continue

        def accumulate(start: int, count: int, block: torch.Tensor, g: int = g,
                       centre: torch.Tensor | None = centre) -> None:
            if centre is None:
                # squares in fp64 (of fp32/fp16 data too): an fp64 key's clip factor keeps fp64 precision
                parts[(g, start)] = torch.linalg.vector_norm(block, ord=2, dim=1, dtype=torch.float64).pow(2)
            else:  # a distance for norm bounding: fp32 norms run 3x faster, and ~1e-6 relative is plenty
                block.sub_(centre[start : start + count])  # (clients, count) − (count,), in the staging copy
                norms = torch.linalg.vector_norm(block, ord=2, dim=1)
                if not bool(torch.isfinite(norms).all()):  # > 1.8e19 (or a difference that overflowed)
                    norms = torch.linalg.vector_norm(block, ord=2, dim=1, dtype=torch.float64)
                parts[(g, start)] = norms.double().pow(2)

        if group.total > 0:
            _for_each_block(group, device, block_bytes, threads, accumulate)
    if not parts:
        return torch.zeros(clients, dtype=torch.float64, device=device)
    # summed in block order, not in the order threads finished: the same norms for any thread count
    return torch.stack([parts[k] for k in sorted(parts)]).sum(dim=0)


def weighted_sum_many_torch(
    updates: Sequence[Any],
    weights: Sequence[float] | torch.Tensor,
    *,
    keys: Sequence[str] | None = None,
    clip_norm: float | None = None,
    check_finite: bool = True,
    out_dtype: torch.dtype | None = None,
    block_bytes: int = DEFAULT_BLOCK_BYTES,
    threads: int | None = None,
    native: NativeKernels | None = None,
) -> dict[str, torch.Tensor]:
    """``{key: Σ_k weights[k] · updates[k][key]}`` for every key, in one pass over memory.

    Same contract as :func:`devft.aggregation.reference.weighted_sum_many_reference`; ``block_bytes`` is
    the size of one thread's staging matrix and ``threads`` the number of threads (default
    :func:`default_threads`). ``native``: the C loops for the fp32/fp64 groups they can read (the
    ``native`` backend, :mod:`.native`).
    """
    with gc_paused():
        flats = weighted_sum_flat_torch(updates, weights, keys=keys, clip_norm=clip_norm, check_finite=check_finite,
                                        out_dtype=out_dtype, block_bytes=block_bytes, threads=threads, native=native)
        out: dict[str, torch.Tensor] = {}
        for group, flat in flats:
            out.update(split_output(flat, group, out_dtype))  # already in the output dtype: views only
        order = list(keys) if keys is not None else as_source(updates[0]).keys()
        return {k: out[k] for k in order}


def weighted_sum_flat_torch(
    updates: Sequence[Any],
    weights: Sequence[float] | torch.Tensor,
    *,
    keys: Sequence[str] | None = None,
    clip_norm: float | None = None,
    check_finite: bool = True,
    out_dtype: torch.dtype | None = None,
    block_bytes: int = DEFAULT_BLOCK_BYTES,
    threads: int | None = None,
    native: NativeKernels | None = None,
) -> list[tuple[Group, torch.Tensor]]:
    """The sums as one flat buffer per dtype group, in ``out_dtype`` or the group's dtype (cast once from
    the accumulation dtype, checked for overflow with ``check_finite``), keys back to back in ``group.keys``
    order at ``group.offsets``: what :func:`weighted_sum_many_torch` splits into views, and what the
    Flower-record writer serialises without going through per-key tensors."""
    with gc_paused():
        sources = as_sources(updates)
        w = check_weights(weights, len(sources))
        threads = threads or default_threads()
        # one thread: memoryview slice assignment (0.5 µs a copy); several, or the C loops: addresses
        groups, device = plan_groups(sources, keys, record_views=threads == 1 and native is None)
        if clip_norm is not None:
            w = _clipped(w, _sq_norms(groups, len(sources), device, block_bytes, threads, native=native), clip_norm)
        flats: list[tuple[Group, torch.Tensor]] = []
        for group in groups:
            cdt = compute_dtype(group.dtype)
            flat = torch.empty(group.total, dtype=cdt, device=device)
            table = run_table(group) if native is not None and group.total > 0 else None
            if table is not None:  # one part a thread: each output element is summed by one, in one order
                parts = list(_native_parts(group, table, -(-group.total // threads)).values())
                _map_blocks(parts, lambda part, flat=flat: native.wsum(flat, *part, np.asarray(w)), threads, device)
            elif group.total > 0 and _accumulates(group):
                _accumulate(group, w, flat, block_bytes, threads)
            elif group.total > 0:
                wvec = torch.tensor(w, dtype=cdt, device=device)

                def reduce(start: int, count: int, block: torch.Tensor, flat: torch.Tensor = flat,
                           wvec: torch.Tensor = wvec) -> None:
                    torch.mv(block.t(), wvec, out=flat[start : start + count])  # (count, clients) · (clients,)

                _for_each_block(group, device, block_bytes, threads, reduce)
            if group.total > 0 and check_finite and not is_finite(flat):
                raise_nonfinite(sources, group, flat)
            target = out_dtype or group.dtype
            if flat.dtype != target:  # one cast; fp16 sums beyond 65504 would become Inf: checked, named
                flat = cast_checked(flat, group, target) if check_finite else flat.to(target)
            flats.append((group, flat))
        return flats


def _native_parts(group: Group, table: np.ndarray, length: int) -> dict[int, tuple[np.ndarray, ...]]:
    """The group's runs as ``{first output element: (start addresses, lengths, output offsets)}`` in
    consecutive parts of at most ``length`` elements (:func:`_blocks`; all runs in one part if they fit)."""
    if length >= group.total:
        lengths = np.asarray(group.runs, dtype=np.int64)
        return {0: (table, lengths, np.cumsum(lengths) - lengths)}
    parts = {}
    for start, _, segs in _blocks(group, length):
        seg = np.asarray(segs, dtype=np.int64)  # (run, start in run, end in run, offset in part)
        rows = table[seg[:, 0]] + (seg[:, 1] * group.itemsize)[:, None]
        parts[start] = (rows, seg[:, 2] - seg[:, 1], start + seg[:, 3])
    return parts


def _clipped(weights: list[float], sq_norms: torch.Tensor, clip_norm: float) -> list[float]:
    """``w_k · min(1, C / ‖x_k‖)``; a non-finite norm gives NaN so the finite check names that client."""
    if not clip_norm > 0:
        raise ValueError(f"clip_norm must be > 0, got clip_norm={clip_norm!r}")
    factors = []
    for n in sq_norms.sqrt().tolist():
        if n != n or n == float("inf"):
            factors.append(float("nan"))
        else:
            factors.append(min(1.0, clip_norm / n) if n > 0 else 1.0)
    log.debug("clip factors %s", factors)
    return [wk * f for wk, f in zip(weights, factors)]
