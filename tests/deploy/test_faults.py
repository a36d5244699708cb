"""Fault injection on a real deployment: TLS SuperLink, authenticated SuperNodes, DP-SGD on.

Each test starts real `edufl server start` / `edufl client start` processes on loopback (see
tests/deploy/harness.py) and breaks something on purpose: a node that sends garbage, a node that
dies and comes back with its key, a node whose budget is spent, the server killed mid-round.
The faults of a misbehaving node come from tests/deploy/faults/sitecustomize.py, put on that
node's PYTHONPATH only; everything else is the code an institution runs.
"""

from __future__ import annotations

import math
import re
import tomllib
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
from flwr.app import Context, MessageType, RecordDict

import client.app
from server.checkpoints import CheckpointStore
from server.config import FederationConfig
from server.federation import global_model
from server.institutions import load_registry
from shared_models.data.contract import default_spec
from shared_models.models.weights import named_weights
from tests.client.test_app import _message
from tests.deploy.harness import (
    Deployment,
    consortium,
    crash,
    edufl,
    finished_rounds,
    institutions,
    ledger_entries,
    ledger_rounds,
    metrics,
    needs_timeout,
    output,
    start_server,
    wait_for,
)

pytestmark = [pytest.mark.slow, needs_timeout]

FAULTS = Path(__file__).parent / "faults"


def _faulty(fault: str, state: Path) -> dict[str, str]:
    return {"PYTHONPATH": str(FAULTS), "EDUFL_FAULT": fault, "EDUFL_FAULT_STATE": str(state)}


def _verify(dep: Deployment, ledger: Path, *, absent: tuple[str, ...] = ()) -> None:
    """The default audit: registered keys, and each taking part institution's own chain end
    (its node's ledger) as the head; ``absent`` enrolled institutions took no part in the run."""
    registry = dep.state / "institutions.toml"
    enrolled = tomllib.loads(registry.read_text("utf-8"))["institutions"]
    heads = [
        arg
        for name in sorted(set(enrolled) - set(absent))
        for arg in ("--heads", str(dep.home(name) / "privacy" / "ledger.jsonl"))
    ]
    absents = [arg for name in absent for arg in ("--absent", name)]
    report = edufl("audit", "verify", str(ledger), "--keys", str(registry), *heads, *absents)
    assert "=> INTACT" in report, report


def _failures(record: dict[str, object]) -> list[dict[str, object]]:
    failures = record["failures"]
    assert isinstance(failures, list)
    return failures


def test_garbage_updates_are_rejected_named_and_kept_out_of_the_global_model(
    deployment: Deployment,
) -> None:
    dep = deployment
    honest = {"uni-a": "institution_01", "uni-b": "institution_02"}
    faults = {"bad-nan": "nan", "bad-shape": "shape", "bad-scale": "scale", "bad-replay": "replay"}
    exports = {name: f"institution_0{i}" for i, name in enumerate(faults, start=3)}
    data = consortium(dep, honest | exports)
    out = dep.root / "run"
    server = start_server(dep, out, rounds=2, min_nodes=6)
    for name, export in honest.items():
        dep.node(name, data / export, dep.root / name)
    for name, fault in faults.items():
        env = _faulty(fault, dep.root / f"{name}.npz")
        dep.node(name, data / exports[name], dep.root / name, env=env)

    first, second = finished_rounds(server, out, rounds=2)

    def rejected(record: dict[str, object]) -> dict[str, str]:
        entries = record["rejected"]
        assert isinstance(entries, list)
        return {str(r["institution"]): str(r["reason"]) for r in entries}

    round_1, round_2 = rejected(first), rejected(second)
    assert set(round_1) == {"bad-nan", "bad-shape", "bad-scale"}  # the replayer was honest once
    assert set(round_2) == set(faults)
    assert "non-finite" in round_2["bad-nan"]
    assert "wrong shape" in round_2["bad-shape"]
    assert "update norm" in round_2["bad-scale"]
    assert "replayed update" in round_2["bad-replay"] and "round 1" in round_2["bad-replay"]
    assert "rejected the update of node" in output(server)

    # The global model moved like an average of honest LSTM updates, not like the attacks.
    store = CheckpointStore(out)
    config = FederationConfig()
    models = []
    for checkpoint in store.checkpoints():
        model = global_model(config, default_spec())
        store.load(checkpoint, model)
        models.append(named_weights(model))
    assert all(np.isfinite(v).all() for weights in models for v in weights.values())
    moved = math.sqrt(sum(float(np.sum((models[1][k] - models[0][k]) ** 2)) for k in models[0]))
    assert 0 < moved < 10.0
    _verify(dep, out / "ledger.jsonl")


