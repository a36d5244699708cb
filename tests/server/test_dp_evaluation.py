"""Under DP the server evaluates after the last round only by default (`--dp-evaluate-every`).

Each federated evaluation under DP is a noised histogram release every node pays for, and its
noise grows with the number the run plans; the server plans them from its config and says so in
``planned-evaluations``. Without DP it evaluates after every round, as before.
"""

from __future__ import annotations

import json
import math
from collections import Counter
from pathlib import Path
from typing import Any

import pytest
from typer.testing import CliRunner

from privacy.budget import DEFAULT_HISTOGRAM_NOISE_STD, histogram_noise_std
from privacy.ledger.entries import parse_entries
from server.checkpoints import CheckpointStore
from server.config import FederationConfig
from server.federation import FederationResult, progress_line, run_federation
from server.rounds import RoundReport
from shared_models.protocol import PLANNED_EVALUATIONS, RISK_ROC_AUC, RoundSettings
from tests.server.conftest import InProcessGrid

runner = CliRunner()


def _dp_config(out_dir: Path, **changes: Any) -> FederationConfig:
    base: dict[str, Any] = {
        "model_overrides": {"hidden_size": 8},
        "rounds": 2,
        "local_epochs": 1,
        "min_nodes": 2,
        "out_dir": out_dir,
        "dp_epsilon": 8.0,
    }
    return FederationConfig(**(base | changes))


def _grid(consortium_dir: Path, tmp_path: Path) -> InProcessGrid:
    grid = InProcessGrid([consortium_dir / f"institution_0{i}" for i in (1, 2)])
    for context in grid.contexts.values():  # each institution's DP state, as a simulation's
        context.node_config["privacy-root"] = str(tmp_path / "institutions")
    return grid


def _sent(grid: InProcessGrid, kind: str) -> list[tuple[int, int]]:
    """(round, planned evaluations) of every ``kind`` message the server sent."""
    out = []
    for msg in grid.sent:
        if msg.metadata.message_type == kind:
            config = msg.content["config"]
            assert PLANNED_EVALUATIONS in config  # sent, not left to the node's default
            settings = RoundSettings.from_config(config)
            out.append((settings.server_round, settings.evaluations))
    return out


# --- which rounds, how many planned -------------------------------------------------------------


@pytest.mark.parametrize(
    ("changes", "rounds"),
    [
        ({}, [1, 2, 3, 4, 5]),  # without DP: every round, as before
        ({"dp_evaluate_every": 2}, [1, 2, 3, 4, 5]),  # a DP-only option
        ({"dp_epsilon": 1.0}, [5]),  # DP: the last round only
        ({"dp_epsilon": 1.0, "dp_evaluate_every": 2}, [2, 4, 5]),  # every 2nd and the last
        ({"dp_epsilon": 1.0, "dp_evaluate_every": 1}, [1, 2, 3, 4, 5]),
        ({"dp_epsilon": 1.0, "dp_evaluate_every": 5}, [5]),
        ({"dp_epsilon": 1.0, "dp_evaluate_every": 7}, [5]),
        ({"dp_epsilon": 1.0, "dp_evaluate_every": 0}, []),  # never
        ({"fraction_evaluate": 0.0}, []),  # Flower's own "no evaluation"
        ({"dp_epsilon": 1.0, "fraction_evaluate": 0.0}, []),
    ],
)
def test_the_server_evaluates_and_plans_exactly_these_rounds(
    changes: dict[str, Any], rounds: list[int]
) -> None:
    config = FederationConfig(rounds=5, **changes)

    assert [r for r in range(0, 8) if config.evaluates(r)] == rounds
    assert config.planned_evaluations == len(rounds)
    sent = RoundSettings.from_config(config.train_config("abc"))
    assert sent.planned_evaluations == len(rounds)  # on the wire, not the node's default


def test_the_option_survives_the_run_config_and_the_options() -> None:
    for every in (None, 0, 3):
        config = FederationConfig(dp_epsilon=1.0, dp_evaluate_every=every)
        assert FederationConfig.from_run_config(config.to_run_config()) == config
    given = FederationConfig.from_options(None, {"dp_evaluate_every": 2, "rounds": 4})
    assert given.dp_evaluate_every == 2
    unset = FederationConfig.from_options(None, {"dp_evaluate_every": None})
    assert unset.dp_evaluate_every is None


