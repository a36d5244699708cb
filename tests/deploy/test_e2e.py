"""A real deployment on loopback: SuperLink + SuperNodes with TLS and node authentication.

Everything runs through the `edufl` command as a university and an operator would run it:
`edufl server start` (a real SuperLink, the real ServerApp) and `edufl client start` (real
SuperNodes, the real ClientApp). Ports are chosen at run time and every server listens on
127.0.0.1 only. Each process runs under coreutils' `timeout` and is asked to die with the test
process, so nothing outlives a crashed test; the fixture stops every one of them by pid.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from typer.testing import CliRunner

from server.checkpoints import CheckpointStore
from server.registry import load_registry
from shared_models import processes
from shared_models.processes import Child
from simulations.cli import app
from simulations.synthetic import write_consortium

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(shutil.which("timeout") is None, reason="needs coreutils' timeout"),
]

#: No process of this test may live longer than this, whatever happens to the test.
HARD_LIMIT_S = 240
RUN_LIMIT_S = 180


def _edufl(*args: str) -> str:
    result = CliRunner().invoke(app, list(args), prog_name="edufl")
    assert result.exit_code == 0, result.output
    return result.output


class Deployment:
    """The processes one test started, and where their output goes."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.children: list[Child] = []
        self.port = processes.free_port()
        self.address = f"127.0.0.1:{self.port}"
        self.keys = root / "consortium" / "keys"
        self.state = root / "consortium" / "state"

    def launch(self, name: str, *args: str) -> Child:
        argv = ["timeout", "-k", "5", str(HARD_LIMIT_S), sys.executable, "-m", "simulations.cli"]
        child = processes.start(
            name,
            [*argv, *args],
            log_path=self.root / "logs" / f"{name}.out",
            env={**os.environ, "PYTHONUNBUFFERED": "1"},
            cwd=self.root,
        )
        self.children.append(child)
        return child

    def node(self, name: str, data: Path, key_dir: Path) -> Child:
        return self.launch(
            name,
            "client",
            "start",
            "--data",
            str(data),
            "--superlink",
            self.address,
            "--root-cert",
            str(self.keys / "ca.pem"),
            "--key",
            str(key_dir / name),
            "--home",
            str(self.root / "homes" / name),
        )

    def leftovers(self) -> list[str]:
        """`ps` lines of Flower processes that belong to this deployment."""
        ps = subprocess.run(["ps", "-ww", "-eo", "pid,args"], capture_output=True, text=True)
        marks = [f"127.0.0.1:{self.port}", str(self.root)]
        marks += [f"127.0.0.1:{p}" for p in self._runtime_ports()]
        return [
            line
            for line in ps.stdout.splitlines()
            if ("flower-" in line or "flwr-" in line) and any(m in line for m in marks)
        ]

    def _runtime_ports(self) -> list[int]:
        ports = []
        for child in self.children:
            text = child.log_path.read_text(errors="replace") if child.log_path.exists() else ""
            for token in text.split():
                if token.startswith("http://127.0.0.1:"):
                    ports.append(int(token.rsplit(":", 1)[1].strip(")")))
        return ports


@pytest.fixture
def deployment(tmp_path: Path) -> Iterator[Deployment]:
    dep = Deployment(tmp_path)
    try:
        yield dep
    finally:
        for child in reversed(dep.children):
            processes.stop(child, timeout=20)
        deadline = time.monotonic() + 20
        while dep.leftovers() and time.monotonic() < deadline:
            time.sleep(0.5)
        assert dep.leftovers() == [], "processes outlived the test"


