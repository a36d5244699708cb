"""The inline engine: Flower's Grid with every virtual node in this process, one after another.

Flower's Ray engine starts Ray and one worker process per concurrent node, and each worker
imports torch and Opacus: 12-20 s before and after the rounds, whatever the consortium's size.
`InlineGrid` hands each message to the very ClientApp the Ray engine runs
(`simulations.runner.simulation_client_app`) through its public call, ``app(message, context)``,
with one persistent `Context` per virtual node built as Flower's simulation builds it
(``partition-id`` and ``num-partitions`` in the node config, a random node id, an empty state).
As Flower's engine does, it gives each message an id when pushed, delivers a copy (the Ray
engine's nodes get a copy too), gives each reply an id, and turns an exception in a node into an
error reply (``ClientAppException``, ``CLIENT_APP_RAISED_EXCEPTION``), so the server counts a
failed node the same on both engines.

Nodes run sequentially, in the order the server sent their messages. A thread pool would race:
a node's local training seeds and draws from torch's process-wide generator (dropout,
``shared_models.training.set_seed``), so concurrent nodes would make a seeded run depend on
thread timing; one process with all cores per node is also what a small consortium wants.

The Flower internals used here (the run, the process identity, the error code) are listed in
`simulations.flower_surface` and pinned by ``tests/test_flower_pin.py``.
"""

from __future__ import annotations

import contextlib
import copy
import logging
import secrets
import time
import traceback
from collections.abc import Iterable, Iterator
from datetime import UTC, datetime
from uuid import uuid4

from flwr.app import Context, Error, Message, RecordDict
from flwr.clientapp import ClientApp
from flwr.clientapp.client_app import ClientAppException
from flwr.common.constant import SUPERLINK_NODE_ID, ErrorCode
from flwr.serverapp import Grid
from flwr.supercore.run import Run
from flwr.supercore.task_identity import TaskIdentity

from shared_models.protocol import NUM_PARTITIONS, PARTITION_ID

__all__ = ["InlineGrid", "new_run", "server_identity"]

logger = logging.getLogger(__name__)

_NODE_ID_BITS = 63  # Flower's node ids are random signed 64-bit integers


