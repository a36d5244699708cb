"""Real processes: a revoked node is told so and named in the server's log; files are private.

One SuperLink with TLS and node authentication; uni-c is enrolled, then revoked; an outsider's
key was never enrolled. Both nodes are refused at activation: the server's log names each (not
by PEM), and uni-c's node exits at once saying its key was revoked and what to do. Every file
the server and the nodes wrote is 0600 in 0700 folders.
"""

from __future__ import annotations

import stat
from pathlib import Path

import pytest

from tests.deploy.harness import (
    Deployment,
    consortium,
    edufl,
    needs_timeout,
    output,
    start_server,
    wait_for,
)

pytestmark = [pytest.mark.slow, needs_timeout]


def _mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def test_refused_nodes_are_named_the_revoked_one_is_told_and_files_are_private(
    deployment: Deployment,
) -> None:
    dep = deployment
    nodes = {"uni-a": "institution_01", "uni-c": "institution_02"}
    data = consortium(dep, nodes, ("outsider",))
    edufl("server", "revoke", "uni-c", "--state", str(dep.state))
    out = dep.root / "run"
    # A machine shared with other tests can take minutes for the `flwr` calls.
    server = start_server(dep, out, rounds=1, min_nodes=1, ready_timeout=300)

    revoked = dep.node(
        "uni-c", data / "institution_02", dep.root / "uni-c", "--activation-wait", "0"
    )
    outsider = dep.node(
        "outsider", data / "institution_02", dep.root / "outsider", "--activation-wait", "0"
    )
    wait_for(
        "the refused nodes to exit",
        lambda: not (revoked.alive() or outsider.alive()),
        300,
        [server],
    )

    told = output(revoked)
    assert revoked.process.returncode != 0
    assert "node key is revoked, so retrying cannot help" in told
    assert "the key of uni-c (SHA256:" in told and "was revoked by the consortium operator" in told
    assert "edufl client keys init --force" in told
    assert "retrying in" not in told  # not mistaken for a crashed session
    assert outsider.process.returncode != 0
    assert "revoked" not in output(outsider)
    assert "enrolled this institution's .pub key" in output(outsider)

    log = (dep.state / "logs" / "superlink.log").read_text(errors="replace")
    assert "refused node activation from 127.0.0.1: revoked key of uni-c (SHA256:" in log
    assert "refused node activation from 127.0.0.1: unenrolled key SHA256:" in log

    # What the server and the refused nodes wrote is private (the run's own files: see
    # tests/server/test_private_files.py; a whole run here would not fit the harness's limit on
    # a shared machine).
    private_files = [
        dep.state / "superlink.db",
        dep.state / "logs" / "superlink.log",
        dep.state / "institutions.toml",
        dep.home("uni-c") / "logs" / "supernode.log",
        dep.home("outsider") / "logs" / "supernode.log",
    ]
    assert {str(p): _mode(p) for p in private_files} == {str(p): 0o600 for p in private_files}
    private_dirs = [dep.state, dep.state / "logs", dep.home("uni-c"), dep.home("uni-c") / "logs"]
    assert {str(p): _mode(p) for p in private_dirs} == {str(p): 0o700 for p in private_dirs}
