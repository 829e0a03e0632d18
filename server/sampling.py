"""Reproducible client sampling: partitions drawn from ``(seed, round)``, then mapped to node ids.

Flower's own ``sample_nodes`` uses the global ``random`` module over node ids, and node ids are random per
run, so the same seed does not give the same clients. Here the *partition ids* (stable: ``partition-id``
in each node's ``node_config``) are sampled with a private ``random.Random`` seeded from the run seed and
the round, and a query round (:data:`PARTITION_QUERY`) learns which node holds which partition.
"""

from __future__ import annotations

import hashlib
import logging
import random
import time
from collections.abc import Iterable

from flwr.app import ConfigRecord, Message, RecordDict
from flwr.serverapp import Grid

log = logging.getLogger(__name__)

PARTITION_QUERY = "query.partition"
"""Message type of the query that asks a node for its ``partition-id`` (answered by ``client.app``)."""


def round_rng(seed: int, server_round: int, purpose: str = "sample") -> random.Random:
    """A private RNG that depends only on ``(seed, server_round, purpose)`` (stable across processes)."""
    digest = hashlib.sha256(f"{purpose}:{seed}:{server_round}".encode()).digest()
    return random.Random(int.from_bytes(digest[:8], "little"))


def sample_partitions(seed: int, server_round: int, partitions: Iterable[int], k: int) -> list[int]:
    """``k`` distinct partition ids for ``server_round``, sorted; the same for the same arguments."""
    pool = sorted(set(partitions))
    if not 1 <= k <= len(pool):
        raise ValueError(f"cannot sample k={k} clients from {len(pool)} available partitions")
    return sorted(round_rng(seed, server_round).sample(pool, k))


def discover_partitions(
    grid: Grid, num_partitions: int, min_required: int, wait_s: float = 30.0, poll_s: float = 1.0,
    asked: set[int] | None = None,
) -> dict[int, int]:
    """Ask every connected node for its partition id; return ``{partition_id: node_id}`` (``asked``, when
    given, gets the node ids asked).

    Waits up to ``wait_s`` for ``num_partitions`` nodes, then goes on with those connected if at least
    ``min_required`` are (otherwise keeps waiting, logging). Nodes that answer with an error, report a
    partition id outside ``[0, num_partitions)``, or claim a partition another node already claimed are
    left out (and logged).
    """
    start = last_said = time.monotonic()
    last_count = -1
    probed = False  # one node asked while the others are awaited: a wrong num-partitions is refused at once
    while len(node_ids := sorted(grid.get_node_ids())) < num_partitions:
        waited = time.monotonic() - start
        if len(node_ids) >= min_required and waited > wait_s:
            log.warning("going on with %d of %d nodes connected", len(node_ids), num_partitions)
            break
        if node_ids and not probed:
            probed = True
            _refuse_mismatched(grid, node_ids[:1], num_partitions, wait_s)
        if len(node_ids) < min_required and time.monotonic() - last_said >= 30.0:  # waits for as long as it takes
            last_said = time.monotonic()
            log.warning("waiting for nodes (%.0f s): %d connected, a round needs %d (federation.clients_per_round) "
                        "of the %d partitions (data.num_clients): start more SuperNodes or lower "
                        "federation.clients_per_round", waited, len(node_ids), min_required, num_partitions)
        elif len(node_ids) != last_count:
            log.info("waiting for nodes: %d of %d connected", len(node_ids), num_partitions)
        last_count = len(node_ids)
        time.sleep(poll_s)
    mismatched: dict[int, int] = {}
    mapping = claimed_partitions(grid, node_ids, num_partitions, timeout=max(60.0, wait_s), mismatched=mismatched)
    _raise_mismatch(mismatched, num_partitions)
    if asked is not None:
        asked.update(node_ids)
    if len(mapping) < min_required:
        raise RuntimeError(f"only {len(mapping)} nodes reported a usable partition id; {min_required} needed")
    log.info("partition map: %d of %d partitions have a node", len(mapping), num_partitions)
    return dict(sorted(mapping.items()))


