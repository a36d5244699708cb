"""The warm executor counts the messages its SuperNode announces, once each, even when an
announcement is split across two reads; a relayed line reaches the node's log unchanged."""

from __future__ import annotations

import os

import pytest

from client.node import warm_exec


@pytest.fixture
def relay_pipe(monkeypatch: pytest.MonkeyPatch) -> tuple[warm_exec._Relay, int, list[bytes]]:
    read_fd, write_fd = os.pipe()
    copied: list[bytes] = []
    monkeypatch.setattr(warm_exec, "_write_all", lambda _fd, data: copied.append(data))
    return warm_exec._Relay(read_fd), write_fd, copied


def test_each_announcement_counts_once_split_or_not(
    relay_pipe: tuple[warm_exec._Relay, int, list[bytes]],
) -> None:
    relay, write_fd, copied = relay_pipe
    hint = warm_exec._HINT
    assert hint == b"Received successfully"  # once the message's objects are all in
    os.write(write_fd, b"INFO :      Receiving: train message (ID: ab)\n")
    assert relay.pump(0.5) == 0  # announced, but its objects are still arriving
    os.write(write_fd, b"INFO :      " + hint[:9])
    assert relay.pump(0.5) == 0
    os.write(write_fd, hint[9:] + b"\nINFO :      " + hint + b"\n")
    assert relay.pump(0.5) == 2
    os.write(write_fd, b"INFO :      Sending: train message\n")
    assert relay.pump(0.5) == 0  # the tail's announcement is not counted again
    assert relay.hints == 2
    assert b"".join(copied).count(hint) == 2
    os.close(write_fd)
    assert relay.pump(0.5) == 0 and not relay.open
