"""Triton kernels of the weighted sum over clients: one launch for every tensor of every client.

Imported only when the Triton backend is asked for (``import devft`` never imports Triton). The kernel
reads each client's tensors where they already are, through a pointer table ``ptrs[client, run]``
(int64 addresses, the grouped-GEMM pattern of Triton's tutorials): no staging copy, no stacking. A *run*
is a stretch of the output that lies back to back in every client's memory: one tensor of a state dict,
or a client's whole packed payload (:mod:`devft.aggregation.packed`). Program ``p`` handles ``BLOCK``
elements of one run for all clients, accumulating ``w_k · x_k`` in fp32 (fp64 for fp64 inputs) and writing
the block once, so every input byte is read once and every output byte written once.

Memory-bandwidth details (checked on the compiled sm_90 code by ``tests/devft/aggregation/test_triton_codegen.py``):

- **128-bit loads and stores.** Addresses read from a table carry no alignment Triton can see, so it
  would emit one 32-bit load per element. When every client address is 16-byte aligned and every run
  length a multiple of ``16 / itemsize`` (true of LoRA tensors and packed payloads; checked on the host
  each call), the kernel is told so (``VEC``) and loads/stores 16 bytes per instruction.
- **Clients unrolled** (``unroll``): the loads of ``unroll`` clients are issued before their products are
  added, for more bytes in flight per thread; the sum still runs over clients in order.
- **Little host work.** The block tables depend only on the run lengths and are cached on the device; the
  client addresses travel in one host→device copy per call, the weights in another that does not block
  the host. :func:`prepare_weighted_sum_triton` does the host work once and returns a launcher, for
  repeated sums over the same buffers (and for timing the kernel alone).

Fused extras:

- ``CHECK_FINITE``: per-client flags raised in the same pass when a loaded element is NaN/Inf (an
  ``atomic_max`` masked to the offending lanes, so it costs nothing when every value is finite).
- clipping: per-client norms need a pass of their own first (torch's fused multi-tensor norm on the
  device); the clip factors ``min(1, C / ‖x_k‖)`` are folded into the weights on the device, no host sync.

On CUDA tensors the kernel is compiled. On CPU tensors it runs under Triton's interpreter when
``TRITON_INTERPRET=1`` is in the environment (read at call time; the kernel uses only Triton builtins, so
this works even when Triton was imported before the variable was set), which is how the tests check it
without a GPU.
"""

from __future__ import annotations

import contextlib
import logging
import math
import os
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import triton
import triton.language as tl

from devft.aggregation._plan import (
    Group,
    check_weights,
    compute_dtype,
    gc_paused,
    plan_groups,
    raise_nonfinite,
    split_output,
)
from devft.aggregation.errors import NonFiniteUpdateError
from devft.aggregation.sources import TensorSource, as_sources

log = logging.getLogger(__name__)

DEFAULT_BLOCK = 2048
DEFAULT_NUM_WARPS = 4
DEFAULT_UNROLL = 1
VECTOR_BYTES = 16  # one 128-bit load or store
_TABLE_CACHE_SIZE = 16


