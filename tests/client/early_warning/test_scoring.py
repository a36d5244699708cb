from __future__ import annotations

import sqlite3
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from torch import nn
from typer.testing import CliRunner

from client.early_warning.scoring import (
    RiskThresholds,
    ScoringError,
    assign_tiers,
    load_observed_term,
    load_scoring_model,
    score_cohort,
    tier_outcomes,
)
from shared_models.data.cohort import CohortArrays, Normalizer
from shared_models.data.contract import default_spec
from shared_models.data.loader import load_cohort
from shared_models.evaluation import predict
from shared_models.models.artifact import load_trained, save_trained
from shared_models.models.registry import build_model
from simulations.cli import app
from simulations.scoring_figures import train_risk_model

SPEC = default_spec()


@pytest.fixture(scope="module")
def model_dir(consortium_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """An at-risk LSTM trained briefly on institutions 1 and 2 (institution 3 is held out)."""
    train = CohortArrays.concatenate(
        [load_cohort(consortium_dir / f"institution_0{k}", SPEC) for k in (1, 2)]
    )
    return train_risk_model(train, SPEC, tmp_path_factory.mktemp("model"), max_epochs=10)


BOUNDARIES = [
    (0.0, "low"),
    (0.3999, "low"),
    (0.40, "moderate"),
    (0.6999, "moderate"),
    (0.70, "high"),
    (1.0, "high"),
]


@pytest.mark.parametrize(("p", "tier"), BOUNDARIES)
@pytest.mark.parametrize("dtype", [np.float64, np.float32])
def test_default_tiers_follow_the_papers_boundaries(p: float, tier: str, dtype: type) -> None:
    assert assign_tiers(np.array([p], dtype=dtype))[0] == tier


def test_custom_thresholds_move_the_boundaries() -> None:
    cut = RiskThresholds.parse("0.2, 0.5")
    tiers = assign_tiers(np.array([0.1999, 0.2, 0.4999, 0.5], np.float32), cut)
    assert tiers.tolist() == ["low", "moderate", "moderate", "high"]
    assert str(cut) == "low < 0.2 <= moderate < 0.5 <= high"


@pytest.mark.parametrize(
    "text", ["0.7,0.4", "0.4,0.4", "0,0.5", "-0.1,0.5", "0.4,1.2", "0.4", "0.3,0.5,0.7", "a,b"]
)
def test_invalid_thresholds_are_refused(text: str) -> None:
    with pytest.raises(ScoringError, match="MODERATE"):
        RiskThresholds.parse(text)


def test_score_command_refuses_invalid_thresholds_in_one_line(
    consortium_dir: Path, model_dir: Path
) -> None:
    data = consortium_dir / "institution_03"
    args = ["client", "score", "--data", str(data), "--model", str(model_dir)]
    result = CliRunner().invoke(app, [*args, "--thresholds", "0.8,0.3"])
    assert result.exit_code == 2
    assert "moderate (0.8) must be below high (0.3)" in result.output
    assert "Traceback" not in result.output


def test_scoring_part_way_ignores_later_weeks_and_infers_the_week(
    consortium_dir: Path, model_dir: Path, export_copy: Path
) -> None:
    scorer = load_scoring_model(model_dir, SPEC)
    full = load_observed_term(export_copy, SPEC, observed_weeks=6)
    activity = pd.read_csv(export_copy / "activity.csv")
    activity[activity["week"] <= 6].to_csv(export_copy / "activity.csv", index=False)
    (export_copy / "outcomes.csv").unlink()  # mid-term: no outcomes yet
    midterm = load_observed_term(export_copy, SPEC)

    assert midterm.observed_weeks == 6
    assert midterm.unscored_ids == full.unscored_ids
    a = score_cohort(scorer, full.cohort, 6)
    b = score_cohort(scorer, midterm.cohort, 6)
    np.testing.assert_array_equal(a.student_ids, b.student_ids)
    np.testing.assert_allclose(a.probability, b.probability, atol=1e-6)
    assert np.isnan(midterm.cohort.at_risk).all()


def test_records_with_too_little_data_are_listed_not_scored(consortium_dir: Path) -> None:
    term = load_observed_term(consortium_dir / "institution_01", SPEC, observed_weeks=6)
    assert term.unscored_ids
    assert not set(term.unscored_ids) & set(term.cohort.student_ids.tolist())


def test_fast_inference_layers_score_exactly_like_the_trained_model(
    consortium_dir: Path, model_dir: Path
) -> None:
    scorer = load_scoring_model(model_dir, SPEC)
    trained, normalizer, _ = load_trained(model_dir, SPEC)
    assert any(isinstance(m, nn.LSTM) for m in scorer.model.modules())
    cohort = load_observed_term(consortium_dir / "institution_03", SPEC, 6).cohort
    expected = predict(trained, normalizer.transform(cohort))["risk"]
    np.testing.assert_allclose(score_cohort(scorer, cohort, 6).probability, expected, atol=1e-5)


@pytest.mark.parametrize("week", [6, 15])
def test_tiers_separate_observed_outcomes_on_a_held_out_institution(
    consortium_dir: Path, model_dir: Path, week: int
) -> None:
    scorer = load_scoring_model(model_dir, SPEC)
    term = load_observed_term(consortium_dir / "institution_03", SPEC, week)
    scores = score_cohort(scorer, term.cohort, term.observed_weeks)
    outcomes = tier_outcomes(scores, term.cohort.at_risk)
    rates = [rate for n, rate in outcomes.values() if n >= 5]
    assert len(rates) >= 2
    assert rates == sorted(rates) and rates[-1] - rates[0] > 0.3, outcomes


def test_a_model_without_a_risk_head_is_refused(tmp_path: Path) -> None:
    model = _untrained(["grade"])
    normalizer = _fitted_normalizer()
    save_trained(tmp_path, model, name="lstm", task="grade", spec=SPEC, normalizer=normalizer)
    with pytest.raises(ScoringError, match="no risk; scoring needs a model trained with"):
        load_scoring_model(tmp_path, SPEC)


def test_predicted_grade_is_on_the_contracts_scale(consortium_dir: Path, tmp_path: Path) -> None:
    model = _untrained(["risk", "grade"])
    normalizer = _fitted_normalizer()
    save_trained(tmp_path, model, name="lstm", task="multitask", spec=SPEC, normalizer=normalizer)
    cohort = load_observed_term(consortium_dir / "institution_03", SPEC, 6).cohort
    scores = score_cohort(load_scoring_model(tmp_path, SPEC), cohort, 6)
    raw = predict(load_trained(tmp_path, SPEC)[0], normalizer.transform(cohort))["grade"]
    np.testing.assert_allclose(scores.grade, 4.0 * raw, atol=1e-4)  # GPA 0-4, not [0, 1]


def test_score_command_saves_one_run_and_prints_tiers(
    consortium_dir: Path, model_dir: Path, tmp_path: Path
) -> None:
    db = tmp_path / "client.sqlite"
    args = ["client", "score", "--data", str(consortium_dir / "institution_03")]
    result = CliRunner().invoke(
        app, [*args, "--model", str(model_dir), "--week", "6", "--db", str(db), "--show", "3"]
    )
    assert result.exit_code == 0, result.output
    assert "after week 6" in result.output and "observed at-risk rate by tier" in result.output
    runs = sqlite3.connect(db).execute("SELECT observed_weeks, n_scored FROM runs").fetchall()
    assert len(runs) == 1 and runs[0][0] == 6 and runs[0][1] > 50


def _fitted_normalizer() -> Normalizer:
    n_static = len(SPEC.static_names)
    return Normalizer(
        SPEC.target.grade_min,
        SPEC.target.grade_max,
        dyn_mean=np.zeros(len(SPEC.dynamic)),
        dyn_std=np.ones(len(SPEC.dynamic)),
        static_mean=np.zeros(n_static),
        static_std=np.ones(n_static),
    )


def _untrained(targets: list[str]) -> nn.Module:
    return build_model(
        "lstm", SPEC.weeks, len(SPEC.dynamic), len(SPEC.static_names), {"targets": targets}
    )


@pytest.mark.parametrize(
    "command",
    [
        ["score"],
        ["report"],
        ["actions"],
        ["actions", "record"],
        ["actions", "list"],
        ["rules"],
        ["rules", "check"],
        ["rules", "indicators"],
    ],
)
def test_every_early_warning_command_has_help_with_an_example(command: list[str]) -> None:
    result = CliRunner().invoke(app, ["client", *command, "--help"], prog_name="edufl")
    assert result.exit_code == 0
    example = result.output.split("Example:", 1)[1]
    assert f"edufl client {command[0]}" in example
