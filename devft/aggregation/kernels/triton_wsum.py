"""Triton kernels of the weighted sum over clients: one launch for every tensor of every client.

Imported only when the Triton backend is asked for (``import devft`` never imports Triton). The kernel
reads each client's tensors where they already are, through a pointer table ``ptrs[client, tensor]``
(int64 addresses, the grouped-GEMM pattern of Triton's tutorials): no staging copy, no stacking. Program
``p`` handles ``BLOCK`` elements of one tensor for all clients, accumulating ``w_k · x_k`` in fp32 (fp64 for
fp64 inputs) and writing the block once, so every input byte is read once and every output byte written once.

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

import logging
import os
from collections.abc import Sequence
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



def _weighted_sum_kernel(
    ptrs,  # int64 [clients, tensors]: address of each client's tensor
    weights,  # [clients] in the accumulation dtype
    out,  # [total] flat output, tensors back to back
    block_tensor,  # int32 [programs]: which tensor program p works on
    block_start,  # int32 [programs]: first element of that tensor for program p
    sizes,  # int64 [tensors]
    out_offsets,  # int64 [tensors]
    flags,  # int32 [clients]: set to 1 when a client holds NaN/Inf
    proto,  # any input tensor: its pointer type gives the input dtype (no dtype constexprs needed)
    n_clients,
    n_tensors,
    BLOCK: tl.constexpr,
    CHECK_FINITE: tl.constexpr,
):
    pid = tl.program_id(0)
    t = tl.load(block_tensor + pid)
    start = tl.load(block_start + pid)
    size = tl.load(sizes + t)
    base = tl.load(out_offsets + t)
    offs = start + tl.arange(0, BLOCK)
    mask = offs < size
    acc = tl.full([BLOCK], 0, dtype=weights.dtype.element_ty)  # fp32 (fp64 for fp64 inputs)
    for k in range(n_clients):
        src = tl.load(ptrs + k * n_tensors + t).to(proto.dtype)  # address → typed pointer
        w = tl.load(weights + k)
        x = tl.load(src + offs, mask=mask, other=0.0).to(weights.dtype.element_ty)
        acc += w * x
        if CHECK_FINITE:
            bad = (x != x) | (tl.abs(x) == float("inf"))
            tl.atomic_max(flags + k + offs * 0, bad.to(tl.int32), mask=mask & bad)
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
    return os.environ.get("TRITON_INTERPRET", "0").lower() in ("1", "true", "yes", "on") or bool(
        triton.knobs.runtime.interpret)


def _tables(group: Group, device: torch.device, block: int) -> tuple[torch.Tensor, ...]:
    """Pointer table, block → (tensor, start) tables, sizes and output offsets for one dtype group."""
    keep = [i for i, n in enumerate(group.numels) if n > 0]
    sizes = np.asarray([group.numels[i] for i in keep], dtype=np.int64)
    offsets = np.asarray([group.offsets[i] for i in keep], dtype=np.int64)
    nblocks = (sizes + block - 1) // block
    block_tensor = np.repeat(np.arange(len(keep), dtype=np.int32), nblocks)
    first = np.repeat(np.cumsum(nblocks) - nblocks, nblocks)
    block_start = ((np.arange(int(nblocks.sum())) - first) * block).astype(np.int32)
    ptrs = np.asarray([[els[i].data_ptr() for i in keep] for els in group.elements], dtype=np.int64)
    as_t = lambda a: torch.from_numpy(np.ascontiguousarray(a)).to(device)  # noqa: E731
    return as_t(ptrs), as_t(block_tensor), as_t(block_start), as_t(sizes), as_t(offsets)


def _raise_for_client(source: TensorSource, client: int, keys: list[str]) -> None:
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


def weighted_sum_many_triton(
    updates: Sequence[Any],
    weights: Sequence[float] | torch.Tensor,
    *,
    keys: Sequence[str] | None = None,
    clip_norm: float | None = None,
    check_finite: bool = True,
    out_dtype: torch.dtype | None = None,
    block: int = DEFAULT_BLOCK,
    num_warps: int = DEFAULT_NUM_WARPS,
) -> dict[str, torch.Tensor]:
    """``{key: Σ_k weights[k] · updates[k][key]}`` in one kernel launch per dtype.

    Same contract as :func:`devft.aggregation.reference.weighted_sum_many_reference`. ``updates`` are
    mappings of tensors on one CUDA device (CPU tensors under the interpreter); Flower records are read as
    zero-copy host views and therefore need the interpreter too (on a GPU machine use the torch backend
    for records, or move the tensors to the device first).
    """
    if block <= 0 or block & (block - 1):
        raise ValueError(f"block must be a power of two, got block={block}")
    with gc_paused():
        sources = as_sources(updates)
        # kernels need real tensors with addresses: views of records, contiguous tensors
        sources = [TensorSource({k: s.tensor(k) for k in s.keys()}) if s.kind != "tensors" else s
                   for s in sources]
        w = check_weights(weights, len(sources))
        groups, device = plan_groups(sources, keys)
        _check_device(device)
        for group in groups:
            group.elements = [[e.contiguous() for e in els] for els in group.elements]
        wdev = torch.tensor(w, dtype=torch.float64, device=device)
        if clip_norm is not None:
            if not clip_norm > 0:
                raise ValueError(f"clip_norm must be > 0, got clip_norm={clip_norm!r}")
            sq = torch.zeros(len(sources), dtype=torch.float64, device=device)
            for group in groups:
                for k, els in enumerate(group.elements):
                    if els:
                        norms = torch._foreach_norm(els, 2, dtype=torch.float32)  # one fused launch per client
                        sq[k] += torch.stack(norms).double().pow(2).sum()
            wdev = wdev * torch.clamp(clip_norm / sq.sqrt(), max=1.0)  # inf/NaN norms give 0/NaN: caught below
        out: dict[str, torch.Tensor] = {}
        flags = torch.zeros(len(sources), dtype=torch.int32, device=device)
        flats: list[tuple[Group, torch.Tensor]] = []
        for group in groups:
            cdt = compute_dtype(group.dtype)
            flat = torch.empty(group.total, dtype=cdt, device=device)
            if group.total > 0:
                ptrs, btensor, bstart, sizes, offsets = _tables(group, device, block)
                proto = next(e for els in group.elements for e in els if e.numel() > 0)
                _kernel(device.type == "cpu")[(btensor.numel(),)](
                    ptrs, wdev.to(cdt), flat, btensor, bstart, sizes, offsets, flags, proto, len(sources),
                    ptrs.shape[1], BLOCK=block, CHECK_FINITE=check_finite, num_warps=num_warps,
                )
            flats.append((group, flat))
        if check_finite:
            checks = [flags.to(torch.int64)] + [(~torch.isfinite(flat)).any().reshape(1).to(torch.int64)
                                                 for _, flat in flats if flat.numel() > 0]
            status = torch.cat(checks).tolist()  # one host sync for the whole call
            flagged = [c for c in range(len(sources)) if status[c]]
            if flagged:
                _raise_for_client(sources[flagged[0]], flagged[0], [k for g in groups for k in g.keys])
            if any(status[len(sources):]):
                for group, flat in flats:
                    if flat.numel() and not bool(torch.isfinite(flat).all()):
                        raise_nonfinite(sources, group, flat)
        for group, flat in flats:
            out.update(split_output(flat, group, out_dtype))
        return {k: out[k] for k in (keys if keys is not None else sources[0].keys())}
