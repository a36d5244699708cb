"""Metrics against values computed by hand, undefined cases, NaN targets, JSON output."""

from __future__ import annotations

import json
import math
import warnings

import numpy as np
import pytest

from shared_models.metrics import classification_metrics, flatten_metrics, regression_metrics

# Labels and probabilities; at threshold 0.5 the flags are [1, 0, 0, 1, 1]:
# TP = 2 (rows 0, 3), FP = 1 (row 4), FN = 1 (row 2), TN = 1 (row 1).
Y = [1, 0, 1, 1, 0]
P = [0.9, 0.4, 0.3, 0.8, 0.6]


def test_classification_metrics_match_hand_computed_values() -> None:
    m = classification_metrics(Y, P)
    assert m["confusion_matrix"] == [[1, 1], [1, 2]]  # [[tn, fp], [fn, tp]]
    assert m["accuracy"] == pytest.approx(3 / 5)
    assert m["precision"] == pytest.approx(2 / 3)  # 2 / (2 + 1)
    assert m["recall"] == pytest.approx(2 / 3)  # 2 / (2 + 1)
    assert m["f1"] == pytest.approx(2 / 3)
    # Brier: mean of (0.1², 0.4², 0.7², 0.2², 0.6²) = 1.06 / 5
    assert m["brier"] == pytest.approx(0.212)
    # ROC-AUC: positive-negative pairs ranked correctly: 0.9 > both, 0.8 > both, 0.3 > none.
    assert m["roc_auc"] == pytest.approx(4 / 6)
    assert (m["n"], m["n_positive"]) == (5, 3)


def test_threshold_moves_the_flags_but_not_the_ranking_metrics() -> None:
    m = classification_metrics(Y, P, threshold=0.85)  # only 0.9 is flagged
    assert m["confusion_matrix"] == [[2, 0], [2, 1]]
    assert m["precision"] == 1.0 and m["recall"] == pytest.approx(1 / 3)
    assert m["roc_auc"] == pytest.approx(4 / 6)


def test_one_class_labels_give_no_roc_auc_and_no_warning() -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        m = classification_metrics([0, 0, 0], [0.2, 0.7, 0.1])
    assert m["roc_auc"] is None
    assert m["precision"] == 0.0 and m["recall"] == 0.0  # nothing to find, zero_division=0
    assert m["accuracy"] == pytest.approx(2 / 3)


def test_nan_targets_are_dropped_with_their_predictions() -> None:
    with_nan = classification_metrics([*Y, math.nan], [*P, 0.99])
    assert with_nan == classification_metrics(Y, P)
    reg = regression_metrics([0.0, 1.0, 2.0, 3.0, math.nan], [0.0, 2.0, 2.0, 2.0, 100.0])
    assert reg["n"] == 4 and reg["mse"] == pytest.approx(0.5)


def test_regression_metrics_match_hand_computed_values() -> None:
    # errors 0, 1, 0, -1; mean target 1.5, total sum of squares 5
    m = regression_metrics([0.0, 1.0, 2.0, 3.0], [0.0, 2.0, 2.0, 2.0])
    assert m["mse"] == pytest.approx(0.5)
    assert m["rmse"] == pytest.approx(math.sqrt(0.5))
    assert m["mae"] == pytest.approx(0.5)
    assert m["r2"] == pytest.approx(1 - 2 / 5)


def test_constant_targets_give_no_r2_and_empty_input_gives_no_metrics() -> None:
    assert regression_metrics([2.0, 2.0], [1.0, 3.0])["r2"] is None
    assert regression_metrics([math.nan], [0.5]) == {
        "n": 0,
        "mse": None,
        "rmse": None,
        "mae": None,
        "r2": None,
    }
    empty = classification_metrics([], [])
    assert empty["n"] == 0 and empty["roc_auc"] is None


def test_logits_and_mismatched_lengths_are_refused() -> None:
    with pytest.raises(ValueError, match="apply a sigmoid"):
        classification_metrics([0, 1], [-2.0, 3.0])
    with pytest.raises(ValueError, match="3 targets but 2 predictions"):
        regression_metrics([1.0, 2.0, 3.0], [1.0, 2.0])


def test_metrics_are_json_serialisable_and_flatten_for_flower() -> None:
    nested = {"loss": np.float32(0.25), "risk": classification_metrics(Y, np.asarray(P))}
    json.dumps(classification_metrics(Y, np.asarray(P, dtype=np.float32)))
    flat = flatten_metrics(nested)
    assert flat["risk/tp"] == 2.0 and flat["risk/fn"] == 1.0
    assert flat["loss"] == pytest.approx(0.25)
    assert all(isinstance(v, float) for v in flat.values())
    assert "risk/confusion_matrix" not in flat
    one_class = flatten_metrics({"risk": classification_metrics([0, 0], [0.1, 0.2])})
    assert "risk/roc_auc" not in one_class  # None is left out, not sent as NaN
