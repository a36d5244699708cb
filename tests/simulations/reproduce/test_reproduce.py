"""``edufl reproduce``: experiment configs, the quick runs' tables, paired tests, user errors."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
from scipy import stats
from typer.testing import CliRunner

from shared_models.data.cohort import CohortArrays
from shared_models.data.contract import load_spec
from simulations.cli import app
from simulations.datasets.uci.loader import SPEC_PATH as UCI_SPEC
from simulations.reproduce import data as reproduce_data
from simulations.reproduce.config import (
    ExperimentConfigError,
    experiment_names,
    load_experiment,
)
from simulations.reproduce.pipeline import Reproduction, plan
from simulations.reproduce.report import markdown
from simulations.reproduce.runs import Outcome, PooledSplit, Scored, naive_row
from simulations.reproduce.stats import paired_t_test

runner = CliRunner()

VALID = """
name = "tiny"
title = "t"
paper = "p"
description = "d"
target = "risk"
metrics = ["roc_auc", "f1"]
primary_metric = "roc_auc"
baselines = ["random-forest"]
repeats = 2

[[models]]
label = "LSTM"
model = "lstm"
"""


def _invoke(*args: str) -> tuple[int, str]:
    result = runner.invoke(app, ["reproduce", *args], prog_name="edufl")
    return result.exit_code, result.output


def _write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "experiment.toml"
    path.write_text(text, "utf-8")
    return path


@pytest.mark.parametrize("name", experiment_names())
def test_every_shipped_experiment_loads_and_its_figures_name_real_rows(name: str) -> None:
    config = load_experiment(name)
    assert config.name == name
    assert config.default_dataset in config.datasets
    for reference in config.references:
        assert reference.row == "" or reference.row in config.row_labels, reference.label
    assert plan(config, config.default_dataset, ["centralized", "federated", "federated-dp"])


def test_the_six_issue_experiments_and_the_uci_benchmark_are_shipped() -> None:
    assert set(experiment_names()) >= {
        "cnn-lstm", "at-risk-lstm", "ednet-lstm", "lstm-gru", "early-warning",
        "privacy-utility", "cortez-silva",
    }  # fmt: skip


def test_a_typo_in_a_key_is_named(tmp_path: Path) -> None:
    with pytest.raises(ExperimentConfigError) as err:
        load_experiment(_write(tmp_path, VALID + "\n[training]\nmax_epoch = 3\n"))
    assert "training.max_epoch: unknown key" in str(err.value)


def test_a_bad_model_override_names_the_model_entry(tmp_path: Path) -> None:
    text = VALID.replace('model = "lstm"', 'model = "lstm"\noverrides = { hiden_size = 8 }')
    with pytest.raises(ExperimentConfigError) as err:
        load_experiment(_write(tmp_path, text))
    assert "models.0" in str(err.value) and "hiden_size" in str(err.value)


def test_a_metric_the_target_cannot_produce_is_refused(tmp_path: Path) -> None:
    text = VALID.replace('metrics = ["roc_auc", "f1"]', 'metrics = ["roc_auc", "mse"]')
    with pytest.raises(ExperimentConfigError, match="metric 'mse' needs target"):
        load_experiment(_write(tmp_path, text))


def test_a_paired_test_against_an_unknown_row_is_refused(tmp_path: Path) -> None:
    text = VALID + '\n[paired_test]\nreference = "LSTM"\nagainst = ["svm"]\n'
    with pytest.raises(ExperimentConfigError, match=r"paired_test names \['svm'\]"):
        load_experiment(_write(tmp_path, text))


def test_unknown_experiment_lists_the_shipped_ones() -> None:
    code, out = _invoke("no-such-paper")
    assert code == 2
    assert "unknown experiment 'no-such-paper'" in out and "cnn-lstm" in out


def test_list_shows_every_experiment() -> None:
    code, out = _invoke("--list")
    assert code == 0
    for name in experiment_names():
        assert name in out


def test_a_missing_download_path_is_a_clear_user_error(tmp_path: Path) -> None:
    code, out = _invoke(
        "cnn-lstm", "--dataset", "oulad", "--data", str(tmp_path / "nope"),
        "--out", str(tmp_path / "out"),
    )  # fmt: skip
    assert code == 2
    assert "no such file or folder" in out and "analyse.kmi.open.ac.uk" in out
    assert not (tmp_path / "out").exists()  # refused before anything was written


def test_no_data_and_no_shared_copy_says_where_to_get_it(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(reproduce_data, "SHARED_DATASETS", tmp_path / "absent")
    code, out = _invoke("cortez-silva", "--out", str(tmp_path / "out"))
    assert code == 2
    assert "pass --data PATH" in out and "archive.ics.uci.edu" in out


def test_data_for_the_generated_consortium_is_refused(tmp_path: Path) -> None:
    code, out = _invoke("lstm-gru", "--data", str(tmp_path), "--out", str(tmp_path / "o"))
    assert code == 2 and "drop --data" in out


def test_an_experiment_on_a_dataset_it_does_not_offer_is_refused(tmp_path: Path) -> None:
    code, out = _invoke("cortez-silva", "--dataset", "synthetic", "--out", str(tmp_path / "o"))
    assert code == 2 and "runs on uci-por, uci-mat, uci, not 'synthetic'" in out


def test_a_foreign_non_empty_output_folder_is_left_alone(tmp_path: Path) -> None:
    (tmp_path / "thesis.tex").write_text("keep me")
    code, out = _invoke("at-risk-lstm", "--quick", "--modes", "centralized", "--out", str(tmp_path))
    assert code == 2 and "not empty and not an earlier reproduction" in out
    assert (tmp_path / "thesis.tex").read_text() == "keep me"


def test_quick_centralized_run_writes_every_row_and_metric(tmp_path: Path) -> None:
    out = tmp_path / "run"
    code, output = _invoke("at-risk-lstm", "--quick", "--modes", "centralized", "--out", str(out))
    assert code == 0, output
    md = (out / "results.md").read_text("utf-8")
    assert (
        "Command: `edufl reproduce at-risk-lstm --dataset synthetic "
        f"--out {out} --modes centralized --quick`" in md
    )
    header = "| model | mode | n test | accuracy | precision | recall | F1 | ROC-AUC |"
    table = md.split(header, 1)[1].split("\n\n", 1)[0].strip().splitlines()[1:]
    assert [row.split(" | ")[0].strip("| *") for row in table] == [
        "LSTM", "svm", "random-forest", "mlp",
    ]  # fmt: skip
    assert all(" ± " in row for row in table)  # two repeats: mean ± sd
    assert "| mlp | centralized |" in md.split("Confusion matrices", 1)[1]
    assert "Paired two-sided t-tests of LSTM" in md
    assert "Proposed LSTM Model" in md  # the paper's figures next to ours

    data = json.loads((out / "results.json").read_text("utf-8"))
    assert len(data["outcomes"]) == 2 * 4  # 2 repeats x (LSTM + 3 baselines)
    for outcome in data["outcomes"]:
        (tn, fp), (fn, tp) = outcome["confusion_matrix"]
        assert tn + fp + fn + tp == outcome["n_test"]
        assert 0.0 <= outcome["metrics"]["roc_auc"] <= 1.0
    # Every row of one repeat is scored on the same test students.
    assert len({(o["repeat"], o["n_test"]) for o in data["outcomes"]}) == 2
    assert (out / "metrics.png").stat().st_size > 1000
    assert (out / "roc_centralized.png").stat().st_size > 1000
    # Fairness by protected group of the first repeat's LSTM, on its test students.
    fairness = md.split("## Fairness by group", 1)[1]
    for attribute in ("gender", "age_band", "first_generation"):
        assert f"**{attribute}**" in fairness
    (lstm,) = [o for o in data["outcomes"] if o["label"] == "LSTM" and o["repeat"] == 0]
    for attribute in lstm["details"]["fairness"]:
        assert sum(g["n"] for g in attribute["groups"]) == lstm["n_test"]


def test_an_experiment_file_runs_and_a_rerun_replaces_the_earlier_outputs(tmp_path: Path) -> None:
    out = tmp_path / "run"
    args = (str(_write(tmp_path, VALID)), "--quick", "--modes", "centralized", "--out", str(out))
    assert _invoke(*args)[0] == 0
    (out / "stale.png").write_bytes(b"old")
    code, output = _invoke(*args)
    assert code == 0, output
    assert not (out / "stale.png").exists()
    md = (out / "results.md").read_text("utf-8")
    assert "| model | mode | n test | ROC-AUC | F1 |" in md
    assert "| random-forest | centralized |" in md


def test_early_warning_rebuilds_the_data_at_each_cutoff_week(tmp_path: Path) -> None:
    out = tmp_path / "run"
    code, output = _invoke("early-warning", "--quick", "--modes", "centralized", "--out", str(out))
    assert code == 0, output
    data = json.loads((out / "results.json").read_text("utf-8"))
    assert [d["week"] for d in data["data"]] == [3, 15]
    cut = load_spec(out / "data" / "synthetic-week03" / "spec.toml")
    assert cut.weeks == 3
    md = (out / "results.md").read_text("utf-8")
    assert "ROC-AUC by cut-off week:" in md
    assert "| cut-off week | centralized: LSTM | centralized: logistic-regression |" in md
    assert (out / "sweep.png").stat().st_size > 1000


def test_plan_runs_every_epsilon_of_the_privacy_sweep_once_per_seed() -> None:
    config = load_experiment("privacy-utility")
    jobs = plan(config, "synthetic", ["centralized", "federated", "federated-dp"])
    for row in ("LSTM", "DP logistic (engineered features)"):
        dp = [j.epsilon for j in jobs if j.mode == "federated-dp" and j.entry.label == row]
        eps = [0.5, 1.0, 2.0, 4.0, 8.0, 16.0]
        assert dp == [e for e in eps for _ in range(config.federated.repeats)], row
    assert len([j for j in jobs if j.mode == "centralized"]) == config.repeats
    assert all(j.epsilon is None for j in jobs if j.mode != "federated-dp")


def test_a_row_runs_only_in_its_own_modes_with_its_own_dp_settings(tmp_path: Path) -> None:
    row = (
        '\n[[models]]\nlabel = "DP logistic"\nmodel = "logistic"\nmodes = ["federated-dp"]\n'
        "dp = { learning_rate = 0.05, batch_size = 256, local_epochs = 1 }\n"
    )
    config = load_experiment(_write(tmp_path, VALID + row + "\n[dp]\nlearning_rate = 0.01\n"))
    jobs = plan(config, "synthetic", ["centralized", "federated", "federated-dp"])
    assert {j.mode for j in jobs if j.entry is not None and j.entry.label == "DP logistic"} == {
        "federated-dp"
    }
    logistic, lstm = config.models[1], config.models[0]
    assert config.dp_for(logistic, 3.0).model_dump(exclude_none=True) == {
        "epsilon": 3.0, "delta": config.dp.delta, "max_grad_norm": config.dp.max_grad_norm,
        "learning_rate": 0.05, "batch_size": 256, "local_epochs": 1,
    }  # fmt: skip
    assert config.dp_for(lstm, 3.0).learning_rate == 0.01
    assert config.quick().dp_for(config.quick().models[1]).local_epochs is None
    with pytest.raises(ExperimentConfigError, match="run in none of the modes"):
        centralized_only = VALID.replace("repeats = 2", 'repeats = 2\nmodes = ["centralized"]')
        load_experiment(_write(tmp_path, centralized_only + row))


def test_naive_predictor_uses_the_last_observed_period_grade() -> None:
    spec = load_spec(UCI_SPEC)
    g = np.array([[8, 12], [11, 9], [14, np.nan], [6, 7]], dtype=np.float32)
    mask = np.array([[1, 1], [1, 1], [1, 0], [1, 1]], dtype=np.float32)  # third: G1 only
    g3 = np.array([12, 9, 15, 5], dtype=np.float32)
    n = len(g3)
    cohort = CohortArrays(
        student_ids=np.arange(n).astype(str), terms=np.full(n, "t"),
        dynamic=g[:, :, None], week_mask=mask, static=np.zeros((n, 0), np.float32),
        grade=g3, at_risk=(g3 < 10).astype(np.float32), dynamic_names=spec.dynamic_names,
        static_names=(),
    )  # fmt: skip
    config = load_experiment("cortez-silva")
    assert config.naive is not None
    scored = naive_row(config.naive, "both", spec, PooledSplit(cohort, cohort, cohort))
    np.testing.assert_array_equal(scored.scores["grade_pred"], [12, 9, 14, 7])
    np.testing.assert_array_equal(scored.scores["prob"], [0, 1, 0, 1])
    assert scored.metrics["accuracy"] == 1.0
    assert scored.metrics["rmse"] == pytest.approx(math.sqrt((0 + 0 + 1 + 4) / 4))


def test_paired_t_test_is_scipys_and_the_correction_is_more_conservative() -> None:
    a = [0.81, 0.84, 0.79, 0.86, 0.83]
    b = [0.78, 0.80, 0.79, 0.81, 0.77]
    result = paired_t_test(a, b, test_to_train=0.15 / 0.7)
    expected = stats.ttest_rel(a, b)
    assert result.t == pytest.approx(expected.statistic)
    assert result.p == pytest.approx(expected.pvalue)
    assert result.p_corrected is not None and result.p_corrected > result.p
    assert result.mean_difference == pytest.approx(np.mean(np.subtract(a, b)))


def test_paired_t_test_drops_undefined_pairs_and_needs_two() -> None:
    one = paired_t_test([0.8, None], [0.7, 0.6], test_to_train=0.2)
    assert one.n == 1 and one.p is None
    same = paired_t_test([0.8, 0.9], [0.7, 0.8], test_to_train=0.2)
    assert same.p is None  # identical differences: nothing to test against


@pytest.mark.slow  # every job of a quick plan, on the default engine in worker processes
def test_quick_run_in_every_mode_scores_federated_models_on_the_same_students(
    tmp_path: Path,
) -> None:
    out = tmp_path / "run"
    code, output = _invoke("at-risk-lstm", "--quick", "--out", str(out))
    assert code == 0, output
    data = json.loads((out / "results.json").read_text("utf-8"))
    by_mode = {(o["mode"], o["repeat"]): o for o in data["outcomes"] if o["label"] == "LSTM"}
    assert by_mode[("federated", 0)]["n_test"] == by_mode[("centralized", 0)]["n_test"]
    dp = by_mode[("federated-dp", 0)]
    assert dp["epsilon"] == 8.0 and 0 < dp["details"]["epsilon_spent"] <= 8.0
    assert "| **LSTM** | federated-dp (ε=8) |" in (out / "results.md").read_text("utf-8")
    fairness = (out / "results.md").read_text("utf-8").split("## Fairness by group", 1)[1]
    for mode in ("centralized", "federated", "federated-dp (ε=8)"):
        assert f"| female | LSTM | {mode} |" in fairness


def _outcome(label: str, mode: str, week: int, eps: float | None, auc: float) -> Outcome:
    details = {"federation_reported": {"risk/roc_auc": auc + 0.01}} if mode != "centralized" else {}
    if eps is not None:
        details["epsilon_spent"] = eps - 0.01
    scored = Scored({"roc_auc": auc, "f1": 0.5}, [[5, 1], [1, 3]], 40, 10, details)
    return Outcome(label, "model", mode, 0, 0, week, eps, 1.0, scored)


def test_federated_rows_of_a_sweep_name_their_week_and_the_epsilon_spent(tmp_path: Path) -> None:
    config = load_experiment("early-warning")
    rep = Reproduction(
        config=config, dataset="synthetic", command="edufl reproduce early-warning",
        modes=["centralized", "federated", "federated-dp"], quick=False, out_dir=tmp_path,
        started="now",
        outcomes=[
            _outcome("LSTM", mode, week, 8.0 if mode == "federated-dp" else None, auc)
            for week, auc in ((3, 0.7), (15, 0.9))
            for mode in ("centralized", "federated", "federated-dp")
        ],
    )  # fmt: skip
    md = markdown(rep, [], [])
    assert "| cut-off week | centralized: LSTM | federated: LSTM | federated-dp: LSTM |" in md
    assert "| 3 | 0.700 | 0.700 | 0.700 |" in md
    assert "| 15 | LSTM | federated | 0.910 | - |" in md
    assert "| 3 | LSTM | federated-dp (ε=8) | 0.710 | 7.990 |" in md
