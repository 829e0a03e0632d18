"""A Flower ``Grid`` that runs a ClientApp in this process: strategy tests without Ray or a SuperLink.

Every message is serialised to Flower's wire objects and rebuilt on the other side (both ways), and an
exception in the ClientApp becomes an error reply exactly as the simulation runtime makes it, so what the
strategy sees matches a real run.
"""

from __future__ import annotations

import traceback
from collections.abc import Iterable
from uuid import uuid4

from flwr.app import Context, Error, Message, MessageType, RecordDict
from flwr.clientapp import ClientApp
from flwr.common.constant import SUPERLINK_NODE_ID, ErrorCode
from flwr.serverapp import Grid
from flwr.supercore.run import Run
from flwr.supercore.task_identity import TaskIdentity

from server.metering import deserialise, serialise

_RUN_ID = 4242


class InProcessGrid(Grid):
    """``num_nodes`` nodes with ids ``1000 + 7·partition``, each calling ``client_app`` in-process."""

    def __init__(self, client_app: ClientApp, num_nodes: int, node_ids: list[int] | None = None) -> None:
        TaskIdentity.task_id = 1
        TaskIdentity.run_id = _RUN_ID
        TaskIdentity.node_id = SUPERLINK_NODE_ID
        self.client_app = client_app
        ids = node_ids or [1000 + 7 * p for p in range(num_nodes)]
        self.contexts = {
            nid: Context(
                run_id=_RUN_ID,
                node_id=nid,
                node_config={"partition-id": p, "num-partitions": num_nodes},
                state=RecordDict(),
                run_config={},
            )
            for p, nid in enumerate(ids)
        }
        self.sent: list[Message] = []
        self._replies: dict[str, Message] = {}
        self._run = Run.create_empty(run_id=_RUN_ID)

    def set_run(self, run: Run) -> None:
        self._run = run

    @property
    def run(self) -> Run:
        return self._run

    def create_message(self, content, message_type, dst_node_id, group_id, ttl=None) -> Message:  # noqa: D102
        return Message(content, dst_node_id, message_type, ttl=ttl, group_id=group_id)

    def get_node_ids(self) -> Iterable[int]:
        return list(self.contexts)

    def push_messages(self, messages: Iterable[Message]) -> Iterable[str]:
        ids = []
        for message in messages:
            message.metadata.__dict__["_message_id"] = str(uuid4())
            self.sent.append(message)
            ids.append(message.metadata.message_id)
            self._replies[message.metadata.message_id] = self._call(message)
        return ids

    def pull_messages(self, message_ids: Iterable[str]) -> Iterable[Message]:
        return [self._replies.pop(i) for i in message_ids if i in self._replies]

    def send_and_receive(self, messages: Iterable[Message], *, timeout: float | None = None) -> Iterable[Message]:
        return self.pull_messages(list(self.push_messages(messages)))

    def _call(self, message: Message) -> Message:
        """Deliver ``message`` over the 'wire', run the ClientApp, and bring the reply back over the 'wire'."""
        received = deserialise(*serialise(message))
        received.metadata.__dict__["_message_id"] = message.metadata.message_id
        context = self.contexts[message.metadata.dst_node_id]
        try:
            reply = self.client_app(received, context)
        except Exception as ex:  # noqa: BLE001 - the runtime turns any ClientApp exception into an error reply
            traceback.print_exc()
            reply = Message(
                Error(code=ErrorCode.CLIENT_APP_RAISED_EXCEPTION, reason=f"{type(ex)}:<'{ex}'>"), reply_to=received
            )
        if reply.has_error():
            back = reply
        else:
            back = deserialise(*serialise(reply))
        back.metadata.__dict__["_message_id"] = str(uuid4())
        return back


class RecordingGrid(InProcessGrid):
    """The in-process grid, keeping every (request, reply) pair; ``fresh`` clears the client's per-process
    caches before each call, as a deployment's fresh ClientApp process per message would."""

    def __init__(self, client_app, num_nodes, fresh=False):
        super().__init__(client_app, num_nodes)
        self.fresh = fresh
        self.pairs = []

    def _call(self, message):
        if self.fresh:
            from client.runtime import clear_process_caches

            clear_process_caches()
        reply = super()._call(message)
        self.pairs.append((message, reply))
        return reply

    def train_replies(self, server_round):
        return [(self.node_pid(m), r) for m, r in self.pairs
                if m.metadata.message_type == MessageType.TRAIN and int(m.metadata.group_id) == server_round]

    def node_pid(self, message):
        return int(self.contexts[message.metadata.dst_node_id].node_config["partition-id"])


def run_recorded(config, out, fresh=False, **kwargs) -> RecordingGrid:
    """A whole run of ``config`` into ``out`` on a :class:`RecordingGrid` (``kwargs`` go to ``run_server``)."""
    from client.app import app as client_app
    from server.app import run_server

    grid = RecordingGrid(client_app, config.data.num_clients, fresh=fresh)
    run_server(grid, config, out, **kwargs)
    return grid
