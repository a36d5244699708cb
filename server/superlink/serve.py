"""The SuperLink with its planes split: ``python -m server.superlink.serve``.

Flower 1.41's `flower-superlink` serves the Control API (runs, node registration), the Fleet
API (what SuperNodes use) and the Runtime API (what the ServerApp uses) on one port, and account
login is a Flower Enterprise feature. This entry point builds the same FastAPI app with Flower's
own `create_app` and serves it on two uvicorn listeners in one process:

* the public listener (``--host``/``--port``, TLS and node authentication as before) answers
  only the Fleet API's routes and Flower's health check; every other request gets 404 from
  `PublicPlane` before any of Flower's middleware or routes sees it, and at most
  `PUBLIC_CONCURRENCY` Fleet requests are served at once (the rest wait their turn), the
  nodes' heartbeats apart in a lane of their own (`LIVENESS_CONCURRENCY`);
* the control listener (127.0.0.1, ``--control-port``, plaintext on loopback) answers
  everything: the `flwr` command, edufl's own control calls, the SuperExec and the ServerApp.

The SuperExec is started here (not by Flower's lifespan) so that it can be given the Runtime
API's shared secret (``--superexec-auth-secret-file``): Flower ignores that secret when it
starts the SuperExec itself. Its command-line options are `flower-superlink`'s where the
meaning is the same.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import logging
import os
import signal
import subprocess
import sys
from collections.abc import Awaitable, Callable, Iterator, MutableMapping, Sequence
from pathlib import Path
from typing import Any

import uvicorn

from server.institutions import REGISTRY_ENV
from server.superlink.flower_surface import ACTIVATE_NODE_PATH, NODE_HEARTBEAT_PATH
from server.superlink.refusals import NodeRefusals
from shared_models import processes
from shared_models.deployment import exit_unless_pinned_flower

logger = logging.getLogger(__name__)

CONTROL_HOST = "127.0.0.1"
#: Path prefix of the Fleet API, the only one SuperNodes use (flwr/supernode/fleet_http_client).
FLEET_PREFIX = "/v1/fleet/"
#: Flower's health route: answers with no state, so it may face the network.
HEALTH = ("GET", "/health")
GRACEFUL_SHUTDOWN_S = 3
#: Fleet requests the public listener serves at once; more wait in its queue. Flower's routes
#: are synchronous, so every request in progress holds one of the worker threads the process's
#: event loop runs them on (anyio's default limiter: 40 threads, for both listeners). With 50
#: nodes pulling and pushing, their requests took every thread (each waiting up to
#: `BUSY_TIMEOUT_MS` for SQLite's write lock) and the ServerApp's Runtime calls, on the control
#: listener, timed out behind them: Flower failed the run (docs/reliability.md, "Load"). This
#: bound keeps the rest of the threads for the control plane, and fewer writers contend for the
#: lock; a waiting request costs a coroutine, not a thread.
PUBLIC_CONCURRENCY = 16
#: Node heartbeats are served in a lane of their own, with this many at once, never behind the
#: bulk Fleet requests above and their queue: Flower's SuperNode gives up on a heartbeat after
#: 5 s (edufl's node after 15 s: `client.node.heartbeats`), on its other calls after 30 s, so a
#: heartbeat queued behind tens of pushes and pulls is lost where they are not. A heartbeat is
#: one small UPDATE; the lane is bounded too, so a node key that floods heartbeats holds at most
#: these threads. The lane alone did not stop the 50-node load test's losses of 2026-12-03: the
#: loaded process read heartbeats late before they reached any queue; the node's longer wait
#: did (docs/reliability.md, "Load").
LIVENESS_CONCURRENCY = 4

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]
ASGIApp = Callable[[Scope, Receive, Send], Awaitable[None]]

_NOT_FOUND = b'{"detail":"Not Found"}'


def public_routes(app: Any) -> frozenset[tuple[str, str]]:
    """(method, path) of every Fleet API route of the FastAPI ``app``, plus the health check.

    Taken from the app itself, so a Fleet route Flower adds is served without a change here,
    and nothing outside ``/v1/fleet/`` ever is. A route with path parameters would never
    match exactly, so it stays closed until looked at.
    """
    from fastapi.routing import iter_route_contexts

    allowed = {HEALTH}
    for route in iter_route_contexts(app.routes):
        path = route.path
        if path.startswith(FLEET_PREFIX) and "{" not in path:
            allowed.update((method, path) for method in route.methods or ())
    return frozenset(allowed)


class PublicPlane:
    """ASGI filter in front of the public listener: exact Fleet routes pass, the rest is 404.

    Matching is on the exact decoded path Starlette routes by, so no spelling of a Control or
    Runtime path (``/v1/fleet/../control/...``, a trailing slash, ``//``) reaches a route.
    """

    def __init__(
        self,
        app: ASGIApp,
        allowed: frozenset[tuple[str, str]],
        refusals: NodeRefusals | None = None,
        concurrency: int = PUBLIC_CONCURRENCY,
    ) -> None:
        if concurrency < 1:
            raise ValueError(f"concurrency must be at least 1, not {concurrency}")
        self.app = app
        self.allowed = allowed
        self.refusals = refusals
        self.concurrency = concurrency
        self.liveness = frozenset({NODE_HEARTBEAT_PATH.text})
        # Made in the serving loop, on first use: bulk Fleet requests, and node heartbeats.
        self._slots: asyncio.Semaphore | None = None
        self._liveness_slots: asyncio.Semaphore | None = None

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        kind = scope["type"]
        if kind == "http" and (scope["method"], scope["path"]) in self.allowed:
            if self.refusals is not None:  # refused node keys are named in the log
                send = self.refusals.watch(scope, send)
            async with self._lane(scope["path"]):
                await self.app(scope, receive, send)
            return
        if kind == "lifespan":
            return  # the control listener owns the app's lifespan (this one runs with it off)
        client = scope.get("client") or ("?", 0)
        logger.warning(
            "refused %s %s from %s on the public listener (only the Fleet API is public)",
            scope.get("method", kind),
            scope.get("path", ""),
            client[0],
        )
        if kind == "websocket":
            await send({"type": "websocket.close", "code": 1008})
            return
        await send(
            {
                "type": "http.response.start",
                "status": 404,
                "headers": [
                    (b"content-type", b"application/json"),
                    (b"content-length", str(len(_NOT_FOUND)).encode()),
                ],
            }
        )
        await send({"type": "http.response.body", "body": _NOT_FOUND})

    def _lane(self, path: str) -> asyncio.Semaphore:
        """The semaphore a Fleet request waits on: heartbeats never queue behind bulk work."""
        if path in self.liveness:
            if self._liveness_slots is None:
                self._liveness_slots = asyncio.Semaphore(LIVENESS_CONCURRENCY)
            return self._liveness_slots
        if self._slots is None:
            self._slots = asyncio.Semaphore(self.concurrency)
        return self._slots


class _Server(uvicorn.Server):
    """A uvicorn server that leaves signals to `_serve`: two servers in one process would
    otherwise take the handlers from each other and re-raise SIGTERM before cleanup."""

    @contextlib.contextmanager
    def capture_signals(self) -> Iterator[None]:
        yield


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    """The command line; options shared with `flower-superlink` keep its names."""
    parser = argparse.ArgumentParser(
        prog="python -m server.superlink.serve",
        description="Flower's SuperLink with the Fleet API public and Control/Runtime on "
        "loopback only.",
    )
    parser.add_argument("--host", required=True, help="Public listener's address (Fleet API).")
    parser.add_argument("--port", type=int, required=True, help="Public listener's port.")
    parser.add_argument(
        "--control-port",
        type=int,
        required=True,
        help=f"Port of the control listener on {CONTROL_HOST} (Control and Runtime APIs).",
    )
    parser.add_argument("--database", required=True, help="The SuperLink's SQLite file.")
    parser.add_argument("--insecure", action="store_true", help="Public listener in plaintext.")
    parser.add_argument("--ssl-ca-certfile")
    parser.add_argument("--ssl-certfile")
    parser.add_argument("--ssl-keyfile")
    parser.add_argument("--enable-supernode-auth", action="store_true")
    parser.add_argument(
        "--superexec-auth-secret-file",
        required=True,
        help="File with the Runtime API's shared secret (the SuperExec gets it too).",
    )
    parser.add_argument(
        "--disable-runtime-dependency-installation",
        action="store_true",
        help="Accepted for `flower-superlink` parity: this SuperLink never installs packages.",
    )
    args = parser.parse_args(argv)
    tls = (args.ssl_ca_certfile, args.ssl_certfile, args.ssl_keyfile)
    if args.insecure and any(tls):
        parser.error("--insecure excludes the --ssl-* options")
    if not args.insecure and not all(tls):
        parser.error("give --ssl-ca-certfile, --ssl-certfile and --ssl-keyfile, or --insecure")
    if args.insecure and args.enable_supernode_auth:
        parser.error("--enable-supernode-auth needs TLS")
    if args.port == args.control_port and args.host in (CONTROL_HOST, "0.0.0.0", "::", ""):
        parser.error("--port and --control-port must differ")
    return args


def build_app(args: argparse.Namespace) -> Any:
    """Flower's SuperLink FastAPI app, configured as `flower-superlink` would be."""
    # Flower's internals, imported here so that `--help` and the filter need none of them.
    from flwr.common.constant import ISOLATION_MODE_PROCESS, TRANSPORT_TYPE_GRPC_RERE
    from flwr.supercore.auth import load_superexec_auth_secret
    from flwr.superlink.cli.flower_superlink import SuperLinkLifespan
    from flwr.superlink.config_loader import SuperLinkLifespanConfig, load_control_authn_plugin
    from flwr.superlink.main import create_app

    _lengthen_busy_timeout()
    _lengthen_task_patience()
    certificates = None
    if not args.insecure:
        certificates = tuple(
            Path(p).read_bytes()
            for p in (args.ssl_ca_certfile, args.ssl_certfile, args.ssl_keyfile)
        )
    config = SuperLinkLifespanConfig(
        control_address=f"{CONTROL_HOST}:{args.control_port}",  # unused: no gRPC Control API
        health_server_address=None,
        host=CONTROL_HOST,
        port=args.control_port,
        insecure=args.insecure,
        certificates=certificates,  # type: ignore[arg-type]
        superexec_auth_secret=load_superexec_auth_secret(args.superexec_auth_secret_file),
        authn_plugin=load_control_authn_plugin(),
        event_log_plugin=None,
        fleet_event_log_plugin=None,
        enable_event_log=False,
        artifact_provider=None,
        enable_supernode_auth=args.enable_supernode_auth,
        fleet_api_type=TRANSPORT_TYPE_GRPC_RERE,
        fleet_api_address=None,
        simulation=False,
        ssl_ca_certfile=args.ssl_ca_certfile,
        ssl_certfile=args.ssl_certfile,
        ssl_keyfile=args.ssl_keyfile,
        database=args.database,
        # "process": Flower's lifespan leaves the SuperExec to us (see the module docstring).
        isolation=ISOLATION_MODE_PROCESS,
        runtime_dependency_install=False,
    )
    return create_app(config, SuperLinkLifespan)


#: How long a SuperLink database connection waits for SQLite's write lock before failing with
#: "database is locked". Flower sets 5 s; with tens of nodes polling on a loaded machine the
#: lock is held longer than that and Flower failed whole runs (docs/reliability.md, "Load").
BUSY_TIMEOUT_MS = 30_000


def _lengthen_busy_timeout() -> None:
    """Set SQLite's busy timeout of every SuperLink connection to `BUSY_TIMEOUT_MS`.

    Flower applies its ``SQLITE_PRAGMAS`` (WAL journal, a 5 s busy timeout, ...) on each new
    connection from the module global of ``flwr.supercore.sql_mixin``; replacing the timeout
    there, before the app opens its database, keeps every other pragma as Flower sets it.
    """
    from flwr.supercore import sql_mixin

    pragmas = tuple(sql_mixin.SQLITE_PRAGMAS)
    if not any(name == "busy_timeout" for name, _ in pragmas):
        raise RuntimeError("Flower no longer sets SQLite's busy_timeout; see flower_surface.py")
    sql_mixin.SQLITE_PRAGMAS = tuple(  # type: ignore[attr-defined]
        (name, str(BUSY_TIMEOUT_MS) if name == "busy_timeout" else value) for name, value in pragmas
    )


#: Heartbeats the ServerApp's task may miss before Flower fails the whole run ("No heartbeat
#: received from the task"): Flower tolerates 2 x 30 s. While tens of nodes start on a loaded
#: machine the ServerApp's heartbeat waits behind their requests for longer, and Flower failed
#: a 50-node run it would have finished (docs/reliability.md, "Load"). A dead ServerApp is still
#: noticed, after 3 minutes.
TASK_HEARTBEAT_PATIENCE = 6


def _lengthen_task_patience() -> None:
    """Let the ServerApp's task miss `TASK_HEARTBEAT_PATIENCE` - 1 heartbeats, not 1.

    Flower's SQL core state reads ``HEARTBEAT_PATIENCE`` from its module globals when it
    expires task claims; nodes' heartbeats (the link state) keep Flower's patience.
    """
    from flwr.supercore.corestate import sql_corestate

    if not hasattr(sql_corestate, "HEARTBEAT_PATIENCE"):
        raise RuntimeError("Flower's task expiry changed; see flower_surface.py")
    sql_corestate.HEARTBEAT_PATIENCE = TASK_HEARTBEAT_PATIENCE  # type: ignore[attr-defined]


def superexec_argv(control_port: int, secret_file: str, parent_pid: int) -> list[str]:
    """The SuperExec's command line: it runs the ServerApp, reaching Runtime on loopback."""
    return [
        processes.executable("flower-superexec"),
        "--insecure",  # loopback only: see docs/security.md
        "--runtime-api-address",
        f"{CONTROL_HOST}:{control_port}",
        "--superexec-auth-secret-file",
        secret_file,
        "--parent-pid",
        str(parent_pid),
    ]


async def _serve(
    control: uvicorn.Server, public: uvicorn.Server, start_superexec: Callable[[], object]
) -> int:
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    control_task = asyncio.ensure_future(control.serve())
    # The public listener opens only once the app's lifespan has started (database open).
    while not control.started and not control_task.done():
        await asyncio.sleep(0.05)
    if not control.started:
        await control_task
        logger.error("the control listener did not start")
        return 1
    start_superexec()
    public_task = asyncio.ensure_future(public.serve())
    stopping = asyncio.ensure_future(stop.wait())
    await asyncio.wait({stopping, control_task, public_task}, return_when=asyncio.FIRST_COMPLETED)
    code = 0 if stop.is_set() else 1
    if code:
        logger.error("a listener stopped on its own; shutting the SuperLink down")
    control.should_exit = public.should_exit = True
    stopping.cancel()
    await asyncio.gather(control_task, public_task, return_exceptions=True)
    return code


def main(argv: Sequence[str] | None = None) -> int:
    """Serve until SIGTERM/SIGINT; the exit code is 0 after a requested stop."""
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    exit_unless_pinned_flower()  # the names below and in `build_app` are Flower 1.41.0's
    from flwr.supercore.constant import FLEET_HTTP_PUBLIC_KEY_HEADER
    from flwr.supercore.error import ApiErrorCode
    from flwr.supercore.http_logging import get_uvicorn_log_config
    from flwr.supercore.logger import console_handler

    app = build_app(args)
    log_config = get_uvicorn_log_config(console_handler.level)
    common: dict[str, Any] = {
        "access_log": True,
        "log_config": log_config,
        "timeout_graceful_shutdown": GRACEFUL_SHUTDOWN_S,
    }
    control = _Server(
        uvicorn.Config(app, host=CONTROL_HOST, port=args.control_port, lifespan="on", **common)
    )
    tls = (
        {}
        if args.insecure
        else {"ssl_certfile": args.ssl_certfile, "ssl_keyfile": args.ssl_keyfile}
    )
    registry = os.environ.get(REGISTRY_ENV)
    refusals = NodeRefusals(
        Path(registry) if registry else None,
        key_header=FLEET_HTTP_PUBLIC_KEY_HEADER,
        activate_path=ACTIVATE_NODE_PATH.text,
        activation_failed=ApiErrorCode.FLEET_NODE_ACTIVATION_FAILED,
    )
    public_app = PublicPlane(app, public_routes(app), refusals)
    public = _Server(
        uvicorn.Config(public_app, host=args.host, port=args.port, lifespan="off", **common, **tls)
    )
    superexec: list[subprocess.Popen[bytes]] = []

    def start_superexec() -> None:
        argv = superexec_argv(args.control_port, args.superexec_auth_secret_file, os.getpid())
        superexec.append(subprocess.Popen(argv, stdin=subprocess.DEVNULL))
        logger.info("started the SuperExec (pid %d)", superexec[0].pid)

    # `tests/deploy/harness.py` reads the control port from this line.
    logger.info(
        "control plane on http://%s:%d (Control, Runtime APIs); public plane on %s:%d "
        "(Fleet API only, %s)",
        CONTROL_HOST,
        args.control_port,
        args.host,
        args.port,
        "plaintext" if args.insecure else "TLS",
    )
    try:
        return asyncio.run(_serve(control, public, start_superexec))
    finally:
        for child in superexec:
            child.terminate()
            try:
                child.wait(timeout=GRACEFUL_SHUTDOWN_S)
            except subprocess.TimeoutExpired:
                child.kill()


if __name__ == "__main__":
    sys.exit(main())
