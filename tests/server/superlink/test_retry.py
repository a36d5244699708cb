"""The round's exchange with a SuperLink: replies asked for often, lost replies asked again."""

from __future__ import annotations

from collections.abc import Iterable

import pytest
from flwr.app import Error, Message, Metadata, RecordDict
from flwr.common.constant import ErrorCode
from flwr.superlink.grid.http_grid import HttpGrid

import server.superlink.retry
from tests.server.conftest import reply


class _SuperLink(HttpGrid):
    """An ``HttpGrid`` (no network) whose nodes answer after ``delay`` seconds of a fake clock.

    ``lose`` names nodes whose first reply is dropped, as Flower's SuperNode drops a reply
    whose push the SuperLink refused; ``unregistered`` nodes whose messages the SuperLink
    refuses (an empty id, as Flower 1.41's Runtime API answers for an unregistered node);
    ``garble`` nodes whose next reply's upload breaks off (``garble_always``: every one).
    """

    def __init__(
        self,
        clock: _Clock,
        delay: dict[int, float],
        lose: Iterable[int] = (),
        garble: Iterable[int] = (),
        gone: Iterable[int] = (),
        unregistered: Iterable[int] = (),
        garble_always: bool = False,
    ) -> None:
        self.clock, self.delay, self.lose, self.garble = clock, delay, set(lose), set(garble)
        self.gone, self.unregistered = set(gone), set(unregistered)
        self.garble_always = garble_always
        self.refused: list[int] = []
        self.pushed: dict[str, tuple[int, float]] = {}  # message id -> (node, sent at)
        self.asks = 0

    def push_messages(self, messages: Iterable[Message]) -> Iterable[str]:
        ids = []
        for msg in messages:
            if int(msg.metadata.dst_node_id) in self.unregistered:
                self.refused.append(int(msg.metadata.dst_node_id))
                ids.append("")
                continue
            msg_id = f"msg-{len(self.pushed)}"
            self.pushed[msg_id] = (int(msg.metadata.dst_node_id), self.clock.now)
            ids.append(msg_id)
        return ids

    def pull_messages(self, message_ids: Iterable[str]) -> Iterable[Message]:
        self.asks += 1
        out = []
        for msg_id in message_ids:
            assert msg_id, "an empty message id was asked for"
            node, sent = self.pushed[msg_id]
            if self.clock.now - sent < self.delay[node]:
                continue
            if node in self.lose:  # this reply never reaches the SuperLink
                self.lose.discard(node)
                self.pushed[msg_id] = (node, float("inf"))
                continue
            if node in self.gone:  # the SuperLink answers for a node that stopped heartbeating
                out.append(_answer(node, msg_id, error=True, code=ErrorCode.NODE_UNAVAILABLE))
                continue
            if node in self.garble:  # the upload broke off: the grid reports it as an error
                if not self.garble_always:
                    self.garble.discard(node)
                out.append(_answer(node, msg_id, error=True))
                continue
            out.append(_answer(node, msg_id))
        return out

    def send_and_receive(self, *args: object, **kwargs: object) -> Iterable[Message]:
        raise AssertionError("Flower's send_and_receive polls every 3 s; not used on a SuperLink")


def _answer(
    node: int, msg_id: str, error: bool = False, code: int = ErrorCode.MESSAGE_UNAVAILABLE
) -> Message:
    """``node``'s reply to message ``msg_id``, with the metadata a SuperLink gives it.

    ``error``: the reply Flower's grid makes itself when the reply's objects cannot be pulled
    (from the server's own node id, code MESSAGE_UNAVAILABLE).
    """
    metadata = Metadata(
        run_id=1,
        message_id=f"reply-{msg_id}",
        src_node_id=1 if error else node,
        dst_node_id=0,
        reply_to_message_id=msg_id,
        group_id="1",
        created_at=0.0,
        ttl=3600,
        message_type="train",
    )
    if error:
        unavailable = Error(code=code, reason="unavailable")
        return Message(error=unavailable, metadata=metadata)
    return Message(content=RecordDict(), metadata=metadata)


class _Clock:
    def __init__(self) -> None:
        self.now = 0.0
        self.naps: list[float] = []

    def sleep(self, seconds: float) -> None:
        self.naps.append(seconds)
        self.now += seconds