def _spend_whole_budget(export: Path, name: str, state: Path, key: Path, rounds: int) -> None:
    """Train ``rounds`` DP rounds in-process under ``state``: a run this node took part in before.

    Same export, batch size, epochs, rounds and budget as the deployed run, so that run finds
    this institution's budget already spent.
    """
    config = FederationConfig(rounds=rounds, local_epochs=1, dp_epsilon=8.0)
    weights = named_weights(global_model(config, default_spec()))
    context = Context(
        run_id=1,
        node_id=1,
        node_config={
            "data-path": str(export),
            "institution": name,
            "privacy-state": str(state),
            "privacy-key": str(key),
            "dp": "required",
        },
        state=RecordDict(),
        run_config={},
    )
    for server_round in range(1, rounds + 1):
        extra = {"server-round": server_round, "run-id": "an-earlier-run"}
        reply = client.app.app(_message(MessageType.TRAIN, config, weights, **extra), context)
        assert not reply.has_error()


def test_node_back_with_its_key_keeps_its_budget_and_a_spent_node_declines_while_the_run_goes_on(
    deployment: Deployment,
) -> None:
    dep = deployment
    nodes = {"uni-a": "institution_01", "uni-b": "institution_02", "uni-c": "institution_03"}
    data = consortium(dep, nodes)
    spent = dep.home("uni-c") / "privacy"
    _spend_whole_budget(data / nodes["uni-c"], "uni-c", spent, dep.root / "uni-c" / "uni-c", 3)
    out = dep.root / "run"
    # Every round waits for three nodes: the one after uni-a's crash waits for it to come back.
    server = start_server(dep, out, rounds=3, min_nodes=3)
    a = dep.node("uni-a", data / nodes["uni-a"], dep.root / "uni-a")
    dep.node("uni-b", data / nodes["uni-b"], dep.root / "uni-b")
    dep.node("uni-c", data / nodes["uni-c"], dep.root / "uni-c")

    wait_for("round 1", lambda: len(metrics(out)) >= 1, 180, [server, a])
    crash(a)  # uni-a's machine goes down ...
    before = ledger_entries(dep.home("uni-a") / "privacy" / "ledger.jsonl")
    dep.node("uni-a", data / nodes["uni-a"], dep.root / "uni-a")  # ... and comes back

    records = finished_rounds(server, out, rounds=3)
    after = ledger_entries(dep.home("uni-a") / "privacy" / "ledger.jsonl")
    assert after[: len(before)] == before, "the restarted node kept its chain"
    assert len(after) > len(before) and after[-1]["round"] == 3
    assert [e["seq"] for e in after] == list(range(len(after)))
    epsilons = [float(e["epsilon_after"]) for e in after]  # type: ignore[arg-type]
    assert epsilons == sorted(epsilons) and epsilons[-1] <= 8.0
    assert epsilons[len(before)] > epsilons[len(before) - 1], "it kept counting, not restarted"

    # uni-c had spent its budget: it declines every round with the reason; the others go on.
    for record in records:
        failures = record["failures"]
        assert isinstance(failures, list)
        assert any("takes no further DP rounds" in str(f["error"]) for f in failures)
    assert "uni-c" not in {e["institution"] for e in ledger_entries(out / "ledger.jsonl")}
    assert ledger_rounds(out / "ledger.jsonl", "uni-b") == [1, 2, 3]
    _verify(dep, out / "ledger.jsonl", absent=("uni-c",))


def test_server_killed_mid_round_resumes_from_its_checkpoint_and_counts_no_round_twice(
    deployment: Deployment,
) -> None:
    dep = deployment
    nodes = {"uni-a": "institution_01", "uni-b": "institution_02"}
    data = consortium(dep, nodes)
    out = dep.root / "run"
    server = start_server(dep, out, rounds=3, min_nodes=2, evaluate=True)
    a = dep.node("uni-a", data / nodes["uni-a"], dep.root / "uni-a")
    # uni-b evaluates slowly: round 2 is trained and spent, but not yet committed, for 15 s.
    env = _faulty("slow-evaluate", dep.root / "unused.npz")
    b = dep.node("uni-b", data / nodes["uni-b"], dep.root / "uni-b", env=env)

    def round_2_trained_not_committed() -> bool:
        trained = all(
            2 in ledger_rounds(dep.home(name) / "privacy" / "ledger.jsonl") for name in nodes
        )
        return trained and [r["round"] for r in metrics(out)] == [1]

    wait_for("round 2 in flight", round_2_trained_not_committed, 240, [server, a, b])
    crash(server)  # the SuperLink and the ServerApp die with it
    assert [c.round for c in CheckpointStore(out).checkpoints()] == [1]

    restarted = start_server(dep, out, rounds=3, min_nodes=2, evaluate=True, name="server-2",
                             extra=("--resume",))  # fmt: skip
    records = finished_rounds(restarted, out, rounds=3)
    assert "stopped 1 run(s) an earlier server left unfinished" in output(restarted)

    # Round 2 ran again from the same checkpoint: each node re-sent what it had released,
    # so neither its own ledger nor the consortium's counts round 2 twice.
    for name in nodes:
        assert ledger_rounds(dep.home(name) / "privacy" / "ledger.jsonl") == [1, 2, 3]
        assert ledger_rounds(out / "ledger.jsonl", name) == [1, 2, 3]
        assert "already trained and released" in output(a if name == "uni-a" else b)
    run_ids = {c.manifest["run_id"] for c in CheckpointStore(out).checkpoints()}
    assert len(run_ids) == 1
    assert {e["run_id"] for e in ledger_entries(out / "ledger.jsonl")} == run_ids
    assert [r["round"] for r in records] == [1, 2, 3]
    _verify(dep, out / "ledger.jsonl")


