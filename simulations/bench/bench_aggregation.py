"""Benchmark of the server's aggregation: Flower's aggregate_arrayrecords vs devft's fused CPU path vs a copy.

Launch (what docs/benchmarks.md reports):

    python simulations/bench/bench_aggregation.py --threads 1

Inputs are realistic: the LoRA state of SmolLM2-135M (peft keys and shapes of the real model, all seven
projections of its 30 layers) at ranks 8 and 32, for 8, 32 and 128 clients, each client with its own bytes,
in both wire formats: Flower's usual one array per tensor (``ArrayRecord(state_dict)``, 420 arrays a client)
and devft's packed format (``devft.aggregation.packed``: one array per dtype plus a manifest; what devft's
clients send by default). In one run, per case, interleaved repeats time:

- ``flower``: ``flwr.serverapp.strategy.strategy_utils.aggregate_arrayrecords`` (replies as RecordDicts) on
  the one-array-per-tensor payload: what a Flower app does by default;
- ``flower_packed``: the same Flower function on the packed payload's data array (the manifest left out):
  what packing alone gives Flower;
- ``ours``: ``devft.aggregation.aggregate_arrayrecords`` on the packed payload (records in, record out;
  header checks, NaN/Inf check and output serialisation included): devft's server path, with the backend
  ``auto`` picks (``ours_backend``: ``native`` where a C compiler is found, else ``torch``) on the server's
  default thread count (one per CPU, at most four; ``--agg-threads N`` sets it, ``agg_threads`` says it);
- ``ours_torch``: the same call with the torch backend (``backend="torch"``), for the ratio
  ``native_vs_torch = ours_torch_s / ours_s`` and ``torch_bandwidth_fraction``; it runs right before or
  right after ``ours``, in turn;
- ``ours_arrays``: the same function on the one-array-per-tensor payload;
- ``copy``: a plain copy of a contiguous buffer as large as all clients' payloads (capped at 1 GiB;
  bandwidth does not depend on size past the caches), the fastest of torch's ``copy_`` (same number of
  threads), libc's ``memmove`` and numpy's ``copyto`` (``copy_method`` says which; torch's single-thread
  ``copy_`` can be well below ``memmove``, whose non-temporal stores skip reading the destination);
- ``gather``: for information, a copy of the received arrays' bytes themselves into one buffer, one
  memoryview assignment per array (the least any Python code touching every received array pays);
- ``norms``: for information, what norm bounding (``federation.max_update_norm*``) adds before the sum:
  ``devft.aggregation.norm_bound.bound_updates`` measuring every packed client's distance from the global
  LoRA (FedIT; no client clipped). ``norms_vs_ours`` = ``norms_s / ours_s``.

Each case prints one line ending ``speedup_vs_flower=<x> bandwidth_fraction=<y>``, where
``speedup_vs_flower = flower_s / ours_s`` (each side with its own default payload; ``speedup_same_payload``
= ``flower_packed_s / ours_s`` and ``arrays_speedup_vs_flower`` = ``flower_s / ours_arrays_s`` are printed
too) and ``bandwidth_fraction = (input bytes / ours_s) / (copied bytes / copy_s)``: both count each input
byte once (a copy also writes every byte, so a weighted sum, which writes 1/N of them, can exceed 1; the
issue's definition). ``traffic_fraction`` counts memory traffic, reads and writes, on both sides:
``(1 + 1/N) · input bytes / ours_s`` over ``2 · copied bytes / copy_s`` (1 = the copy's own rate).

With a CUDA GPU and Triton (or ``--device cpu`` under ``TRITON_INTERPRET=1`` to exercise the code path), it
also prints, per case, the Triton kernel against the torch backend on the same device tensors and against the
device's copy bandwidth: ``gpu … triton_vs_torch=<x> bandwidth_fraction=<y>`` (fields and timing in
``bench_aggregation_device.py``). ``--gpu-only`` skips the CPU section (no Flower needed; with
``--shapes static`` no model either); ``--sweep`` also times every launch configuration of the kernel
(block, warps, unrolled clients) and prints the best per case.

GPU check on a bare CUDA machine with torch and Triton, from the repository root:

    PYTHONPATH=. python3 simulations/bench/bench_aggregation.py --gpu-only --shapes static --sweep --json bench_gpu.json
"""

from __future__ import annotations

import argparse
import ctypes
import gc
import json
import math
import os
import platform
import statistics
import sys
import time
from collections.abc import Callable

import numpy as np
import torch


