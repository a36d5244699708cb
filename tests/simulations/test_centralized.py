from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from shared_models.data.cohort import CohortArrays
from shared_models.data.contract import default_spec
from shared_models.data.loader import load_cohort
from shared_models.data.splits import split_cohort
from shared_models.errors import DataContractError
from shared_models.evaluation import predict
from shared_models.models.artifact import load_trained
from shared_models.training import FitConfig
from simulations.centralized import results_table, run_centralized
from simulations.cli import app

SPEC = default_spec()


@pytest.fixture(scope="module")
def pooled(consortium_dir: Path) -> CohortArrays:
    return CohortArrays.concatenate(
        [load_cohort(f) for f in sorted(consortium_dir.glob("institution_*"))]
    )


def test_train_writes_metrics_weights_table_and_plots(pooled: CohortArrays, tmp_path: Path) -> None:
    runs = run_centralized(
        pooled,
        SPEC,
        tmp_path,
        model_name="lstm",
        target="both",
        fit_config=FitConfig(max_epochs=3, seed=1),
    )
    for name in (
        "metrics.json",
        "model.pt",
        "model.json",
        "results.md",
        "roc.png",
        "grade_scatter.png",
        "training_curves.png",
    ):
        assert (tmp_path / name).is_file(), name
    metrics = json.loads((tmp_path / "metrics.json").read_text())
    assert metrics["n"]["train"] + metrics["n"]["val"] + metrics["n"]["test"] == len(pooled)
    assert 0.0 <= metrics["risk"]["roc_auc"] <= 1.0
    assert "logistic-regression" in metrics["baselines"]
    table = (tmp_path / "results.md").read_text()
    assert "| **lstm** |" in table and "| linear-regression |" in table
    assert runs[0]["epochs_run"] == 3


def test_saved_model_reloads_bit_for_bit_and_predicts_the_same(
    pooled: CohortArrays, tmp_path: Path
) -> None:
    run_centralized(
        pooled, SPEC, tmp_path, model_name="cnn-lstm", fit_config=FitConfig(max_epochs=2)
    )
    model, norm, card = load_trained(tmp_path, SPEC)
    assert card.model == "cnn-lstm" and card.spec_fingerprint == SPEC.fingerprint
    saved = torch.load(tmp_path / "model.pt", weights_only=True)
    for name, tensor in model.named_parameters():
        assert torch.equal(tensor.detach(), saved[name])
    split = split_cohort(pooled)
    inputs = norm.transform(pooled.subset(split.test))
    again, _, _ = load_trained(tmp_path)
    np.testing.assert_array_equal(predict(model, inputs)["risk"], predict(again, inputs)["risk"])


def test_model_from_another_contract_is_refused(pooled: CohortArrays, tmp_path: Path) -> None:
    run_centralized(pooled, SPEC, tmp_path, fit_config=FitConfig(max_epochs=1))
    other = SPEC.model_copy(update={"version": "2.0.0"})
    with pytest.raises(DataContractError, match="trained on contract"):
        load_trained(tmp_path, other)


def test_kfold_reports_mean_and_sd(pooled: CohortArrays, tmp_path: Path) -> None:
    runs = run_centralized(
        pooled, SPEC, tmp_path, split="kfold", folds=3, fit_config=FitConfig(max_epochs=1)
    )
    assert len(runs) == 3
    assert all((tmp_path / f"fold_{k}" / "model.pt").is_file() for k in (1, 2, 3))
    assert "±" in (tmp_path / "results.md").read_text()
    test_rows = sum(r["n"]["test"] for r in runs)
    assert test_rows == int((~np.isnan(pooled.at_risk)).sum())


def test_results_table_formats_missing_values() -> None:
    run = {"model": "lstm", "risk": {"roc_auc": 0.9}, "baselines": {"knn": {"risk": {}}}}
    table = results_table([run], "risk")
    assert "| **lstm** | 0.900 |" in table and "n/a" in table


def test_train_command_end_to_end(consortium_dir: Path, tmp_path: Path) -> None:
    dirs = [str(p) for p in sorted(consortium_dir.glob("institution_*"))]
    result = CliRunner().invoke(
        app,
        [
            "train",
            *dirs,
            "--model",
            "gru",
            "--target",
            "grade",
            "--epochs",
            "2",
            "--out",
            str(tmp_path),
        ],
    )
    assert result.exit_code == 0, result.output
    assert "## grade" in result.output and "| **gru** |" in result.output
    assert (tmp_path / "grade_scatter.png").is_file()


def test_train_command_refuses_unknown_model(consortium_dir: Path, tmp_path: Path) -> None:
    result = CliRunner().invoke(
        app,
        [
            "train",
            str(consortium_dir / "institution_01"),
            "--model",
            "transformer",
            "--out",
            str(tmp_path),
        ],
    )
    assert result.exit_code == 2
    assert "unknown model 'transformer'" in result.output
