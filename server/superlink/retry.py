"""Asking a SuperLink for a round's replies, and asking a node again when its reply was lost.

Flower 1.41 internals: ``HttpGrid`` (the ServerApp's connection to a SuperLink) and the error
codes of a reply lost in transit. Simulation's grid gets Flower's own ``send_and_receive``.
"""

from __future__ import annotations

import copy
import importlib
import logging
import sys
import time
from collections import Counter
from collections.abc import Mapping
from types import ModuleType

from flwr.app import Error, Message, Metadata
from flwr.common.constant import ErrorCode
from flwr.serverapp import Grid

from server.superlink import flower_surface
from server.superlink.packing import PackedArraysError, pack_records, unpack_records
from shared_models import object_pulls

logger = logging.getLogger(__name__)

#: Seconds between asks for replies in a deployment. Flower 1.41's ``HttpGrid`` (the
#: ServerApp's connection to a SuperLink) asks every 3 s in ``send_and_receive``, which alone
#: added 1.5 s to every round on average (docs/benchmarks.md, question 4); an ask is one small
#: call to the SuperLink on the same machine. Simulation's ``InMemoryGrid`` asks every 0.1 s.
REPLY_POLL_S = 0.1

#: Flower's module of the ServerApp's grid to a SuperLink, ``HttpGrid``. It is imported only
#: when a grid to a SuperLink exists: importing it loads Flower's SuperLink state (SQLAlchemy,
#: Alembic, FastAPI), about 0.7 s that an in-process simulation does not need
#: (docs/benchmarks.md, section 1).
_HTTP_GRID = flower_surface.HTTP_GRID.module


def _http_grid() -> ModuleType | None:
    try:
        return importlib.import_module(_HTTP_GRID)
    except ImportError:  # pragma: no cover - another Flower layout: its own polling then
        return None


def _on_superlink(grid: Grid) -> bool:
    """Whether ``grid`` is Flower's grid to a SuperLink (never imports it: one exists only then)."""
    module = sys.modules.get(_HTTP_GRID)
    return module is not None and isinstance(grid, getattr(module, flower_surface.HTTP_GRID.attr))


#: A reply's object not uploaded yet is asked for again after this long, doubling up to
#: `OBJECT_BACKOFF_CAP_S`. Flower's SuperLink hands the ServerApp a reply as soon as the node
#: pushed its metadata, while the reply's arrays and records are still going up (a paced node's
#: push takes 0.5-0.8 s on loopback), and Flower's grid then waits 1 s before asking again,
#: doubling to 10 s: in the deployment benchmark's rounds the ServerApp sat out about 1 s of
#: most rounds after the first reply came (docs/benchmarks.md, question 4). The ServerApp is one
#: client pulling two objects at a time, so the quicker asks are a handful of small requests a
#: round; Flower's 500 tries per object stay, which with the 1 s cap gives up on a reply whose
#: upload never completes after about 8 minutes, not about 80 (the node is then asked again:
#: see `exchange`).
OBJECT_BACKOFF_S = 0.05
OBJECT_BACKOFF_CAP_S = 1.0


def quick_reply_pulls() -> bool:
    """Make Flower's ServerApp grid ask again soon for a reply's objects; idempotent.

    Returns whether this Flower release's grid could be changed (otherwise it keeps its pace).
    """
    http_grid = _http_grid()
    if http_grid is None:  # pragma: no cover - another Flower layout
        return False
    return object_pulls.install(
        http_grid,
        "pull_objects",
        initial_backoff=OBJECT_BACKOFF_S,
        backoff_cap=OBJECT_BACKOFF_CAP_S,
    )


#: A node whose reply has not come this long after the round's median reply (times
#: ``RESEND_FACTOR``, at least ``RESEND_MIN_S`` after it was sent) is asked again.
RESEND_FACTOR = 1.5
RESEND_MIN_S = 30.0
#: Messages a node gets per round at most (the first and the asks again).
MAX_ASKS = 4
#: Error replies that mean the node's reply was lost on the way (Flower's grid makes one when
#: a reply's objects cannot be pulled), not that the node failed: the node is asked again.
_IN_TRANSIT = (ErrorCode.MESSAGE_UNAVAILABLE, ErrorCode.REPLY_MESSAGE_UNAVAILABLE)