def smollm2_lora_shapes(rank: int, layers: int | None) -> dict[str, tuple[int, ...]]:
    """Key → shape of the LoRA state of the real SmolLM2-135M (all seven projections) at ``rank``."""
    from devft.models import LoraSettings, attach_lora, load_model, lora_state

    loaded = load_model("smollm2-135m")
    state = lora_state(attach_lora(loaded.model, LoraSettings(r=rank, alpha=2.0 * rank)))
    shapes = {k: tuple(v.shape) for k, v in state.items()}
    if layers is not None:
        shapes = {k: s for k, s in shapes.items() if int(k.split(".layers.")[1].split(".")[0]) < layers}
    return shapes


SMOLLM2_135M = {"layers": 30, "hidden": 576, "intermediate": 1536, "kv": 192}
"""SmolLM2-135M's decoder dimensions (its config.json); :func:`static_smollm2_lora_shapes` is tested equal
to the shapes read from the real model."""


def static_smollm2_lora_shapes(rank: int, layers: int | None) -> dict[str, tuple[int, ...]]:
    """The same key → shape map as :func:`smollm2_lora_shapes`, without loading the model (for a GPU machine
    that has torch and Triton but not the model or Flower)."""
    h, i, kv = SMOLLM2_135M["hidden"], SMOLLM2_135M["intermediate"], SMOLLM2_135M["kv"]
    modules = {"self_attn.q_proj": (h, h), "self_attn.k_proj": (h, kv), "self_attn.v_proj": (h, kv),
               "self_attn.o_proj": (h, h), "mlp.gate_proj": (h, i), "mlp.up_proj": (h, i), "mlp.down_proj": (i, h)}
    out = {}
    for layer in range(SMOLLM2_135M["layers"] if layers is None else layers):
        for module, (d_in, d_out) in modules.items():
            prefix = f"base_model.model.model.layers.{layer}.{module}"
            out[f"{prefix}.lora_A.weight"] = (rank, d_in)
            out[f"{prefix}.lora_B.weight"] = (d_out, rank)
    return out


def build_records(shapes: dict[str, tuple[int, ...]], clients: int, seed: int = 0) -> tuple[list, list]:
    """Per client (client k = base · (1 + k/1000), each with its own bytes): the one-array-per-tensor
    ArrayRecord Flower builds from a state dict, and the packed ArrayRecord of the same tensors."""
    from flwr.app import Array, ArrayRecord

    from devft.aggregation.packed import pack_arrayrecord

    g = torch.Generator().manual_seed(seed)
    base = {k: 0.02 * torch.randn(s, generator=g) for k, s in shapes.items()}
    arrays, packed = [], []
    for c in range(clients):
        factor = 1.0 + c / 1000.0
        state = {k: v * factor for k, v in base.items()}
        arrays.append(ArrayRecord({k: Array(v.numpy()) for k, v in state.items()}))
        packed.append(pack_arrayrecord(state))
    return arrays, packed


def timed(fn: Callable[[], object], sync: Callable[[], None] | None = None) -> float:
    if sync:
        sync()
    start = time.perf_counter()
    fn()
    if sync:
        sync()
    return time.perf_counter() - start


