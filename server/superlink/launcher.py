"""The consortium server as deployed: a SuperLink with TLS and node authentication, and the run.

Everything the server keeps lives in one state folder::

    STATE/institutions.toml   enrolled institutions (see `server.institutions`)
    STATE/superlink.db        the SuperLink's SQLite state: registered nodes, runs
    STATE/flwr-home/          FLWR_HOME: the `flwr` connection, apps the SuperLink unpacked
    STATE/app/pyproject.toml  the Flower app submitted as the run (components + run config)
    STATE/enrolled/NAME.pub   public keys as registered with the SuperLink
    STATE/logs/superlink.log  the SuperLink's log
    STATE/server.json         pid and addresses while a server runs (`edufl server enrol` reads it)
    STATE/runtime.secret      the Runtime API's shared secret, new at every start (0600)

The SuperLink is Flower's, run by `server.superlink.serve` with its planes split: the public
``--address`` answers only the nodes' Fleet API; the Control and Runtime APIs (``flwr``, the
ServerApp) listen on 127.0.0.1 only, at the port in ``server.json`` and ``flwr-home``.

The app folder holds only a ``pyproject.toml``: its components name ``server.app:app`` and
``client.app:app``, which the SuperLink and every SuperNode import from their own installed
edufl. That is also why the SuperLink runs with runtime dependency installation disabled.
"""

from __future__ import annotations

import json
import logging
import os
import sys
import time
from collections.abc import Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import tomli_w

from privacy.keys import (
    ConsortiumKeys,
    KeyMaterialError,
    check_server_certificate,
    write_private,
    write_public,
)
from server.institutions import (
    REGISTRY_ENV,
    REGISTRY_FILE,
    Registry,
    load_registry,
    private_dir,
    save_registry,
)
from server.superlink.control import FINISHED, FlowerControl, write_connection
from shared_models import processes
from shared_models.deployment import check_flower_version, check_insecure_address
from shared_models.processes import Child, DeploymentError

logger = logging.getLogger(__name__)

SERVERAPP = "server.app:app"
CLIENTAPP = "client.app:app"
DEFAULT_ADDRESS = "127.0.0.1:8000"  # Flower's own default port for the SuperLink
#: The control plane (Control and Runtime APIs) listens on loopback only.
CONTROL_HOST = "127.0.0.1"
SERVE_MODULE = "server.superlink.serve"


@dataclass(frozen=True)
class ServerLayout:
    """Paths inside a server's state folder."""

    state_dir: Path

    @property
    def database(self) -> Path:
        return self.state_dir / "superlink.db"

    @property
    def flwr_home(self) -> Path:
        return self.state_dir / "flwr-home"

    @property
    def app_dir(self) -> Path:
        return self.state_dir / "app"

    @property
    def enrolled_dir(self) -> Path:
        return self.state_dir / "enrolled"

    @property
    def superlink_log(self) -> Path:
        return self.state_dir / "logs" / "superlink.log"

    @property
    def runtime_secret(self) -> Path:
        return self.state_dir / "runtime.secret"

    @property
    def server_file(self) -> Path:
        return self.state_dir / "server.json"

    def control(self, timeout: float = 300.0) -> FlowerControl:
        """A `FlowerControl` for the SuperLink this state folder's server runs."""
        return FlowerControl(self.flwr_home, timeout=timeout)


