"""The deployment benchmark's and load test's plumbing: planes, SuperLink log, modes, verdict."""

from __future__ import annotations

import os
import time
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest

from bench import load_test
from bench.bench_deploy import (
    CLOSED_PATHS,
    EXECUTOR_WARM,
    FLEET_PATH,
    MODES,
    PUBLIC_HOST,
    Federation,
    flower_supernode_argv,
    planes_split,
    superlink_log_summary,
)
from client.node import cli as node_cli
from client.node.launcher import supernode_argv

# Lines as `server.superlink.serve` and Flower's uvicorn access log write them (flwr 1.41).
SUPERLINK_LOG = """\
2026-12-02T05:44:20.086Z INFO [uvicorn.access] 127.0.0.1:35994 - "POST /v1/control/list-runs HTTP/1.1" 200
WARNING __main__: refused POST /v1/control/list-runs from 127.0.0.1 on the public listener (only the Fleet API is public)
2026-12-02T05:44:28.176Z INFO [uvicorn.access] 127.0.0.1:37220 - "POST /v1/control/list-runs HTTP/1.1" 404
WARNING __main__: refused POST /v1/runtime/acquire-task from 127.0.0.2 on the public listener (only the Fleet API is public)
2026-12-02T05:44:28.178Z INFO [uvicorn.access] 127.0.0.1:37224 - "POST /v1/runtime/acquire-task HTTP/1.1" 404
2026-12-02T05:50:01.000Z INFO [uvicorn.access] 127.0.0.1:40000 - "POST /v1/fleet/push-messages HTTP/1.1" 500
ERROR flwr: (sqlite3.OperationalError) database is locked
2026-12-02T05:50:02.000Z INFO [uvicorn.access] 127.0.0.1:40002 - "POST /v1/fleet/push-messages HTTP/1.1" 500
"""  # noqa: E501


def _probe(**status: int) -> dict[str, Any]:
    codes = dict.fromkeys(CLOSED_PATHS, 404) | {FLEET_PATH: 401}
    codes.update({k.replace("__", "/"): v for k, v in status.items()})
    return {
        "public": f"{PUBLIC_HOST}:9092",
        "control": "127.0.0.1:9093",
        "control_port_open_on_public_host": False,
        "status": codes,
    }


def test_superlink_log_summary_counts_failed_requests_public_refusals_and_locks() -> None:
    summary = superlink_log_summary(SUPERLINK_LOG)

    assert summary["logged_requests_by_status"] == {"200": 1, "404": 2, "500": 2}
    assert summary["failed_requests"] == {
        "/v1/control/list-runs 404": 1,
        "/v1/fleet/push-messages 500": 2,
        "/v1/runtime/acquire-task 404": 1,
    }
    assert summary["refused_on_public_listener"] == 2
    assert summary["database_locked"] == 1


def test_planes_are_split_only_when_control_and_runtime_are_404_and_fleet_answers() -> None:
    assert planes_split(_probe())
    assert not planes_split(_probe(**{CLOSED_PATHS[0].replace("/", "__"): 200}))
    assert not planes_split(_probe(**{FLEET_PATH.replace("/", "__"): 404}))
    assert not planes_split(_probe() | {"control_port_open_on_public_host": True})


def _result(**changes: Any) -> dict[str, Any]:
    result = {
        "error": "",
        "updates_lost": 0,
        "rounds_completed": 10,
        "rounds_asked": 10,
        "planes_split": True,
    }
    return result | changes


@pytest.mark.parametrize(
    "changes",
    [
        {"error": "run 1 finished:failed"},
        {"updates_lost": 1},
        {"rounds_completed": 9},
        {"planes_split": False},
    ],
)
def test_load_test_fails_a_lost_update_a_missing_round_or_a_public_control_plane(
    changes: dict[str, Any],
) -> None:
    assert load_test.passed(_result())
    assert not load_test.passed(_result(**changes))


def test_load_test_table_shows_the_planes_and_what_the_superlink_logged() -> None:
    result = {
        **_result(rounds_completed=1, rounds_asked=1),
        "rounds": [
            {"round": 1, "wall_s": 12.0, "expected": 2, "received": 2, "lost": 0, "failures": 0}
        ],
        "round_s": {"median": 12.0, "min": 12.0, "max": 12.0, "runs": 1},
        "updates_expected": 2,
        "failures": 0,
        "peak_processes": 9,
        "peak_pss_sum_mib": 900,
        "peak_rss_sum_mib": 2000,
        "seconds_server_start_to_end": 40.0,
        "asked_again": 0,
        "restarted_nodes": ["uni-45"],
        "superlink_refused_pushes": 2,
        "planes": _probe() | {"control_port_open_on_public_host": True},
        "planes_split": False,
        "superlink_log": superlink_log_summary(SUPERLINK_LOG),
        "load_average": [1.5, 7.25],
        "cpus": 2,
    }

    table = load_test._table(result)

    assert f"planes: public {PUBLIC_HOST}:9092 answers /v1/control/list-runs 404" in table
    assert "(open on the public address): NOT SPLIT" in table
    assert "refused on the public listener 2 (the probes above: 3)" in table
    assert "'database is locked' 1" in table
    assert "load average (1 min) during the run: 1.5-7.25 on 2 CPUs" in table
    assert "nodes started again after the SuperLink did not activate them: uni-45" in table