def _weighted_sum_kernel(
    ptrs,  # int64 [clients, runs]: address of each client's run
    weights,  # [clients] in the accumulation dtype
    out,  # [total] flat output, runs back to back
    block_run,  # int64 [programs]: which run program p works on
    block_start,  # int64 [programs]: first element of that run for program p
    sizes,  # int64 [runs]
    out_offsets,  # int64 [runs]
    flags,  # int32 [clients]: set to 1 when a client holds NaN/Inf
    proto,  # any input tensor: its pointer type gives the input dtype (no dtype constexprs needed)
    n_clients,
    n_runs,
    BLOCK: tl.constexpr,
    CHECK_FINITE: tl.constexpr,
    VEC: tl.constexpr,  # elements per 16 bytes when every address and run length allows it, else 1
    UNROLL: tl.constexpr,  # clients per loop step: their loads are issued before their sums
):
    pid = tl.program_id(0)
    r = tl.load(block_run + pid)
    start = tl.multiple_of(tl.load(block_start + pid), BLOCK)
    size = tl.multiple_of(tl.load(sizes + r), VEC)
    base = tl.multiple_of(tl.load(out_offsets + r), VEC)
    offs = start + tl.arange(0, BLOCK)
    mask = offs < size
    acc = tl.full([BLOCK], 0, dtype=weights.dtype.element_ty)  # fp32 (fp64 for fp64 inputs)
    for k0 in range(0, n_clients, UNROLL):
        for u in tl.static_range(UNROLL):  # clients in order: the sum rounds the same for every UNROLL
            k = pid * 0 + k0 + u  # a tensor also under the interpreter, where the loop counter is an int
            live = k < n_clients
            src = tl.load(ptrs + k * n_runs + r, mask=live, other=0).to(proto.dtype)  # address → typed pointer
            if VEC > 1:
                src = tl.multiple_of(src, 16)  # bytes: checked on the host before VEC > 1 is chosen
            w = tl.load(weights + k, mask=live, other=0.0)
            lanes = offs < tl.where(live, size, 0)  # no lanes past the last client
            x = tl.load(src + offs, mask=lanes, other=0.0).to(weights.dtype.element_ty)
            acc += w * x
            if CHECK_FINITE:
                bad = (x != x) | (tl.abs(x) == float("inf"))
                tl.atomic_max(flags + k + offs * 0, bad.to(tl.int32), mask=lanes & bad)
    tl.store(out + base + offs, acc.to(out.dtype.element_ty), mask=mask)


_KERNELS: dict[bool, Any] = {}


def _kernel(interpret: bool) -> Any:
    """The weighted-sum kernel, compiled (CUDA) or interpreted (CPU), built once each."""
    if interpret not in _KERNELS:
        if interpret:
            from triton.runtime.interpreter import InterpretedFunction

            _KERNELS[interpret] = InterpretedFunction(_weighted_sum_kernel)
        else:
            from triton.runtime.jit import JITFunction

            _KERNELS[interpret] = JITFunction(_weighted_sum_kernel)
    return _KERNELS[interpret]


def interpreting() -> bool:
    """Whether CPU tensors may run through Triton's interpreter (``TRITON_INTERPRET=1``, read now)."""
    knobs = getattr(triton, "knobs", None)  # Triton >= 3.4; older ones read only the environment
    return os.environ.get("TRITON_INTERPRET", "0").lower() in ("1", "true", "yes", "on") or bool(
        knobs is not None and knobs.runtime.interpret)


_TABLES: OrderedDict[tuple, tuple[torch.Tensor, ...]] = OrderedDict()


def block_tables(runs: Sequence[int], block: int, device: torch.device) -> tuple[torch.Tensor, ...]:
    """``(block_run, block_start, sizes, out_offsets)`` for runs of these lengths (zero-length runs already
    dropped), as views of one int64 device buffer. They depend only on the lengths, so they are cached."""
    key = (str(device), block, tuple(runs))
    hit = _TABLES.get(key)
    if hit is not None:
        _TABLES.move_to_end(key)
        return hit
    sizes = np.asarray(runs, dtype=np.int64)
    offsets = np.cumsum(sizes) - sizes
    nblocks = (sizes + block - 1) // block
    block_run = np.repeat(np.arange(len(sizes), dtype=np.int64), nblocks)
    first = np.repeat(np.cumsum(nblocks) - nblocks, nblocks)
    block_start = (np.arange(int(nblocks.sum()), dtype=np.int64) - first) * block
    buf = torch.from_numpy(np.concatenate([block_run, block_start, sizes, offsets])).to(device)
    cuts = np.cumsum([0, len(block_run), len(block_start), len(sizes), len(offsets)])
    tables = tuple(buf[a:b] for a, b in zip(cuts[:-1], cuts[1:]))
    _TABLES[key] = tables
    if len(_TABLES) > _TABLE_CACHE_SIZE:
        _TABLES.popitem(last=False)
    return tables


def _raise_for_client(source: Any, client: int, keys: list[str]) -> None:
    for key in keys:
        if not bool(torch.isfinite(source.tensor(key)).all()):
            raise NonFiniteUpdateError("holds NaN or Inf values", client=client, key=key)
    raise NonFiniteUpdateError("holds NaN or Inf values", client=client)