def test_a_negative_interval_is_refused_by_name() -> None:
    with pytest.raises(ValueError, match="dp_evaluate_every"):
        FederationConfig.validated({"dp_evaluate_every": -1}, "options")


def test_the_histogram_noise_keeps_the_evaluations_cost_whatever_their_number() -> None:
    assert histogram_noise_std(1) == DEFAULT_HISTOGRAM_NOISE_STD == 9.0
    assert histogram_noise_std(0) == DEFAULT_HISTOGRAM_NOISE_STD
    for k in (2, 5, 10):
        std = histogram_noise_std(k)
        # k Gaussian releases at std: RDP k * alpha / (2 std^2), that of one at the default.
        assert k / std**2 == pytest.approx(1 / DEFAULT_HISTOGRAM_NOISE_STD**2)
    # No more than the five evaluations at std 20 a run paid for before.
    assert 1 / DEFAULT_HISTOGRAM_NOISE_STD**2 <= 5 / 20.0**2


# --- runs on the in-process grid ----------------------------------------------------------------


@pytest.mark.usefixtures("flower_task")
def test_a_dp_run_evaluates_after_its_last_round_only_by_default(
    consortium_dir: Path, tmp_path: Path
) -> None:
    config = _dp_config(tmp_path / "run")
    grid = _grid(consortium_dir, tmp_path)
    reports: list[RoundReport] = []
    result = run_federation(grid, config, on_round=reports.append)

    assert _sent(grid, "train") == [(1, 1), (1, 1), (2, 1), (2, 1)]  # one evaluation planned
    assert _sent(grid, "evaluate") == [(2, 1), (2, 1)]  # asked after round 2 only
    entries = parse_entries(config.out_dir / "ledger.jsonl")
    histograms = Counter(e.institution for e in entries if e.kind == "histogram")
    assert histograms == {"institution_01": 1, "institution_02": 1}
    assert {e.round for e in entries if e.kind == "histogram"} == {2}

    first, last = CheckpointStore(config.out_dir).read_metrics()
    assert first["evaluate"] == {} and first["evaluated"] is False
    assert all(e.get("evaluate", {}) == {} for e in first["institutions"])
    assert last["evaluated"] is True
    # Two institutions, each count at the one-evaluation std: the consortium's sqrt(2) * 9.
    consortium_std = math.sqrt(2) * DEFAULT_HISTOGRAM_NOISE_STD
    assert last["evaluate"][RISK_ROC_AUC]["noise_std"] == pytest.approx(consortium_std)
    for entry in last["institutions"]:
        assert entry["evaluate"][RISK_ROC_AUC]["noise_std"] == DEFAULT_HISTOGRAM_NOISE_STD
    assert result.noised and result.released == last["evaluate"]

    line = progress_line(reports[0], config.rounds)
    assert "not evaluated this round" in line and "ROC-AUC" not in line  # nothing stale
    assert "federated ROC-AUC" in progress_line(reports[1], config.rounds)
    assert "noised" in progress_line(reports[1], config.rounds)
    summary = (config.out_dir / "summary.md").read_text()
    assert f"**{last['evaluate'][RISK_ROC_AUC]['value']:.4f}**" in summary


@pytest.mark.usefixtures("flower_task")
def test_a_dp_run_evaluates_every_n_rounds_and_after_the_last(
    consortium_dir: Path, tmp_path: Path
) -> None:
    config = _dp_config(tmp_path / "run", rounds=3, dp_evaluate_every=2)
    grid = _grid(consortium_dir, tmp_path)
    run_federation(grid, config)

    assert {planned for _, planned in _sent(grid, "train")} == {2}
    assert sorted({rnd for rnd, _ in _sent(grid, "evaluate")}) == [2, 3]
    entries = parse_entries(config.out_dir / "ledger.jsonl")
    histograms = [e for e in entries if e.kind == "histogram"]
    assert Counter(e.institution for e in histograms) == {"institution_01": 2, "institution_02": 2}
    records = CheckpointStore(config.out_dir).read_metrics()
    assert [r["evaluated"] for r in records] == [False, True, True]
    for record in records[1:]:  # each count noised at sqrt(2) x the one-evaluation std
        for entry in record["institutions"]:
            assert entry["evaluate"][RISK_ROC_AUC]["noise_std"] == pytest.approx(
                histogram_noise_std(2)
            )
    # The nodes paid for exactly the two evaluations they were asked for.
    after = {e.institution: e.epsilon_after for e in entries}
    assert all(0 < eps <= 8.0 for eps in after.values())


