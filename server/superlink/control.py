"""Talking to a running SuperLink's Control API through Flower's own `flwr` command.

The `flwr` command is Flower's public interface for registering nodes and submitting,
watching and stopping runs; its Python internals change between releases. It reads the
SuperLink's address and CA certificate from ``$FLWR_HOME/config.toml``, which `write_connection`
writes into edufl's state folder, so edufl never touches the operator's own ``~/.flwr``.
"""

from __future__ import annotations

import json
import logging
import subprocess
from pathlib import Path
from typing import Any, TextIO

import tomli_w

from privacy.keys import write_public
from server.superlink.flower_surface import ALREADY_REGISTERED
from shared_models.processes import DeploymentError, executable, flower_env

logger = logging.getLogger(__name__)

CONNECTION = "edufl"
#: Flower's answer when a key is registered already; harmless when edufl registers again.
_ALREADY_REGISTERED = ALREADY_REGISTERED.text
FINISHED = "finished:"


def write_connection(flwr_home: Path, address: str, root_cert: Path | None) -> Path:
    """Write the `flwr` configuration naming the SuperLink's Control API; returns its path.

    Args:
        flwr_home: Folder used as ``FLWR_HOME`` for the `flwr` command.
        address: ``host:port`` of the SuperLink.
        root_cert: CA certificate to verify the SuperLink; None for plaintext (``--insecure``).
    """
    connection: dict[str, Any] = {"address": address}
    if root_cert is None:
        connection["insecure"] = True
    else:
        connection["root-certificates"] = str(root_cert.resolve())
    config = {"superlink": {"default": CONNECTION, CONNECTION: connection}}
    flwr_home.mkdir(parents=True, exist_ok=True)
    path = flwr_home / "config.toml"
    write_public(path, tomli_w.dumps(config).encode())
    return path


class FlowerControl:
    """The `flwr` commands edufl needs, against the connection in ``flwr_home``."""

    def __init__(self, flwr_home: Path, timeout: float = 300.0) -> None:
        self.flwr_home = flwr_home
        self.timeout = timeout

    def register_node(self, public_key: Path, name: str) -> str | None:
        """Register a node's public key; its node id, or None if it was registered already."""
        reply = self._json("supernode", "register", str(public_key), CONNECTION, "--name", name)
        if reply.get("success"):
            return str(reply["node-id"])
        message = str(reply.get("error-message", reply))
        if _ALREADY_REGISTERED in message:
            return None
        raise DeploymentError(f"the SuperLink refused to register {name}: {_last_line(message)}")

    def unregister_node(self, node_id: str) -> None:
        """Remove a node from the SuperLink: its key is refused from then on."""
        reply = self._json("supernode", "unregister", node_id, CONNECTION)
        if not reply.get("success"):
            raise DeploymentError(
                f"the SuperLink refused to unregister node {node_id}: {_error(reply)}"
            )

    def active_node_ids(self) -> list[str]:
        """Ids of the nodes the SuperLink lets in (registered, online or offline)."""
        reply = self._json("supernode", "list", CONNECTION)
        if not reply.get("success"):
            raise DeploymentError(f"cannot list the SuperLink's nodes: {_error(reply)}")
        nodes = reply.get("nodes") or []
        return [str(n["node-id"]) for n in nodes if str(n.get("status")) != "unregistered"]

    def start_run(self, app_dir: Path) -> str:
        """Submit the Flower app in ``app_dir`` as a new run; returns the run id."""
        reply = self._json("run", str(app_dir), CONNECTION)
        if not reply.get("success"):
            raise DeploymentError(f"the SuperLink refused the run: {_error(reply)}")
        return str(reply["run-id"])

    def run_status(self, run_id: str) -> str:
        """A run's status: ``pending``, ``starting``, ``running`` or ``finished:<result>``."""
        reply = self._json("ls", CONNECTION, "--run-id", run_id)
        runs = reply.get("runs") or []
        if not reply.get("success") or not runs:
            raise DeploymentError(f"cannot read the status of run {run_id}: {_error(reply)}")
        return str(runs[0]["status"])

    def unfinished_runs(self) -> list[str]:
        """Ids of the runs the SuperLink has not finished (pending, starting or running)."""
        reply = self._json("ls", CONNECTION)
        if not reply.get("success"):
            raise DeploymentError(f"cannot list the SuperLink's runs: {_error(reply)}")
        runs = reply.get("runs") or []
        return [str(r["run-id"]) for r in runs if not str(r["status"]).startswith(FINISHED)]

    def stop_run(self, run_id: str) -> None:
        """Ask the SuperLink to stop a run (no error if it has finished)."""
        self._json("stop", run_id, CONNECTION)

    def stream_logs(self, run_id: str, out: TextIO | None) -> subprocess.Popen[bytes]:
        """Start `flwr log --stream`: it prints the ServerApp's log until the run finishes."""
        return subprocess.Popen(
            [executable("flwr"), "log", run_id, CONNECTION, "--stream"],
            stdin=subprocess.DEVNULL,
            stdout=out,
            stderr=subprocess.STDOUT,
            env=flower_env(self.flwr_home),
        )

    def _json(self, *args: str) -> dict[str, Any]:
        argv = [executable("flwr"), *args, "--format", "json"]
        logger.debug("running %s", " ".join(argv))
        try:
            done = subprocess.run(
                argv,
                capture_output=True,
                text=True,
                timeout=self.timeout,
                env=flower_env(self.flwr_home),
                stdin=subprocess.DEVNULL,
            )
        except subprocess.TimeoutExpired:
            raise DeploymentError(
                f"`flwr {args[0]}` got no answer within {self.timeout:.0f} s; "
                "is the SuperLink running and reachable?"
            ) from None
        try:
            reply = json.loads(done.stdout[done.stdout.index("{") :])
        except ValueError:
            detail = _last_line(done.stderr or done.stdout) or f"exit code {done.returncode}"
            raise DeploymentError(f"`flwr {args[0]}` failed: {detail}") from None
        if not isinstance(reply, dict):
            raise DeploymentError(f"`flwr {args[0]}` answered {reply!r}")
        return reply


def _error(reply: dict[str, Any]) -> str:
    return _last_line(str(reply.get("error-message", reply)))


def _last_line(text: str) -> str:
    lines = [line.strip() for line in text.strip().splitlines() if line.strip()]
    return lines[-1] if lines else ""