def _check_device(device: torch.device) -> None:
    if device.type == "cuda":
        return
    if device.type == "cpu" and interpreting():
        return
    raise ValueError(
        f"the triton backend runs on CUDA tensors (got tensors on {device}); on a CPU it runs only under "
        "Triton's interpreter (set TRITON_INTERPRET=1). Use backend='torch' here."
    )


@dataclass(frozen=True)
class KernelConfig:
    """Launch parameters: ``block`` elements per program (a power of two), ``num_warps`` per program, and
    ``unroll`` clients per loop step. Tuned per GPU with ``simulations/bench/bench_aggregation.py --sweep``."""

    block: int = DEFAULT_BLOCK
    num_warps: int = DEFAULT_NUM_WARPS
    unroll: int = DEFAULT_UNROLL

    def __post_init__(self) -> None:
        if self.block <= 0 or self.block & (self.block - 1):
            raise ValueError(f"block must be a power of two, got block={self.block}")
        if self.num_warps not in (1, 2, 4, 8, 16, 32):
            raise ValueError(f"num_warps must be a power of two from 1 to 32, got num_warps={self.num_warps}")
        if not 1 <= self.unroll <= 8:
            raise ValueError(f"unroll must be 1..8, got unroll={self.unroll}")


@dataclass
class _Launch:
    """One dtype group's kernel launch: its non-empty runs, each client's buffer of each, their addresses
    on the device, the block tables and the output."""

    group: Group
    flat: torch.Tensor  # output in the accumulation dtype, all of the group's keys back to back
    runs: list[int]
    elements: list[list[torch.Tensor]]  # [client][run], contiguous (kept alive: the addresses point into them)
    addresses: np.ndarray  # int64 [clients, runs]
    vec: int
    tables: tuple[torch.Tensor, ...]  # block_tables(runs): held here, so a launch never rebuilds them
    ptrs: torch.Tensor | None = None  # the addresses on the device (set once all groups are prepared)