def exchange(grid: Grid, messages: list[Message], timeout: float) -> list[Message]:
    """``grid.send_and_receive``; on a SuperLink, asking often and asking lost nodes again.

    On a SuperLink the replies are asked for every ``REPLY_POLL_S`` seconds, a reply's objects
    still uploading are asked for again soon (`quick_reply_pulls`), and a node whose
    reply was lost gets the same message again: at once when the grid says the reply's upload
    did not complete (``_IN_TRANSIT``), and when its reply is far behind the others' (see
    ``RESEND_FACTOR``). With 50 nodes pushing at once on a loaded machine, the SuperLink's
    SQLite store answered "database is locked" to some pushes (bench/load_test.py): Flower
    1.41's SuperNode drops a reply whose push was refused, and the SuperLink never hands a
    message out twice, so without this the update would wait for the round timeout and be
    lost. The node answers the second message from its release cache (same
    run, round and global weights: the update already released, no second privacy spend;
    `client.release_cache`); a node that was only slow answers twice and the first is kept.

    A node the SuperLink no longer has (unregistered, e.g. by `edufl server revoke`, while the
    round runs) fails at once, as Flower's strategies count a failure, and is never asked again:
    Flower 1.41 answers a message already sent to it with a Node Unavailable error (it then also
    withholds a reply the node stored before, which is not aggregated), and refuses a message
    for it (an empty message id; see `_refused`). A node whose last message was spent with no
    ask left is not waited for either.
    """
    if not messages:
        return []
    if not _on_superlink(grid):
        return list(grid.send_and_receive(messages, timeout=timeout))
    quick_reply_pulls()
    started = time.monotonic()
    deadline = started + timeout
    by_node = {int(m.metadata.dst_node_id): m for m in messages}
    node_of: dict[str, int] = {}
    sent_at: dict[int, float] = {}
    asks: Counter[int] = Counter()

    replies: dict[int, Message] = {}

    def push(batch: list[Message]) -> None:
        now = time.monotonic()
        packed = [_packed(m) for m in batch]
        for msg_id, msg in zip(grid.push_messages(packed), batch, strict=True):
            node = int(msg.metadata.dst_node_id)
            asks[node] += 1
            if not msg_id:  # the SuperLink stored no message: it has no such node now
                replies.setdefault(node, _refused(msg))
                continue
            node_of[msg_id] = node
            sent_at[node] = now

    push(messages)
    latencies: list[float] = []
    while len(replies) < len(by_node) and time.monotonic() < deadline:
        waiting = [i for i, node in node_of.items() if node not in replies]
        if not waiting:  # every message left was spent, and no node may be asked again
            break
        lost: set[int] = set()
        for msg in grid.pull_messages(waiting):
            msg_id = msg.metadata.reply_to_message_id
            node = node_of.get(msg_id)
            if node is None or node in replies:
                continue
            if msg.has_error() and msg.error.code in _IN_TRANSIT:
                # the node replied but its upload did not complete: that message is spent
                logger.info("node %s's reply was lost in transit (%s)", node, msg.error.reason)
                del node_of[msg_id]
                lost.add(node)
                continue
            replies[node] = _unpacked(_from_node(msg, node))
            latencies.append(time.monotonic() - started)
        late = lost | set(_late_nodes(by_node, replies, sent_at, latencies, time.monotonic()))
        late = sorted(n for n in late - replies.keys() if asks[n] < MAX_ASKS)
        if late:
            logger.warning(
                "no reply yet from node(s) %s: asking again (a lost reply is re-sent from the "
                "node's release cache, not retrained)",
                ", ".join(str(n) for n in late),
            )
            push([_again(by_node[n]) for n in late])
        if len(replies) < len(by_node):
            time.sleep(REPLY_POLL_S)
    return list(replies.values())


def _late_nodes(
    by_node: Mapping[int, Message],
    replies: Mapping[int, Message],
    sent_at: Mapping[int, float],
    latencies: list[float],
    now: float,
) -> list[int]:
    """Nodes to ask again: at least half have replied, and these are far behind them."""
    if not latencies or 2 * len(replies) < len(by_node):
        return []
    typical = sorted(latencies)[len(latencies) // 2]
    patience = max(RESEND_MIN_S, RESEND_FACTOR * typical)
    return [n for n in by_node if n not in replies and now - sent_at[n] >= patience]


def _refused(msg: Message) -> Message:
    """The failure of a node whose message the SuperLink refused to store: Flower 1.41 keeps
    no message for a node that is not registered (`store_message_ins`, e.g. one unregistered
    between the round's sampling and its messages) and answers the push with an empty id."""
    node = int(msg.metadata.dst_node_id)
    reason = (
        f"the SuperLink refused this round's message for node {node}: the node is not "
        "registered with it (unregistered, e.g. by `edufl server revoke`, after the round "
        "sampled it)"
    )
    metadata = Metadata(
        run_id=msg.metadata.run_id,
        message_id="",
        src_node_id=node,
        dst_node_id=msg.metadata.src_node_id,
        reply_to_message_id="",
        group_id=msg.metadata.group_id,
        created_at=time.time(),
        ttl=0,
        message_type=msg.metadata.message_type,
    )
    return Message(error=Error(code=ErrorCode.NODE_UNAVAILABLE, reason=reason), metadata=metadata)


def _from_node(msg: Message, node: int) -> Message:
    """``msg``, or for an error the SuperLink made itself (its own id as the sender, e.g. Node
    Unavailable), the same error from ``node``: the failure is the node's, and named so."""
    if not msg.has_error() or int(msg.metadata.src_node_id) == node:
        return msg
    meta = msg.metadata
    metadata = Metadata(
        run_id=meta.run_id,
        message_id=meta.message_id,
        src_node_id=node,
        dst_node_id=meta.dst_node_id,
        reply_to_message_id=meta.reply_to_message_id,
        group_id=meta.group_id,
        created_at=meta.created_at,
        ttl=meta.ttl,
        message_type=meta.message_type,
    )
    return Message(error=msg.error, metadata=metadata)


def _packed(msg: Message) -> Message:
    """``msg`` with its weights in one array (`server.superlink.packing`): one
    object for the SuperLink and the node to move instead of one per tensor."""
    if not msg.has_content():
        return msg
    return Message(content=pack_records(msg.content), metadata=copy.copy(msg.metadata))


def _unpacked(msg: Message) -> Message:
    """A reply with its weights unpacked; a corrupt packed array becomes the node's error."""
    if msg.has_error() or not msg.has_content():
        return msg
    try:
        msg.content = unpack_records(msg.content)
    except PackedArraysError as exc:
        logger.warning("node %s sent a corrupt reply: %s", msg.metadata.src_node_id, exc)
        return Message(error=Error(code=ErrorCode.UNKNOWN, reason=str(exc)), metadata=msg.metadata)
    return msg


def _again(msg: Message) -> Message:
    """A new message with ``msg``'s content for the same node (a SuperLink takes an id once)."""
    return Message(
        content=msg.content,
        dst_node_id=msg.metadata.dst_node_id,
        message_type=msg.metadata.message_type,
        group_id=msg.metadata.group_id,
    )
