"""The deployment commands without a running federation: what they start, check and refuse."""

from __future__ import annotations

import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path

import pytest
from flwr.cli.config_utils import load_and_validate
from flwr.cli.flower_config import read_superlink_connection
from flwr.common.config import parse_config_args
from typer.testing import CliRunner

from client.node.launcher import NodeOptions, supernode_argv
from privacy.keys import ConsortiumKeys, init_institution_keys
from server.institutions import EnrolmentError, Registry, load_registry
from server.superlink.control import write_connection
from server.superlink.launcher import (
    SERVERAPP,
    ServerLayout,
    running_server,
    superlink_argv,
    write_app,
)
from shared_models import processes
from shared_models.processes import DeploymentError
from simulations.cli import app

runner = CliRunner()


def _invoke(*args: str) -> tuple[int, str]:
    result = runner.invoke(app, list(args), prog_name="edufl")
    return result.exit_code, result.output


@pytest.fixture
def busy_port() -> Iterator[int]:
    """A loopback port something already listens on."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        sock.listen()
        yield sock.getsockname()[1]


@pytest.mark.parametrize(
    "command",
    [
        ["server"],
        ["server", "keys"],
        ["server", "keys", "init"],
        ["server", "enrol"],
        ["server", "revoke"],
        ["server", "start"],
        ["client", "keys"],
        ["client", "keys", "init"],
        ["client", "start"],
    ],
)
def test_every_deployment_command_has_help_with_an_example(command: list[str]) -> None:
    code, out = _invoke(*command, "--help")
    assert code == 0
    assert "Example" in out
    assert "edufl " in out


def test_superlink_runs_with_tls_node_auth_persistent_state_and_no_installs(
    tmp_path: Path,
) -> None:
    layout = ServerLayout(tmp_path / "state")
    argv = superlink_argv(layout, "127.0.0.1", 9999, ConsortiumKeys.in_dir(tmp_path / "keys"))
    joined = " ".join(argv)
    assert f"--ssl-ca-certfile {tmp_path / 'keys' / 'ca.pem'}" in joined
    assert f"--ssl-certfile {tmp_path / 'keys' / 'server.pem'}" in joined
    assert f"--ssl-keyfile {tmp_path / 'keys' / 'server.key'}" in joined
    assert "--enable-supernode-auth" in argv
    assert f"--database {layout.database}" in joined
    assert "--disable-runtime-dependency-installation" in argv
    assert "--host 127.0.0.1 --port 9999" in joined
    assert "--insecure" not in argv


def test_insecure_superlink_has_neither_tls_nor_node_auth(tmp_path: Path) -> None:
    argv = superlink_argv(ServerLayout(tmp_path), "127.0.0.1", 9999, None)
    assert "--insecure" in argv
    assert not any(a.startswith("--ssl") or a == "--enable-supernode-auth" for a in argv)


def test_supernode_pins_the_ca_uses_the_node_key_and_names_its_export(tmp_path: Path) -> None:
    options = NodeOptions(
        data_dir=tmp_path / "export",
        superlink="127.0.0.1:9999",
        root_cert=tmp_path / "ca.pem",
        private_key=tmp_path / "uni-a",
        name="uni-a",
        home=tmp_path / "home",
        runtime_port=9123,
    )
    argv = supernode_argv(options)
    joined = " ".join(argv)
    assert f"--root-certificates {tmp_path / 'ca.pem'}" in joined
    assert f"--auth-supernode-private-key {tmp_path / 'uni-a'}" in joined
    node_config = parse_config_args([argv[argv.index("--node-config") + 1]])
    assert node_config == {
        "data-path": str(tmp_path / "export"),
        "institution": "uni-a",
        # DP-SGD is the deployment default, its state kept in the node's home, and the
        # ledger signed with the enrolled node key.
        "dp": "required",
        "privacy-state": str(tmp_path / "home" / "privacy"),
        "privacy-key": str(tmp_path / "uni-a"),
        # The node's own bound on the model the server may send (client.node.own_code).
        "max-model-params": 10_000_000,
        # Where the final global model the server delivers is adopted (client.app.deliver).
        "home-path": str(tmp_path / "home"),
    }
    assert "--host 127.0.0.1 --port 9123" in joined
    assert "--insecure" not in argv


def test_supernode_carries_the_institutions_own_budget_opt_out_and_threads(
    tmp_path: Path,
) -> None:
    base = NodeOptions(
        data_dir=tmp_path / "export",
        superlink="127.0.0.1:9999",
        root_cert=None,
        private_key=None,
        name="uni-a",
        home=tmp_path / "home",
        runtime_port=9123,
        insecure=True,
    )

    def config(options: NodeOptions) -> dict[str, object]:
        argv = supernode_argv(options)
        return parse_config_args([argv[argv.index("--node-config") + 1]])

    own = config(replace(base, dp_epsilon=3.0, dp_delta=1e-6, privacy_state=tmp_path / "p"))
    assert (own["dp"], own["dp-epsilon"], own["dp-delta"]) == ("required", 3.0, 1e-6)
    assert own["privacy-state"] == str(tmp_path / "p")
    assert config(replace(base, no_dp=True))["dp"] == "off"
    # Torch's own thread count unless the node is given one (`edufl client start --threads`).
    assert "threads" not in config(base)
    assert config(replace(base, threads=1))["threads"] == 1


def test_app_definition_is_a_valid_flower_app_naming_the_edufl_apps(tmp_path: Path) -> None:
    app_dir = write_app(ServerLayout(tmp_path), {"rounds": 2, "guard.max-norm": 3.0, "x": ""})
    config, _ = load_and_validate(app_dir / "pyproject.toml")  # what `flwr run` checks
    flwr_app = config["tool"]["flwr"]["app"]
    assert flwr_app["components"] == {"serverapp": SERVERAPP, "clientapp": "client.app:app"}
    assert flwr_app["config"] == {"rounds": 2, "guard.max-norm": 3.0, "x": ""}


def test_flwr_connection_points_at_the_superlink_with_the_consortium_ca(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    write_connection(tmp_path, "127.0.0.1:9999", Path("keys/ca.pem"))
    monkeypatch.setenv("FLWR_HOME", str(tmp_path))
    connection = read_superlink_connection()
    assert connection.address == "127.0.0.1:9999"
    assert connection.root_certificates == str(Path("keys/ca.pem").resolve())
    assert not connection.insecure


def test_enrol_records_the_key_and_refuses_a_taken_name_or_key(tmp_path: Path) -> None:
    state = tmp_path / "state"
    a = init_institution_keys(tmp_path, "uni-a")
    b = init_institution_keys(tmp_path, "uni-b")
    code, out = _invoke(
        "server", "enrol", str(a.public_key), "--name", "uni-a", "--state", str(state)
    )
    assert code == 0, out
    assert "registered when `edufl server start` runs" in out
    entry = load_registry(state).institutions["uni-a"]
    assert a.public_key.read_text().startswith(entry.public_key)

    code, out = _invoke(
        "server", "enrol", str(b.public_key), "--name", "uni-a", "--state", str(state)
    )
    assert code == 2 and "already enrolled with another key" in out
    code, out = _invoke(
        "server", "enrol", str(a.public_key), "--name", "uni-x", "--state", str(state)
    )
    assert code == 2 and "already enrolled as 'uni-a'" in out
    assert list(load_registry(state).institutions) == ["uni-a"]


def test_revoke_removes_the_institution_and_its_key_can_never_be_enrolled_again(
    tmp_path: Path,
) -> None:
    state = tmp_path / "state"
    a = init_institution_keys(tmp_path, "uni-a")
    b = init_institution_keys(tmp_path, "uni-b")
    for keys, name in ((a, "uni-a"), (b, "uni-b")):
        assert _invoke("server", "enrol", str(keys.public_key), "--name", name,
                       "--state", str(state))[0] == 0  # fmt: skip

    code, out = _invoke("server", "revoke", "uni-a", "--state", str(state))
    assert code == 0, out
    assert "revoked uni-a" in out and "refused from the next start" in out
    registry = load_registry(state)
    assert list(registry.institutions) == ["uni-b"]
    assert a.public_key.read_text().startswith(registry.revoked["uni-a"].public_key)

    # Neither under its old name nor under another: it needs a new key pair.
    for name in ("uni-a", "uni-z"):
        code, out = _invoke(
            "server", "enrol", str(a.public_key), "--name", name, "--state", str(state)
        )
        assert code == 2 and "was revoked" in out and "new key pair" in out
    code, out = _invoke("server", "revoke", "uni-q", "--state", str(state))
    assert code == 2 and "'uni-q' is not enrolled (enrolled: uni-b)" in out


def test_enrolling_the_same_key_twice_changes_nothing() -> None:
    line = "ecdsa-sha2-nistp384 AAAA"
    once = Registry().with_institution("uni-a", line)
    assert once.with_institution("uni-a", line) is once
    with pytest.raises(EnrolmentError):
        once.with_institution("uni-b", line)


def test_server_start_without_keys_says_how_to_create_them(tmp_path: Path) -> None:
    code, out = _invoke(
        "server", "start", "--keys", str(tmp_path / "none"), "--state", str(tmp_path)
    )
    assert code == 2
    assert "edufl server keys init" in out


def test_insecure_server_warns_before_anything_starts(tmp_path: Path, busy_port: int) -> None:
    address = f"127.0.0.1:{busy_port}"
    result = CliRunner().invoke(
        app, ["server", "start", "--insecure", "--state", str(tmp_path), "--address", address]
    )
    assert "WARNING: --insecure" in result.output
    assert result.exit_code == 2 and "in use" in result.output  # and nothing was started


def test_client_start_refuses_an_unusable_export(tmp_path: Path, export_copy: Path) -> None:
    keys = init_institution_keys(tmp_path, "uni-a")
    (tmp_path / "ca.pem").write_text("unused")
    next(export_copy.glob("students.*")).unlink()
    code, out = _invoke(
        "client", "start", "--data", str(export_copy), "--superlink", "127.0.0.1:9",
        "--root-cert", str(tmp_path / "ca.pem"), "--key", str(keys.private_key),
    )  # fmt: skip
    assert code == 2
    assert "not usable" in out and "edufl client validate" in out


def test_client_start_refuses_insecure_with_node_key(tmp_path: Path, export_copy: Path) -> None:
    keys = init_institution_keys(tmp_path, "uni-a")
    code, out = _invoke(
        "client", "start", "--data", str(export_copy), "--superlink", "127.0.0.1:9",
        "--insecure", "--key", str(keys.private_key),
    )  # fmt: skip
    assert code == 2
    assert "node authentication needs TLS" in out


def test_stop_ends_the_child_and_what_it_started_even_in_another_session(tmp_path: Path) -> None:
    # As Flower's SuperExec does, the grandchild leads a session of its own; it starts one more
    # process into it only once its parent is gone, i.e. after `stop` looked at the family.
    late = tmp_path / "late.pid"
    grandchild_code = (
        "import os, subprocess, sys, time\n"
        "parent = os.getppid()\n"
        "while os.getppid() == parent: time.sleep(0.005)\n"
        "p = subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(120)'])\n"
        f"open({str(late)!r}, 'w').write(str(p.pid))\n"
        "time.sleep(120)\n"
    )
    script = (
        "import subprocess, sys, time\n"
        f"p = subprocess.Popen([sys.executable, '-c', {grandchild_code!r}],"
        " start_new_session=True)\n"
        "print(p.pid, flush=True)\n"
        "time.sleep(120)\n"
    )
    child = processes.start("sleeper", [sys.executable, "-c", script], log_path=tmp_path / "log")
    deadline = time.monotonic() + 30
    while not (tmp_path / "log").read_text().strip() and time.monotonic() < deadline:
        time.sleep(0.1)
    pids = [int((tmp_path / "log").read_text())]
    processes.stop(child, timeout=5)
    assert not child.alive()
    time.sleep(0.5)
    if late.exists() and late.read_text():
        pids.append(int(late.read_text()))
    for pid in pids:
        status = subprocess.run(["ps", "-o", "stat=", "-p", str(pid)], capture_output=True)
        assert status.stdout.strip()[:1] in (b"", b"Z"), f"process {pid} survived"


def test_a_daemon_that_dies_at_start_is_reported_with_its_log(tmp_path: Path) -> None:
    argv = [sys.executable, "-c", "print('bad flag'); raise SystemExit(3)"]
    child = processes.start("daemon", argv, log_path=tmp_path / "log")
    with pytest.raises(DeploymentError, match=r"exited with code 3(.|\n)*bad flag"):
        processes.wait_until_listening(child, "127.0.0.1", processes.free_port(), timeout=30)


@pytest.mark.parametrize("address", ["localhost", "host:port", "1.2.3.4:0", ":80"])
def test_malformed_addresses_are_refused(address: str) -> None:
    with pytest.raises(DeploymentError):
        processes.split_address(address)


def test_a_server_file_left_by_a_crash_does_not_block_a_restart(tmp_path: Path) -> None:
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    layout = ServerLayout(tmp_path)
    layout.server_file.write_text(f'{{"pid": {dead.pid}, "address": "127.0.0.1:9", "tls": true}}')
    assert running_server(layout) is None