def _refuse_mismatched(grid: Grid, node_ids: list[int], num_partitions: int, wait_s: float) -> None:
    """Ask ``node_ids`` (connected while the others are awaited) for their partition count, and refuse a wrong one
    at once: no later node can make the run's data split theirs. One node is asked (every node is asked again
    once the wait ends, and in a deployment each ask starts a ClientApp process): a simulation tells every node
    the same count, and SuperNodes are usually started from one command line."""
    mismatched: dict[int, int] = {}
    claimed_partitions(grid, node_ids, num_partitions, timeout=max(60.0, wait_s), mismatched=mismatched)
    _raise_mismatch(mismatched, num_partitions)


def _raise_mismatch(mismatched: dict[int, int], num_partitions: int) -> None:
    if mismatched:
        node, told = next(iter(mismatched.items()))
        raise ValueError(
            f"node {node} was started with num-partitions={told} (of {len(mismatched)} nodes told another count), "
            f"but data.num_clients={num_partitions}: in a simulation pass --federation-config "
            f"'num-supernodes={num_partitions}' to flwr run (Flower's default local federation has 2 nodes); "
            f"on SuperNodes, --node-config 'partition-id=K num-partitions={num_partitions}'")


def claimed_partitions(grid: Grid, node_ids: Iterable[int], num_partitions: int, timeout: float,
                       mismatched: dict[int, int] | None = None) -> dict[int, int]:
    """Ask ``node_ids`` for their partition ids: ``{partition_id: node_id}`` of those that answered with one in
    ``[0, num_partitions)``; where two claim one partition, the lower node id keeps it (the others are logged).
    A node whose node config gives another ``num-partitions`` is left out (its split of the data is not this
    run's), logged, and recorded in ``mismatched`` (``{node_id: its num-partitions}``) when given."""
    messages = [
        Message(RecordDict({"config": ConfigRecord()}), dst_node_id=nid, message_type=PARTITION_QUERY)
        for nid in sorted(node_ids)
    ]
    replies = grid.send_and_receive(messages, timeout=timeout) if messages else []
    mapping: dict[int, int] = {}
    for reply in sorted(replies, key=lambda r: r.metadata.src_node_id):
        node = reply.metadata.src_node_id
        if reply.has_error():
            log.warning("node %d did not report its partition: %s", node, reply.error.reason)
            continue
        pid = int(reply.content["config"]["partition-id"])
        told = reply.content["config"].get("num-partitions")
        if told is not None and int(told) != num_partitions:
            log.warning("node %d was started with num-partitions=%d, but data.num_clients=%d: not used", node,
                        int(told), num_partitions)
            if mismatched is not None:
                mismatched[node] = int(told)
        elif not 0 <= pid < num_partitions:
            log.warning("node %d reports partition %d, outside [0, %d): not used", node, pid, num_partitions)
        elif pid in mapping:
            log.warning("nodes %d and %d both claim partition %d; keeping %d", mapping[pid], node, pid, mapping[pid])
        else:
            mapping[pid] = node
    return mapping


def refreshed_partitions(grid: Grid, known: dict[int, int], asked: set[int], num_partitions: int,
                         timeout: float = 60.0) -> dict[int, int]:
    """``known`` (``{partition_id: node_id}``) after asking the nodes that connected since (``asked``: every node
    asked before, updated here). A partition no node held before joins the pool. A new node that claims a
    held partition takes it over: a SuperNode that restarts connects under a new node id, usually before the
    SuperLink has noticed that the old one is gone (its heartbeat times out only later). Where the old node
    is in fact still running, the two were given one partition id; the warning says so."""
    connected = set(grid.get_node_ids())
    new = connected - asked
    if not new:
        return known
    asked |= new
    updated = dict(known)
    for pid, node in claimed_partitions(grid, new, num_partitions, timeout).items():
        holder = updated.get(pid)
        if holder is None:
            log.info("partition %d joined on node %d: sampled from now on", pid, node)
        elif holder in connected:
            log.warning("partition %d moves from node %d to node %d, which claims it now (a restarted SuperNode; if "
                        "node %d still runs, two nodes were given partition-id %d)", pid, holder, node, holder, pid)
        else:
            log.info("partition %d moved from node %d (gone) to node %d", pid, holder, node)
        updated[pid] = node
    return dict(sorted(updated.items()))
