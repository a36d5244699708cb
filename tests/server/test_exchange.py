"""The round's exchange with a SuperLink: replies are asked for often, not every 3 s."""

from __future__ import annotations

from collections.abc import Iterable

import pytest
from flwr.app import Message
from flwr.superlink.grid.http_grid import HttpGrid

import server.rounds
from tests.server.conftest import reply


class _SuperLink(HttpGrid):
    """An ``HttpGrid`` whose SuperLink answers node ``n`` after ``n`` asks (no network)."""

    def __init__(self) -> None:  # no connection: only push/pull are used
        self.asks = 0
        self.pushed: list[str] = []

    def push_messages(self, messages: Iterable[Message]) -> Iterable[str]:
        self.pushed = [f"msg-{m.metadata.dst_node_id}" for m in messages]
        return list(self.pushed)

    def pull_messages(self, message_ids: Iterable[str]) -> Iterable[Message]:
        self.asks += 1
        wanted = set(message_ids)
        return [
            reply(int(mid.split("-")[1]), None)
            for mid in self.pushed
            if mid in wanted and int(mid.split("-")[1]) <= self.asks
        ]

    def send_and_receive(self, *args: object, **kwargs: object) -> Iterable[Message]:
        raise AssertionError("Flower's send_and_receive polls every 3 s; not used on a SuperLink")


@pytest.fixture
def naps(monkeypatch: pytest.MonkeyPatch) -> list[float]:
    slept: list[float] = []
    monkeypatch.setattr(server.rounds.time, "sleep", slept.append)
    return slept


def _to(nodes: list[int]) -> list[Message]:
    """Messages for ``nodes`` (any message with a destination will do)."""
    messages = [reply(n, None) for n in nodes]
    for msg, node in zip(messages, nodes, strict=True):
        msg.metadata.dst_node_id = node
    return messages


def test_every_reply_is_collected_asking_every_tenth_of_a_second(naps: list[float]) -> None:
    grid = _SuperLink()
    replies = server.rounds._exchange(grid, _to([1, 2, 3]), timeout=60)
    assert sorted(m.metadata.src_node_id for m in replies) == [1, 2, 3]
    assert grid.asks == 3
    assert naps == [server.rounds.REPLY_POLL_S] * 2


def test_the_round_timeout_returns_the_replies_in_so_far(
    naps: list[float], monkeypatch: pytest.MonkeyPatch
) -> None:
    clock = iter([0.0, 0.0, 5.0, 11.0])  # start, after ask 1, after ask 2, after ask 3
    monkeypatch.setattr(server.rounds.time, "monotonic", lambda: next(clock))
    replies = server.rounds._exchange(_SuperLink(), _to([1, 2, 9]), timeout=10)
    assert sorted(m.metadata.src_node_id for m in replies) == [1, 2]


def test_no_message_no_ask() -> None:
    assert server.rounds._exchange(_SuperLink(), [], timeout=10) == []
