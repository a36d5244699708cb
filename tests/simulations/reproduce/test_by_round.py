"""`simulations.reproduce.by_round`: every round's global model of a real reproduction, scored."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from typer.testing import CliRunner

from simulations.cli import app
from simulations.reproduce import by_round

# A real reproduction (two DP rows x 4 rounds on the synthetic consortium): about 40 s. The
# averaging itself is in the fast suite (tests/server/test_averaging.py).
pytestmark = pytest.mark.slow

EXPERIMENT = """
name = "tiny-rounds"
title = "t"
paper = "p"
description = "d"
target = "risk"
metrics = ["roc_auc"]
primary_metric = "roc_auc"
repeats = 1

[[models]]
label = "LSTM"
model = "lstm"
overrides = { hidden_size = 8 }

[[models]]
label = "last round"
model = "lstm"
overrides = { hidden_size = 8 }
dp = { average_rounds = 0.0 }

[training]
max_epochs = 2

[federated]
rounds = 4
local_epochs = 1
repeats = 1

[dp]
epsilon = 8.0
learning_rate = 0.01
batch_size = 64
"""


@pytest.fixture(scope="module")
def reproduction(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("by-round")
    toml = root / "tiny.toml"
    toml.write_text(EXPERIMENT, "utf-8")
    out = root / "out"
    args = ["reproduce", str(toml), "--modes", "federated-dp", "--engine", "inline"]
    result = CliRunner().invoke(app, [*args, "--workers", "1", "--out", str(out)])
    assert result.exit_code == 0, result.output
    return out


def test_the_released_model_scores_as_the_reproduction_scored_it(reproduction: Path) -> None:
    scores = {s.row: s for s in by_round.score_reproduction(reproduction)}
    reported = {
        o["label"]: o["metrics"]["roc_auc"]
        for o in json.loads((reproduction / "results.json").read_text())["outcomes"]
    }
    averaged, last = scores["lstm"], scores["last-round"]
    assert averaged.released == pytest.approx(reported["LSTM"], abs=1e-9)
    assert last.released == pytest.approx(reported["last round"], abs=1e-9)
    assert len(averaged.iterates) == len(last.iterates) == 4
    # Without averaging the released model is the last round's iterate; with it (rounds 3-4),
    # the iterate comes from the checkpoint's state and differs from the mean.
    assert last.released == pytest.approx(last.iterates[-1], abs=1e-9)
    assert averaged.released != pytest.approx(averaged.iterates[-1], abs=1e-9)


def test_the_command_prints_each_run_and_the_mean_per_row(
    reproduction: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert by_round.main([str(reproduction), "--row", "lstm"]) == 0
    text = capsys.readouterr().out
    assert "| lstm | eps8-seed0 |" in text and "last-round" not in text
    assert "| lstm | eps8 | 1 |" in text


def test_a_folder_without_runs_says_so(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert by_round.main([str(tmp_path)]) == 1
    assert "no federated-dp run under" in capsys.readouterr().err