@pytest.fixture
def clock(monkeypatch: pytest.MonkeyPatch) -> _Clock:
    fake = _Clock()
    monkeypatch.setattr(server.superlink.retry.time, "sleep", fake.sleep)
    monkeypatch.setattr(server.superlink.retry.time, "monotonic", lambda: fake.now)
    return fake


def _to(nodes: list[int]) -> list[Message]:
    """Messages for ``nodes`` (any message with a destination will do)."""
    messages = [reply(n, None) for n in nodes]
    for msg, node in zip(messages, nodes, strict=True):
        msg.metadata.dst_node_id = node
    return messages


def _nodes(replies: list[Message]) -> list[int]:
    return sorted(int(m.metadata.src_node_id) for m in replies)


def test_every_reply_is_collected_asking_every_tenth_of_a_second(clock: _Clock) -> None:
    grid = _SuperLink(clock, {1: 0.0, 2: 0.15, 3: 0.25})
    replies = server.superlink.retry.exchange(grid, _to([1, 2, 3]), timeout=60)
    assert _nodes(replies) == [1, 2, 3]
    assert grid.asks == 4  # at 0, 0.1, 0.2, 0.3 s
    assert set(clock.naps) == {server.superlink.retry.REPLY_POLL_S}
    assert len(grid.pushed) == 3  # nobody asked twice


@pytest.mark.usefixtures("flower_task")
def test_a_lost_reply_is_asked_for_again_and_arrives_once(clock: _Clock) -> None:
    grid = _SuperLink(clock, {1: 5.0, 2: 5.0, 3: 5.0, 4: 5.0}, lose={3})
    replies = server.superlink.retry.exchange(grid, _to([1, 2, 3, 4]), timeout=900)
    assert _nodes(replies) == [1, 2, 3, 4]
    resent = [node for node, _ in list(grid.pushed.values())[4:]]
    assert resent == [3]
    # asked again once the others' median reply (5 s) was far behind: 30 s, not the timeout
    assert 30 <= clock.now < 40


@pytest.mark.usefixtures("flower_task")
def test_a_reply_lost_in_transit_is_asked_for_again_at_once(clock: _Clock) -> None:
    grid = _SuperLink(clock, {1: 5.0, 2: 5.0, 3: 5.0}, garble={3})
    replies = server.superlink.retry.exchange(grid, _to([1, 2, 3]), timeout=900)
    assert _nodes(replies) == [1, 2, 3]
    assert not any(m.has_error() for m in replies)
    assert [node for node, _ in list(grid.pushed.values())[3:]] == [3]
    assert clock.now < 11  # not the 30 s patience: the grid said the reply was lost


@pytest.mark.usefixtures("flower_task")
def test_a_node_always_lost_is_asked_a_few_times_then_left_to_the_timeout(clock: _Clock) -> None:
    grid = _SuperLink(clock, {1: 1.0, 2: 1.0, 3: 1e9})
    replies = server.superlink.retry.exchange(grid, _to([1, 2, 3]), timeout=900)
    assert _nodes(replies) == [1, 2]
    assert [node for node, _ in grid.pushed.values()].count(3) == server.superlink.retry.MAX_ASKS


@pytest.mark.usefixtures("flower_task")
def test_a_slow_node_answering_twice_counts_once(clock: _Clock) -> None:
    grid = _SuperLink(clock, {1: 1.0, 2: 1.0, 3: 31.0})
    replies = server.superlink.retry.exchange(grid, _to([1, 2, 3]), timeout=900)
    assert _nodes(replies) == [1, 2, 3]


def test_the_round_timeout_returns_the_replies_in_so_far(clock: _Clock) -> None:
    grid = _SuperLink(clock, {1: 1.0, 2: 1.0, 9: 1e9})
    replies = server.superlink.retry.exchange(grid, _to([1, 2, 9]), timeout=10)
    assert _nodes(replies) == [1, 2]
    assert 10 <= clock.now < 10.5


def test_no_message_no_ask(clock: _Clock) -> None:
    assert server.superlink.retry.exchange(_SuperLink(clock, {}), [], timeout=10) == []


def test_a_node_the_superlink_reports_unavailable_fails_at_once_under_its_own_id(
    clock: _Clock,
) -> None:
    grid = _SuperLink(clock, {1: 1.0, 2: 1.0, 3: 1.0}, gone={3})
    replies = server.superlink.retry.exchange(grid, _to([1, 2, 3]), timeout=900)
    assert _nodes(replies) == [1, 2, 3]  # the SuperLink's error is attributed to node 3
    assert [m.has_error() for m in sorted(replies, key=lambda m: m.metadata.src_node_id)] == [
        False,
        False,
        True,
    ]
    assert clock.now < 2  # no waiting for the round timeout


