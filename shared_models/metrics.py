"""Evaluation metrics of the seed papers, computed with scikit-learn, JSON-serialisable.

Regression (grade): MSE, RMSE, MAE, R² (CNN-LSTM and LSTM-GRU papers). Classification (at-risk):
ROC-AUC (CNN-LSTM paper), accuracy, precision, recall, F1 and the confusion matrix (at-risk
LSTM paper), plus the Brier score and average precision for calibration and imbalance.

Targets that are NaN (ungraded students) are dropped with their predictions. A metric that is
undefined on the data (ROC-AUC with one class, R² with constant targets, anything on zero
samples) is ``None`` rather than an exception or a warning, so a small institution's evaluation
never crashes a federated round.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Mapping
from typing import Any

import numpy as np
from sklearn import metrics as skm

logger = logging.getLogger(__name__)


def _paired(y_true: Any, y_pred: Any) -> tuple[np.ndarray, np.ndarray]:
    """1-D float arrays of equal length with rows whose target or prediction is NaN dropped."""
    true = np.asarray(y_true, dtype=np.float64).reshape(-1)
    pred = np.asarray(y_pred, dtype=np.float64).reshape(-1)
    if true.shape != pred.shape:
        raise ValueError(f"{true.size} targets but {pred.size} predictions")
    keep = np.isfinite(true) & np.isfinite(pred)
    return true[keep], pred[keep]


def classification_metrics(y_true: Any, prob: Any, threshold: float = 0.5) -> dict[str, Any]:
    """Metrics of at-risk probabilities against 0/1 labels.

    Args:
        y_true: labels, 0/1 (NaN rows dropped).
        prob: predicted probability of the positive (at-risk) class, in [0, 1].
        threshold: a student is flagged at risk when ``prob >= threshold``.

    Returns:
        ``n``, ``n_positive``, ``threshold``, ``accuracy``, ``precision``, ``recall``, ``f1``,
        ``roc_auc``, ``average_precision``, ``brier`` (floats or None when undefined) and
        ``confusion_matrix`` as ``[[tn, fp], [fn, tp]]``.
    """
    true, score = _paired(y_true, prob)
    if not np.isin(true, (0.0, 1.0)).all():
        raise ValueError("classification labels must be 0 or 1 (or NaN for unknown)")
    if ((score < 0) | (score > 1)).any():
        raise ValueError("prob must be probabilities in [0, 1]; apply a sigmoid to logits")
    labels = true.astype(int)
    flagged = (score >= threshold).astype(int)
    out: dict[str, Any] = {
        "n": int(labels.size),
        "n_positive": int(labels.sum()),
        "threshold": float(threshold),
    }
    if labels.size == 0:
        out |= dict.fromkeys(
            ("accuracy", "precision", "recall", "f1", "roc_auc", "average_precision", "brier")
        )
        out["confusion_matrix"] = [[0, 0], [0, 0]]
        return out
    two_classes = np.unique(labels).size == 2
    out |= {
        "accuracy": float(skm.accuracy_score(labels, flagged)),
        "precision": float(skm.precision_score(labels, flagged, zero_division=0)),
        "recall": float(skm.recall_score(labels, flagged, zero_division=0)),
        "f1": float(skm.f1_score(labels, flagged, zero_division=0)),
        "roc_auc": float(skm.roc_auc_score(labels, score)) if two_classes else None,
        "average_precision": (
            float(skm.average_precision_score(labels, score)) if labels.any() else None
        ),
        "brier": float(skm.brier_score_loss(labels, score, pos_label=1)),
        "confusion_matrix": skm.confusion_matrix(labels, flagged, labels=[0, 1]).tolist(),
    }
    return out


def regression_metrics(y_true: Any, y_pred: Any) -> dict[str, Any]:
    """Metrics of grade predictions; both arguments on the same scale.

    Returns:
        ``n``, ``mse``, ``rmse``, ``mae``, ``r2`` (floats, or None when undefined).
    """
    true, pred = _paired(y_true, y_pred)
    if true.size == 0:
        return {"n": 0, "mse": None, "rmse": None, "mae": None, "r2": None}
    mse = float(skm.mean_squared_error(true, pred))
    # R² divides by the targets' variance: undefined for fewer than two distinct values.
    r2 = float(skm.r2_score(true, pred)) if np.unique(true).size > 1 else None
    return {
        "n": int(true.size),
        "mse": mse,
        "rmse": math.sqrt(mse),
        "mae": float(skm.mean_absolute_error(true, pred)),
        "r2": r2,
    }


def flatten_metrics(metrics: Mapping[str, Any], prefix: str = "") -> dict[str, float]:
    """Nested metrics as flat ``"a/b": float`` pairs (Flower's ``MetricRecord`` takes only these).

    ``None`` values and non-scalar entries (the confusion matrix) are left out; the confusion
    matrix cells appear as ``.../tn``, ``/fp``, ``/fn``, ``/tp``.
    """
    flat: dict[str, float] = {}
    for key, value in metrics.items():
        name = f"{prefix}{key}"
        if isinstance(value, Mapping):
            flat |= flatten_metrics(value, prefix=f"{name}/")
        elif key == "confusion_matrix" and isinstance(value, list):
            (tn, fp), (fn, tp) = value
            cells = {"tn": tn, "fp": fp, "fn": fn, "tp": tp}
            flat |= {f"{prefix}{cell}": float(count) for cell, count in cells.items()}
        elif isinstance(value, bool | int | float | np.floating | np.integer):
            flat[name] = float(value)
    return flat
