"""The device section of ``bench_aggregation.py``: the Triton weighted sum against the torch backend and
against the device's own copy bandwidth, and (``--sweep``) its launch parameters.

Per case (SmolLM2-135M LoRA shapes, ``clients`` clients, fp32 device tensors) and per layout, ``per_key``
(the 420 LoRA tensors of each client, each its own allocation) and ``packed`` (one flat buffer per client,
the packed wire layout):

- ``kernel_s``: the kernels alone, :meth:`PreparedWeightedSum.launch` on buffers prepared once, with the
  weights already on the device: ``BURST`` launches captured in a CUDA graph, replayed between two CUDA
  events, per launch. This is what the issue's target (≥ 0.7 of the copy bandwidth) is about.
- ``call_s``: the whole ``weighted_sum_many(..., backend="triton")`` call, host work included (per-tensor
  checks and addresses: with 420 tensors a client it is host-bound on a fast GPU), timed with a sync.
- ``torch_s``: the same call with ``backend="torch"``.
- ``dcopy_s``: a copy of a buffer as large as all clients' inputs, timed like ``kernel_s``: the faster of
  ``copy_`` (a memcpy node in the graph, which the driver may hand to the copy engines) and an elementwise
  kernel on the SMs (``torch.mul(src, 1, out=dst)``); ``dcopy_method`` says which.
- ``checked_call_s``: ``call_s`` with the NaN/Inf check (per-client flags and one host sync).

Where a case's buffers are small against the GPU's L2 cache, each timed burst cycles through
``rotations`` copies of them (enough that one pass reads at least 4 × L2), for the kernel and the copy
alike: no launch reads what the previous one left in L2.

``bandwidth_fraction = dcopy_s / kernel_s`` (per_key), ``packed_bandwidth_fraction`` the same for the packed
layout, ``call_bandwidth_fraction`` and ``packed_call_bandwidth_fraction`` with ``call_s``: input bytes per
second over copied bytes per second, each input byte counted once (the issue's definition). The copy also
writes each byte and a weighted sum only 1/N of them, so a kernel as fast as the memory scores up to
2N/(N+1), about 2. ``traffic_fraction`` (and ``packed_``) counts memory traffic instead, reads and writes:
``(1 + 1/N) · nbytes / kernel_s`` over ``2 · nbytes / dcopy_s``; 1 is the copy's own rate.
``triton_vs_torch = torch_s / call_s``.

Under ``TRITON_INTERPRET=1`` with ``--device cpu`` the same code runs through Triton's interpreter (the
timings then mean nothing; the tests use it to check the code path).
"""

from __future__ import annotations

import itertools
import math
import statistics
import time
from collections.abc import Callable

import torch

BURST = 12  # back-to-back launches per timed sample on a GPU (divisible by 1, 2, 3, 4 and 6 buffer sets)
WARMUP = 3  # untimed replays before the timed ones (clocks up, caches and TLBs warm)
SWEEP = {"block": (1024, 2048, 4096, 8192), "num_warps": (4, 8), "unroll": (1, 2, 4)}
LAYOUTS = ("per_key", "packed")


def _timer(device: torch.device, repeats: int) -> Callable[[Callable[[], object]], float]:
    """Median seconds per call of ``fn``: on a GPU, ``BURST`` calls captured in one CUDA graph and replayed
    between two CUDA events (no host launch cost between them; plain bursts if capture fails, logged);
    wall time elsewhere."""

    def events(run: Callable[[], object], per: int) -> float:
        samples = []
        for _ in range(repeats):
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            torch.cuda.synchronize(device)
            start.record()
            run()
            end.record()
            end.synchronize()
            samples.append(start.elapsed_time(end) / 1e3 / per)
        return statistics.median(samples)

    def burst(fn: Callable[[], object]) -> None:
        for _ in range(BURST):
            fn()

    def cuda(fn: Callable[[], object]) -> float:
        fn()  # warm up (compile)
        torch.cuda.synchronize(device)
        try:
            graph = torch.cuda.CUDAGraph()
            side = torch.cuda.Stream(device)
            side.wait_stream(torch.cuda.current_stream(device))
            with torch.cuda.stream(side):
                fn()  # a warm-up on a side stream, as torch.cuda.graph wants
            torch.cuda.current_stream(device).wait_stream(side)
            with torch.cuda.graph(graph):
                burst(fn)
        except Exception as err:  # noqa: BLE001 - any capture failure falls back to timing plain bursts
            print(f"# CUDA graph capture failed ({type(err).__name__}: {err}); timing plain bursts", flush=True)
            torch.cuda.synchronize(device)
            for _ in range(WARMUP):
                burst(fn)
            return events(lambda: burst(fn), BURST)
        for _ in range(WARMUP):
            graph.replay()
        return events(graph.replay, BURST)

    def wall(fn: Callable[[], object]) -> float:
        fn()
        samples = []
        for _ in range(repeats):
            t = time.perf_counter()
            fn()
            samples.append(time.perf_counter() - t)
        return statistics.median(samples)

    return cuda if device.type == "cuda" else wall


