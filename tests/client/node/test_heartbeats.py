"""The SuperNode's heartbeat waits long enough for a loaded SuperLink's answer."""

from __future__ import annotations

import threading
import time
import types
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import ClassVar

import httpx
import pytest
from flwr.proto.heartbeat_pb2 import (  # pylint: disable=E0611
    SendNodeHeartbeatRequest,
    SendNodeHeartbeatResponse,
)
from flwr.proto.node_pb2 import Node  # pylint: disable=E0611
from flwr.supercore import heartbeat
from flwr.supernode import fleet_http_client
from flwr.supernode.fleet_http_client import FleetHttpClient

from client.node import heartbeats

#: Seconds the stand-in SuperLink takes to answer: longer than Flower's 5 s heartbeat wait.
LATE_S = 6.0


class _LateFleet(BaseHTTPRequestHandler):
    """Answers a node heartbeat as Flower's Fleet API does, ``LATE_S`` late; records it."""

    read: ClassVar[list[str]] = []

    def do_POST(self) -> None:
        body = self.rfile.read(int(self.headers["content-length"]))
        time.sleep(LATE_S)
        request = SendNodeHeartbeatRequest()
        request.ParseFromString(body)
        answer = SendNodeHeartbeatResponse(success=True).SerializeToString()
        try:
            self.send_response(200)
            self.send_header("content-type", "application/protobuf")
            self.send_header("content-length", str(len(answer)))
            self.end_headers()
            self.wfile.write(answer)
        except OSError:
            return  # the node gave up first: the heartbeat does not count
        _LateFleet.read.append(f"{self.path} node {request.node.node_id}")

    def log_message(self, *_args: object) -> None:
        pass


@pytest.fixture
def late_fleet() -> Iterator[str]:
    server = ThreadingHTTPServer(("127.0.0.1", 0), _LateFleet)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    _LateFleet.read = []
    try:
        yield f"127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()
        thread.join(10)


def _beat(address: str) -> SendNodeHeartbeatResponse:
    with FleetHttpClient.from_server_address(address, True, None, interceptors=[]) as client:
        return client.SendNodeHeartbeat(
            SendNodeHeartbeatRequest(node=Node(node_id=7), heartbeat_interval=30)
        )


@pytest.fixture
def flowers_timeouts(monkeypatch: pytest.MonkeyPatch) -> None:
    """Flower's own 5 s in both modules, put back after the test whatever it installs."""
    monkeypatch.setattr(fleet_http_client, "HEARTBEAT_CALL_TIMEOUT", 5)
    monkeypatch.setattr(heartbeat, "HEARTBEAT_CALL_TIMEOUT", 5)


def test_a_heartbeat_answered_late_counts_once_installed(
    late_fleet: str, flowers_timeouts: None
) -> None:
    assert heartbeats.install(fleet_http_client, heartbeat)
    assert _beat(late_fleet).success
    assert _LateFleet.read == ["/v1/fleet/send-node-heartbeat node 7"]


@pytest.mark.slow
def test_flowers_own_wait_gives_up_on_that_heartbeat(
    late_fleet: str, flowers_timeouts: None
) -> None:
    """What the installed wait is for: Flower's node gives up after 5 s (the attack's premise)."""
    with pytest.raises(httpx.ReadTimeout):
        _beat(late_fleet)
    time.sleep(LATE_S - 5 + 0.5)
    assert _LateFleet.read == []


def test_installed_heartbeats_are_spaced_to_fit_the_longer_wait(flowers_timeouts: None) -> None:
    assert heartbeats.install(fleet_http_client, heartbeat)
    assert fleet_http_client.HEARTBEAT_CALL_TIMEOUT == heartbeats.CALL_TIMEOUT_S
    assert heartbeat.HEARTBEAT_CALL_TIMEOUT == heartbeats.CALL_TIMEOUT_S
    # Flower's sender: next = (interval - timeout) x (0.8 +- 0.1); three tries or more in the
    # SuperLink's 2 x 30 s, each allowed the whole wait.
    gap = heartbeat.HEARTBEAT_DEFAULT_INTERVAL - heartbeat.HEARTBEAT_CALL_TIMEOUT
    assert gap * 0.7 >= 10 and gap * 0.9 + heartbeats.CALL_TIMEOUT_S <= 30


def test_install_changes_nothing_where_flower_lacks_the_name(flowers_timeouts: None) -> None:
    elsewhere = types.ModuleType("not_flowers_heartbeat")
    assert not heartbeats.install(fleet_http_client, elsewhere)
    assert fleet_http_client.HEARTBEAT_CALL_TIMEOUT == 5
    with pytest.raises(ValueError, match="heartbeat timeout"):
        heartbeats.install(fleet_http_client, timeout=20)
