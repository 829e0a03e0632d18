"""Benchmark of the server's side of each LoRA aggregation rule as the number of clients grows.

Launch (what docs/benchmarks.md reports):

    python simulations/bench/bench_rules.py --threads 1

The quickstart runs 2 clients a round, where every rule's server work is milliseconds to ~150 ms. This
asks what it becomes with more clients. Per rule (``fedit``, ``ffa``, ``fedsa``, ``flora``, ``fedex``,
``svd``) and client count (default 2, 8, 32), on the LoRA shapes of SmolLM2-135M (all seven projections of
its 30 layers, rank ``--rank``), it runs ``--rounds`` rounds the way the Flower strategy does:

- every client replies with its own random update of the tensors the rule uploads, packed as devft's
  clients send it (one array per dtype + manifest; built outside the timing);
- ``aggregate_s``: ``rule.aggregate(state, replies, num_examples)``, what the server's rows record as
  ``aggregate_s`` (validation of the replies against the state, the rule, and the finiteness check of the
  new state);
- ``downlink_s``: building the next train message's record from the new state, as the strategy sends it by
  default to clients that keep nothing between rounds (``rule.downlink(full=True)``; for FFA-LoRA B alone,
  since its clients rebuild the shared A: ``federation.rebuild_frozen``), then packing, once a round;
  ``down_mib``: its size, per client message.

FLoRA and FedEx-LoRA fold each round into a base delta that grows until it is dense, so their cost rises
over the first rounds; the line per (rule, clients) prints round 1 and the median of the rounds after it.
One line per case ends ``aggregate_s=<median of rounds 2..> down_mib=<last round>``.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_aggregation import static_smollm2_lora_shapes  # noqa: E402

from devft.aggregation import RULES, get_rule  # noqa: E402
from devft.aggregation.packed import pack_arrayrecord  # noqa: E402
from devft.aggregation.product_svd import SOLVERS  # noqa: E402


def initial_lora(shapes: dict[str, tuple[int, ...]], generator: torch.Generator) -> dict[str, torch.Tensor]:
    """peft's initial LoRA: A uniform in ±1/√d_in, B zero."""
    out = {}
    for key, shape in shapes.items():
        if ".lora_A." in key:
            bound = shape[1] ** -0.5
            out[key] = torch.empty(shape).uniform_(-bound, bound, generator=generator)
        else:
            out[key] = torch.zeros(shape)
    return out


def client_replies(rule, state, clients: int, generator: torch.Generator, step: float = 1e-3) -> list:
    """Each client's packed reply: the uploaded tensors it received (zeros where it received none, as after
    FLoRA's fresh B) moved by its own random step of standard deviation ``step``, or fresh random A for
    rules that restart LoRA."""
    expected = rule.expected_upload(state)
    replies = []
    for _ in range(clients):
        reply = {}
        for key, shape in expected.items():
            start = state.lora[key]
            if rule.fresh_lora_each_round and ".lora_A." in key:
                start = torch.empty(shape).uniform_(-shape[1] ** -0.5, shape[1] ** -0.5, generator=generator)
            reply[key] = start + step * torch.randn(shape, generator=generator)
        replies.append(pack_arrayrecord(reply))
    return replies


def bench_rule(name: str, clients: int, rank: int, rounds: int, layers: int | None, solver: str | None = None,
               step: float = 1e-3) -> dict:
    generator = torch.Generator().manual_seed(0)
    shapes = static_smollm2_lora_shapes(rank, layers)
    rule = get_rule(name, alpha=2.0 * rank, **({} if solver is None else {"solver": solver}))
    state = rule.init_state(initial_lora(shapes, generator))
    aggregate_s, downlink_s, down_bytes = [], [], 0
    for _ in range(rounds):
        replies = client_replies(rule, state, clients, generator, step)
        weights = [100 + 10 * k for k in range(clients)]
        start = time.perf_counter()
        state = rule.aggregate(state, replies, weights)
        aggregate_s.append(time.perf_counter() - start)
        start = time.perf_counter()
        record = pack_arrayrecord(rule.downlink(state, full=not rule.frozen))  # all but what clients rebuild
        downlink_s.append(time.perf_counter() - start)
        down_bytes = sum(len(array.data) for array in record.values())
        del replies, record
    later = aggregate_s[1:] or aggregate_s
    return {"rule": name, "solver": solver, "step": step, "clients": clients, "rank": rank, "rounds": rounds, "round1_aggregate_s": aggregate_s[0],
            "aggregate_s": statistics.median(later), "downlink_s": statistics.median(downlink_s[1:] or downlink_s),
            "down_mib": down_bytes / 2**20, "aggregate_s_by_round": aggregate_s}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--clients", type=int, nargs="+", default=[2, 8, 32])
    parser.add_argument("--rules", nargs="+", default=sorted(RULES), choices=sorted(RULES))
    parser.add_argument("--rank", type=int, default=8)
    parser.add_argument("--rounds", type=int, default=4, help="aggregations per case (state carried over)")
    parser.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default: torch's)")
    parser.add_argument("--layers", type=int, default=None, help="keep only the first N layers (smoke runs)")
    parser.add_argument("--svd-solvers", nargs="+", default=["auto"], choices=SOLVERS,
                        help="svd's solvers, one case each (auto: exact below 12 clients, iterative from there)")
    parser.add_argument("--step", type=float, default=1e-3,
                        help="std of each client's random step from the global adapters: 1e-3 keeps the clients "
                             "near them (svd: a gap after the top r), 0.1 makes them nearly independent (no gap, "
                             "the iterative solver's worst case)")
    parser.add_argument("--json", default=None, help="also write all rows to this JSON file")
    args = parser.parse_args(argv)
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    print(f"# python {platform.python_version()} torch {torch.__version__} threads={torch.get_num_threads()} "
          f"cpu={platform.processor() or platform.machine()}")
    rows = []
    for clients in args.clients:
        for name, solver in [(n, s) for n in args.rules for s in (args.svd_solvers if n == "svd" else [None])]:
            row = bench_rule(name, clients, args.rank, args.rounds, args.layers, solver, args.step)
            rows.append(row)
            print(f"rule={name}{'' if solver is None else f' solver={solver}'} clients={clients} rank={args.rank} step={args.step:g} round1_aggregate_s={row['round1_aggregate_s']:.4g} "
                  f"downlink_s={row['downlink_s']:.4g} aggregate_s={row['aggregate_s']:.4g} "
                  f"down_mib={row['down_mib']:.4g}", flush=True)
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
