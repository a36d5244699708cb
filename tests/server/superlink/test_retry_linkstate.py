"""A round's exchange against Flower 1.41's own SuperLink state, with a node revoked mid-round.

`edufl server revoke` unregisters the node from the running SuperLink (Flower's
``delete_node``). These tests put `server.superlink.retry.exchange` in front of the SQLite
``SqlLinkState`` a SuperLink runs on (no network: the grid below does what the Runtime API's
handlers do) and pin what the exchange relies on: a round never waits for its timeout because
of a revoked node, and a revoked node's reply the ServerApp had not collected is not handed over.
The real processes are in tests/deploy/test_faults.py.
"""

from __future__ import annotations

import secrets
from collections.abc import Iterable, Iterator

import pytest
from flwr.app import Message, RecordDict
from flwr.common.constant import NOOP_ACCOUNT_NAME, NOOP_FLWR_AID, SUPERLINK_NODE_ID, ErrorCode
from flwr.server.superlink.linkstate import LinkState, LinkStateFactory
from flwr.supercore.constant import NOOP_FEDERATION_ID
from flwr.supercore.object_store import ObjectStoreFactory
from flwr.supercore.task_identity import TaskIdentity
from flwr.superlink.federation import NoOpFederationManager
from flwr.superlink.grid.http_grid import HttpGrid

import server.superlink.retry
from tests.server.superlink.test_retry import _Clock


class _Link(HttpGrid):
    """The ServerApp's grid on a SuperLink, straight on its ``LinkState`` (no network).

    Pushing stores each message as the Runtime API's ``push_messages`` handler does (an empty
    id for one the state refuses); pulling asks ``get_message_res`` as ``pull_messages`` does.
    """

    def __init__(self, state: LinkState, run_id: int) -> None:
        self.state, self.run_id = state, run_id

    def push_messages(self, messages: Iterable[Message]) -> Iterable[str]:
        ids = []
        for msg in messages:
            msg.metadata.__dict__["_run_id"] = self.run_id
            msg.metadata.__dict__["_src_node_id"] = SUPERLINK_NODE_ID
            msg.metadata.__dict__["_message_id"] = msg.object_id
            ids.append(self.state.store_message_ins(msg) or "")
        return ids

    def pull_messages(self, message_ids: Iterable[str]) -> Iterable[Message]:
        return self.state.get_message_res(set(message_ids), self.run_id)


class _Federation:
    """A SuperLink's state with three online nodes and a run; its nodes answer on ``sleep``."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch) -> None:
        factory = LinkStateFactory(":memory:", NoOpFederationManager(), ObjectStoreFactory())
        self.state = factory.state()
        self.nodes = []
        for _ in range(3):
            node = self.state.create_node(
                NOOP_FLWR_AID, NOOP_ACCOUNT_NAME, secrets.token_bytes(32), heartbeat_interval=30
            )
            self.state.activate_node(node, 30.0)
            self.nodes.append(node)
        self.run_id = self.state.create_run(
            None, None, None, {}, NOOP_FEDERATION_ID, None, NOOP_FLWR_AID, "serverapp"
        )
        monkeypatch.setattr(TaskIdentity, "_run_id", self.run_id)
        monkeypatch.setattr(TaskIdentity, "_node_id", SUPERLINK_NODE_ID)
        monkeypatch.setattr(TaskIdentity, "_task_id", 1)
        self.silent: set[int] = set()
        self.stored: dict[int, str] = {}  # node -> id of the reply the SuperLink stored

    def revoke(self, node: int) -> None:
        """What `edufl server revoke` asks of a running SuperLink (`flwr supernode unregister`)."""
        self.state.delete_node(NOOP_FLWR_AID, node)

    def answer(self) -> None:
        """Each node not ``silent`` pulls its messages and stores its reply to each."""
        for node in self.nodes:
            if node in self.silent:
                continue
            for msg in self.state.get_message_ins(node_id=node, limit=None):
                reply = Message(RecordDict(), reply_to=msg)
                reply.metadata.__dict__["_src_node_id"] = node
                reply.metadata.__dict__["_message_id"] = reply.object_id
                stored = self.state.store_message_res(reply)
                if stored:
                    self.stored[node] = stored


@pytest.fixture
def federation(monkeypatch: pytest.MonkeyPatch, clock: _Clock) -> Iterator[_Federation]:
    fed = _Federation(monkeypatch)
    nap = clock.sleep

    def sleep(seconds: float) -> None:
        nap(seconds)
        fed.answer()  # the nodes work while the ServerApp waits between asks

    monkeypatch.setattr(server.superlink.retry.time, "sleep", sleep)
    yield fed


@pytest.fixture
def clock(monkeypatch: pytest.MonkeyPatch) -> _Clock:
    fake = _Clock()
    monkeypatch.setattr(server.superlink.retry.time, "monotonic", lambda: fake.now)
    return fake


def _to(nodes: list[int]) -> list[Message]:
    return [Message(RecordDict(), dst_node_id=n, message_type="train") for n in nodes]


def _outcome(replies: list[Message]) -> dict[int, int | None]:
    """Each replying node's error code (None: a real reply)."""
    return {int(m.metadata.src_node_id): (m.error.code if m.has_error() else None) for m in replies}


