"""Grade cut-off week: grade regressions see weeks 1..W only, so a late grade is predicted."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from shared_models.data.cohort import Normalizer
from shared_models.data.contract import default_spec
from simulations.reproduce.config import (
    ExperimentConfig,
    ExperimentConfigError,
    contract_weeks,
    load_experiment,
)
from simulations.reproduce.data import prepare
from simulations.reproduce.pipeline import Reproduction, plan
from simulations.reproduce.report import markdown
from simulations.reproduce.runs import Outcome, Scored, SplitCache, fit_baseline_rows

GRADE = """
name = "tiny-grade"
title = "t"
paper = "p"
description = "d"
target = "grade"
metrics = ["mse", "r2"]
primary_metric = "mse"
baselines = ["linear-regression"]
repeats = 2
{extra}

[[models]]
label = "LSTM"
model = "lstm"
"""

GRADE_EXPERIMENTS = ("lstm-gru", "cnn-lstm", "ednet-lstm")


def _load(tmp_path: Path, extra: str, text: str = GRADE) -> ExperimentConfig:
    path = tmp_path / "experiment.toml"
    path.write_text(text.format(extra=extra), "utf-8")
    return load_experiment(path)


@pytest.mark.parametrize("name", GRADE_EXPERIMENTS)
def test_shipped_grade_experiments_cut_oulad_at_week_20_in_every_mode_dp_included(
    name: str,
) -> None:
    config = load_experiment(name)
    assert config.grade_week_for("oulad") == 20 < contract_weeks("oulad")
    assert config.sweep is None  # one fixed week, not an early-warning curve
    jobs = plan(config, "oulad", ["centralized", "federated", "federated-dp"])
    assert {j.week for j in jobs} == {20}
    dp = [j for j in jobs if j.mode == "federated-dp" and j.entry is not None]
    assert {j.entry.label for j in dp} == {m.label for m in config.models}
    assert config.dp.epsilon == 8.0
    assert {j.week for j in plan(config.quick(), "oulad", ["centralized"])} == {20}
    # Datasets without a key keep the whole term.
    assert {j.week for j in plan(config, "synthetic", ["centralized"])} == {None}


def test_uci_key_covers_each_uci_subject(tmp_path: Path) -> None:
    config = _load(tmp_path, "grade_cutoff_week = { uci = 1 }")
    assert config.weeks_for("uci-por") == [1] and config.grade_week_for("uci-mat") == 1


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        ("grade_cutoff_week = { edx = 5 }", "grade_cutoff_week.edx: unknown dataset; valid keys"),
        ("grade_cutoff_week = { oulad = 0 }", "grade_cutoff_week.oulad = 0: outside the contract"),
        ("grade_cutoff_week = { oulad = 40 }", "choose a week from 1 to 39"),
        ("grade_cutoff_week = { synthetic = 16 }", "choose a week from 1 to 15"),
        ("grade_cutoff_week = { uci = 3 }", "choose a week from 1 to 2"),
        (
            'datasets = ["synthetic"]\ngrade_cutoff_week = { oulad = 20 }',
            "does not run on 'oulad'",
        ),
        (
            "grade_cutoff_week = { oulad = 20 }\ncutoff_weeks = { oulad = [5, 10] }",
            "keep one",
        ),
    ],
)
def test_a_bad_grade_cutoff_week_is_refused_with_its_key(
    tmp_path: Path, extra: str, message: str
) -> None:
    with pytest.raises(ExperimentConfigError, match="experiment config is invalid") as err:
        _load(tmp_path, extra)
    assert message in str(err.value)


def test_a_grade_cutoff_on_a_risk_only_experiment_is_refused(tmp_path: Path) -> None:
    risk = GRADE.replace('target = "grade"', 'target = "risk"').replace(
        'metrics = ["mse", "r2"]\nprimary_metric = "mse"',
        'metrics = ["roc_auc"]\nprimary_metric = "roc_auc"',
    )
    with pytest.raises(ExperimentConfigError, match="needs target 'grade' or 'both'"):
        _load(tmp_path, "grade_cutoff_week = { synthetic = 5 }", risk)


def _features_and_predictions(
    out: Path, week: int | None
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """What the baselines and models of a grade run see at ``week``, and the baseline's grades."""
    prepared = prepare("synthetic", None, out, week=week, quick=True)
    split = SplitCache(prepared).holdout(0)
    norm = Normalizer(prepared.spec.target.grade_min, prepared.spec.target.grade_max)
    norm.fit(split.train)
    train = norm.transform(split.train)
    rows = fit_baseline_rows(["linear-regression"], "grade", prepared.spec, split, 0)
    return train.flat(), train.dynamic, rows["linear-regression"].scores["grade_pred"]


