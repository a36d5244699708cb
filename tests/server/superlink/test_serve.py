"""The public listener's path filter: only the Fleet API (and the health check) gets through."""

from __future__ import annotations

import re
import socket
from pathlib import Path
from typing import Any

import flwr.supernode.fleet_http_client as fleet_http_client
import pytest
from fastapi.routing import iter_route_contexts
from starlette.testclient import TestClient

from server.superlink.launcher import ServerLayout, start_superlink, superlink_argv
from server.superlink.serve import PublicPlane, build_app, parse_args, public_routes
from shared_models import processes
from shared_models.processes import DeploymentError


@pytest.fixture(scope="module")
def flower_app(tmp_path_factory: pytest.TempPathFactory) -> Any:
    root = tmp_path_factory.mktemp("serve")
    secret = root / "runtime.secret"
    secret.write_bytes(b"s" * 32)
    listeners = ["--insecure", "--host", "127.0.0.1", "--port", "1", "--control-port", "2"]
    files = ["--database", str(root / "superlink.db"), "--superexec-auth-secret-file", str(secret)]
    args = parse_args([*listeners, *files])
    return build_app(args)


def _supernode_paths() -> set[str]:
    source = Path(fleet_http_client.__file__).read_text()
    return set(re.findall(r'path="(/[^"]+)"', source))


def test_the_public_routes_are_exactly_flowers_fleet_routes_and_cover_the_supernode(
    flower_app: Any,
) -> None:
    allowed = public_routes(flower_app)
    fleet = {path for _, path in allowed if path != "/health"}
    assert all(path.startswith("/v1/fleet/") for path in fleet)
    # Every path a SuperNode calls is let through; nothing of Control or Runtime is.
    assert _supernode_paths() and _supernode_paths() <= fleet
    all_paths = {r.path for r in iter_route_contexts(flower_app.routes)}
    assert any(p.startswith("/v1/control/") for p in all_paths)
    assert any(p.startswith("/v1/runtime/") for p in all_paths)


def _recording_app(calls: list[str]) -> Any:
    async def app(scope: Any, receive: Any, send: Any) -> None:
        calls.append(scope["path"])
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": b"ok"})

    return app


@pytest.mark.parametrize(
    ("method", "path"),
    [
        ("POST", "/v1/control/start-run"),
        ("POST", "/v1/control/register-node"),
        ("POST", "/v1/control/list-runs"),
        ("POST", "/v1/runtime/acquire-task"),
        ("POST", "/v1/runtime/pull-task-input"),
        ("GET", "/docs"),
        ("GET", "/openapi.json"),
        ("GET", "/"),
        ("GET", "/v1/fleet/pull-messages"),  # right path, wrong method
        ("POST", "/v1/fleet/pull-messages/"),
        ("POST", "/v1/fleet//pull-messages"),
        ("POST", "/v1/fleet/../control/start-run"),
        ("POST", "/v1/fleet/%2e%2e/control/start-run"),
        ("POST", "/V1/FLEET/pull-messages"),
        ("POST", "/health"),
    ],
)
def test_the_filter_answers_404_to_anything_but_a_fleet_route_and_passes_nothing_on(
    method: str, path: str, caplog: pytest.LogCaptureFixture
) -> None:
    calls: list[str] = []
    allowed = frozenset({("POST", "/v1/fleet/pull-messages"), ("GET", "/health")})
    client = TestClient(PublicPlane(_recording_app(calls), allowed))
    # Whatever spelling reaches the app (httpx removes plain dot segments, not encoded ones).
    reply = client.request(method, "http://testserver" + path)
    assert reply.status_code == 404
    assert calls == []
    assert "refused" in caplog.text and "only the Fleet API is public" in caplog.text


def test_the_filter_passes_fleet_routes_and_the_health_check() -> None:
    calls: list[str] = []
    allowed = frozenset({("POST", "/v1/fleet/pull-messages"), ("GET", "/health")})
    client = TestClient(PublicPlane(_recording_app(calls), allowed))
    assert client.post("/v1/fleet/pull-messages").status_code == 200
    assert client.get("/health").status_code == 200
    assert calls == ["/v1/fleet/pull-messages", "/health"]