def bench_cpu_case(records: list, packed: list, rank: int, repeats: int, flower_repeats: int,
                   agg_threads: int | None = None) -> dict[str, float]:
    """One case; ``agg_threads`` as ``federation.aggregation_threads`` (None or 0: the server's default)."""
    from flwr.app import ArrayRecord, MetricRecord, RecordDict
    from flwr.serverapp.strategy.strategy_utils import aggregate_arrayrecords as flower_aggregate

    from devft.aggregation import aggregate_arrayrecords, get_rule, record_tensors, server_threads
    from devft.aggregation.kernels import resolve_backend
    from devft.aggregation.norm_bound import bound_updates
    from devft.aggregation.packed import MANIFEST_KEY

    clients = len(records)
    agg_threads = server_threads(agg_threads or 0)
    nbytes = sum(len(a.data) for a in packed[0].values()) * clients
    counts = [100 + 7 * c for c in range(clients)]
    replies = [RecordDict({"arrays": r, "metrics": MetricRecord({"num-examples": n})}) for r, n in zip(records, counts)]
    packed_replies = [
        RecordDict({"arrays": ArrayRecord({k: a for k, a in r.items() if k != MANIFEST_KEY}),
                    "metrics": MetricRecord({"num-examples": n})})
        for r, n in zip(packed, counts)
    ]
    copy_elems = min(nbytes, 1 << 30) // 4
    src = torch.rand(copy_elems)
    dst = torch.empty_like(src)
    dst.copy_(src)  # fault the pages in before timing
    src_np, dst_np = src.numpy(), dst.numpy()
    copies = {"torch_copy": lambda: dst.copy_(src),
              "memmove": lambda: ctypes.memmove(dst.data_ptr(), src.data_ptr(), copy_elems * 4),
              "numpy_copyto": lambda: np.copyto(dst_np, src_np)}
    # gather copy of the received arrays (first clients up to 1 GiB)
    arrays = [memoryview(a.data) for r in records for a in r.values()]
    gather_arrays = []
    gather_bytes = 0
    for mv in arrays:
        if gather_bytes + len(mv) > (1 << 30):
            break
        gather_arrays.append(mv)
        gather_bytes += len(mv)
    gather_dst = memoryview(bytearray(gather_bytes))

    def gather() -> None:
        offset = 0
        for mv in gather_arrays:
            gather_dst[offset : offset + len(mv)] = mv
            offset += len(mv)

    gather()
    # norm bounding (federation.max_update_norm*): each client's distance from the global LoRA it received
    rule = get_rule("fedit", alpha=16.0, threads=agg_threads)
    state = rule.init_state({k: 0.5 * v for k, v in record_tensors(records[0]).items()})

    def norms() -> object:
        return bound_updates(rule, state, packed, max_norm=1e30)

    norms()
    ours_out = record_tensors(aggregate_arrayrecords(packed, counts, threads=agg_threads))  # warm-up (and the result checked below)
    aggregate_arrayrecords(records, counts, threads=agg_threads)
    aggregate_arrayrecords(packed, counts, threads=agg_threads, backend="torch")
    times: dict[str, list[float]] = {"ours": [], "ours_arrays": [], "ours_torch": [], "flower": [], "flower_packed": [],
                                     "gather": [], "norms": [], **{name: [] for name in copies}}
    cpu: dict[str, list[float]] = {"ours": [], "flower": [], **{name: [] for name in copies}}
    flower_out = None

    def run(name: str, fn: Callable[[], object]) -> object:
        t0, c0 = time.perf_counter(), time.process_time()
        result = fn()
        times[name].append(time.perf_counter() - t0)
        if name in cpu:
            cpu[name].append(time.process_time() - c0)
        return result

    for rep in range(repeats):
        for name, copy in copies.items():
            run(name, copy)
        pair = [("ours", None), ("ours_torch", "torch")]  # the A/B of auto's backend and torch's, in turn first
        for name, backend in pair if rep % 2 == 0 else pair[::-1]:
            run(name, lambda backend=backend: aggregate_arrayrecords(packed, counts, threads=agg_threads,
                                                                     **({"backend": backend} if backend else {})))
        run("ours_arrays", lambda: aggregate_arrayrecords(records, counts, threads=agg_threads))
        run("gather", gather)
        run("norms", norms)
        if rep < flower_repeats:
            flower_out = run("flower", lambda: flower_aggregate(replies, "num-examples"))
            run("flower_packed", lambda: flower_aggregate(packed_replies, "num-examples"))
    worst, scale = 0.0, 0.0
    for key in list(flower_out)[:: max(1, len(flower_out) // 20)]:
        b = torch.from_numpy(flower_out[key].numpy())
        worst = max(worst, float((ours_out[key] - b).abs().max()))
        scale = max(scale, float(b.abs().max()))
    med = {k: statistics.median(v) for k, v in times.items()}
    med_cpu = {k: statistics.median(v) for k, v in cpu.items()}
    copy_method = min(copies, key=lambda name: med[name])  # the machine's copy bandwidth: its fastest copy
    med["copy"], med_cpu["copy"], times["copy"] = med[copy_method], med_cpu[copy_method], times[copy_method]
    copy_bps = copy_elems * 4 / med["copy"]
    ours_bps = nbytes / med["ours"]
    return {
        "clients": clients, "rank": rank, "agg_threads": agg_threads, "mb_per_client": nbytes / clients / 1e6, "total_gb": nbytes / 1e9,
        "flower_s": med["flower"], "flower_packed_s": med["flower_packed"], "ours_arrays_s": med["ours_arrays"],
        "ours_s": med["ours"], "ours_backend": resolve_backend("auto", torch.device("cpu")),
        "ours_torch_s": med["ours_torch"], "native_vs_torch": med["ours_torch"] / med["ours"],
        "torch_bandwidth_fraction": (nbytes / med["ours_torch"]) / copy_bps,
        "norms_s": med["norms"], "norms_vs_ours": med["norms"] / med["ours"],
        "copy_s_per_gb": med["copy"] / (copy_elems * 4 / 1e9), "copy_method": copy_method,
        **{f"{name}_gbps": copy_elems * 4 / med[name] / 1e9 for name in copies},
        "ours_gbps": ours_bps / 1e9, "copy_gbps": copy_bps / 1e9, "gather_gbps": gather_bytes / med["gather"] / 1e9,
        "max_rel_diff_vs_flower": worst / scale if scale else worst,
        "speedup_same_payload": med["flower_packed"] / med["ours"],
        "arrays_speedup_vs_flower": med["flower"] / med["ours_arrays"],
        "arrays_bandwidth_fraction": (nbytes / med["ours_arrays"]) / copy_bps,
        # the same ratios from process CPU time (less sensitive to other processes on a shared machine)
        "cpu_speedup": med_cpu["flower"] / med_cpu["ours"],
        "cpu_fraction": (nbytes / med_cpu["ours"]) / (copy_elems * 4 / med_cpu["copy"]),
        "traffic_fraction": (1 + 1 / clients) * ours_bps / (2 * copy_bps),
        "speedup_vs_flower": med["flower"] / med["ours"], "bandwidth_fraction": ours_bps / copy_bps,
        "ours_min_s": min(times["ours"]), "flower_min_s": min(times["flower"]), "copy_min_s": min(times["copy"]),
    }


def fmt(row: dict[str, float], keys: list[str]) -> str:
    parts = []
    for k in keys:
        v = row[k]
        parts.append(f"{k}={v}" if isinstance(v, (int, str)) else f"{k}={v:.4g}")
    return " ".join(parts)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--clients", type=int, nargs="+", default=[8, 32, 128])
    parser.add_argument("--ranks", type=int, nargs="+", default=[8, 32])
    parser.add_argument("--repeats", type=int, default=7, help="timed repeats of ours and copy (median)")
    parser.add_argument("--flower-repeats", type=int, default=3, help="timed repeats of Flower's (median)")
    parser.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default: torch's)")
    parser.add_argument("--agg-threads", type=int, default=None,
                        help="threads of devft's weighted sum (federation.aggregation_threads; default: as the server, one per CPU, at most 4)")
    parser.add_argument("--layers", type=int, default=None, help="keep only the first N layers (smoke runs)")
    parser.add_argument("--device", default=None, help="device for the Triton section (default: cuda if present)")
    parser.add_argument("--json", default=None, help="also write all rows to this JSON file")
    parser.add_argument("--shapes", choices=["model", "static"], default="model",
                        help="LoRA shapes read from the real SmolLM2 (model) or from its known dimensions (static)")
    parser.add_argument("--gpu-only", action="store_true",
                        help="only the device section (needs torch and Triton, not Flower or the model)")
    parser.add_argument("--triton-host", action="store_true",
                        help="device section: only the host work of a Triton call (no kernel runs; see host_case)")
    parser.add_argument("--sweep", action="store_true",
                        help="device section: also time every kernel launch configuration (block, warps, unroll)")
    args = parser.parse_args(argv)
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))  # the device section's module beside this one
    from bench_aggregation_device import LAYOUTS, device_case, host_case, sweep_case

    if args.threads:
        torch.set_num_threads(args.threads)
    from devft.aggregation import server_threads

    agg_threads = server_threads(args.agg_threads or 0)
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    from devft.aggregation.kernels import triton_available

    run_device = triton_available() and (device.type == "cuda" or os.environ.get("TRITON_INTERPRET") == "1")
    print(f"# machine: {platform.processor() or platform.machine()}, {os.cpu_count()} cpus, torch threads "
          f"{torch.get_num_threads()}, torch {torch.__version__}, python {sys.version.split()[0]}, "
          f"aggregation threads {agg_threads}, loadavg at start {os.getloadavg()[0]:.2f}", flush=True)
    if device.type == "cuda":
        print(f"# device: {torch.cuda.get_device_name(device)}", flush=True)
    rows: list[dict] = []

    def save(rows: list[dict]) -> None:
        if args.json:
            with open(args.json, "w") as fh:
                json.dump(rows, fh, indent=1)

    keys = ["clients", "rank", "agg_threads", "mb_per_client", "total_gb", "flower_s", "flower_packed_s", "ours_arrays_s",
            "ours_s", "ours_backend", "ours_torch_s", "native_vs_torch", "torch_bandwidth_fraction", "norms_s",
            "norms_vs_ours", "ours_gbps", "copy_gbps", "copy_method", "torch_copy_gbps",
            "memmove_gbps", "numpy_copyto_gbps", "gather_gbps", "max_rel_diff_vs_flower", "cpu_speedup",
            "cpu_fraction", "arrays_speedup_vs_flower", "arrays_bandwidth_fraction", "speedup_same_payload",
            "traffic_fraction", "speedup_vs_flower", "bandwidth_fraction"]
    gpu_keys = ["clients", "rank", "total_gb", "rotations", "dcopy_method", "dcopy_s", "kernel_s", "call_s", "checked_call_s", "torch_s",
                "packed_kernel_s", "packed_call_s", "packed_torch_s", "kernel_gbps", "dcopy_gbps",
                "kernel_traffic_gbps", "dcopy_traffic_gbps", "max_abs_diff_vs_reference", "call_bandwidth_fraction",
                "packed_call_bandwidth_fraction", "packed_triton_vs_torch", "traffic_fraction",
                "packed_traffic_fraction", "packed_bandwidth_fraction", "triton_vs_torch", "bandwidth_fraction"]
    sweep_keys = ["clients", "rank", "layout", "block", "num_warps", "unroll", "kernel_s", "traffic_fraction",
                  "bandwidth_fraction"]
    save(rows)  # an empty list at once: a run that dies early still leaves a file
    if args.gpu_only and not run_device:
        print("# --gpu-only: no CUDA device with Triton here (or TRITON_INTERPRET=1 with --device cpu)", flush=True)
        return 1
    for rank in args.ranks:
        shapes = (static_smollm2_lora_shapes if args.shapes == "static" else smollm2_lora_shapes)(rank, args.layers)
        for clients in args.clients:
            if not args.gpu_only:
                records, packed = build_records(shapes, clients)
                row = bench_cpu_case(records, packed, rank, args.repeats, min(args.flower_repeats, args.repeats),
                                     agg_threads)
                rows.append({"kind": "cpu", **row})
                print(fmt(row, keys), flush=True)
                del records, packed
            if run_device and args.triton_host:
                hrow = host_case(shapes, clients, rank, args.repeats, device)
                rows.append({"kind": "host", "device": str(device), **hrow})
                print("host " + fmt(hrow, list(hrow)), flush=True)
            elif run_device:
                try:  # a case that fails (memory, a compile error) is recorded and the run goes on
                    drow = device_case(shapes, clients, rank, args.repeats, device)
                    rows.append({"kind": "device", "device": str(device), **drow})
                    print("gpu " + fmt(drow, gpu_keys), flush=True)
                except Exception as err:  # noqa: BLE001
                    print(f"# gpu case clients={clients} rank={rank}: {type(err).__name__}: {err}", flush=True)
                    rows.append({"kind": "device", "device": str(device), "clients": clients, "rank": rank,
                                 "error": f"{type(err).__name__}: {err}"[:500]})
                save(rows)
                if args.sweep:
                    try:  # its own configurations fail one by one; this catches the set-up (memory, the copy)
                        swept = sweep_case(shapes, clients, rank, args.repeats, device)
                    except Exception as err:  # noqa: BLE001
                        print(f"# sweep clients={clients} rank={rank}: {type(err).__name__}: {err}", flush=True)
                        swept = [{"clients": clients, "rank": rank, "layout": "-",
                                  "error": f"{type(err).__name__}: {err}"[:500]}]
                    rows.extend({"kind": "sweep", "device": str(device), **r} for r in swept)
                    for layout in LAYOUTS:
                        timed_ok = [r for r in swept if r["layout"] == layout and "error" not in r]
                        if timed_ok:
                            best = max(timed_ok, key=lambda r: r["bandwidth_fraction"])
                            print("sweep-best " + fmt(best, sweep_keys), flush=True)
                if device.type == "cuda":
                    torch.cuda.empty_cache()
            gc.collect()
            save(rows)  # after every case: a run cut short keeps what it measured
    print(f"# loadavg at end {os.getloadavg()[0]:.2f}", flush=True)
    save(rows)
    failed = any("error" in r for r in rows)
    return 0 if not failed and all(math.isfinite(r.get("bandwidth_fraction", 0.0)) for r in rows) else 1


if __name__ == "__main__":
    raise SystemExit(main())
