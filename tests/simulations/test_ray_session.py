"""One Ray session for many simulations, and the checks before joining a cluster."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from typer.testing import CliRunner

import simulations.runner as runner_module
from server.config import FederationConfig
from simulations.cli import app
from simulations.runner import SimulationError, ray_session, simulate
from simulations.synthetic import write_consortium
from tests.simulations.test_runner import _no_leftover_processes

cli = CliRunner()


def _pid(actor: object) -> int:
    import ray

    return int(ray.get(actor.__ray_call__.remote(lambda _: os.getpid())))  # type: ignore[attr-defined]


@pytest.mark.slow
def test_simulations_in_one_session_share_ray_and_its_warm_workers(tmp_path: Path) -> None:
    import ray

    exports = write_consortium(tmp_path / "c", institutions=2, students=120, seed=0)
    results, pids = [], []
    with ray_session() as session:
        for run in ("a", "b"):
            config = FederationConfig(rounds=1, local_epochs=1, min_nodes=2, out_dir=tmp_path / run)
            results.append(simulate(config, exports))
            assert ray.is_initialized()  # the session keeps Ray between simulations
            pids.append(sorted(_pid(a) for a in session.actors))
        assert session.simulations == 2
    assert pids[0] == pids[1] and len(pids[0]) >= 1  # the same worker processes served both
    # Same seed, same exports: a warm worker gives what a fresh one gave.
    assert results[0].evaluate == results[1].evaluate
    assert not ray.is_initialized()
    assert _no_leftover_processes() == []


def test_a_warm_worker_forgets_what_it_prepared_from_files_that_changed(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    cleared: list[int] = []
    monkeypatch.setattr(runner_module.node_app, "clear_caches", lambda: cleared.append(1))
    monkeypatch.setattr(runner_module, "_seen_files", {})
    export = tmp_path / "export"
    export.mkdir()
    (export / "students.csv").write_text("a\n")
    first = runner_module._files_digest([str(export)])
    runner_module._forget_changed_files(first)
    runner_module._forget_changed_files(runner_module._files_digest([str(export)]))
    assert cleared == []  # the same files: the prepared data stays
    (export / "students.csv").write_text("a,b\n")
    changed = runner_module._files_digest([str(export)])
    assert changed != first
    runner_module._forget_changed_files(changed)
    assert cleared == [1]


def test_on_a_cluster_relative_paths_fail_before_ray_is_touched(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    (tmp_path / "exp").mkdir()
    config = FederationConfig(rounds=1, min_nodes=1, out_dir=tmp_path / "run")
    with pytest.raises(SimulationError, match=r"paths must be absolute; relative: export 'exp'"):
        simulate(config, ["exp"], ray_address="127.0.0.1:1")
    relative_out = FederationConfig(rounds=1, min_nodes=1, out_dir=Path("run"))
    monkeypatch.setenv("RAY_ADDRESS", "127.0.0.1:1")  # Ray's own variable counts as well
    with pytest.raises(SimulationError, match=r"127\.0\.0\.1:1 .* relative: --out 'run'"):
        simulate(relative_out, [tmp_path / "exp"])
    import ray

    assert not ray.is_initialized()


def test_a_simulation_inside_a_session_cannot_name_another_cluster(tmp_path: Path) -> None:
    (tmp_path / "exp").mkdir()
    config = FederationConfig(rounds=1, min_nodes=1, out_dir=tmp_path / "run")
    with ray_session() as session, pytest.raises(SimulationError, match="open the session"):
        simulate(config, [tmp_path / "exp"], ray_address="10.0.0.1:6379")
    assert not session.started  # Ray starts at the first simulation, and none ran


def test_cli_ray_address_wants_an_absolute_out_and_reads_ray_address(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    result = cli.invoke(
        app,
        ["simulate", "run", "--synthetic", "2", "--out", "rel", "--ray-address", "10.0.0.1:6379"],
        prog_name="edufl",
    )
    assert result.exit_code == 2
    assert "--out 'rel' is relative" in result.output and "Traceback" not in result.output
    monkeypatch.setenv("RAY_ADDRESS", "10.0.0.2:6379")
    result = cli.invoke(app, ["simulate", "run", "--synthetic", "2", "--out", "rel"])
    assert result.exit_code == 2 and "10.0.0.2:6379" in result.output
    assert not (tmp_path / "rel").exists()