@pytest.mark.usefixtures("flower_task")
def test_a_run_without_dp_still_evaluates_every_round(consortium_dir: Path, tmp_path: Path) -> None:
    config = _dp_config(tmp_path / "run", dp_epsilon=None, dp_evaluate_every=0)
    grid = InProcessGrid([consortium_dir / f"institution_0{i}" for i in (1, 2)])
    reports: list[RoundReport] = []
    run_federation(grid, config, on_round=reports.append)

    assert _sent(grid, "evaluate") == [(1, 2), (1, 2), (2, 2), (2, 2)]
    records = CheckpointStore(config.out_dir).read_metrics()
    assert all(r["release"] == "exact" and r["evaluated"] for r in records)
    assert all(RISK_ROC_AUC in r["evaluate"] for r in records)
    assert "not evaluated" not in progress_line(reports[0], config.rounds)


# --- the commands pass the option on -------------------------------------------------------------


def test_simulate_run_passes_dp_evaluate_every(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import simulations.runner
    from simulations.cli import app

    seen: list[FederationConfig] = []

    def fake_simulate(config: FederationConfig, *args: Any, **kwargs: Any) -> FederationResult:
        seen.append(config)
        return FederationResult(1, config.rounds, {})

    monkeypatch.setattr(simulations.runner, "simulate", fake_simulate)
    args = ["simulate", "run", "--synthetic", "2", "--students", "60", "--rounds", "4"]
    args += ["--dp-epsilon", "1", "--out", str(tmp_path / "run")]
    result = runner.invoke(app, [*args, "--dp-evaluate-every", "3"], prog_name="edufl")
    assert result.exit_code == 0, result.output
    assert seen[-1].dp_evaluate_every == 3 and seen[-1].planned_evaluations == 2  # rounds 3, 4
    result = runner.invoke(app, [*args, "--resume"], prog_name="edufl")
    assert result.exit_code == 0, result.output
    assert seen[-1].dp_evaluate_every is None and seen[-1].planned_evaluations == 1
    refused = runner.invoke(app, [*args, "--dp-evaluate-every", "-1"], prog_name="edufl")
    assert refused.exit_code == 2 and "dp-evaluate-every" in refused.output


def test_server_start_passes_dp_evaluate_every(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from server.cli import app
    from server.superlink import launcher

    submitted: list[dict[str, Any]] = []
    monkeypatch.setattr(launcher, "start_superlink", lambda *a, **k: object())
    monkeypatch.setattr(launcher, "control_address", lambda layout: "127.0.0.1:1")
    monkeypatch.setattr(launcher, "stop_unfinished_runs", lambda layout: [])
    monkeypatch.setattr(launcher, "submit_run", lambda layout, rc: submitted.append(rc) or 7)
    monkeypatch.setattr(launcher, "wait_for_run", lambda *a, **k: "finished:completed")
    monkeypatch.setattr(launcher, "stop_superlink", lambda *a, **k: None)
    base = ["start", "--insecure", "--address", "127.0.0.1:9092", "--state", str(tmp_path)]
    result = runner.invoke(app, [*base, "--rounds", "6", "--dp-evaluate-every", "2"])
    assert result.exit_code == 0, result.output
    config = FederationConfig.from_run_config(submitted[-1])
    assert config.dp_evaluate_every == 2 and config.planned_evaluations == 3  # rounds 2, 4, 6
    result = runner.invoke(app, [*base, "--rounds", "6"])
    assert result.exit_code == 0, result.output
    default = FederationConfig.from_run_config(submitted[-1])
    assert default.dp_epsilon is not None and default.planned_evaluations == 1
    assert json.dumps(submitted[-1])  # a run config Flower can carry