def test_a_fleet_route_reaches_flower_through_the_filter_and_control_does_not(
    flower_app: Any,
) -> None:
    client = TestClient(PublicPlane(flower_app, public_routes(flower_app)))
    assert client.get("/health").status_code == 200
    # Flower answers (an error about the empty body), not the filter's 404.
    assert client.post("/v1/fleet/get-run", content=b"").status_code != 404
    assert client.post("/v1/control/list-runs", content=b"").status_code == 404


def test_the_superlink_command_line_splits_the_planes_and_sets_the_runtime_secret(
    tmp_path: Path,
) -> None:
    layout = ServerLayout(tmp_path)
    argv = superlink_argv(layout, "0.0.0.0", 9999, None, 9100)
    joined = " ".join(argv)
    assert "-m server.superlink.serve" in joined
    assert "--host 0.0.0.0 --port 9999 --control-port 9100" in joined
    assert f"--superexec-auth-secret-file {layout.runtime_secret}" in joined
    args = parse_args(argv[3:])
    assert (args.host, args.port, args.control_port) == ("0.0.0.0", 9999, 9100)


@pytest.mark.parametrize(
    "extra",
    [
        ["--insecure", "--enable-supernode-auth"],
        ["--ssl-certfile", "x.pem"],
        ["--insecure", "--ssl-certfile", "x.pem"],
    ],
)
def test_the_entry_point_refuses_inconsistent_tls_options(extra: list[str]) -> None:
    base = ["--host", "127.0.0.2", "--port", "1", "--control-port", "2", "--database", "db"]
    with pytest.raises(SystemExit):
        parse_args([*base, "--superexec-auth-secret-file", "s", *extra])


def test_a_taken_control_port_is_a_user_error_before_anything_starts(tmp_path: Path) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        public = f"127.0.0.1:{processes.free_port()}"
        with pytest.raises(DeploymentError, match=f"control port {port} on 127.0.0.1 is in use"):
            start_superlink(ServerLayout(tmp_path), public, None, control_port=port)
    assert not (tmp_path / "server.json").exists()


def test_superlink_connections_wait_longer_for_sqlite_s_lock(
    flower_app: Any, tmp_path: Path
) -> None:
    """Flower's own per-connection hook, after build_app, sets edufl's busy timeout (and WAL)."""
    from flwr.supercore import sql_mixin
    from sqlalchemy import create_engine, event, text

    from server.superlink.serve import BUSY_TIMEOUT_MS

    engine = create_engine(f"sqlite:///{tmp_path / 'state.db'}")
    event.listen(engine, "connect", sql_mixin._set_sqlite_pragmas)
    with engine.connect() as conn:
        assert conn.execute(text("PRAGMA busy_timeout")).scalar() == BUSY_TIMEOUT_MS
        assert conn.execute(text("PRAGMA journal_mode")).scalar() == "wal"
    engine.dispose()


def test_the_serverapp_task_may_miss_more_heartbeats_than_flowers_default(
    flower_app: Any,
) -> None:
    from flwr.common.constant import HEARTBEAT_PATIENCE
    from flwr.supercore.corestate import sql_corestate

    from server.superlink.serve import TASK_HEARTBEAT_PATIENCE

    assert sql_corestate.HEARTBEAT_PATIENCE == TASK_HEARTBEAT_PATIENCE > HEARTBEAT_PATIENCE


class _HeldApp:
    """An ASGI app that holds every request until ``release`` is set; the most held at once."""

    def __init__(self) -> None:
        import asyncio

        self.inside = self.most = 0
        self.release = asyncio.Event()

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        self.inside += 1
        self.most = max(self.most, self.inside)
        await self.release.wait()
        self.inside -= 1
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": b""})


async def _post(plane: PublicPlane, path: str) -> int:
    """POST ``path`` through ``plane`` as an ASGI server would; the response's status."""
    statuses: list[int] = []

    async def receive() -> dict[str, Any]:
        return {"type": "http.request", "body": b"", "more_body": False}

    async def send(message: dict[str, Any]) -> None:
        if message["type"] == "http.response.start":
            statuses.append(message["status"])

    scope = {"type": "http", "method": "POST", "path": path, "client": ("127.0.0.9", 1)}
    await plane(scope, receive, send)
    return statuses[0]


