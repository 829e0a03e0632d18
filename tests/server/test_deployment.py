"""The deployment engine on 127.0.0.1: real ``flower-superlink``, ``flower-supernode`` and ``flwr run . <connection>``.

Each SuperNode starts a fresh ``flwr-clientapp`` process for every message, so a client keeps nothing in memory
between rounds: the fused submodels and FedSA-LoRA's own B live on the node's disk (``$DEVFT_CACHE``, one
directory per node here, as on real devices). The tests are slow (about 1.5, 1 and 2.5 minutes on 2 busy cores);
every process they start is stopped by PID (process group, then anything carrying the test's ``FLWR_HOME``).
"""

from __future__ import annotations

import json
import math
import os
import signal
import threading
import time
from pathlib import Path

import pytest
import torch
from deployment_helpers import (
    Processes,
    flwr_cli,
    free_port,
    listening,
    make_node_keys,
    make_tls,
    smoke_run_config,
    superlink_cmd,
    supernode_cmd,
    wait_for,
    write_connection,
)
from safetensors.torch import load_file
from simulation_helpers import pids_with_env

from server.checkpoint import load_checkpoint

# 2 SuperNodes, 2 rounds = 2 stages (4 then 8 layers). FedSA-LoRA keeps each client's own B on its disk, and its
# evaluation is personalised (each client evaluates with its own B): round 2's evaluate message is answered by a
# fresh process that must read the B the train process of that round wrote.
DEPLOY = {"data.num_clients": 2, "federation.num_rounds": 2, "federation.clients_per_round": 2,
          "federation.eval_every": 2, "federation.aggregation": "fedsa"}
FRESH_PROCESS = "Start `flwr-clientapp` process"


def distinct_ports(n: int) -> list[int]:
    ports: list[int] = []
    while len(ports) < n:
        if (port := free_port()) not in ports:
            ports.append(port)
    return ports


