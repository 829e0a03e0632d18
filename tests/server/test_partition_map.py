"""The partition map in a deployment: SuperNodes that restart (a new node id for the same partition) or go
away mid-run, on an in-process grid that behaves like a SuperLink (it answers for a lost node itself)."""

from __future__ import annotations

import json

from flwr.app import MessageType, RecordDict
from flwr.server.superlink.linkstate.utils import create_message_error_unavailable_res_message
from inprocess_grid import RecordingGrid


class ChangingGrid(RecordingGrid):
    """Nodes that restart under a new id or leave; a message to a node that left is answered by the
    'SuperLink' with Flower's node-unavailable error."""

    def restart(self, partition: int, new_id: int) -> None:
        old = next(n for n, c in self.contexts.items() if c.node_config["partition-id"] == partition)
        context = self.contexts.pop(old)
        context.node_id = new_id
        self.contexts[new_id] = context

    def leave(self, partition: int) -> None:
        del self.contexts[next(n for n, c in self.contexts.items() if c.node_config["partition-id"] == partition)]

    def _call(self, message):
        if message.metadata.dst_node_id not in self.contexts:
            reply = create_message_error_unavailable_res_message(message.metadata, "node_unavail")
            self.pairs.append((message, reply))
            return reply
        return super()._call(message)


def _rows(out):
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def test_a_restarted_supernode_keeps_its_partition_and_one_that_left_is_a_failure(smoke_config, private_env,
                                                                                  one_thread, tmp_path):
    from client.app import app as client_app
    from server.app import run_server

    config = smoke_config(federation__clients_per_round=4, federation__num_rounds=3, federation__eval_every=3)
    grid = ChangingGrid(client_app, config.data.num_clients)

    def after_round(row):
        if row["round"] == 1:
            grid.restart(1, new_id=5555)
            grid.leave(2)

    run_server(grid, config, tmp_path / "run", on_round=[after_round])
    table = _rows(tmp_path / "run")
    assert [(r["clients_ok"], r["clients_failed"]) for r in table] == [(4, 0), (3, 1), (3, 1)]
    for r in table[1:]:
        assert r["failures"][0]["partition"] == 2
        assert r["failures"][0]["reason"].startswith("no reply; the SuperLink answered for the node")
        assert r["ignored_replies"] == []
    to_new_node = [(int(m.metadata.group_id), r.has_error()) for m, r in grid.pairs
                   if m.metadata.message_type == MessageType.TRAIN and m.metadata.dst_node_id == 5555]
    assert to_new_node == [(2, False), (3, False)]  # partition 1 trained on its new node in rounds 2 and 3


def test_the_partition_map_follows_new_nodes_and_asks_each_once(private_env):
    from client.app import app as client_app
    from server.sampling import refreshed_partitions

    grid = ChangingGrid(client_app, 4)
    known = {p: 1000 + 7 * p for p in range(3)}  # partition 3's node was not connected at the start
    asked = set(known.values())
    assert refreshed_partitions(grid, known, asked, 4) == {**known, 3: 1021}  # a late partition joins the pool
    assert asked == {1000, 1007, 1014, 1021}
    queries = len(grid.pairs)
    assert refreshed_partitions(grid, {**known, 3: 1021}, asked, 4) == {**known, 3: 1021}
    assert len(grid.pairs) == queries  # nobody new: nobody asked
    grid.restart(1, new_id=5555)
    assert refreshed_partitions(grid, {**known, 3: 1021}, asked, 4) == {0: 1000, 1: 5555, 2: 1014, 3: 1021}
    # a restart the SuperLink has not noticed yet: the old node id is still listed; the new node takes over
    grid.contexts[6666] = grid.contexts[1000].__class__(
        run_id=4242, node_id=6666, node_config={"partition-id": 0, "num-partitions": 4}, state=RecordDict(),
        run_config={})
    assert refreshed_partitions(grid, {0: 1000, 1: 5555, 2: 1014, 3: 1021}, asked, 4)[0] == 6666