def test_revoked_institution_is_refused_at_once_or_at_the_next_start(
    deployment: Deployment,
) -> None:
    dep = deployment
    nodes = {
        "uni-a": "institution_01",
        "uni-b": "institution_02",
        "uni-c": "institution_03",
        "uni-d": "institution_04",
    }
    data = consortium(dep, nodes)
    out = dep.root / "run"
    server = start_server(dep, out, rounds=3, min_nodes=2)
    superlink_log = dep.state / "logs" / "superlink.log"

    def online(name: str) -> Callable[[], bool]:
        node_id = load_registry(dep.state).institutions[name].node_id
        return lambda: f"Activated node_id={node_id}" in superlink_log.read_text("utf-8")

    # The round boundaries are held with test-only faults (train replies that wait for a
    # file): round 1 is uni-a's and uni-b's, and uni-a's reply waits until uni-c is online,
    # so round 2 samples all three; uni-c's round-2 reply waits until it has been revoked.
    hold_a, hold_c = dep.root / "hold-a", dep.root / "hold-c"
    for folder, rounds in ((hold_a, (2, 3)), (hold_c, (1, 3))):
        folder.mkdir()
        for n in rounds:
            (folder / f"release-round-{n}").touch()
    a = dep.node(
        "uni-a", data / nodes["uni-a"], dep.root / "uni-a", env=_faulty("hold-train", hold_a)
    )
    b = dep.node("uni-b", data / nodes["uni-b"], dep.root / "uni-b")
    wait_for("round 1 under way", (hold_a / "held-round-1").exists, 180, [server, a, b])
    c = dep.node(
        "uni-c", data / nodes["uni-c"], dep.root / "uni-c", env=_faulty("hold-train", hold_c)
    )
    wait_for("uni-c online", online("uni-c"), 120, [server, a, b, c])
    (hold_a / "release-round-1").touch()
    wait_for("uni-c to train round 2", (hold_c / "held-round-2").exists, 180, [server, a, b, c])

    # Revoked while the server runs, after round 2 sent it its message: the SuperLink
    # unregisters its node at once.
    c_id = load_registry(dep.state).institutions["uni-c"].node_id
    reply = edufl("server", "revoke", "uni-c", "--state", str(dep.state))
    assert f"node {c_id} unregistered from the running SuperLink" in reply
    (hold_c / "release-round-2").touch()  # its round-2 update now goes out, after the revocation
    first, second, third = finished_rounds(server, out, rounds=3)
    assert institutions(first) == {"uni-a", "uni-b"}
    # The round it was revoked in ends without it, as a failure (Flower's Node Unavailable),
    # not at the round timeout (120 s); the update it trained and spent budget on (its own
    # ledger) is refused by the SuperLink or never sent, never aggregated. The next round has
    # only the others.
    assert ledger_rounds(dep.home("uni-c") / "privacy" / "ledger.jsonl") == [2]
    assert institutions(second) == {"uni-a", "uni-b"}
    assert [f["node_id"] for f in _failures(second)] == [int(c_id)]
    assert float(second["seconds"]) < 60, second
    assert institutions(third) == {"uni-a", "uni-b"}
    assert _failures(third) == []
    # Its next request is refused: the reply's push, or a heartbeat sent first (Flower's node
    # then stops itself, and the reply never leaves it; more likely with edufl's heartbeats,
    # one every 10.5-13.5 s: `client.node.heartbeats`).
    refused = re.compile(
        r"refused node request /v1/fleet/(push-messages|send-node-heartbeat) from 127\.0\.0\.1: "
        r"revoked key of uni-c"
    )
    wait_for(
        "uni-c's next request refused",
        lambda: refused.search(superlink_log.read_text("utf-8")) is not None,
        60,
        [],
    )

    # Revoked while the server is down: the next start unregisters the node before any run.
    # (uni-a spent its whole budget in the first run and declines; uni-d joins fresh.)
    reply = edufl("server", "revoke", "uni-b", "--state", str(dep.state))
    assert "refused from the next start" in reply
    again = start_server(dep, dep.root / "run-2", rounds=1, min_nodes=2, name="server-2")
    assert "enrolled institutions: uni-a, uni-d" in output(again)
    assert "its key is no longer enrolled" in output(again)
    dep.node("uni-d", data / nodes["uni-d"], dep.root / "uni-d")
    (only,) = finished_rounds(again, dep.root / "run-2", rounds=1)
    assert institutions(only) == {"uni-d"}
    failures = only["failures"]
    assert isinstance(failures, list)
    assert any("takes no further DP rounds" in str(f["error"]) for f in failures)
