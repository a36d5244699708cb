"""``edufl simulate run``: a real federation on Flower's Ray engine, end to end, and its CLI."""

from __future__ import annotations

import json
import os
import subprocess
import time
from pathlib import Path

import pytest
from flwr.supercore.task_identity import TaskIdentity
from typer.testing import CliRunner

from server.config import FederationConfig
from server.federation import run_federation
from simulations.cli import app
from simulations.synthetic import write_consortium
from tests.server.conftest import InProcessGrid

runner = CliRunner()


def _invoke(*args: str) -> tuple[int, str]:
    result = runner.invoke(app, ["simulate", "run", *args], prog_name="edufl")
    return result.exit_code, result.output


#: Python's own multiprocessing helper: started by the first spawned worker pool of this test
#: process (`edufl reproduce --workers`), it lives as long as its parent by design.
_RESOURCE_TRACKER = "from multiprocessing.resource_tracker import main"


def _descendants() -> list[str]:
    """Processes started (directly or not) by this test process, as ``pid command``."""
    table = subprocess.run(
        ["ps", "-ww", "-eo", "pid=,ppid=,comm=,args="], capture_output=True, text=True, check=True
    ).stdout
    children: dict[int, list[tuple[int, str, str]]] = {}
    for line in table.splitlines():
        pid, ppid, comm, *args = line.split(None, 3)
        children.setdefault(int(ppid), []).append((int(pid), comm, " ".join(args)))
    found, todo = [], [os.getpid()]
    while todo:
        for pid, comm, args in children.get(todo.pop(), []):
            if comm != "ps" and _RESOURCE_TRACKER not in args:
                found.append(f"{pid} {comm}")
                todo.append(pid)
    return found


def _no_leftover_processes(grace: float = 15.0) -> list[str]:
    deadline = time.monotonic() + grace  # Ray's daemons take a moment to exit after shutdown
    while (left := _descendants()) and time.monotonic() < deadline:
        time.sleep(0.5)
    return left


def test_simulation_on_ray_trains_every_round_and_leaves_no_process_behind(
    tmp_path: Path,
) -> None:
    out = tmp_path / "run"
    code, output = _invoke(
        "--synthetic", "3", "--students", "240", "--rounds", "2", "--out", str(out),
        "--engine", "ray",  # the default (auto) runs inline on one machine
    )  # fmt: skip
    assert code == 0, output

    progress = [line for line in output.splitlines() if line.startswith("round ")]
    assert [line.split()[1] for line in progress] == ["1/2", "2/2"]
    assert "federated ROC-AUC" in progress[-1]
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["round"] for r in records] == [1, 2]
    for record in records:
        names = sorted(e["institution"] for e in record["institutions"])
        assert names == ["institution_01", "institution_02", "institution_03"]
        assert record["failures"] == [] and record["rejected"] == []
    final = records[-1]["evaluate"]["risk/roc_auc"]
    assert 0.5 < final <= 1.0
    assert f"{final:.4f}" in output
    assert sorted(p.name for p in (out / "checkpoints").glob("*.json")) == [
        "round-0001.json",
        "round-0002.json",
    ]
    assert "| institution_03 |" in (out / "summary.md").read_text()
    assert (out / "rounds.png").stat().st_size > 1000

    import ray

    assert not ray.is_initialized()
    assert _no_leftover_processes() == []


@pytest.mark.slow
def test_a_run_that_crashed_after_round_one_resumes_on_ray_with_the_remaining_rounds(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    out = tmp_path / "run"
    exports = write_consortium(out / "consortium", institutions=2, students=120, seed=0)
    # Round 1 in-process (Ray start-up is the slow part), then the SuperLink "dies" in round 2.
    for attr, value in (("_run_id", 1), ("_node_id", 0), ("_task_id", 1)):
        monkeypatch.setattr(TaskIdentity, attr, value)
    crashed = FederationConfig(rounds=3, local_epochs=1, out_dir=out)
    with pytest.raises(RuntimeError, match="SuperLink crashed"):
        run_federation(
            InProcessGrid(exports, crash_at=lambda m: m.content["config"]["server-round"] == 2),
            crashed,
        )

    common = (
        "--synthetic", "2", "--students", "120", "--local-epochs", "1", "--out", str(out),
        "--engine", "ray",
    )  # fmt: skip
    code, output = _invoke(*common, "--rounds", "3")
    assert code == 2 and "--resume" in output  # a crashed run is never overwritten silently

    code, output = _invoke(*common, "--rounds", "3", "--resume")
    assert code == 0, output
    progress = [line.split()[1] for line in output.splitlines() if line.startswith("round ")]
    assert progress == ["2/3", "3/3"]
    rounds = [json.loads(x)["round"] for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert rounds == [1, 2, 3]
    assert _no_leftover_processes() == []


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (("--out", "x"), "either --data DIR"),
        (("--out", "x", "--synthetic", "2", "--data", "y"), "either --data DIR"),
        (("--out", "x", "--data", "nowhere", "--strategy", "fedsgd"), "valid names are: fedavg"),
        (("--out", "x", "--data", "nowhere", "--proximal-mu", "0.1"), "fedprox"),
        (("--out", "x", "--data", "nowhere"), "export folder(s) not found"),
        (("--out", "x", "--data", "d", "--strategy-param", "eta"), "KEY=NUMBER"),
        (("--out", "x", "--data", ".", "--min-nodes", "2"), "wait forever"),
    ],
)
def test_bad_options_fail_with_one_clear_line_before_anything_starts(
    args: tuple[str, ...], message: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    code, output = _invoke(*args)
    assert code == 2
    assert message in output
    assert "Traceback" not in output
    assert not (tmp_path / "x").exists()


def test_run_help_has_an_example() -> None:
    code, output = _invoke("--help")
    assert code == 0 and "edufl simulate run --synthetic 4" in output