class PreparedWeightedSum:
    """The host-side work of ``Σ_k w_k · x_k`` over fixed buffers, done once: checks, dtype groups, runs,
    client addresses (copied to the device here), block tables and outputs. :meth:`launch` then only
    launches the kernels, so it can be called again with other weights while the buffers stay alive at the
    same addresses (their values may change). Each launch writes the same output buffers."""

    def __init__(self, updates: Sequence[Any], keys: Sequence[str] | None = None, *,
                 check_finite: bool = True, config: KernelConfig | None = None) -> None:
        self.config = config or KernelConfig()
        sources = as_sources(updates)
        # Flower records (npy bytes) are converted to tensors; packed payloads and tensors are read in place
        self.sources = [TensorSource({k: s.tensor(k) for k in s.keys()}) if s.kind == "npy-bytes" else s
                        for s in sources]
        self.groups, self.device = plan_groups(self.sources, keys)
        _check_device(self.device)
        self.keys = list(keys) if keys is not None else self.sources[0].keys()
        self.check_finite = check_finite
        self.flags = torch.zeros(len(self.sources), dtype=torch.int32, device=self.device)
        self.device_weights_used: torch.Tensor | None = None  # the last launch's unchecked device weights
        self.launches = [self._prepare(group) for group in self.groups]
        table = [ln.addresses.reshape(-1) for ln in self.launches if ln.runs]
        if table:
            on_device = torch.from_numpy(np.concatenate(table)).to(self.device)  # one copy for every group
            cut = 0
            for ln in self.launches:
                if ln.runs:
                    ln.ptrs = on_device[cut : cut + ln.addresses.size]
                    cut += ln.addresses.size

    def _prepare(self, group: Group) -> _Launch:
        flat = torch.empty(group.total, dtype=compute_dtype(group.dtype), device=self.device)
        keep = [j for j, n in enumerate(group.runs) if n > 0]
        runs = [group.runs[j] for j in keep]
        elements = [[els[j].contiguous() for j in keep] for els in group.elements]
        addresses = np.asarray([[e.data_ptr() for e in els] for els in elements], dtype=np.int64)
        addresses = addresses.reshape(len(elements), len(runs))
        vec = VECTOR_BYTES // group.itemsize
        aligned = (not (addresses % VECTOR_BYTES).any() and all(n % vec == 0 for n in runs)
                   and flat.data_ptr() % VECTOR_BYTES == 0)
        tables = block_tables(runs, self.config.block, self.device) if runs else ()  # now, not in launch
        return _Launch(group, flat, runs, elements, addresses, vec if aligned else 1, tables)

    def device_weights(self, weights: Sequence[float] | torch.Tensor) -> torch.Tensor:
        """``weights`` as a float64 tensor on the device: a sequence or CPU tensor is checked (one finite
        number per client) and copied without blocking the host; a tensor already on the device is used
        as it is (made contiguous: the kernel reads weight k at ``weights + k``, so a column of a table or
        an ``expand``-ed scalar is copied first), its values unchecked here (that would wait for the device;
        :meth:`raise_if_not_finite` checks them in its one sync). A float32 device tensor is taken too when
        every input accumulates in float32: a launch then converts nothing."""
        if self.on_device(weights):
            wide = any(ln.flat.dtype == torch.float64 for ln in self.launches)
            allowed = (torch.float64,) if wide else (torch.float64, torch.float32)
            if weights.dtype not in allowed or weights.shape != (len(self.sources),):
                raise ValueError(f"device weights must be {' or '.join(map(str, allowed))} of shape "
                                 f"({len(self.sources)},), got {weights.dtype} of shape {tuple(weights.shape)}")
            return weights.contiguous()
        host = torch.tensor(check_weights(weights, len(self.sources)), dtype=torch.float64)
        if self.device.type == "cpu":
            return host
        return host.pin_memory().to(self.device, non_blocking=True)

    def on_device(self, weights: Sequence[float] | torch.Tensor) -> bool:
        """Whether ``weights`` are a tensor already on the (CUDA) device, used without a host check."""
        return isinstance(weights, torch.Tensor) and weights.device == self.device and self.device.type != "cpu"

    def launch(self, weights: Sequence[float] | torch.Tensor,
               scale: torch.Tensor | None = None) -> list[tuple[Group, torch.Tensor]]:
        """Launch the sums with ``weights`` (see :meth:`device_weights`; times ``scale``, a float64 device
        tensor, when given) and return each group's flat output (accumulation dtype) without waiting for
        the kernels."""
        wdev = self.device_weights(weights)
        # device weights were not checked on the host: with check_finite their finiteness is read in the
        # same sync as the clients' flags (raise_if_not_finite)
        self.device_weights_used = wdev if self.check_finite and self.on_device(weights) else None
        if scale is not None:
            wdev = wdev * scale
        with torch.cuda.device(self.device) if self.device.type == "cuda" else contextlib.nullcontext():
            if self.check_finite:
                self.flags.zero_()
            cast = {dtype: wdev.to(dtype) for dtype in {ln.flat.dtype for ln in self.launches if ln.runs}}  # no-op when equal
            for ln in self.launches:
                if not ln.runs:
                    continue
                block_run, block_start, sizes, offsets = ln.tables
                _kernel(self.device.type == "cpu")[(block_run.numel(),)](
                    ln.ptrs, cast[ln.flat.dtype], ln.flat, block_run, block_start, sizes, offsets, self.flags,
                    ln.elements[0][0], len(self.sources), len(ln.runs),
                    BLOCK=self.config.block, CHECK_FINITE=self.check_finite, VEC=ln.vec,
                    UNROLL=self.config.unroll, num_warps=self.config.num_warps,
                )
        return [(ln.group, ln.flat) for ln in self.launches]

    def vector_widths(self) -> dict[torch.dtype, int]:
        """Elements per load/store each dtype group runs with (``16 / itemsize`` aligned, 1 otherwise)."""
        return {ln.group.dtype: ln.vec for ln in self.launches}

    def raise_if_not_finite(self, flats: list[tuple[Group, torch.Tensor]]) -> None:
        """One host sync: the last launch's device weights (when they were not checked on the host), the
        clients' NaN/Inf flags and the outputs' finiteness; raises a ValueError naming a non-finite weight,
        or an error naming the client (and key) that holds a non-finite value, or the key whose sum
        overflowed."""
        n = len(self.sources)
        weights = self.device_weights_used
        checks = [(~torch.isfinite(weights)).to(torch.int64) if weights is not None else self.flags.new_zeros(0, dtype=torch.int64),
                  self.flags.to(torch.int64)]
        checks += [(~torch.isfinite(flat)).any().reshape(1).to(torch.int64) for _, flat in flats if flat.numel() > 0]
        status = torch.cat(checks).tolist()
        if weights is not None:
            bad = [k for k in range(n) if status[k]]
            if bad:
                raise ValueError(f"weighted sum weights must be finite, got {float(weights[bad[0]])!r} for "
                                 f"update {bad[0]} (device weights)")
            status = status[n:]
        flagged = [c for c in range(n) if status[c]]
        if flagged:
            _raise_for_client(self.sources[flagged[0]], flagged[0], [k for g in self.groups for k in g.keys])
        if any(status[n:]):
            for group, flat in flats:
                if flat.numel() and not bool(torch.isfinite(flat).all()):
                    raise_nonfinite(self.sources, group, flat)