def test_a_node_revoked_between_sampling_and_sending_fails_at_once(
    federation: _Federation, clock: _Clock
) -> None:
    a, b, c = federation.nodes
    federation.revoke(c)  # after the strategy sampled it, before the messages went out
    replies = server.superlink.retry.exchange(
        _Link(federation.state, federation.run_id), _to([a, b, c]), timeout=3600
    )
    assert _outcome(replies) == {a: None, b: None, c: ErrorCode.NODE_UNAVAILABLE}
    assert clock.now < 1  # not the round timeout


def test_a_node_revoked_after_taking_its_message_fails_at_once(
    federation: _Federation, clock: _Clock
) -> None:
    a, b, c = federation.nodes
    federation.silent.add(c)  # it took the message and trains: no reply yet
    grid = _Link(federation.state, federation.run_id)
    messages = _to([a, b, c])
    pull = grid.pull_messages

    def revoke_once_pulled(message_ids: Iterable[str]) -> Iterable[Message]:
        if federation.state.get_message_ins(node_id=c, limit=None):
            federation.revoke(c)  # revoked while it holds the round's message
        return pull(message_ids)

    grid.pull_messages = revoke_once_pulled  # type: ignore[method-assign]
    replies = server.superlink.retry.exchange(grid, messages, timeout=3600)
    assert _outcome(replies) == {a: None, b: None, c: ErrorCode.NODE_UNAVAILABLE}
    assert clock.now < 1


def test_a_reply_stored_before_the_revocation_but_not_collected_is_withheld(
    federation: _Federation, clock: _Clock
) -> None:
    # The revoked node's reply reached the SuperLink, but the ServerApp had not taken it
    # when the node was revoked: Flower hands over a Node Unavailable error instead, so the
    # update of a node revoked before aggregation is never aggregated.
    a, b, c = federation.nodes
    grid = _Link(federation.state, federation.run_id)
    pull = grid.pull_messages

    def revoke_before_collecting(message_ids: Iterable[str]) -> Iterable[Message]:
        if c in federation.stored and c not in federation.silent:
            federation.silent.add(c)
            federation.revoke(c)
        return pull(message_ids)

    grid.pull_messages = revoke_before_collecting  # type: ignore[method-assign]
    replies = server.superlink.retry.exchange(grid, _to([a, b, c]), timeout=3600)
    assert c in federation.stored  # its reply was stored...
    assert _outcome(replies) == {a: None, b: None, c: ErrorCode.NODE_UNAVAILABLE}  # ...not given
    assert clock.now < 1