@pytest.mark.usefixtures("flower_task")
def test_a_node_unregistered_before_its_message_fails_at_once_and_is_not_asked_again(
    clock: _Clock,
) -> None:
    # Sampled, then revoked before the round's messages went out: the SuperLink refuses its
    # message. Its failure is named at once; the round does not wait for the timeout.
    grid = _SuperLink(clock, {1: 1.0, 2: 1.0, 3: 1.0}, unregistered={3})
    replies = server.superlink.retry.exchange(grid, _to([1, 2, 3]), timeout=900)
    assert _nodes(replies) == [1, 2, 3]
    (failed,) = [m for m in replies if m.has_error()]
    assert int(failed.metadata.src_node_id) == 3
    assert failed.error.code == ErrorCode.NODE_UNAVAILABLE
    assert "not registered" in failed.error.reason and "revoke" in failed.error.reason
    assert grid.refused == [3]  # asked once, never again
    assert clock.now < 2


@pytest.mark.usefixtures("flower_task")
def test_a_node_revoked_after_its_reply_was_lost_fails_at_the_next_ask(clock: _Clock) -> None:
    grid = _SuperLink(clock, {1: 1.0, 2: 1.0, 3: 1.0}, garble={3})
    pull = grid.pull_messages

    def revoke_after_the_loss(message_ids: Iterable[str]) -> Iterable[Message]:
        out = list(pull(message_ids))
        if any(m.has_error() for m in out):
            grid.unregistered.add(3)  # revoked before the ask again reaches it
        return out

    grid.pull_messages = revoke_after_the_loss  # type: ignore[method-assign]
    replies = server.superlink.retry.exchange(grid, _to([1, 2, 3]), timeout=900)
    assert sorted((_nodes([m]), m.has_error()) for m in replies) == [
        ([1], False),
        ([2], False),
        ([3], True),
    ]
    assert grid.refused == [3]
    assert clock.now < 2


@pytest.mark.usefixtures("flower_task")
def test_a_node_whose_every_reply_is_lost_is_not_waited_for_once_no_ask_is_left(
    clock: _Clock,
) -> None:
    grid = _SuperLink(clock, {1: 1.0, 2: 1.0, 3: 1.0}, garble={3}, garble_always=True)
    replies = server.superlink.retry.exchange(grid, _to([1, 2, 3]), timeout=900)
    assert _nodes(replies) == [1, 2]  # node 3: no reply (the round reports it as missing)
    assert [node for node, _ in grid.pushed.values()].count(3) == server.superlink.retry.MAX_ASKS
    assert clock.now < 10  # 4 asks of ~1 s, then nothing left in flight: no wait for the timeout


def test_the_serverapp_asks_again_soon_for_a_reply_still_uploading(
    clock: _Clock, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A reply is handed to the ServerApp before its objects are all up: the grid asks for a
    missing object again after 0.05 s (doubling to 1 s), not after Flower's 1 s (doubling
    to 10 s), which cost most deployment rounds about a second."""
    import itertools

    from flwr.supercore.inflatable import inflatable_utils
    from flwr.superlink.grid import http_grid

    from tests.client.node.test_object_pulls import arrives_after

    # Flower's own (an exchange earlier in this process may have installed the quick one)
    flowers = inflatable_utils.pull_objects
    monkeypatch.setattr(http_grid, "pull_objects", flowers)
    server.superlink.retry.exchange(_SuperLink(clock, {7: 0.0}), _to([7]), timeout=5)
    quick = http_grid.pull_objects
    assert quick is not flowers and getattr(quick, "_edufl_quick_retry", False)
    assert server.superlink.retry.quick_reply_pulls()
    assert http_grid.pull_objects is quick  # installed once

    pull, asks = arrives_after(0.3)
    assert quick(["a" * 64], pull_object_fn=pull) == {"a" * 64: b"content"}
    assert asks[-1] < 0.6  # Flower's own first retry alone is 0.8-1.2 s
    gaps = [b - a for a, b in itertools.pairwise(asks)]
    assert len(gaps) >= 3 and max(gaps) < 0.3  # 0.05, 0.1, 0.2

    pull, asks = arrives_after(0.3)
    flowers(["b" * 64], pull_object_fn=pull)
    assert asks[-1] >= 0.8  # what it replaces