def rows(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def wait_for_summary(run_dir: Path, log: str) -> None:
    """The stream can end a moment before the ServerApp writes its summary."""
    wait_for(lambda: (run_dir / "summary.json").exists(), 60, f"{run_dir / 'summary.json'}\n{log[-3000:]}")


def start_link_and_nodes(procs: Processes, link: int, node_ports: list[int], caches: list[Path]) -> None:
    """A SuperLink on ``link`` and one SuperNode per cache (partition k of that many, its own disk), connected."""
    procs.start("superlink", superlink_cmd(link))
    wait_for(lambda: listening(link), 60, "the SuperLink listening", procs.logs / "superlink.log")
    for k, cache in enumerate(caches):
        procs.start(f"node{k}", supernode_cmd(link, node_ports[k], k, len(caches)), DEVFT_CACHE=str(cache))
    for k in range(len(caches)):
        wait_for(lambda k=k: "SuperNode ID" in procs.log(f"node{k}"), 60, f"SuperNode {k} connected",
                 procs.logs / f"node{k}.log")


@pytest.mark.slow
def test_superlink_and_two_supernodes_run_devft_with_state_on_each_nodes_disk(private_env, run_inprocess,
                                                                                smoke_config, tmp_path):
    flwr_home, out = tmp_path / "flwr", tmp_path / "run"
    env = {**private_env, "FLWR_HOME": str(flwr_home)}
    link, *node_ports = distinct_ports(3)
    write_connection(flwr_home, "deploy", link)
    caches = [tmp_path / f"node{k}-cache" for k in range(2)]  # each device has its own disk
    procs = Processes(env, tmp_path / "logs")
    start = time.monotonic()
    try:
        start_link_and_nodes(procs, link, node_ports, caches)
        connected_s = time.monotonic() - start
        run_config = smoke_run_config(DEPLOY | {"run-dir": str(out)})
        code, log = flwr_cli(["run", ".", "deploy", "--stream", "--run-config", run_config], env, timeout=240,
                             log=tmp_path / "flwr-run.log")
        wait_for_summary(out, log)
        wall_s = time.monotonic() - start
        code_ls, listing = flwr_cli(["ls", "deploy", "--format", "json"], env, timeout=60)
    finally:
        procs.stop_all()
    assert not pids_with_env("FLWR_HOME", env["FLWR_HOME"])
    assert code == 0, log[-3000:]
    assert code_ls == 0, listing[-2000:]
    runs = json.loads(listing[listing.index("{"):])["runs"]
    assert len(runs) == 1 and runs[0]["status"].startswith("finished:completed"), runs

    table = rows(out)
    assert [(r["round"], r["stage"], r["submodel_layers"]) for r in table] == [(1, 0, 4), (2, 1, 8)]
    for r in table:
        assert (r["clients_sampled"], r["clients_ok"], r["clients_failed"], r["aggregated"]) == (2, 2, 0, True)
        assert sorted(r["sampled_partitions"]) == [0, 1]
        assert r["bytes_up"] > 0 and r["bytes_down"] > 0 and math.isfinite(r["train_loss"])
    assert math.isfinite(table[1]["eval_loss"]) and table[1]["eval_clients"] == 2
    assert (out / "adapter" / "adapter_model.safetensors").exists()
    assert (out / "adapter" / "adapter_config.json").exists()
    summary = json.loads((out / "summary.json").read_text())
    assert summary["rounds"] == 2 and summary["aggregation"] == "fedsa"

    # Every message (partition query, 2 trains, 1 evaluation) was answered by a fresh ClientApp process ...
    for k in range(2):
        node_log = procs.log(f"node{k}")
        received = node_log.count("Receiving:")
        assert received == 4 and node_log.count(FRESH_PROCESS) == received, node_log[-3000:]
    # ... so what a client needs across messages is on its own disk: the first stage's fused layers (the
    # full-depth stage fuses nothing: its layers are the base model's own, not cached), and its own B (written
    # by round 2's train process, read by the evaluate process after it), never another node's.
    key = load_checkpoint(out / "checkpoint")["client_state_key"]
    for k, cache in enumerate(caches):
        plans = sorted((cache / "submodels").glob("*/layers.safetensors"))
        assert len(plans) == 1, plans
        assert sorted(p.name for p in (cache / "clients" / key).iterdir()) == [str(k)]
        assert (cache / "clients" / key / str(k) / "personal-r000002.safetensors").exists()

    # The same run on the in-process grid (one process, shared caches) ends with the same adapter, bit for bit.
    reference = tmp_path / "reference"
    run_inprocess(smoke_config(**{k.replace(".", "__"): v for k, v in DEPLOY.items()}), reference)
    a = load_file(str(out / "adapter" / "adapter_model.safetensors"))
    b = load_file(str(reference / "adapter" / "adapter_model.safetensors"))
    assert a.keys() == b.keys() and len(a) > 0
    assert all(torch.equal(a[name], b[name]) for name in a)
    assert [r["train_loss"] for r in rows(reference)] == [r["train_loss"] for r in table]
    print(f"deployment: SuperLink + 2 SuperNodes connected after {connected_s:.1f} s, summary after {wall_s:.1f} s; "
          f"round wall {[round(r['round_wall_s'], 1) for r in table]} s, of which evaluation "
          f"{[round(r['eval_s'], 1) for r in table]} s; bytes up {[r['bytes_up'] for r in table]}, "
          f"down {[r['bytes_down'] for r in table]}")


@pytest.mark.slow
def test_tls_and_node_authentication_run_a_registered_node_and_refuse_an_unregistered_one(private_env, tmp_path):
    flwr_home, out = tmp_path / "flwr", tmp_path / "run"
    env = {**private_env, "FLWR_HOME": str(flwr_home)}
    tls = make_tls(tmp_path / "tls")
    key0, pub0 = make_node_keys(tmp_path / "keys", "node0")
    key1, _ = make_node_keys(tmp_path / "keys", "stranger")  # never registered
    link, port0, port1 = distinct_ports(3)
    write_connection(flwr_home, "secure", link, tls)
    procs = Processes(env, tmp_path / "logs")
    try:
        procs.start("superlink", superlink_cmd(link, tls, node_auth=True))
        wait_for(lambda: listening(link), 60, "the SuperLink listening", procs.logs / "superlink.log")
        code, registered = flwr_cli(["supernode", "register", str(pub0), "secure", "--format", "json"], env, 60)
        assert code == 0, registered
        node_id = json.loads(registered[registered.index("{"):])["node-id"]
        procs.start("node0", supernode_cmd(link, port0, 0, 1, tls, key0), DEVFT_CACHE=str(tmp_path / "node0-cache"))
        stranger = procs.start("stranger", supernode_cmd(link, port1, 0, 1, tls, key1, max_retries=1),
                               DEVFT_CACHE=str(tmp_path / "stranger-cache"))
        wait_for(lambda: "SuperNode ID" in procs.log("node0"), 60, "node0 connected", procs.logs / "node0.log")
        stranger_code = stranger.wait(timeout=90)
        run_config = smoke_run_config({"data.num_clients": 1, "federation.num_rounds": 1,
                                       "federation.clients_per_round": 1, "growth.num_stages": 1,
                                       "federation.eval_every": 1, "run-dir": str(out)})
        code, log = flwr_cli(["run", ".", "secure", "--stream", "--run-config", run_config], env, timeout=180,
                             log=tmp_path / "flwr-run.log")
        wait_for_summary(out, log)
        code_list, nodes = flwr_cli(["supernode", "list", "secure", "--format", "json"], env, 60)
    finally:
        procs.stop_all()
    assert not pids_with_env("FLWR_HOME", env["FLWR_HOME"])
    assert "https://127.0.0.1" in procs.log("superlink")  # TLS on the one port of every API
    # The unregistered node gave up: the SuperLink refused its key.
    assert stranger_code != 0, procs.log("stranger")[-3000:]
    assert "Failed to activate SuperNode" in procs.log("stranger")
    assert "No SuperNode found with the given public key" in procs.log("superlink")
    assert code_list == 0, nodes
    listed = json.loads(nodes[nodes.index("{"):])["nodes"]
    assert [int(n["node-id"]) for n in listed] == [int(node_id)]
    # The registered node trained the round, over TLS.
    assert code == 0, log[-3000:]
    [row] = rows(out)
    assert (row["clients_sampled"], row["clients_ok"], row["clients_failed"], row["submodel_layers"]) == (1, 1, 0, 8)
    assert row["bytes_up"] > 0 and row["bytes_down"] > 0
    assert math.isfinite(row["train_loss"]) and math.isfinite(row["eval_loss"])
    assert (out / "adapter" / "adapter_model.safetensors").exists()


@pytest.mark.slow
def test_a_supernode_that_restarts_mid_run_gets_its_partition_back(private_env, tmp_path):
    """Node 1 is killed after round 1 and started again (a new node id, the same partition and disk). Round 2
    may still go to the old id (the SuperLink answers for it once its heartbeat times out, about 60 s) or
    already to the new node; from round 3 on partition 1 trains on the new node."""
    flwr_home, out = tmp_path / "flwr", tmp_path / "run"
    env = {**private_env, "FLWR_HOME": str(flwr_home)}
    link, *node_ports = distinct_ports(4)
    write_connection(flwr_home, "deploy", link)
    caches = [tmp_path / f"node{k}-cache" for k in range(2)]
    procs = Processes(env, tmp_path / "logs")
    restarted = threading.Event()

    def restart_node_1_after_round_1():
        deadline = time.monotonic() + 240
        while time.monotonic() < deadline and not ((out / "metrics.jsonl").exists() and rows(out)):
            time.sleep(0.2)
        os.killpg(procs.procs["node1"].pid, signal.SIGKILL)
        procs.start("node1-again", supernode_cmd(link, node_ports[2], 1, 2), DEVFT_CACHE=str(caches[1]))
        restarted.set()

    try:
        start_link_and_nodes(procs, link, node_ports, caches)
        watcher = threading.Thread(target=restart_node_1_after_round_1, daemon=True)
        watcher.start()
        run_config = smoke_run_config(DEPLOY | {"federation.num_rounds": 4, "federation.eval_every": 4,
                                                "federation.reply_timeout_s": 180.0, "run-dir": str(out)})
        code, log = flwr_cli(["run", ".", "deploy", "--stream", "--run-config", run_config], env, timeout=420,
                             log=tmp_path / "flwr-run.log")
        wait_for_summary(out, log)
        watcher.join(timeout=5)
        again = procs.log("node1-again")
    finally:
        procs.stop_all()
    assert restarted.is_set() and code == 0, log[-3000:]
    table = rows(out)
    assert [r["round"] for r in table] == [1, 2, 3, 4]
    assert (table[0]["clients_ok"], table[0]["clients_failed"]) == (2, 0)
    if table[1]["clients_failed"]:  # round 2 went to the old node id: the SuperLink answered for it
        assert table[1]["failures"][0]["partition"] == 1 and "SuperLink answered" in table[1]["failures"][0]["reason"]
    for r in table[2:]:
        assert (r["clients_sampled"], r["clients_ok"], r["clients_failed"]) == (2, 2, 0), r
    assert again.count("Receiving:") >= 3  # its partition query, then rounds 3 and 4 at least
    assert math.isfinite(table[-1]["eval_loss"]) and table[-1]["eval_clients"] == 2