def test_load_test_takes_the_public_listeners_address(tmp_path: Path) -> None:
    fed = Federation(tmp_path, hard_limit_s=60, host="127.0.0.3")

    assert fed.address == f"127.0.0.3:{fed.port}"
    assert fed.superlink_log == tmp_path / "consortium" / "state" / "logs" / "superlink.log"
    assert Federation(tmp_path, hard_limit_s=60).host == PUBLIC_HOST != "127.0.0.1"


def test_only_the_flower_mode_runs_flowers_isolation_the_others_edufls_executor(
    tmp_path: Path,
) -> None:
    fed = Federation(tmp_path, hard_limit_s=60)
    key = tmp_path / "uni-01"
    options = fed.node_options("uni-01", tmp_path / "export", key, warm=False)

    argv = flower_supernode_argv(options)

    own = supernode_argv(options)
    assert own[own.index("--isolation") + 1] == "process"
    assert argv[argv.index("--isolation") + 1] == "subprocess"
    assert [a for a in argv if a != "subprocess"] == [a for a in own if a != "process"]
    assert set(MODES) - set(EXECUTOR_WARM) == {"flower"}
    assert EXECUTOR_WARM == {"cold": False, "warm": True, "paced": True}


def test_activated_reads_only_the_log_written_since_the_start(tmp_path: Path) -> None:
    log_path = tmp_path / "supernode.log"
    log_path.write_text("INFO : SuperNode ID: 42\n")
    earlier = log_path.stat().st_size
    with open(log_path, "a") as fh:
        fh.write("ERROR : Exit Code: 305\n")

    assert load_test.activated(log_path, 0)
    assert not load_test.activated(log_path, earlier)
    assert not load_test.activated(tmp_path / "missing.log", 0)


class _ExitingNodes(load_test.ForkedNodes):
    """Nodes that write their next log line and exit at once (real processes, no SuperNode)."""

    def __init__(self, lines: list[str], activation_wait: float) -> None:
        super().__init__(60, activation_wait=activation_wait, preload=False)
        self.lines = lines

    def start(self, options: Any, first_start: float | None = None) -> int:
        log_path = options.home / "supernode.log"
        log_start = log_path.stat().st_size if log_path.exists() else 0
        line = self.lines.pop(0)
        pid = os.fork()
        if pid == 0:
            with open(log_path, "a") as fh:
                fh.write(line)
            os._exit(1)
        self.track(pid, options, log_path, log_start, first_start)
        return pid


REFUSED = "[code: 2004] Failed to activate SuperNode.\nExit Code: 305\n"
IN = "SuperNode ID: 7\nExit Code: 1\n"


@pytest.mark.parametrize(
    ("lines", "wait", "restarted"),
    [
        ([REFUSED, IN], 60.0, ["uni-45"]),  # in at the second try, then exits: once again only
        ([REFUSED, IN], 0.0, []),  # --activation-wait 0: never again
        ([IN, IN], 60.0, []),  # exited after its activation: not a refusal, not started again
    ],
)
def test_a_forked_node_the_superlink_did_not_activate_is_started_again_as_the_cli_does(
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    lines: list[str],
    wait: float,
    restarted: list[str],
) -> None:
    monkeypatch.setattr(node_cli, "ACTIVATION_RETRY_S", 0.0)
    nodes = _ExitingNodes(lines, activation_wait=wait)

    nodes.start(SimpleNamespace(name="uni-45", home=tmp_path))
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline:  # every child exits at once; reap them all
        nodes.restart_unactivated()
        time.sleep(0.02)

    assert nodes.restarted == restarted
    assert len(nodes.pids) == 1 + len(restarted)
    nodes.stop_all(timeout=1)


def _record(k: int, seconds: float, train: dict[str, Any] | None = None) -> dict[str, Any]:
    """One round of a run's ``metrics.jsonl``, as `round_rows` reads it."""
    return {
        "round": k,
        "seconds": seconds,
        "failures": [],
        "institutions": [{"train": train or {}}],
    }


