"""bench.dp_sweep: its grid, its options, and one tiny federated DP run scored end to end."""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import pytest

from bench import dp_sweep
from bench.dp_sweep import GRID, START, Setting, SweepError, pick, table_rows


def test_the_grid_moves_one_lever_at_a_time_from_the_start() -> None:
    names = [s.name for s in GRID]
    assert len(names) == len(set(names))
    assert GRID[0] == START
    first_stage = GRID[: [s.name for s in GRID].index("logistic") + 1]
    for setting in first_stage[1:]:
        moved = {k for k, v in vars(setting).items() if k != "name" and v != getattr(START, k)}
        # the linear model changes its step size with it; every other entry moves one lever
        assert len(moved) == 1 or (setting.model == "logistic" and "model" in moved), setting


def test_pick_names_settings_and_refuses_unknown_ones() -> None:
    assert [s.name for s in pick("start, logistic")] == ["start", "logistic"]
    assert pick("all") == list(GRID)
    with pytest.raises(SweepError, match=r"unknown setting 'batch9'.*start"):
        pick("start,batch9")


def test_only_the_lstm_gets_a_hidden_size() -> None:
    assert Setting("a", hidden_size=16).overrides == {"hidden_size": 16}
    assert Setting("b", model="logistic").overrides == {}
    assert "h16" in Setting("a", hidden_size=16).describe()


def test_table_gives_mean_sd_and_the_ratio_per_setting_and_epsilon() -> None:
    result = {
        "central": {0: 0.9, 1: 0.8},
        "runs": [
            {"setting": "start", "epsilon": 8.0, "seed": 0, "auc": 0.9, "ratio": 1.0, "seconds": 2},
            {"setting": "start", "epsilon": 8.0, "seed": 1, "auc": 0.4, "ratio": 0.5, "seconds": 4},
        ],
    }

    (row,) = table_rows("synthetic", result, [START])

    assert row[:2] == ["synthetic", "start"]
    assert row[3:] == ["8", "0.650 ± 0.354", "0.850 ± 0.071", "0.750 ± 0.354", "3"]


def test_a_missing_public_dataset_is_skipped_with_a_note(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    absent = tmp_path / "nowhere"

    assert dp_sweep.load("uci-por", absent, [], tmp_path) is None
    assert "skipping uci-por" in capsys.readouterr().err


def test_a_tiny_sweep_scores_fed_dp_against_the_centralized_reference(tmp_path: Path) -> None:
    out = tmp_path / "sweep.json"
    tiny = replace(START, name="tiny", batch_size=32, rounds=1, hidden_size=8)
    dp_sweep.SETTINGS["tiny"] = tiny
    try:
        code = dp_sweep.main(
            [
                "--sizes", "60,60", "--seeds", "1", "--epsilons", "8", "--settings", "tiny",
                "--central-batch-size", "64", "--central-patience", "1",
                "--work", str(tmp_path / "work"), "--json", str(out),
            ]
        )  # fmt: skip
    finally:
        del dp_sweep.SETTINGS["tiny"]

    assert code == 0
    data = json.loads(out.read_text())
    (run,) = data["details"]["synthetic"]["runs"]
    central = data["details"]["synthetic"]["central"]["0"]
    assert 0.0 <= run["auc"] <= 1.0 and 0.0 < central <= 1.0
    assert run["ratio"] == pytest.approx(run["auc"] / central)
    assert data["summary"][0]["measure"] == "synthetic tiny eps 8: fed+DP / centralized"


def test_a_reference_must_give_one_value_per_seed(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exc:
        dp_sweep.main(["--seeds", "3", "--reference", "0.9,0.8"])

    assert exc.value.code == 2
    assert "--reference gives 2 value(s) for 3 seed(s)" in capsys.readouterr().err
