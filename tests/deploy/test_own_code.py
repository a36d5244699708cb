"""A real node runs only edufl's own ClientApp: the review's malicious bundle is refused.

The operator (or whoever holds the server) submits, with `flwr run` through the control plane on
127.0.0.1, an app whose ClientApp reads the node's data folder, writes a marker file and sends
the rows back. Every node refuses the bundle, says so in its log, and nothing of it runs; the
consortium's honest run then still trains.
"""

from __future__ import annotations

import textwrap
from pathlib import Path

import pytest

from server.superlink.control import FlowerControl
from server.superlink.launcher import ServerLayout
from tests.deploy.harness import (
    Deployment,
    consortium,
    finished_rounds,
    institutions,
    needs_timeout,
    output,
    start_server,
    wait_for,
)

pytestmark = [pytest.mark.slow, needs_timeout]

_PYPROJECT = """
[project]
name = "totally-edufl"
version = "1.0.0"
license = "Apache-2.0"

[tool.flwr.app]
publisher = "edufl"

[tool.flwr.app.components]
serverapp = "evil_server:app"
clientapp = "evil_client:app"
"""

#: The review's proof of concept, run at the node: reads the data folder, leaves a marker.
_CLIENT = """
from pathlib import Path
from flwr.app import ConfigRecord, Message, RecordDict
from flwr.clientapp import ClientApp

MARKER = Path({marker!r})
MARKER.write_text("imported")
app = ClientApp()


@app.train()
def train(msg, context):
    folder = Path(context.node_config["data-path"])
    rows = "".join(p.read_text() for p in sorted(folder.rglob("*.csv")))
    MARKER.write_text(rows)
    return Message(RecordDict({{"loot": ConfigRecord({{"rows": rows[:100000]}})}}), reply_to=msg)
"""

#: Sends one train message to every node and writes down what came back.
_SERVER = """
import time
from pathlib import Path
from flwr.app import ConfigRecord, Message, RecordDict
from flwr.serverapp import Grid, ServerApp

app = ServerApp()


@app.main()
def main(grid: Grid, context) -> None:
    deadline = time.monotonic() + 120
    nodes = []
    while len(nodes) < 2 and time.monotonic() < deadline:
        nodes = list(grid.get_node_ids())
        time.sleep(1)
    content = RecordDict({{"config": ConfigRecord({{"x": 1}})}})
    messages = [Message(content, dst_node_id=n, message_type="train") for n in nodes]
    replies = list(grid.send_and_receive(messages, timeout=120))
    lines = [
        f"{{r.metadata.src_node_id}} " + (r.error.reason if r.has_error() else "CONTENT")
        for r in replies
    ]
    Path({result!r}).write_text("\\n".join(lines) + "\\n")
"""


def _malicious_app(root: Path, marker: Path, result: Path) -> Path:
    app = root / "malicious-app"
    app.mkdir()
    (app / "pyproject.toml").write_text(textwrap.dedent(_PYPROJECT))
    (app / "evil_client.py").write_text(_CLIENT.format(marker=str(marker)))
    (app / "evil_server.py").write_text(_SERVER.format(result=str(result)))
    return app


def test_a_real_node_refuses_the_malicious_bundle_runs_none_of_it_and_still_trains(
    deployment: Deployment,
) -> None:
    dep = deployment
    nodes = {"uni-a": "institution_01", "uni-b": "institution_02"}
    data = consortium(dep, nodes)
    out = dep.root / "run"
    server = start_server(dep, out, rounds=1)
    marker, result = dep.root / "marker", dep.root / "malicious-replies.txt"
    app = _malicious_app(dep.root, marker, result)
    # The operator's `flwr run` of the malicious folder through the control plane (loopback).
    run_id = FlowerControl(ServerLayout(dep.state).flwr_home).start_run(app)
    children = {
        name: dep.node(name, data / folder, dep.root / name) for name, folder in nodes.items()
    }

    wait_for("the malicious run's replies", result.exists, 240, [server, *children.values()])
    replies = result.read_text().splitlines()
    assert len(replies) == 2, replies
    for reply in replies:  # an error reply from each node, no content
        assert "refused the app bundle" in reply and "evil_client:app" in reply
    for name, child in children.items():
        log = output(child)
        assert f"run {run_id}: refused the app bundle" in log, (name, log[-3000:])
        assert "names the ClientApp 'evil_client:app'" in log
        assert "runs only client.app:app of edufl" in log
        assert not (dep.home(name) / "apps").exists()  # nothing of the bundle was installed
    assert not marker.exists(), "the malicious ClientApp ran at a node"

    # The consortium's own run still trains, with both nodes.
    records = finished_rounds(server, out, rounds=1)
    assert institutions(records[0]) == set(nodes)
    assert not marker.exists()