class InlineGrid(Grid):
    """``num_nodes`` virtual nodes served by ``client_app`` in this process.

    Args:
        client_app: the ClientApp every node runs (one instance, called per message).
        num_nodes: virtual nodes; node ``i`` gets ``partition-id`` ``i``.
        run: the run the messages belong to (its id is every context's ``run_id``).
    """

    def __init__(self, client_app: ClientApp, num_nodes: int, run: Run) -> None:
        if num_nodes < 1:
            raise ValueError(f"an inline grid needs at least one node, got {num_nodes}")
        self._app = client_app
        self._run = run
        self.contexts: dict[int, Context] = {}
        for partition in range(num_nodes):
            node_id = _new_node_id(set(self.contexts))
            self.contexts[node_id] = Context(
                run_id=run.run_id,
                node_id=node_id,
                node_config={PARTITION_ID: partition, NUM_PARTITIONS: num_nodes},
                state=RecordDict(),
                run_config=dict(run.override_config),
            )
        self._pending: dict[str, Message] = {}

    def set_run(self, run: Run) -> None:
        if not isinstance(run, Run):
            raise TypeError(f"`run` must be an instance of Run, got {type(run).__name__}")
        self._run = run

    @property
    def run(self) -> Run:
        return Run(**vars(self._run))

    def create_message(
        self,
        content: RecordDict,
        message_type: str,
        dst_node_id: int,
        group_id: str,
        ttl: float | None = None,
    ) -> Message:
        return Message(content, dst_node_id, message_type, ttl=ttl, group_id=group_id)

    def get_node_ids(self) -> Iterable[int]:
        return list(self.contexts)

    def push_messages(self, messages: Iterable[Message]) -> Iterable[str]:
        """Queue ``messages`` for their nodes; their ids, as the SuperLink would assign them."""
        ids = []
        for msg in messages:
            meta = msg.metadata
            if meta.dst_node_id not in self.contexts:
                raise ValueError(
                    f"message for node {meta.dst_node_id}, which is not in this simulation "
                    f"(nodes: {sorted(self.contexts)})"
                )
            if meta.reply_to_message_id or meta.ttl <= 0 or meta.delivered_at:
                raise ValueError(f"not an instruction message a grid can send: {meta}")
            msg_id = str(uuid4())
            meta.__dict__["_message_id"] = msg_id  # as Flower's in-memory grid sets it
            self._pending[msg_id] = msg
            ids.append(msg_id)
        return ids

    def pull_messages(self, message_ids: Iterable[str]) -> Iterable[Message]:
        """Run the nodes of the pending ``message_ids``, in order, and return their replies."""
        return [self._deliver(self._pending.pop(i)) for i in message_ids if i in self._pending]

    def send_and_receive(
        self, messages: Iterable[Message], *, timeout: float | None = None
    ) -> Iterable[Message]:
        """Every node's reply; past ``timeout`` the nodes not yet run send none (as on Ray)."""
        ids = list(self.push_messages(messages))
        deadline = None if timeout is None else time.monotonic() + timeout
        replies = []
        for position, msg_id in enumerate(ids):
            if deadline is not None and time.monotonic() > deadline:
                left = len(ids) - position
                logger.warning("round timeout of %.0f s passed; %d node(s) not run", timeout, left)
                for late in ids[position:]:
                    self._pending.pop(late, None)
                break
            replies.extend(self.pull_messages([msg_id]))
        return replies

    def _deliver(self, msg: Message) -> Message:
        node_id = msg.metadata.dst_node_id
        delivered = copy.deepcopy(msg)  # the node's copy, as Ray's would be; ours stays intact
        delivered.metadata.delivered_at = datetime.now(UTC).isoformat()
        try:
            reply = self._app(delivered, self.contexts[node_id])
            if reply.metadata.reply_to_message_id != msg.metadata.message_id:
                raise ValueError("the ClientApp's reply does not answer the message it was given")
        except Exception as exc:  # as Flower's engine: the node's exception becomes its reply
            logger.warning("node %d failed: %r", node_id, exc)  # the round reports it too
            logger.debug("node %d traceback:\n%s", node_id, traceback.format_exc())
            wrapped = ClientAppException(str(exc))
            reply = Message(
                Error(
                    code=ErrorCode.CLIENT_APP_RAISED_EXCEPTION,
                    reason=f"{type(wrapped)}:<'{wrapped}'>",
                ),
                reply_to=delivered,
            )
        reply.metadata.__dict__["_message_id"] = str(uuid4())
        return reply


@contextlib.contextmanager
def server_identity(run: Run) -> Iterator[None]:
    """The process identity Flower's runtime sets before a ServerApp creates messages.

    ``run_simulation`` sets the same (task 1, the run's id, the SuperLink's node id); this one
    puts back what was there before.
    """
    saved = (TaskIdentity._task_id, TaskIdentity._run_id, TaskIdentity._node_id)
    TaskIdentity.task_id = 1
    TaskIdentity.run_id = run.run_id
    TaskIdentity.node_id = SUPERLINK_NODE_ID
    try:
        yield
    finally:
        TaskIdentity._task_id, TaskIdentity._run_id, TaskIdentity._node_id = saved


def new_run() -> Run:
    """A run with a random id, as ``run_simulation`` creates for its legacy Python API."""
    run = Run.create_empty(run_id=secrets.randbits(_NODE_ID_BITS))
    run.primary_task_id = 1
    return run


def _new_node_id(taken: set[int]) -> int:
    while True:
        node_id = secrets.randbits(_NODE_ID_BITS)
        if node_id > SUPERLINK_NODE_ID and node_id not in taken:
            return node_id