def _wait_for(what: str, check: Callable[[], bool], timeout: float, must_live: list[Child]) -> None:
    """Poll ``check``; fail early, with their logs, if one of ``must_live`` exits."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if check():
            return
        if not all(c.alive() for c in must_live):
            break
        time.sleep(0.5)
    logs = "\n".join(f"--- {c.name}\n{processes.log_tail(c.log_path, 40)}" for c in must_live)
    pytest.fail(f"gave up waiting for {what}\n{logs}")


def _output(child: Child) -> str:
    return child.log_path.read_text(errors="replace")


def _consortium(dep: Deployment, nodes: dict[str, str], strangers: tuple[str, ...] = ()) -> Path:
    """Synthetic exports, consortium keys, node keys; ``nodes`` (name → export) enrolled."""
    data = dep.root / "data"
    write_consortium(data, institutions=2, students=120, seed=1)
    for folder in set(nodes.values()) - {"institution_01", "institution_02"}:
        shutil.copytree(data / "institution_02", data / folder)  # a spare node's copy
    _edufl("server", "keys", "init", "--dir", str(dep.keys))
    for name in [*nodes, *strangers]:
        _edufl("client", "keys", "init", "--dir", str(dep.root / name), "--name", name)
    for name in nodes:
        pub = str(dep.root / name / f"{name}.pub")
        _edufl("server", "enrol", pub, "--name", name, "--state", str(dep.state))
    return data


def _start_server(dep: Deployment, out: Path) -> Child:
    """`edufl server start` for two rounds needing two nodes; returns once keys are registered.

    Evaluation rounds are left out: every message costs a node a fresh ClientApp process
    (seconds of imports), and the ServerApp's own tests cover evaluation.
    """
    config = dep.root / "federation.toml"
    config.write_text("local_epochs = 1\nfraction_evaluate = 0.0\nround_timeout = 120.0\n")
    server = dep.launch(
        "server", "server", "start", "--keys", str(dep.keys), "--state", str(dep.state),
        "--address", dep.address, "--config", str(config), "--rounds", "2",
        "--min-nodes", "2", "--out", str(out), "--timeout", str(RUN_LIMIT_S),
    )  # fmt: skip
    # Nodes may connect only once the server has registered their keys.
    _wait_for("the keys", lambda: "enrolled institutions:" in _output(server), 90, [server])
    return server


def _finished_rounds(server: Child, out: Path) -> list[dict[str, object]]:
    """Wait for the run to end; check it completed with two checkpoints; the metrics log."""
    _wait_for("the run to finish", lambda: not server.alive(), RUN_LIMIT_S, [server])
    assert server.process.returncode == 0, processes.log_tail(server.log_path, 40)
    assert "finished:completed" in _output(server)
    assert [c.round for c in CheckpointStore(out).checkpoints()] == [1, 2]
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["round"] for r in records] == [1, 2]
    return records


def _institutions(record: dict[str, object]) -> set[str]:
    entries = record["institutions"]
    assert isinstance(entries, list)
    return {entry["institution"] for entry in entries if "train" in entry}


def test_tls_federation_with_node_keys_trains_two_rounds_and_refuses_an_unenrolled_node(
    deployment: Deployment,
) -> None:
    dep = deployment
    nodes = {"uni-a": "institution_01", "uni-b": "institution_02"}
    data = _consortium(dep, nodes, ("stranger", "uni-late"))
    out = dep.root / "run"
    server = _start_server(dep, out)
    assert "enrolled institutions: uni-a, uni-b" in _output(server)
    dep.node("uni-a", data / "institution_01", dep.root / "uni-a")
    dep.node("uni-b", data / "institution_02", dep.root / "uni-b")
    stranger = dep.node("stranger", data / "institution_01", dep.root / "stranger")

    # The SuperLink turns the unenrolled key away; the node says what to do about it.
    _wait_for("the stranger to exit", lambda: not stranger.alive(), 90, [server])
    assert stranger.process.returncode == 2
    assert "refused SuperNode stranger" in _output(stranger)
    assert "edufl server enrol" in _output(stranger)
    # Enrolling while the server runs registers the key with the SuperLink at once.
    late = str(dep.root / "uni-late" / "uni-late.pub")
    reply = _edufl("server", "enrol", late, "--name", "uni-late", "--state", str(dep.state))
    assert "registered with the running SuperLink as node" in reply

    records = _finished_rounds(server, out)
    for record in records:
        assert _institutions(record) == {"uni-a", "uni-b"}
        assert record["train"]["train/loss"] > 0  # type: ignore[index]
    # Each node was known by its enrolled key: the ids in the metrics log are the ones the
    # SuperLink gave the keys at registration.
    registry = load_registry(dep.state).institutions
    entries = records[-1]["institutions"]
    assert isinstance(entries, list)
    assert {e["institution"]: str(e["node_id"]) for e in entries} == {
        name: registry[name].node_id for name in nodes
    }
    assert registry["uni-late"].node_id is not None


def test_run_finishes_when_a_node_is_lost_mid_round_and_enough_remain(
    deployment: Deployment,
) -> None:
    dep = deployment
    nodes = {"uni-a": "institution_01", "uni-b": "institution_02", "uni-c": "institution_03"}
    data = _consortium(dep, nodes)
    out = dep.root / "run"
    server = _start_server(dep, out)
    # Round 1 starts with uni-a and uni-c; uni-c is lost during it while uni-b joins, so
    # round 2 still has the two nodes --min-nodes asks for.
    a = dep.node("uni-a", data / "institution_01", dep.root / "uni-a")
    c = dep.node("uni-c", data / "institution_03", dep.root / "uni-c")
    _wait_for(
        "round 1 to start",
        lambda: "configure_train: Sampled 2 nodes" in _output(server),
        120,
        [server, a, c],
    )
    dep.node("uni-b", data / "institution_02", dep.root / "uni-b")
    processes.stop(c)

    first, second = _finished_rounds(server, out)
    assert "uni-c" not in _institutions(first) | _institutions(second)
    assert first["failures"], "the lost node's round-1 reply should be recorded as a failure"
    assert _institutions(second) == {"uni-a", "uni-b"}