def prepare_weighted_sum_triton(updates: Sequence[Any], keys: Sequence[str] | None = None, *,
                                check_finite: bool = True, config: KernelConfig | None = None) -> PreparedWeightedSum:
    """The host work of a weighted sum done once; see :class:`PreparedWeightedSum`."""
    with gc_paused():
        return PreparedWeightedSum(updates, keys, check_finite=check_finite, config=config)


def _clip_factors(prepared: PreparedWeightedSum, clip_norm: float) -> torch.Tensor:
    """``min(1, C / ‖x_k‖)`` per client, computed on the device (an inf or NaN norm gives a NaN factor,
    which the finiteness check reports)."""
    if not clip_norm > 0:
        raise ValueError(f"clip_norm must be > 0, got clip_norm={clip_norm!r}")
    sq = torch.zeros(len(prepared.sources), dtype=torch.float64, device=prepared.device)
    for ln in prepared.launches:
        for k, els in enumerate(ln.elements):
            if els:  # one fused launch per client and dtype, in fp64: an fp64 key's factor keeps its precision
                norms = torch._foreach_norm(els, 2, dtype=torch.float64)
                sq[k] += torch.stack(norms).double().pow(2).sum()
    factors = torch.clamp(clip_norm / sq.sqrt(), max=1.0)
    # a norm beyond float64 (finite float64 values above ~1e154) would give a factor of 0, silently dropping
    # that client: NaN instead, which the finiteness check reports as the other backends do
    return torch.where(torch.isinf(sq), torch.full_like(factors, math.nan), factors)


def weighted_sum_many_triton(
    updates: Sequence[Any],
    weights: Sequence[float] | torch.Tensor,
    *,
    keys: Sequence[str] | None = None,
    clip_norm: float | None = None,
    check_finite: bool = True,
    out_dtype: torch.dtype | None = None,
    config: KernelConfig | None = None,
) -> dict[str, torch.Tensor]:
    """``{key: Σ_k weights[k] · updates[k][key]}`` in one kernel launch per dtype.

    Same contract as :func:`devft.aggregation.reference.weighted_sum_many_reference`. ``updates`` are
    mappings of tensors on one CUDA device (CPU tensors under the interpreter); Flower records are read as
    zero-copy host views and therefore need the interpreter too (on a GPU machine use the torch backend
    for records, or move the tensors to the device first).
    """
    with gc_paused():
        prepared = PreparedWeightedSum(updates, keys, check_finite=check_finite, config=config)
        scale = _clip_factors(prepared, clip_norm) if clip_norm is not None else None
        flats = prepared.launch(weights, scale)
        if check_finite:
            prepared.raise_if_not_finite(flats)
        out: dict[str, torch.Tensor] = {}
        for group, flat in flats:
            out.update(split_output(flat, group, out_dtype, check_finite))
        return {k: out[k] for k in prepared.keys}
