"""A simulation on a two-node Ray cluster that it joins (``--ray-address``), not one it starts.

Ray 2.55 binds its GCS and raylets to every interface and swaps ``--node-ip-address 127.0.0.1``
for the machine's routable address, so "loopback only" cannot be asked of Ray itself. The test
runs the whole cluster and the driver in a private network, mount and PID namespace
(``unshare``): the only interface there is ``lo``, and when the namespace's first process ends,
for any reason, the kernel ends every process in it (the cluster cannot outlive the test).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
import textwrap
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
RAY = Path(sys.executable).parent / "ray"
NAMESPACE = [
    "unshare", "--user", "--map-root-user", "--net", "--mount", "--pid", "--fork",
    "--kill-child", "--mount-proc",
]  # fmt: skip


def _namespaces_work() -> bool:
    if shutil.which("unshare") is None or shutil.which("ip") is None:
        return False
    probe = subprocess.run([*NAMESPACE, "true"], capture_output=True, timeout=30)
    return probe.returncode == 0


# The driver: joins the cluster through the CLI's --ray-address inside a session it opened with
# the same address, so that it can then ask the session's actors which node each ran on.
DRIVER = textwrap.dedent(
    """
    import json, sys
    from pathlib import Path

    import ray

    from simulations.cli import app
    from simulations.runner import ray_session

    address, out = sys.argv[1], Path(sys.argv[2])
    report = {}
    with ray_session(address) as session:
        app(
            ["simulate", "run", "--ray-address", address, "--synthetic", "2",
             "--students", "200", "--rounds", "1", "--local-epochs", "1", "--out", str(out)],
            prog_name="edufl", standalone_mode=False,
        )
        report["joined"] = session.joined
        report["alive_during"] = sum(n["Alive"] for n in ray.nodes())
        where = lambda _: ray.get_runtime_context().get_node_id()
        report["actor_nodes"] = ray.get([a.__ray_call__.remote(where) for a in session.actors])
        report["second_node"] = [
            n["NodeID"] for n in ray.nodes() if n["Alive"] and "second_node" in n["Resources"]
        ]
    report["connected_after"] = ray.is_initialized()
    ray.init(address=address, logging_level="ERROR")  # the cluster must still be there
    report["alive_after"] = sum(n["Alive"] for n in ray.nodes())
    ray.shutdown()
    print("REPORT " + json.dumps(report), flush=True)
    """
)

# Inside the namespace: loopback up, a head and a second node (each 1 CPU, its own ports), the
# driver, and `ray stop` on the way out whatever happened (the namespace's end is the backstop).
SCRIPT = textwrap.dedent(
    """
    set -eu
    ip link set lo up
    trap '"$RAY" stop --force >/dev/null 2>&1 || true' EXIT
    ports=$("$PY" -c 'import socket
    ss = [socket.socket() for _ in range(12)]
    for s in ss: s.bind(("127.0.0.1", 0))
    print(" ".join(str(s.getsockname()[1]) for s in ss))')
    set -- $ports
    common="--node-ip-address 127.0.0.1 --num-cpus 1 --temp-dir $TMPR --disable-usage-stats
            --object-store-memory 80000000"
    # Ray gives a starting node 30 s to register, fixed; on a loaded machine that can pass.
    retry() {
        for _ in 1 2 3; do "$@" && return 0; "$RAY" stop --force >/dev/null 2>&1; done; return 1
    }
    retry "$RAY" start --head --port $1 --ray-client-server-port $2 --include-dashboard=false \\
        --resources '{"head_node": 1}' $common \\
        --node-manager-port $3 --object-manager-port $4 --dashboard-agent-listen-port $5 \\
        --dashboard-agent-grpc-port $6 --runtime-env-agent-port $7 --metrics-export-port $8
    for _ in 1 2 3; do
        "$RAY" start --address 127.0.0.1:$1 --resources '{"second_node": 1}' $common \\
            --node-manager-port $9 --object-manager-port ${10} \\
            --dashboard-agent-listen-port ${11} --dashboard-agent-grpc-port ${12} && break
        sleep 5
    done
    # Listening sockets, for the test to check that every one is on loopback.
    ss -Hltn | awk '{print "LISTEN " $4}'
    "$PY" "$DRIVER" 127.0.0.1:$1 "$OUT"
    """
)


@pytest.mark.slow
@pytest.mark.skipif(not RAY.is_file(), reason="Ray's `ray` command is not installed")
def test_a_simulation_runs_across_a_two_node_ray_cluster_it_joins_and_leaves_running(
    tmp_path: Path,
) -> None:
    if not _namespaces_work():
        pytest.skip("unshare (user, network and PID namespaces) is not available here")
    driver = tmp_path / "driver.py"
    driver.write_text(DRIVER)
    out = tmp_path / "run"
    # Ray's socket paths must stay under 108 bytes: pytest's tmp_path is too deep.
    ray_tmp = Path(tempfile.mkdtemp(prefix="edufl-ray-"))
    env = {
        **os.environ,
        "RAY": str(RAY),
        "PY": sys.executable,
        "DRIVER": str(driver),
        "OUT": str(out),
        "TMPR": str(ray_tmp),
        "PYTHONPATH": str(REPO),
        "RAY_worker_niceness": "0",
        "RAY_ADDRESS": "",
    }
    try:
        proc = subprocess.run(
            [*NAMESPACE, "bash", "-c", SCRIPT],
            cwd=REPO,
            env=env,
            capture_output=True,
            text=True,
            timeout=900,
        )
    finally:
        shutil.rmtree(ray_tmp, ignore_errors=True)
    output = proc.stdout + proc.stderr
    assert proc.returncode == 0, output[-4000:]
    lines = [x for x in proc.stdout.splitlines() if x.startswith("REPORT ")]
    assert lines, output[-4000:]
    report = json.loads(lines[-1].removeprefix("REPORT "))

    assert report["joined"] is True
    assert report["alive_during"] == 2
    # One actor per node (1 CPU each, 1 CPU per virtual node), so both nodes trained.
    assert len(report["actor_nodes"]) == 2
    assert len(set(report["actor_nodes"])) == 2
    assert set(report["second_node"]) <= set(report["actor_nodes"])
    # Leaving the session disconnected this driver only: the cluster kept both nodes.
    assert report["connected_after"] is False
    assert report["alive_after"] == 2
    listening = [x.split()[1] for x in proc.stdout.splitlines() if x.startswith("LISTEN ")]
    assert listening, output[-4000:]
    assert all(a.rsplit(":", 1)[0] in ("127.0.0.1", "[::ffff:127.0.0.1]") for a in listening)

    records = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["round"] for r in records] == [1]
    names = sorted(e["institution"] for e in records[0]["institutions"])
    assert names == ["institution_01", "institution_02"]
    assert records[0]["failures"] == []
    assert "federated ROC-AUC" in output