def superlink_argv(
    layout: ServerLayout,
    host: str,
    port: int,
    keys: ConsortiumKeys | None,
    control_port: int | None = None,
) -> list[str]:
    """The SuperLink's command line; ``keys=None`` means plaintext (``--insecure``).

    `server.superlink.serve` runs Flower's SuperLink app with the Fleet API alone on
    ``host:port`` and the Control and Runtime APIs on 127.0.0.1:``control_port`` (a free port
    when None); the options it shares with `flower-superlink` keep their names.
    """
    argv = [sys.executable, "-m", SERVE_MODULE]
    if keys is None:
        argv.append("--insecure")
    else:
        argv += [
            "--ssl-ca-certfile",
            str(keys.ca_cert.resolve()),
            "--ssl-certfile",
            str(keys.server_cert.resolve()),
            "--ssl-keyfile",
            str(keys.server_key.resolve()),
            # Node authentication needs TLS: only enrolled institutions' nodes are let in.
            "--enable-supernode-auth",
        ]
    if control_port is None:
        control_port = processes.free_port(CONTROL_HOST)
    return [
        *argv,
        "--database",
        str(layout.database.resolve()),
        # Otherwise the SuperLink tries to `uv sync` the app's dependencies from the internet.
        "--disable-runtime-dependency-installation",
        "--host",
        host,
        "--port",
        str(port),
        "--control-port",
        str(control_port),
        # The Runtime API lets only a SuperExec holding this secret take the ServerApp's task.
        "--superexec-auth-secret-file",
        str(layout.runtime_secret.resolve()),
    ]


def check_keys(keys_dir: Path) -> ConsortiumKeys:
    """The consortium key files in ``keys_dir``; a user error naming any that is missing."""
    keys = ConsortiumKeys.in_dir(keys_dir)
    missing = [p for p in (keys.ca_cert, keys.server_cert, keys.server_key) if not p.is_file()]
    if missing:
        raise KeyMaterialError(
            f"missing {', '.join(str(p) for p in missing)}; create them with "
            f"`edufl server keys init --dir {keys_dir}` (or pass --insecure for plaintext)"
        )
    check_server_certificate(keys_dir)  # an expired one: refused, with the renew command
    return keys


def running_server(layout: ServerLayout) -> dict[str, object] | None:
    """What ``server.json`` says about a server still running from this state folder, if any.

    A file left by a crashed server is ignored: its process must exist and its port answer.
    """
    try:
        info = json.loads(layout.server_file.read_text("utf-8"))
        os.kill(int(info["pid"]), 0)
        host, port = processes.split_address(str(info["address"]))
    except (OSError, ValueError, KeyError, TypeError, DeploymentError):
        return None
    return dict(info) if processes.port_open(host, port) else None


def start_superlink(
    layout: ServerLayout,
    address: str,
    keys: ConsortiumKeys | None,
    *,
    control_port: int | None = None,
    ready_timeout: float = 60.0,
) -> Child:
    """Start the SuperLink for ``layout`` and wait until both its listeners accept connections.

    Args:
        layout: The server's state folder.
        address: ``host:port`` of the public listener: the Fleet API alone, for the nodes.
        keys: Consortium keys for TLS and node authentication; None for plaintext.
        control_port: Port of the control plane (Control and Runtime APIs) on 127.0.0.1;
            a free port when None. edufl's `flwr` connection points there.
        ready_timeout: Seconds to wait for the listeners.
    """
    host, port = processes.split_address(address)
    check_flower_version()
    if keys is None:
        check_insecure_address(host, "--address")
    if running_server(layout) is not None:
        raise DeploymentError(
            f"a server from {layout.state_dir} is running already "
            f"(see {layout.server_file}); stop it first"
        )
    client_host = CONTROL_HOST if host in ("0.0.0.0", "::", "") else host
    if processes.port_open(client_host, port):
        raise DeploymentError(f"port {port} on {client_host} is in use; choose another --address")
    if control_port is None:
        control_port = processes.free_port(CONTROL_HOST)
    elif processes.port_open(CONTROL_HOST, control_port):
        raise DeploymentError(
            f"control port {control_port} on {CONTROL_HOST} is in use; choose another"
        )
    # The state folder holds the node registry, the run database and logs: the operator's only.
    private_dir(layout.state_dir)
    private_dir(layout.superlink_log.parent)
    for private_file in (layout.database, layout.superlink_log):
        # Created 0600 before Flower opens them (SQLite gives its journals the same mode).
        os.close(os.open(private_file, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600))
        private_file.chmod(0o600)
    # A new Runtime API secret at every start; only this SuperLink's SuperExec reads it.
    write_private(layout.runtime_secret, os.urandom(32))
    # Loopback only, so plaintext: a local user who could read it could connect anyway.
    write_connection(layout.flwr_home, f"{CONTROL_HOST}:{control_port}", None)
    env = processes.flower_env(layout.flwr_home)
    # The ServerApp's update guard names each node by the key it enrolled with.
    env[REGISTRY_ENV] = str((layout.state_dir / REGISTRY_FILE).resolve())
    child = processes.start(
        "SuperLink",
        superlink_argv(layout, host, port, keys, control_port),
        log_path=layout.superlink_log,
        env=env,
        cwd=layout.state_dir,
    )
    try:
        # The public listener opens after the control one: when it answers, both do.
        processes.wait_until_listening(child, client_host, port, timeout=ready_timeout)
    except BaseException:
        processes.stop(child)
        raise
    info = {
        "pid": child.pid,
        "address": f"{client_host}:{port}",
        "control": f"{CONTROL_HOST}:{control_port}",
        "tls": keys is not None,
    }
    write_private(layout.server_file, json.dumps(info).encode())
    return child