def test_the_public_listener_serves_at_most_its_concurrency_at_once_and_queues_the_rest() -> None:
    """50 nodes' Fleet requests must not take every worker thread from the control plane."""
    import asyncio

    slow_fleet = _HeldApp()
    path = "/v1/fleet/pull-messages"
    plane = PublicPlane(slow_fleet, frozenset({("POST", path)}), concurrency=3)

    async def request(target: str) -> int:
        return await _post(plane, target)

    async def scenario() -> tuple[list[int], int, int]:
        fleet = [asyncio.ensure_future(request(path)) for _ in range(10)]
        await asyncio.sleep(0.05)
        queued_most = slow_fleet.most
        # A refused request is answered at once, even while every slot is taken.
        refused = await asyncio.wait_for(request("/v1/control/start-run"), timeout=1)
        slow_fleet.release.set()
        return list(await asyncio.gather(*fleet)), queued_most, refused

    statuses, queued_most, refused = asyncio.run(scenario())
    assert queued_most == 3 and slow_fleet.most == 3
    assert statuses == [200] * 10
    assert refused == 404


def test_the_public_listener_needs_a_positive_concurrency() -> None:
    with pytest.raises(ValueError, match="at least 1"):
        PublicPlane(_recording_app([]), frozenset(), concurrency=0)


def test_a_node_heartbeat_is_served_while_every_fleet_slot_is_taken_and_others_queue() -> None:
    """A heartbeat stuck behind bulk traffic made the SuperLink declare busy nodes gone.

    The 50-node load test of 2026-12-03 lost 243 of 500 updates: requests waited tens of
    seconds for a Fleet slot, the nodes' heartbeats (5 s call timeout) with them, and after
    2 x 30 s without one the SuperLink answered the round's messages with Node Unavailable.
    A heartbeat has a lane of its own: it is answered while the bulk slots are all held.
    """
    import asyncio

    from server.superlink.flower_surface import NODE_HEARTBEAT_PATH

    release = asyncio.Event()
    served: list[str] = []

    async def fleet(scope: Any, receive: Any, send: Any) -> None:
        if scope["path"] != NODE_HEARTBEAT_PATH.text:
            await release.wait()
        served.append(scope["path"])
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": b""})

    bulk = "/v1/fleet/push-object"
    routes = frozenset({("POST", bulk), ("POST", NODE_HEARTBEAT_PATH.text)})
    plane = PublicPlane(fleet, routes, concurrency=2)

    async def request(target: str) -> int:
        return await _post(plane, target)

    async def scenario() -> list[int]:
        pushes = [asyncio.ensure_future(request(bulk)) for _ in range(8)]
        await asyncio.sleep(0.05)  # 2 pushes hold the slots, 6 wait
        beats = [await asyncio.wait_for(request(NODE_HEARTBEAT_PATH.text), 1) for _ in range(3)]
        assert served == [NODE_HEARTBEAT_PATH.text] * 3  # before any push
        release.set()
        await asyncio.gather(*pushes)
        return beats

    assert asyncio.run(scenario()) == [200] * 3
    assert served.count(bulk) == 8


def test_the_heartbeat_lane_is_bounded_too() -> None:
    """A node key flooding heartbeats holds at most the lane's slots, not every thread."""
    import asyncio

    from server.superlink.flower_surface import NODE_HEARTBEAT_PATH
    from server.superlink.serve import LIVENESS_CONCURRENCY

    fleet = _HeldApp()
    plane = PublicPlane(fleet, frozenset({("POST", NODE_HEARTBEAT_PATH.text)}), concurrency=16)

    async def request() -> None:
        await _post(plane, NODE_HEARTBEAT_PATH.text)

    async def scenario() -> int:
        beats = [asyncio.ensure_future(request()) for _ in range(3 * LIVENESS_CONCURRENCY)]
        await asyncio.sleep(0.05)
        held = fleet.most
        fleet.release.set()
        await asyncio.gather(*beats)
        return held

    assert asyncio.run(scenario()) == LIVENESS_CONCURRENCY < 16
