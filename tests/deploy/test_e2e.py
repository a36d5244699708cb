"""A real deployment on loopback: SuperLink + SuperNodes with TLS and node authentication.

Everything runs through the `edufl` command as a university and an operator would run it:
`edufl server start` (a real SuperLink, the real ServerApp) and `edufl client start` (real
SuperNodes, the real ClientApp). Ports are chosen at run time and every server listens on
127.0.0.1 only. Each process runs under coreutils' `timeout` and is asked to die with the test
process, so nothing outlives a crashed test; the fixture stops every one of them by pid
(tests/deploy/harness.py).
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from client.early_warning.adopt import ADOPTION_FILE, latest_adopted
from server.checkpoints import CheckpointStore
from server.institutions import load_registry
from shared_models import processes
from shared_models.data.contract import default_spec
from shared_models.models.artifact import WEIGHTS_FILE
from shared_models.models.checkpoints import checkpoint_model
from shared_models.models.weights import load_tensors, named_weights
from shared_models.protocol import weights_sha256
from tests.deploy.harness import (
    Deployment,
    consortium,
    edufl,
    finished_rounds,
    institutions,
    needs_timeout,
    output,
    start_server,
    wait_for,
)

pytestmark = [pytest.mark.slow, needs_timeout]


def test_tls_federation_with_node_keys_trains_two_rounds_and_refuses_an_unenrolled_node(
    deployment: Deployment,
) -> None:
    dep = deployment
    nodes = {"uni-a": "institution_01", "uni-b": "institution_02"}
    data = consortium(dep, nodes, ("stranger", "uni-late"))
    out = dep.root / "run"
    server = start_server(dep, out)
    assert "enrolled institutions: uni-a, uni-b" in output(server)
    dep.node("uni-a", data / "institution_01", dep.root / "uni-a")
    dep.node("uni-b", data / "institution_02", dep.root / "uni-b")
    stranger = dep.node(
        "stranger", data / "institution_01", dep.root / "stranger", "--activation-wait", "0"
    )

    # The SuperLink turns the unenrolled key away; the node says what to do about it.
    wait_for("the stranger to exit", lambda: not stranger.alive(), 90, [server])
    assert stranger.process.returncode == 2
    assert "refused SuperNode stranger" in output(stranger)
    assert "edufl server enrol" in output(stranger)
    # Enrolling while the server runs registers the key with the SuperLink at once.
    late = str(dep.root / "uni-late" / "uni-late.pub")
    reply = edufl("server", "enrol", late, "--name", "uni-late", "--state", str(dep.state))
    assert "registered with the running SuperLink as node" in reply

    records = finished_rounds(server, out)
    for record in records:
        assert institutions(record) == {"uni-a", "uni-b"}
        # Under DP (the default) a round's train figures are the nodes' noised counts only.
        assert record["train"]["num-examples"]["noised"] is True  # type: ignore[index]
    # Each node was known by its enrolled key: the ids in the metrics log are the ones the
    # SuperLink gave the keys at registration.
    registry = load_registry(dep.state).institutions
    entries = records[-1]["institutions"]
    assert isinstance(entries, list)
    assert {e["institution"]: str(e["node_id"]) for e in entries} == {
        name: registry[name].node_id for name in nodes
    }
    assert registry["uni-late"].node_id is not None

    # DP-SGD is the default: every round's spend is in the consortium ledger, signed with the
    # enrolled node keys, and each institution's own copy sits in its node's home.
    ledger = out / "ledger.jsonl"
    heads = [a for n in nodes for a in ("--heads", str(dep.home(n) / "privacy" / "ledger.jsonl"))]
    keys = ("--keys", str(dep.state / "institutions.toml"), "--absent", "uni-late")
    verified = edufl("audit", "verify", str(ledger), *keys, *heads)
    assert "=> INTACT" in verified and "registered keys" in verified
    entries = [json.loads(line) for line in ledger.read_text().splitlines()]
    trained = [e for e in entries if e.get("kind", "train") == "train"]
    assert sorted((e["institution"], e["round"]) for e in trained) == [
        ("uni-a", 1), ("uni-a", 2), ("uni-b", 1), ("uni-b", 2),
    ]  # fmt: skip
    # Besides, each node's noised student count, released once in the run.
    assert sorted(e["institution"] for e in entries if e.get("kind") == "count") == list(nodes)
    assert all(e["private"] and 0 < e["epsilon_after"] <= 8.0 for e in entries)
    for name in nodes:
        own = (dep.home(name) / "privacy" / "ledger.jsonl").read_text().splitlines()
        assert [json.loads(line)["round"] for line in own] == [1, 1, 2]  # count, train, train

    # After the last round every node received the final model, verified it and adopted it
    # into its home: the advisors' score and report use it without --model, nothing copied.
    _every_university_holds_the_final_model(dep, out, {n: data / e for n, e in nodes.items()})
    assert "adopted by 2 of 2 node(s): uni-a, uni-b" in output(server)

    # No secret ever reaches a log: no line of any private key's body, in any process's log.
    secrets = [dep.keys / "ca.key", dep.keys / "server.key"]
    secrets += [dep.root / name / name for name in (*nodes, "stranger", "uni-late")]
    bodies = {
        line
        for path in secrets
        for line in path.read_text().splitlines()
        if len(line) >= 40 and "PRIVATE KEY" not in line
    }
    assert len(bodies) > len(secrets)
    logs = [*dep.root.glob("logs/*"), *dep.root.glob("homes/*/logs/*")]
    assert logs
    for log in logs:
        text = log.read_text(errors="replace")
        assert not [b for b in bodies if b in text], f"a private key leaked into {log}"


def _every_university_holds_the_final_model(
    dep: Deployment, out: Path, exports: dict[str, Path]
) -> None:
    final = CheckpointStore(out).latest()
    assert final is not None
    checksum = weights_sha256(named_weights(checkpoint_model(final, default_spec())))
    delivered = json.loads((out / "delivery.json").read_text())
    assert delivered == {
        "run_id": final.manifest["run_id"],
        "round": final.round,
        "weights_sha256": checksum,
        "adopted": sorted(exports),
        "not_adopted": {},
    }
    for name, export in exports.items():
        home = dep.home(name)
        folder = latest_adopted(home)
        adopted = load_tensors(folder / WEIGHTS_FILE)
        assert weights_sha256({k: v.numpy() for k, v in adopted.items()}) == checksum
        record = json.loads((folder / ADOPTION_FILE).read_text())
        assert (record["run_id"], record["round"]) == (final.manifest["run_id"], final.round)
        assert record["data_dir"] == str(export.resolve())

        scored = edufl(
            "client", "score", "--home", str(home), "--data", str(export),
            "--db", str(dep.root / f"{name}.sqlite"),
        )  # fmt: skip
        assert f"model: {folder}" in scored
        report = dep.root / "reports" / name
        edufl("client", "report", "--home", str(home), "--data", str(export), "--out", str(report))
        assert "<html" in (report / "report.html").read_text()[:2000].lower()
        assert (report / "students.csv").is_file()


def test_run_finishes_when_a_node_is_lost_mid_round_and_enough_remain(
    deployment: Deployment,
) -> None:
    dep = deployment
    nodes = {"uni-a": "institution_01", "uni-b": "institution_02", "uni-c": "institution_03"}
    data = consortium(dep, nodes)
    out = dep.root / "run"
    server = start_server(dep, out)
    # Round 1 starts with uni-a and uni-c; uni-c is lost during it while uni-b joins, so
    # round 2 still has the two nodes --min-nodes asks for.
    a = dep.node("uni-a", data / "institution_01", dep.root / "uni-a")
    c = dep.node("uni-c", data / "institution_03", dep.root / "uni-c")
    wait_for(
        "round 1 to start",
        lambda: "configure_train: Sampled 2 nodes" in output(server),
        120,
        [server, a, c],
    )
    dep.node("uni-b", data / "institution_02", dep.root / "uni-b")
    processes.stop(c)

    first, second = finished_rounds(server, out)
    assert "uni-c" not in institutions(first) | institutions(second)
    assert first["failures"], "the lost node's round-1 reply should be recorded as a failure"
    assert institutions(second) == {"uni-a", "uni-b"}