def control_address(layout: ServerLayout) -> str:
    """``127.0.0.1:PORT`` of the control plane of the server running from ``layout``."""
    try:
        return str(json.loads(layout.server_file.read_text("utf-8"))["control"])
    except (OSError, ValueError, KeyError) as error:
        raise DeploymentError(
            f"no running server in {layout.state_dir} ({layout.server_file}: {error})"
        ) from None


def stop_superlink(layout: ServerLayout, child: Child) -> None:
    """Stop the SuperLink (and its SuperExec and ServerApp processes); forget ``server.json``."""
    processes.stop(child)
    layout.server_file.unlink(missing_ok=True)


def register_institutions(layout: ServerLayout, registry: Registry) -> Registry:
    """Register every enrolled institution's key with the running SuperLink (idempotent)."""
    layout.enrolled_dir.mkdir(parents=True, exist_ok=True)
    control = layout.control()
    key_files = {}
    for name, entry in registry.institutions.items():
        key_files[name] = layout.enrolled_dir / f"{name}.pub"
        write_public(key_files[name], f"{entry.public_key} edufl:{name}\n".encode())
    # Each `flwr` call spends seconds starting Python; the SuperLink handles them concurrently.
    with ThreadPoolExecutor(max_workers=4) as pool:
        replies = pool.map(control.register_node, key_files.values(), key_files)
        node_ids = dict(zip(key_files, replies, strict=True))
    for name, node_id in node_ids.items():
        if node_id is not None:
            registry = registry.with_node_id(name, node_id)
            logger.info("registered %s as node %s", name, node_id)
    save_registry(layout.state_dir, registry)
    return registry


def write_app(layout: ServerLayout, run_config: Mapping[str, bool | int | float | str]) -> Path:
    """Write the Flower app definition the run is submitted from; returns its folder."""
    pyproject = {
        "project": {
            "name": "edufl-federation",
            "version": "1.0.0",
            "description": "edufl federated training run",
            "license": "Apache-2.0",
        },
        "tool": {
            "flwr": {
                "app": {
                    "publisher": "edufl",
                    "components": {"serverapp": SERVERAPP, "clientapp": CLIENTAPP},
                    "config": dict(run_config),
                }
            }
        },
    }
    layout.app_dir.mkdir(parents=True, exist_ok=True)
    write_public(layout.app_dir / "pyproject.toml", tomli_w.dumps(pyproject).encode())
    return layout.app_dir