def rotations(working_set_bytes: int, device: torch.device) -> int:
    """How many copies of a case's buffers a burst cycles through: one pass over them reads at least
    4 × the GPU's L2 cache (1 off a GPU, where the timings are not measurements). A divisor of ``BURST``,
    so that each replay of a captured burst goes on with the set after the one the last replay ended with."""
    if device.type != "cuda":
        return 1
    l2 = getattr(torch.cuda.get_device_properties(device), "L2_cache_size", 0) or 64 * 2**20
    needed = max(1, math.ceil(4 * l2 / max(1, working_set_bytes)))
    return min(d for d in range(needed, BURST + 1) if BURST % d == 0) if needed <= BURST else needed


def cycling(fns: list[Callable[[], object]]) -> Callable[[], object]:
    """One callable that calls ``fns`` in turn, one per call (a CUDA graph captures the sequence)."""
    turn = itertools.cycle(fns)
    return lambda: next(turn)()


def device_copy(inputs: list[dict[str, list[dict[str, torch.Tensor]]]],
                timer: Callable[[Callable[[], object]], float]) -> tuple[float, str]:
    """Seconds per copy of all clients' bytes, and which copy it was: the faster of ``copy_`` and an
    elementwise kernel (see the module docstring), over the rotated buffer sets."""
    pairs = []
    for case in inputs:
        src = torch.cat([x["payload"] for x in case["packed"]])
        pairs.append((src, torch.empty_like(src)))
    candidates = {"copy_": [lambda s=s, d=d: d.copy_(s) for s, d in pairs],
                  "sm_kernel": [lambda s=s, d=d: torch.mul(s, 1, out=d) for s, d in pairs]}
    timed = {name: timer(cycling(fns)) for name, fns in candidates.items()}
    best = min(timed, key=timed.get)
    return timed[best], best


def _device_weights(weights: list[float], device: torch.device) -> torch.Tensor | list[float]:
    """The weights as a float32 device tensor on a GPU (the inputs' accumulation dtype: a launch then copies
    and converts nothing), as they are elsewhere."""
    return torch.tensor(weights, dtype=torch.float32, device=device) if device.type == "cuda" else weights


def traffic_fraction(dcopy_s: float, kernel_s: float, clients: int) -> float:
    """Memory traffic per second of a weighted sum (reads all N inputs, writes one output) over a copy's
    (reads and writes every byte): ``(1 + 1/N) · dcopy_s / (2 · kernel_s)``."""
    return (1.0 + 1.0 / clients) * dcopy_s / (2.0 * kernel_s)


def _synced(fn: Callable[[], object], device: torch.device) -> Callable[[], object]:
    """``fn`` followed by a device sync: a whole call, host work and GPU work, as a caller waits for it."""
    if device.type != "cuda":
        return fn
    return lambda: (fn(), torch.cuda.synchronize(device))


def make_inputs(shapes: dict[str, tuple[int, ...]], clients: int, device: torch.device,
                seed: int = 0) -> dict[str, list[dict[str, torch.Tensor]]]:
    """Both layouts of the same fp32 values: ``per_key`` (a tensor per key) and ``packed`` (one flat buffer)."""
    g = torch.Generator(device=device).manual_seed(seed)
    per_key = [{k: 0.02 * torch.randn(s, generator=g, device=device) for k, s in shapes.items()}
               for _ in range(clients)]
    packed = [{"payload": torch.cat([t.reshape(-1) for t in u.values()])} for u in per_key]
    return {"per_key": per_key, "packed": packed}


def device_case(shapes: dict[str, tuple[int, ...]], clients: int, rank: int, repeats: int,
                device: torch.device) -> dict[str, float]:
    """One case: see the module docstring for the fields."""
    from devft.aggregation import weighted_sum_many
    from devft.aggregation.kernels.triton_wsum import prepare_weighted_sum_triton

    inputs = make_inputs(shapes, clients, device)
    weights = [1.0 / clients] * clients
    wdev = _device_weights(weights, device)
    nbytes = sum(x["payload"].numel() * 4 for x in inputs["packed"])
    sets = [inputs] + [make_inputs(shapes, clients, device, seed=i) for i in range(1, rotations(nbytes, device))]
    per_call = _timer(device, repeats)  # events around bursts on a GPU
    whole_call = _timer(torch.device("cpu"), repeats)  # wall time of synced calls
    row: dict[str, float] = {"clients": clients, "rank": rank, "total_gb": nbytes / 1e9, "rotations": len(sets)}
    row["dcopy_s"], row["dcopy_method"] = device_copy(sets, per_call)
    for layout in LAYOUTS:
        updates = inputs[layout]
        prepared = [prepare_weighted_sum_triton(case[layout], check_finite=False) for case in sets]
        tag = "" if layout == "per_key" else "packed_"
        row[f"{tag}kernel_s"] = per_call(cycling([lambda p=p: p.launch(wdev) for p in prepared]))
        row[f"{tag}call_s"] = whole_call(_synced(
            lambda u=updates: weighted_sum_many(u, weights, backend="triton", check_finite=False), device))
        row[f"{tag}torch_s"] = whole_call(_synced(
            lambda u=updates: weighted_sum_many(u, weights, backend="torch", check_finite=False), device))
        row[f"{tag}bandwidth_fraction"] = row["dcopy_s"] / row[f"{tag}kernel_s"]
        row[f"{tag}traffic_fraction"] = traffic_fraction(row["dcopy_s"], row[f"{tag}kernel_s"], clients)
        row[f"{tag}call_bandwidth_fraction"] = row["dcopy_s"] / row[f"{tag}call_s"]
        row[f"{tag}triton_vs_torch"] = row[f"{tag}torch_s"] / row[f"{tag}call_s"]
    row["checked_call_s"] = whole_call(_synced(
        lambda: weighted_sum_many(inputs["per_key"], weights, backend="triton"), device))
    row["kernel_gbps"] = nbytes / row["kernel_s"] / 1e9  # input bytes a second
    row["dcopy_gbps"] = nbytes / row["dcopy_s"] / 1e9  # copied bytes a second (its traffic is twice that)
    row["kernel_traffic_gbps"] = nbytes * (1 + 1 / clients) / row["kernel_s"] / 1e9
    row["dcopy_traffic_gbps"] = 2 * nbytes / row["dcopy_s"] / 1e9
    row["max_abs_diff_vs_reference"] = _max_diff(inputs, weights)
    return row


