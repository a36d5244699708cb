"""The public address answers only the Fleet API: an outsider holding ``ca.pem`` gets nothing else.

A real `edufl server start` with its public listener on 127.0.0.2 and its control plane on
127.0.0.1 (how the review found the Control API open: issue 17). With only the consortium's
``ca.pem``, Flower's own `flwr` command (register a node, list runs, submit a run) and direct
HTTPS requests to the Control and Runtime APIs through the public address all fail, while the
enrolled nodes train as before and edufl's own control calls work on loopback.
"""

from __future__ import annotations

import json
import ssl
import subprocess
import urllib.error
import urllib.request
from pathlib import Path

import pytest

from server.superlink.control import write_connection
from server.superlink.launcher import ServerLayout, write_app
from shared_models import processes
from tests.deploy.harness import (
    Deployment,
    consortium,
    finished_rounds,
    institutions,
    needs_timeout,
    output,
    start_server,
)

pytestmark = [pytest.mark.slow, needs_timeout]

PUBLIC_HOST = "127.0.0.2"
CLI_LIMIT_S = 120


def _post(url: str, ca: Path, content_type: str = "application/protobuf") -> int:
    """The HTTP status of an empty POST to ``url``, verifying the server against ``ca``."""
    request = urllib.request.Request(
        url, data=b"", method="POST", headers={"Content-Type": content_type}
    )
    context = ssl.create_default_context(cafile=str(ca))
    try:
        with urllib.request.urlopen(request, context=context, timeout=30) as reply:
            return int(reply.status)
    except urllib.error.HTTPError as error:
        return int(error.code)


def test_an_outsider_with_the_ca_reaches_only_the_fleet_api_and_enrolled_nodes_train(
    deployment: Deployment,
) -> None:
    dep = deployment
    dep.port = processes.free_port(PUBLIC_HOST)
    dep.address = f"{PUBLIC_HOST}:{dep.port}"
    nodes = {"uni-a": "institution_01", "uni-b": "institution_02"}
    data = consortium(dep, nodes, ("outsider",), cert_addresses=(PUBLIC_HOST,))
    out = dep.root / "run"
    server = start_server(dep, out)
    info = json.loads((dep.state / "server.json").read_text())
    control_host, control_port = processes.split_address(info["control"])
    assert (control_host, info["address"]) == ("127.0.0.1", dep.address)
    assert control_port != dep.port
    assert f"control plane on {info['control']} (loopback only)" in output(server)
    # The control plane listens on loopback's 127.0.0.1 only, not on the public address.
    assert processes.port_open("127.0.0.1", control_port)
    assert not processes.port_open(PUBLIC_HOST, control_port)

    # The outsider: Flower's own `flwr` command, pointed at the public address with ca.pem.
    home = dep.root / "outsider-flwr"
    ca = dep.keys / "ca.pem"
    write_connection(home, dep.address, ca)
    app_dir = write_app(ServerLayout(dep.root / "outsider-app"), {"rounds": 1})
    attempts = {
        "register": ["supernode", "register", str(dep.root / "outsider" / "outsider.pub")],
        "ls": ["ls"],
        "run": ["run", str(app_dir)],
    }
    flwr = processes.executable("flwr")
    running = {
        name: subprocess.Popen(
            [flwr, *args, "edufl", "--format", "json"],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            env=processes.flower_env(home),
        )
        for name, args in attempts.items()
    }
    for name, process in running.items():
        try:
            stdout, _ = process.communicate(timeout=CLI_LIMIT_S)
        finally:
            process.kill()
        reply = json.loads(stdout[stdout.index("{") :])
        assert reply["success"] is False, (name, reply)
        assert "Not Found" in reply["error-message"], (name, reply)

    # Direct HTTPS requests to the Control and Runtime APIs through the public address: 404,
    # while the Fleet API there is Flower's (it answers, refusing the empty request itself).
    public = f"https://{dep.address}"
    refused = [
        "/v1/control/register-node",
        "/v1/control/start-run",
        "/v1/control/list-runs",
        "/v1/control/list-nodes",
        "/v1/runtime/acquire-task",
        "/v1/runtime/pull-task-input",
        "/v1/runtime/push-task-output",
    ]
    assert {path: _post(public + path, ca) for path in refused} == dict.fromkeys(refused, 404)
    assert _post(public + "/v1/fleet/get-run", ca) not in (404, 200)

    # edufl's own control calls work on loopback: the outsider's key and run never landed.
    control = ServerLayout(dep.state).control(timeout=CLI_LIMIT_S)
    assert len(control.active_node_ids()) == len(nodes)
    assert len(control.unfinished_runs()) == 1
    log = (dep.state / "logs" / "superlink.log").read_text(errors="replace")
    assert "refused POST /v1/control/register-node" in log
    assert "refused POST /v1/runtime/acquire-task" in log

    # The enrolled nodes train through the public address as before.
    dep.node("uni-a", data / "institution_01", dep.root / "uni-a")
    dep.node("uni-b", data / "institution_02", dep.root / "uni-b")
    records = finished_rounds(server, out)
    for record in records:
        assert institutions(record) == set(nodes)
