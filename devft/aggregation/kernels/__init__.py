"""The fused weighted sum over clients (and over layers, for DBLF fusion): backends and dispatch."""

# Backends, all with the signature of :func:`devft.aggregation.reference.weighted_sum_many_reference`:
#
# - ``reference``: pure loops, one tensor at a time (:mod:`devft.aggregation.reference`).
# - ``torch``: blocks of all clients staged side by side, one gemv per block, or long runs accumulated in
#   place (:mod:`.torch_blocked`); any device.
# - ``native``: the torch backend's plan with C inner loops for fp32/fp64 CPU data, compiled on first use
#   with the machine's C compiler (:mod:`.native`); reads four client streams per pass, up to 1.7× the
#   torch backend's rate on long runs. Half precision in the same call takes the torch backend's loops.
# - ``triton``: one kernel launch over a pointer table of every client's tensors (:mod:`.triton_wsum`); CUDA
#   tensors, or CPU tensors under Triton's interpreter. Needs ``pip install devft[triton]``.
#
# ``auto`` picks ``triton`` for CUDA tensors when Triton imports and the GPU is one it compiles for (compute
# capability 7.0 or newer), else ``torch``; for CPU data ``native`` when it compiles here, else ``torch``;
# tensors that need gradients always go to ``reference`` (the only differentiable one).

from __future__ import annotations

import functools
import importlib
import importlib.util
import logging
from collections.abc import Mapping, Sequence
from typing import Any

import torch

from devft.aggregation.kernels.native import native_kernels, unavailable_reason
from devft.aggregation.kernels.torch_blocked import client_sq_norms_torch, weighted_sum_many_torch
from devft.aggregation.reference import weighted_sum_many_reference, weighted_sum_reference
from devft.aggregation.sources import as_source, as_sources

log = logging.getLogger(__name__)

BACKENDS = ("auto", "reference", "torch", "native", "triton")

__all__ = [
    "BACKENDS",
    "available_backends",
    "client_sq_norms",
    "resolve_backend",
    "triton_available",
    "weighted_sum",
    "weighted_sum_many",
]


@functools.cache
def triton_available() -> bool:
    """Whether Triton is installed and imports (a version that does not fit this torch fails here, once,
    with a warning, rather than in the middle of an aggregation)."""
    if importlib.util.find_spec("triton") is None:
        return False
    try:
        importlib.import_module("triton")
    except Exception as err:  # noqa: BLE001 - any import failure means the backend cannot run
        log.warning("Triton is installed but does not import (%s: %s); aggregating with the torch backend",
                    type(err).__name__, err)
        return False
    return True


MIN_TRITON_CAPABILITY = (7, 0)  # Volta: the oldest GPUs Triton compiles for


def _triton_runs_on(device: torch.device) -> bool:
    """Whether ``auto`` may send tensors on ``device`` to Triton: CUDA, Triton importable, a GPU it compiles for."""
    if device.type != "cuda" or not triton_available():
        return False
    index = device.index if device.index is not None else (torch.cuda.current_device() if torch.cuda.is_available() else 0)
    return _compiles_for(index)


@functools.cache
def _compiles_for(index: int) -> bool:
    """Whether Triton compiles for CUDA device ``index`` (asked, and a refusal logged, once per device)."""
    device = torch.device("cuda", index)
    capability = torch.cuda.get_device_capability(device)
    if capability < MIN_TRITON_CAPABILITY:
        log.warning("%s has compute capability %d.%d; Triton needs %d.%d: aggregating with the torch backend",
                    torch.cuda.get_device_name(device), *capability, *MIN_TRITON_CAPABILITY)
        return False
    return True


def available_backends() -> list[str]:
    """Backends usable in this environment (``native`` where it compiles, ``triton`` where it is installed)."""
    return (["reference", "torch"] + (["native"] if native_kernels() is not None else [])
            + (["triton"] if triton_available() else []))


def _triton_module() -> Any:
    try:
        return importlib.import_module("devft.aggregation.kernels.triton_wsum")
    except ImportError as err:
        raise ImportError(
            f"the triton aggregation backend needs Triton ({err}); install it with `pip install devft[triton]`"
        ) from err


def resolve_backend(backend: str, device: torch.device) -> str:
    """The concrete backend for ``backend`` (``auto`` or a name) and the device the data is on."""
    if backend not in BACKENDS:
        raise ValueError(f"unknown aggregation backend={backend!r}; choose one of {list(BACKENDS)}")
    if backend == "triton" and not triton_available():
        raise ImportError("backend='triton' needs Triton; install it with `pip install devft[triton]`")
    if backend == "native":
        if device.type != "cpu":
            raise ValueError(f"backend='native' sums CPU data; these updates are on {device}")
        if native_kernels() is None:
            raise RuntimeError(f"backend='native' is unavailable here: {unavailable_reason()}")
    if backend != "auto":
        return backend
    if device.type == "cpu":
        return "native" if native_kernels() is not None else "torch"
    return "triton" if _triton_runs_on(device) else "torch"


