"""Real deployments on loopback for the end-to-end and fault-injection tests.

Everything runs through the `edufl` command as a university and an operator would run it:
`edufl server start` (a real SuperLink, the real ServerApp) and `edufl client start` (real
SuperNodes, the real ClientApp). Ports are chosen at run time and every server listens on
127.0.0.1 only. Each process runs under coreutils' `timeout` and is asked to die with the test
process, so nothing outlives a crashed test; the `deployment` fixture stops every one of them
by pid and fails the test if a Flower process of its deployment is left.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path

import pytest
from typer.testing import CliRunner

from server.checkpoints import CheckpointStore
from server.superlink.launcher import SERVE_MODULE
from shared_models import processes
from shared_models.processes import Child
from simulations.cli import app
from simulations.synthetic import write_consortium

needs_timeout = pytest.mark.skipif(
    shutil.which("timeout") is None, reason="needs coreutils' timeout"
)

#: No process of a test may live longer than this, whatever happens to the test.
HARD_LIMIT_S = 300
RUN_LIMIT_S = 180


def edufl(*args: str) -> str:
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

    def launch(self, name: str, *args: str, env: Mapping[str, str] | None = None) -> Child:
        """Run `edufl ARGS` as ``name``; a second launch of a name appends to its log."""
        argv = ["timeout", "-k", "5", str(HARD_LIMIT_S), sys.executable, "-m", "simulations.cli"]
        child = processes.start(
            name,
            [*argv, *args],
            log_path=self.root / "logs" / f"{name}.out",
            env={**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})},
            cwd=self.root,
        )
        self.children.append(child)
        return child

    def node(
        self,
        name: str,
        data: Path,
        key_dir: Path,
        *extra: str,
        env: Mapping[str, str] | None = None,
    ) -> Child:
        """`edufl client start` for ``name`` (home ROOT/homes/NAME: its privacy state too)."""
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
            *extra,
            env=env,
        )

    def home(self, name: str) -> Path:
        return self.root / "homes" / name

    def leftovers(self) -> list[str]:
        """`ps` lines of Flower processes that belong to this deployment."""
        ps = subprocess.run(["ps", "-ww", "-eo", "pid,args"], capture_output=True, text=True)
        marks = [self.address, str(self.root)]
        marks += [f"127.0.0.1:{p}" for p in self._runtime_ports()]
        return [
            line
            for line in ps.stdout.splitlines()
            if ("flower-" in line or "flwr-" in line or SERVE_MODULE in line)
            and any(m in line for m in marks)
        ]

    def _runtime_ports(self) -> list[int]:
        ports = []
        # The SuperLink's own log names its control plane, where the ServerApp connects.
        logs = [c.log_path for c in self.children] + [self.state / "logs" / "superlink.log"]
        for log in logs:
            text = log.read_text(errors="replace") if log.exists() else ""
            ports += [int(port) for port in re.findall(r"http://127\.0\.0\.1:(\d+)", text)]
        return ports


def deployment_fixture(tmp_path: Path) -> Iterator[Deployment]:
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


def wait_for(what: str, check: Callable[[], bool], timeout: float, must_live: list[Child]) -> None:
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


def output(child: Child) -> str:
    return child.log_path.read_text(errors="replace")


def consortium(
    dep: Deployment,
    nodes: dict[str, str],
    strangers: tuple[str, ...] = (),
    cert_addresses: tuple[str, ...] = (),
) -> Path:
    """Synthetic exports, consortium keys, node keys; ``nodes`` (name → export) enrolled.

    ``cert_addresses`` replace the server certificate's default addresses (127.0.0.1).
    """
    data = dep.root / "data"
    write_consortium(data, institutions=2, students=120, seed=1)
    for folder in set(nodes.values()) - {"institution_01", "institution_02"}:
        shutil.copytree(data / "institution_02", data / folder)  # a spare node's copy
    addresses = [arg for address in cert_addresses for arg in ("--address", address)]
    edufl("server", "keys", "init", "--dir", str(dep.keys), *addresses)
    for name in [*nodes, *strangers]:
        edufl("client", "keys", "init", "--dir", str(dep.root / name), "--name", name)
    for name in nodes:
        pub = str(dep.root / name / f"{name}.pub")
        edufl("server", "enrol", pub, "--name", name, "--state", str(dep.state))
    return data


def start_server(
    dep: Deployment,
    out: Path,
    *,
    rounds: int = 2,
    min_nodes: int = 2,
    extra: tuple[str, ...] = (),
    name: str = "server",
    evaluate: bool = False,
    ready_timeout: float = 90,
) -> Child:
    """`edufl server start` for ``rounds`` rounds; returns once the keys are registered.

    Evaluation rounds are left out unless ``evaluate``: the ServerApp's own tests cover
    evaluation, and each message costs every node time.
    """
    config = dep.root / "federation.toml"
    fraction = 1.0 if evaluate else 0.0
    config.write_text(f"local_epochs = 1\nfraction_evaluate = {fraction}\nround_timeout = 120.0\n")
    server = dep.launch(
        name, "server", "start", "--keys", str(dep.keys), "--state", str(dep.state),
        "--address", dep.address, "--config", str(config), "--rounds", str(rounds),
        "--min-nodes", str(min_nodes), "--out", str(out), "--timeout", str(RUN_LIMIT_S), *extra,
    )  # fmt: skip
    # Nodes may connect only once the server has registered their keys.
    wait_for(
        "the keys", lambda: "enrolled institutions:" in output(server), ready_timeout, [server]
    )
    return server


def finished_rounds(server: Child, out: Path, rounds: int = 2) -> list[dict[str, object]]:
    """Wait for the run to end; check it completed all its checkpoints; the metrics log."""
    wait_for("the run to finish", lambda: not server.alive(), RUN_LIMIT_S, [server])
    assert server.process.returncode == 0, processes.log_tail(server.log_path, 40)
    assert "finished:completed" in output(server)
    expected = list(range(1, rounds + 1))
    assert [c.round for c in CheckpointStore(out).checkpoints()] == expected
    records = metrics(out)
    assert [r["round"] for r in records] == expected
    return records


def metrics(out: Path) -> list[dict[str, object]]:
    """The run's metrics.jsonl so far."""
    path = out / "metrics.jsonl"
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def institutions(record: dict[str, object]) -> set[str]:
    entries = record["institutions"]
    assert isinstance(entries, list)
    return {entry["institution"] for entry in entries if "train" in entry}


def crash(child: Child) -> None:
    """SIGKILL ``child`` and every process below it at once: a machine losing power, not a stop.

    Nothing gets to clean up (no run is stopped, no file closed), unlike `processes.stop`.
    """
    family = [pid for pid, _, _ in processes._descendants(child.pid)]
    for pid in [child.pid, *family]:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.kill(pid, signal.SIGKILL)
    child.process.wait(timeout=10)


def ledger_rounds(path: Path, institution: str | None = None) -> list[int]:
    """The rounds of a ledger file's training entries (of one institution), in file order.

    The run's count and histogram releases are entries too (``kind``); they are left out.
    """
    if not path.exists():
        return []
    entries = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    return [
        e["round"]
        for e in entries
        if institution in (None, e["institution"]) and e.get("kind", "train") == "train"
    ]


def ledger_entries(path: Path) -> list[dict[str, object]]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