def test_deploy_rows_without_training_times_compare_round_wall_times() -> None:
    from bench.bench_deploy import _report, round_rows
    from bench.common import Report

    timed = round_rows([_record(1, 9.0, {"train/seconds": 2.5}), _record(2, 4.0, {})])
    assert timed[0]["overhead_s"] == 6.5 and "overhead_s" not in timed[1]

    walls = {"flower": [30.0, 10.0, 12.0], "warm": [30.0, 4.0, 6.0]}
    rounds = {
        mode: [
            {"rep": 1, **r} for r in round_rows([_record(k + 1, w, {}) for k, w in enumerate(ws)])
        ]
        for mode, ws in walls.items()
    }
    report = Report("bench_deploy", "4", {})
    _report(report, rounds)

    rows = {row.measure: row for row in report.rows}
    assert rows["warm: round wall time (replies carry no training time)"].stats.median == 5.0
    assert rows["round wall time warm / flower (per pair of federations)"].stats.median == 5 / 11


def test_a_mode_with_training_times_gets_its_overhead_and_target_beside_one_without() -> None:
    """Flower's own node logs no training times; that must not hide the paced node's overhead
    (the combined table of `python -m bench` once showed wall times only)."""
    from bench.bench_deploy import TARGET_S, _report, round_rows
    from bench.common import Report

    timed = [(30.0, 5.0), (2.0, 1.0), (3.5, 1.0)]  # paced: wall, training -> overheads 1.0, 2.5
    rounds = {
        "flower": [
            {"rep": 1, **r}
            for r in round_rows([_record(k + 1, w, {}) for k, w in enumerate([30.0, 10.0, 12.0])])
        ],
        "paced": [
            {"rep": 1, **r}
            for r in round_rows(
                [_record(k + 1, w, {"train/seconds": t}) for k, (w, t) in enumerate(timed)]
            )
        ],
    }
    report = Report("bench_deploy", "4", {})
    _report(report, rounds)

    rows = {row.measure: row for row in report.rows}
    paced = rows["paced: round wall time - slowest node's training"]
    assert paced.stats.median == 1.75 and paced.target == f"< {TARGET_S:g} s"
    assert paced.met is True
    flower = rows["flower: round wall time (replies carry no training time)"]
    assert flower.stats.median == 11.0 and flower.met is None
    # The same federations' overhead as a share of Flower's own round (1.75 / 11), beside the
    # share the target was when it was set: a machine's speed moves both.
    share = rows[
        "paced overhead / flower round wall time (per pair of federations; the 2 s target was "
        "0.14 of Flower's node's 14.3 s when set)"
    ]
    assert share.stats.median == pytest.approx(1.75 / 11.0)
    assert share.target == "" and share.met is None  # the target is the overhead's row
    # The target is the default node's: another mode's overhead is shown without one.
    rounds["warm"] = [dict(r) for r in rounds["paced"]]
    report = Report("bench_deploy", "4", {})
    _report(report, rounds)
    rows = {row.measure: row for row in report.rows}
    warm = rows["warm: round wall time - slowest node's training"]
    assert warm.stats.median == 1.75 and warm.target == "" and warm.met is None
    assert rows["paced: round wall time - slowest node's training"].met is True


def test_dp_rounds_get_training_times_and_overhead_from_the_nodes_own_logs(
    tmp_path: Path,
) -> None:
    from bench.bench_deploy import add_task_split, round_rows

    logs = {
        "uni-a": [
            "INFO    :      round 1: uni-a trained with DP-SGD in 0.800 s (3 steps)",
            "INFO    :      task 11: ClientApp done in 1.20 s",
            "INFO    :      round 2: uni-a trained with DP-SGD in 0.500 s (3 steps)",
            "INFO    :      task 12: ClientApp done in 0.90 s",
        ],
        "uni-b": [
            "INFO    :      round 1: uni-b trained on 300 records in 1.500 s",
            "INFO    :      task 21: ClientApp done in 2.00 s",
            "INFO    :      task 22: ClientApp done in 0.70 s",  # round 2 not logged
        ],
    }
    for name, lines in logs.items():
        (tmp_path / name / "logs").mkdir(parents=True)
        (tmp_path / name / "logs" / "supernode.log").write_text("\n".join(lines) + "\n")
    rows = round_rows([_record(1, 3.0), _record(2, 2.0)])
    add_task_split(rows, tmp_path)
    first, second = rows
    assert first["slowest_train_s"] == 1.5 and first["overhead_s"] == 1.5
    assert first["in_task_s"] == 0.5 and first["transport_s"] == 1.0
    assert "overhead_s" not in second  # one node did not log its training: no figure
    assert second["transport_s"] == 1.1


def test_deploy_refuses_a_negative_thread_count_before_starting_anything(
    capsys: pytest.CaptureFixture[str],
) -> None:
    from bench.bench_deploy import main

    with pytest.raises(SystemExit) as exit_info:
        main(["--threads-per-node", "-1", "--modes", "paced"])
    assert exit_info.value.code == 2
    assert "--threads-per-node must be 0 (torch's own) or more, not -1" in capsys.readouterr().err