def _first_device(updates: Sequence[Any]) -> torch.device:
    src = as_source(updates[0])
    keys = src.keys()
    return src.device(keys[0]) if keys else torch.device("cpu")


def _needs_grad(updates: Sequence[Any]) -> bool:
    if not torch.is_grad_enabled():
        return False
    for src in as_sources(updates):
        if src.kind != "tensors":  # records are never differentiable
            continue
        if any(src.tensor(k).requires_grad for k in src.keys()):
            return True
    return False


def weighted_sum_many(
    updates: Sequence[Any],
    weights: Sequence[float] | torch.Tensor,
    *,
    keys: Sequence[str] | None = None,
    clip_norm: float | None = None,
    check_finite: bool = True,
    out_dtype: torch.dtype | None = None,
    backend: str = "auto",
    threads: int | None = None,
) -> dict[str, torch.Tensor]:
    """``{key: Σ_k weights[k] · c_k · updates[k][key]}`` for every key, in one pass over memory.

    ``updates``: one mapping ``{key: tensor}`` or Flower ``ArrayRecord`` per client (records are read in
    place, never deserialised array by array). ``weights``: one finite real number per client, used as
    given (normalise them yourself for a weighted mean). ``c_k = min(1, clip_norm / ‖x_k‖)`` with
    ``clip_norm``, else 1. Accumulates in fp32 (fp64 for fp64 inputs) and returns the input dtype unless
    ``out_dtype``. ``check_finite`` raises :class:`~devft.aggregation.errors.NonFiniteUpdateError` naming
    the client and key holding NaN/Inf. ``threads``: CPU threads of the torch and native backends (default 1, see
    :func:`~devft.aggregation.kernels.torch_blocked.default_threads`). Results may be views into one flat
    buffer.
    """
    if len(updates) == 0:
        raise ValueError("weighted sum needs at least one update, got 0")
    updates = as_sources(updates)  # a malformed record raises here, naming its client
    kwargs: dict[str, Any] = dict(keys=keys, clip_norm=clip_norm, check_finite=check_finite, out_dtype=out_dtype)
    if _needs_grad(updates):
        return weighted_sum_many_reference(updates, weights, **kwargs)
    chosen = resolve_backend(backend, _first_device(updates))
    if chosen == "reference":
        return weighted_sum_many_reference(updates, weights, **kwargs)
    if chosen == "triton":
        return _triton_module().weighted_sum_many_triton(updates, weights, **kwargs)
    native = native_kernels() if chosen == "native" else None
    return weighted_sum_many_torch(updates, weights, threads=threads, native=native, **kwargs)


def weighted_sum(
    tensors: Sequence[torch.Tensor], weights: Sequence[float] | torch.Tensor, *, backend: str = "auto"
) -> torch.Tensor:
    """Return ``Σ_k weights[k] · tensors[k]``, accumulated in fp32 (fp64 for fp64), in the dtype of ``tensors[0]``.

    The contract of :func:`devft.aggregation.reference.weighted_sum_reference` (same shapes, one weight
    per tensor, any real weights), dispatched to the fastest backend for the tensors' device. Tensors that
    need gradients, or that mix dtypes or devices, take the reference path.
    """
    if len(tensors) == 0:
        raise ValueError("weighted_sum needs at least one tensor, got 0")
    first = tensors[0]
    for k, t in enumerate(tensors):
        if t.shape != first.shape:
            raise ValueError(f"weighted_sum tensor {k} has shape {tuple(t.shape)}, expected {tuple(first.shape)}")
    mixed = any(t.dtype != first.dtype or t.device != first.device for t in tensors)
    grad = torch.is_grad_enabled() and any(t.requires_grad for t in tensors)
    if backend == "reference" or mixed or grad:
        return weighted_sum_reference(tensors, weights)
    updates = [{"x": t} for t in tensors]
    return weighted_sum_many(updates, weights, check_finite=False, backend=backend)["x"]


def client_sq_norms(updates: Sequence[Any], keys: Sequence[str] | None = None,
                    origin: Mapping[str, torch.Tensor] | None = None, backend: str = "auto",
                    threads: int | None = None) -> torch.Tensor:
    """``‖x_k‖²`` of each client over all ``keys`` (fp64, one pass; what norm clipping needs first), or
    ``‖x_k − o‖²`` with ``origin`` ``{key: o}`` (what norm bounding needs: how far each client moved).
    ``backend``: ``native`` loops for CPU data (``auto`` where they compile), the torch backend's otherwise;
    ``threads`` as for :func:`weighted_sum_many`."""
    updates = as_sources(updates)
    chosen = resolve_backend(backend, _first_device(updates)) if updates else "torch"
    native = native_kernels() if chosen == "native" else None
    return client_sq_norms_torch(updates, keys, origin=origin, native=native, threads=threads)
