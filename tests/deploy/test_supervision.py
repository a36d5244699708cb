"""How a node's processes are composed and stopped: the SuperNode under `client.node.warm_exec`.

The fast tests check the command lines. The slow ones run `client.node.warm_exec` for real, with a
stand-in for `flower-superlink`'s node (a Python process that listens on the Runtime API port),
to check what a user relies on: one stop ends every process of the node, and the node's exit
code is the SuperNode's.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from client.node.launcher import (
    NodeOptions,
    node_argv,
    node_config,
    start_supernode,
    supernode_argv,
)
from shared_models import processes


def _options(tmp_path: Path, **changes: object) -> NodeOptions:
    values: dict[str, object] = {
        "data_dir": tmp_path / "export",
        "superlink": "127.0.0.1:9999",
        "root_cert": tmp_path / "ca.pem",
        "private_key": tmp_path / "uni-a",
        "name": "uni-a",
        "home": tmp_path / "home",
        "runtime_port": 9123,
    }
    return NodeOptions(**(values | changes))  # type: ignore[arg-type]


def test_node_runs_its_supernode_in_process_isolation_under_the_warm_executor(
    tmp_path: Path,
) -> None:
    options = _options(tmp_path, pull_interval=None)  # Flower's pace: no pacing wrapper
    argv = node_argv(options)
    split = argv.index("--")
    assert argv[:split] == [
        sys.executable,
        "-m",
        "client.node.warm_exec",
        "--runtime-api-address",
        "127.0.0.1:9123",
        "--node-config-json",  # the executor prepares the export once, before the first task
        json.dumps(node_config(options).to_node_config()),
    ]
    supernode = argv[split + 1 :]
    assert supernode == supernode_argv(options)
    assert Path(supernode[0]).name == "flower-supernode"
    # The SuperNode must not start a SuperExec of its own: the warm executor takes its place.
    assert supernode[supernode.index("--isolation") + 1] == "process"
    # Its Runtime API, which the executor talks to, stays on loopback.
    assert supernode[supernode.index("--host") + 1] == "127.0.0.1"
    assert supernode[supernode.index("--port") + 1] == "9123"


def test_a_node_runs_flowers_supernode_paced_by_default(tmp_path: Path) -> None:
    options = _options(tmp_path)
    assert options.pull_interval == 0.25
    argv = node_argv(options)
    rest = argv[argv.index("--") + 1 :]
    paced = rest[: rest.index("--")]
    assert paced == [sys.executable, "-m", "client.node.pacing", "--pull-interval", "0.25"]
    assert rest[len(paced) + 1 :] == supernode_argv(options)


def test_a_warm_task_imports_nothing_the_executor_could_have_imported_once() -> None:
    """What a ClientApp imports lazily on its first round (torch.optim imports torch._dynamo,
    about 1 s) is imported by the executor before it forks, not again by every task."""
    probe = (
        "import importlib, sys, torch\n"
        "from client.node.warm_exec import PRELOAD\n"
        "for name in PRELOAD: importlib.import_module(name)\n"
        "before = set(sys.modules)\n"
        "torch.optim.Adam([torch.zeros(1, requires_grad=True)])\n"
        "print(sorted(set(sys.modules) - before))\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", probe], capture_output=True, text=True, check=True, timeout=300
    ).stdout
    assert out.strip() == "[]"


def test_flowers_own_superexec_is_never_used_even_when_the_warm_executor_is_off(
    tmp_path: Path,
) -> None:
    """Flower's SuperExec would run `flwr-clientapp`, which runs the server's app bundle."""
    options = _options(tmp_path, warm_clientapp=False)
    argv = node_argv(options)
    assert argv[1:3] == ["-m", "client.node.warm_exec"]
    assert argv[argv.index("--preload") + 1] == ""  # cold: each task imports for itself
    supernode = supernode_argv(options)
    assert argv[-len(supernode) - 1 :] == ["--", *supernode]
    assert supernode[-2:] == ["--isolation", "process"]


# --- real processes -------------------------------------------------------------------------

#: Listens on the port like a SuperNode's Runtime API, then exits with the code it is given
#: after the given seconds (or runs until signalled).
_FAKE_SUPERNODE = """
import socket, sys, time
sock = socket.socket(); sock.bind(("127.0.0.1", int(sys.argv[1]))); sock.listen()
print("fake SuperNode up", flush=True)
time.sleep(float(sys.argv[3]))
sys.exit(int(sys.argv[2]))
"""


def _warm_exec(tmp_path: Path, port: int, code: int, seconds: float) -> processes.Child:
    fake = [sys.executable, "-c", _FAKE_SUPERNODE, str(port), str(code), str(seconds)]
    argv = [sys.executable, "-m", "client.node.warm_exec", "--runtime-api-address"]
    argv += [f"127.0.0.1:{port}", "--preload", "json", "--", *fake]
    return processes.start(
        "warm node", argv, log_path=tmp_path / "node.log", env={**os.environ}, cwd=tmp_path
    )


def _fake_supernodes() -> list[int]:
    """Ids of the running stand-ins (``python -c _FAKE_SUPERNODE ...``)."""
    found = []
    for entry in Path("/proc").glob("[0-9]*"):
        try:
            argv = (entry / "cmdline").read_bytes().decode().split("\0")
        except OSError:
            continue
        if argv[1:3] == ["-c", _FAKE_SUPERNODE]:
            found.append(int(entry.name))
    return found


@pytest.mark.slow
def test_stopping_a_warm_node_stops_its_supernode_too(tmp_path: Path) -> None:
    port = processes.free_port()
    child = _warm_exec(tmp_path, port, 0, 600)
    try:
        processes.wait_until_listening(child, "127.0.0.1", port, timeout=60)
        assert len(_fake_supernodes()) == 1
    finally:
        processes.stop(child, timeout=20)
    deadline = time.monotonic() + 10
    while _fake_supernodes() and time.monotonic() < deadline:
        time.sleep(0.2)
    assert _fake_supernodes() == []
    assert not processes.port_open("127.0.0.1", port)


@pytest.mark.slow
def test_a_warm_node_exits_with_its_supernodes_exit_code(tmp_path: Path) -> None:
    port = processes.free_port()
    child = _warm_exec(tmp_path, port, 3, 2)
    try:
        assert child.process.wait(timeout=60) == 3
    finally:
        processes.stop(child)
    assert "fake SuperNode up" in child.log_path.read_text()


@pytest.mark.slow
def test_a_warm_node_whose_supernode_fails_to_start_is_reported_with_its_log(
    tmp_path: Path,
) -> None:
    (tmp_path / "uni-a").write_text("not a key")
    options = _options(tmp_path, runtime_port=processes.free_port())  # ca.pem does not exist
    with pytest.raises(processes.DeploymentError, match="exited with code 1 before listening"):
        start_supernode(options, ready_timeout=60)
