"""A row's own federated-dp rounds (``dp = { rounds = N }``) and averaged share of them
(``average_rounds``): validated, applied, reported."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from shared_models.data.contract import default_spec
from simulations import runner as simulation_runner
from simulations.reproduce.config import ExperimentConfigError, load_experiment
from simulations.reproduce.data import PreparedData
from simulations.reproduce.runs import train_federated

EXPERIMENT = """
name = "tiny"
title = "t"
paper = "p"
description = "d"
target = "risk"
metrics = ["roc_auc"]
primary_metric = "roc_auc"

[[models]]
label = "LSTM"
model = "lstm"
dp = { rounds = 30, local_epochs = 1 }

[[models]]
label = "GRU"
model = "lstm"

[federated]
rounds = 10
local_epochs = 2

[dp]
learning_rate = 0.01
"""


def _load(tmp_path: Path, text: str = EXPERIMENT) -> Any:
    path = tmp_path / "experiment.toml"
    path.write_text(text, "utf-8")
    return load_experiment(path)


class _Captured(Exception):
    """Stops the run once its federation config is built."""


def _federation(monkeypatch: pytest.MonkeyPatch, tmp_path: Path, dp: Any) -> Any:
    """The federation config `train_federated` starts for the tiny experiment's first row."""
    config = _load(tmp_path)

    def fake_simulate(federation: Any, *args: Any, **kwargs: Any) -> None:
        raise _Captured(federation)

    monkeypatch.setattr(simulation_runner, "simulate", fake_simulate)
    data = PreparedData(
        "synthetic", (tmp_path / "a.csv", tmp_path / "b.csv"), default_spec(), None, None, {}
    )
    with pytest.raises(_Captured) as caught:
        train_federated(
            config.models[0], config.target, data, config.federated, dp, 0, tmp_path / "run"
        )
    return caught.value.args[0]


def _rounds_run(monkeypatch: pytest.MonkeyPatch, tmp_path: Path, dp: Any) -> int:
    return int(_federation(monkeypatch, tmp_path, dp).rounds)


def test_a_rows_dp_rounds_replace_the_experiments_in_its_federated_dp_run_only(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    config = _load(tmp_path)
    lstm, gru = config.models
    assert config.dp_for(lstm).rounds == 30
    assert config.dp_for(gru).rounds is None  # the experiment's [federated] rounds
    assert _rounds_run(monkeypatch, tmp_path, config.dp_for(lstm)) == 30
    assert _rounds_run(monkeypatch, tmp_path, config.dp_for(gru)) == 10
    assert _rounds_run(monkeypatch, tmp_path, None) == 10  # the non-DP federated row


def test_the_report_notes_a_rows_dp_rounds_and_quick_runs_drop_them(tmp_path: Path) -> None:
    config = _load(tmp_path)
    assert config.dp_row_notes() == ["  LSTM: 30 round(s) x 1 local epoch(s), Adam 0.01, batch 32."]
    quick = config.quick()
    assert quick.dp_for(quick.models[0]).rounds is None
    assert quick.federated.rounds == 1


@pytest.mark.parametrize("value", ["0", "-3", "2.5", '"many"'])
def test_dp_rounds_that_are_not_a_positive_whole_number_fail_with_their_key(
    tmp_path: Path, value: str
) -> None:
    text = EXPERIMENT.replace("rounds = 30", f"rounds = {value}")
    with pytest.raises(ExperimentConfigError, match=r"models\.0\.dp\.rounds"):
        _load(tmp_path, text)
    with pytest.raises(ExperimentConfigError, match=r"dp\.rounds"):
        _load(tmp_path, EXPERIMENT + f"rounds = {value}\n")  # the experiment's [dp] too


def test_dp_runs_release_the_mean_of_their_last_half_unless_a_row_says_otherwise(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    config = _load(tmp_path)
    gru = config.models[1]  # no dp settings of its own: the experiment's
    shipped = _federation(monkeypatch, tmp_path, config.dp_for(gru))
    assert (shipped.average_rounds, shipped.first_averaged_round) == (0.5, 6)
    assert _federation(monkeypatch, tmp_path, None).average_rounds == 0  # no DP: the last round
    own = config.dp_for(gru).model_copy(update={"average_rounds": 0.0})
    assert _federation(monkeypatch, tmp_path, own).first_averaged_round == 10

    text = EXPERIMENT.replace("local_epochs = 1 }", "local_epochs = 1, average_rounds = 0.2 }")
    row = _load(tmp_path, text)
    assert row.dp_row_notes() == [
        "  LSTM: 30 round(s) x 1 local epoch(s), Adam 0.01, batch 32, the mean of rounds "
        "25-30's global models released."
    ]
    with pytest.raises(ExperimentConfigError, match=r"models\.0\.dp\.average_rounds"):
        _load(tmp_path, EXPERIMENT.replace("local_epochs = 1 }", "average_rounds = 2 }"))