def stop_unfinished_runs(layout: ServerLayout) -> list[str]:
    """Stop runs an earlier server left unfinished; returns their ids.

    The SuperLink keeps runs in its database and starts a pending one again when it restarts,
    which would put a second ServerApp to work on the same run folder.
    """
    control = layout.control()
    stale = control.unfinished_runs()
    for run_id in stale:
        logger.warning("stopping run %s, left unfinished by an earlier server", run_id)
        control.stop_run(run_id)
    return stale


def submit_run(layout: ServerLayout, run_config: Mapping[str, bool | int | float | str]) -> str:
    """Submit the edufl app with ``run_config`` (flat, TOML-typed values); returns the run id."""
    run_id = layout.control().start_run(write_app(layout, run_config))
    logger.info("submitted run %s", run_id)
    return run_id


def wait_for_run(
    layout: ServerLayout,
    superlink: Child,
    run_id: str,
    *,
    timeout: float | None = None,
    poll: float = 2.0,
) -> str:
    """Stream the ServerApp's log to stdout until the run finishes; returns its final status.

    Args:
        layout: The server's state folder.
        superlink: The running SuperLink; its exit ends the wait with an error.
        run_id: The run to follow.
        timeout: Seconds after which an unfinished run is stopped; None waits for ever.
        poll: Seconds between checks.

    Returns:
        Flower's final status, e.g. ``finished:completed`` or ``finished:failed``.
    """
    control = layout.control()
    stream = control.stream_logs(run_id, None)
    deadline = None if timeout is None else time.monotonic() + timeout
    try:
        while True:
            if not superlink.alive():
                raise DeploymentError(
                    f"the SuperLink exited (code {superlink.process.returncode}) during run "
                    f"{run_id}; its log ends with:\n{processes.log_tail(superlink.log_path)}"
                )
            if stream.poll() is not None:
                status = control.run_status(run_id)
                if status.startswith(FINISHED):
                    return status
                stream = control.stream_logs(run_id, None)  # the stream dropped: follow again
            if deadline is not None and time.monotonic() > deadline:
                logger.warning("run %s still unfinished after %.0f s: stopping it", run_id, timeout)
                control.stop_run(run_id)
                return f"{FINISHED}stopped (timeout)"
            time.sleep(poll)
    finally:
        if stream.poll() is None:
            stream.terminate()
            stream.wait(timeout=10)


def load_and_register(layout: ServerLayout) -> Registry:
    """Register the state folder's enrolled institutions with its running SuperLink.

    Nodes the SuperLink's database still lets in but the registry no longer holds (revoked
    while the server was down) are unregistered first.
    """
    registry = register_institutions(layout, load_registry(layout.state_dir))
    drop_unenrolled_nodes(layout, registry)
    return registry


def drop_unenrolled_nodes(layout: ServerLayout, registry: Registry) -> list[str]:
    """Unregister every node the SuperLink lets in whose key is not enrolled; their ids."""
    if any(e.node_id is None for e in registry.institutions.values()):
        # An enrolled key whose node id is unknown could be among the SuperLink's: keep all.
        logger.warning("some enrolled institutions have no node id yet; not pruning nodes")
        return []
    control = layout.control()
    enrolled = registry.node_ids()
    dropped = [n for n in control.active_node_ids() if n not in enrolled]
    for node_id in dropped:
        control.unregister_node(node_id)
        logger.warning("unregistered node %s: its key is no longer enrolled", node_id)
    return dropped


def revoke_institution(layout: ServerLayout, name: str) -> tuple[Registry, bool]:
    """Remove ``name`` from the registry and revoke its key; True if a running SuperLink
    unregistered its node at once (else that happens at the next `edufl server start`)."""
    registry = load_registry(layout.state_dir)
    revoked = registry.without(name)
    save_registry(layout.state_dir, revoked)
    running = running_server(layout)
    if running is None or not running.get("tls"):
        return revoked, False
    node_id = revoked.revoked[name].node_id
    if node_id is not None:
        layout.control().unregister_node(node_id)
    drop_unenrolled_nodes(layout, revoked)
    return revoked, True