def _max_diff(inputs: dict[str, list], weights: list[float]) -> float:
    """Largest difference of the Triton sums (both layouts) from the reference backend's."""
    from devft.aggregation import weighted_sum_many

    ref = weighted_sum_many(inputs["per_key"], weights, backend="reference")
    got = weighted_sum_many(inputs["per_key"], weights, backend="triton")
    packed = weighted_sum_many(inputs["packed"], weights, backend="triton")["payload"]
    worst = max(float((ref[k] - got[k]).abs().max()) for k in ref)
    return max(worst, float((torch.cat([ref[k].reshape(-1) for k in ref]) - packed).abs().max()))


def host_case(shapes: dict[str, tuple[int, ...]], clients: int, rank: int, repeats: int,
              device: torch.device) -> dict[str, float]:
    """The host work a Triton call does before its first kernel (checks, dtype groups, runs, addresses,
    outputs: :class:`PreparedWeightedSum`), per layout, in wall seconds. No kernel runs, so on a machine
    without a GPU this measures, under ``TRITON_INTERPRET=1``, what a GPU call would spend on the host."""
    from devft.aggregation.kernels.triton_wsum import prepare_weighted_sum_triton

    inputs = make_inputs(shapes, clients, device)
    wall = _timer(torch.device("cpu"), repeats)
    row: dict[str, float] = {"clients": clients, "rank": rank, "tensors_per_client": len(shapes)}
    for layout in LAYOUTS:
        row[f"{layout}_prepare_s"] = wall(lambda u=inputs[layout]: prepare_weighted_sum_triton(u, check_finite=False))
    return row


def sweep_case(shapes: dict[str, tuple[int, ...]], clients: int, rank: int, repeats: int,
               device: torch.device, grid: dict[str, tuple[int, ...]] | None = None) -> list[dict[str, float]]:
    """``kernel_s``, ``bandwidth_fraction`` and ``traffic_fraction`` of every launch configuration in
    ``grid`` (default ``SWEEP``), per layout, with the copy timed once for the case. A configuration that
    fails gets a row with its ``error`` instead, and the sweep goes on."""
    from devft.aggregation.kernels.triton_wsum import KernelConfig, prepare_weighted_sum_triton

    inputs = make_inputs(shapes, clients, device)
    wdev = _device_weights([1.0 / clients] * clients, device)
    nbytes = sum(x["payload"].numel() * 4 for x in inputs["packed"])
    sets = [inputs] + [make_inputs(shapes, clients, device, seed=i) for i in range(1, rotations(nbytes, device))]
    timer = _timer(device, repeats)
    dcopy, method = device_copy(sets, timer)
    grid = grid or SWEEP
    rows = []
    for block, num_warps, unroll in itertools.product(grid["block"], grid["num_warps"], grid["unroll"]):
        for layout in LAYOUTS:
            row = {"clients": clients, "rank": rank, "layout": layout, "block": block, "num_warps": num_warps,
                   "unroll": unroll}
            try:
                config = KernelConfig(block=block, num_warps=num_warps, unroll=unroll)
                prepared = [prepare_weighted_sum_triton(case[layout], check_finite=False, config=config)
                            for case in sets]
                kernel = timer(cycling([lambda p=p: p.launch(wdev) for p in prepared]))
            except Exception as err:  # noqa: BLE001 - one configuration failing must not lose the others
                print(f"# sweep {row}: {type(err).__name__}: {err}", flush=True)
                rows.append({**row, "error": f"{type(err).__name__}: {err}"[:500]})
                continue
            rows.append({**row, "kernel_s": kernel, "dcopy_s": dcopy, "dcopy_method": method, "rotations": len(sets),
                         "bandwidth_fraction": dcopy / kernel,
                         "traffic_fraction": traffic_fraction(dcopy, kernel, clients)})
    return rows