def _tamper_after(full: Path, week: int) -> None:
    """Change every weekly value after ``week`` in the generated whole-term exports."""
    for activity in full.glob("*/activity.csv"):
        frame = pd.read_csv(activity)
        late = frame["week"] > week
        frame.loc[late, "attendance_rate"] = 1.0 - frame.loc[late, "attendance_rate"]
        frame.loc[late, "quiz_score"] = 100.0
        frame.to_csv(activity, index=False)


def test_weekly_values_after_the_cutoff_change_no_input_and_no_prediction(
    tmp_path: Path,
) -> None:
    week = 5
    config = _load(tmp_path, f"grade_cutoff_week = {{ synthetic = {week} }}")
    jobs = plan(config, "synthetic", ["centralized", "federated-dp"])
    assert {j.week for j in jobs} == {week}
    names = default_spec().dynamic_names
    assert {"attendance_rate", "quiz_score"} <= set(names)

    out = tmp_path / "data"
    flat, dynamic, grades = _features_and_predictions(out, week)
    assert dynamic.shape[1] == week  # the sequence itself stops at the cut-off
    full_flat, _, full_grades = _features_and_predictions(out, None)

    _tamper_after(out / "synthetic-full", week)
    for folder in out.glob("synthetic-week*"):  # rebuilt from the tampered whole term
        shutil.rmtree(folder)
    again_flat, _, again_grades = _features_and_predictions(out, week)
    np.testing.assert_array_equal(again_flat, flat)
    np.testing.assert_array_equal(again_grades, grades)
    # The same tampering does reach a whole-term run: the test can see a leak.
    tampered_flat, _, tampered_grades = _features_and_predictions(out, None)
    assert not np.array_equal(tampered_flat, full_flat)
    assert not np.allclose(tampered_grades, full_grades)


def test_the_report_states_the_grade_cutoff_and_orders_rows_at_that_week(tmp_path: Path) -> None:
    config = load_experiment("lstm-gru")
    outcomes = [
        Outcome(row, "model", "centralized", r, r, 20, None, 1.0,
                Scored({"mse": mse + r, "rmse": mse**0.5, "r2": 0.5}, None, 500, 100))
        for row, mse in (("LSTM", 300.0), ("GRU", 250.0), ("LSTM-GRU (hybrid)", 200.0))
        for r in range(2)
    ]  # fmt: skip
    rep = Reproduction(
        config=config, dataset="oulad", command="edufl reproduce lstm-gru --dataset oulad",
        modes=["centralized"], quick=False, out_dir=tmp_path, started="now",
        data=[{"week": 20, "summary": "AAA-2013J (383 records, 27.4 % at risk)"}],
        outcomes=outcomes,
    )  # fmt: skip
    md = markdown(rep, [], [])
    assert "- Grade cut-off: week 20 of 39. Every model, baseline and mode sees weeks 1-20" in md
    assert "Cut-off week 20: AAA-2013J" in md
    assert "Grade cut-off week 20: every row saw weeks 1-20 only." in md
    # The paper's ordering is compared with our rows at the cut-off week, not silently dropped.
    assert "MSE: ours (centralized) LSTM-GRU (hybrid) > GRU > LSTM agrees with" in md
    synthetic = Reproduction(
        config=config, dataset="synthetic", command="c", modes=["centralized"], quick=False,
        out_dir=tmp_path, started="now",
    )  # fmt: skip
    assert "Grade cut-off" not in markdown(synthetic, [], [])
