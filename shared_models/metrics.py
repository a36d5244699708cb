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
import sklearn
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
    # The arrays were checked above; scikit-learn's own checks of every call took most of a
    # federated round's evaluation (tens of ms per call on a few hundred students).
    with sklearn.config_context(assume_finite=True, skip_parameter_validation=True):
        confusion = skm.confusion_matrix(labels, flagged, labels=[0, 1])
        precision, recall, f1, _ = skm.precision_recall_fscore_support(
            labels, flagged, average="binary", pos_label=1, zero_division=0
        )
        out |= {
            "accuracy": float(np.trace(confusion) / labels.size),
            "precision": float(precision),
            "recall": float(recall),
            "f1": float(f1),
            "roc_auc": float(skm.roc_auc_score(labels, score)) if two_classes else None,
            "average_precision": (
                float(skm.average_precision_score(labels, score)) if labels.any() else None
            ),
            "brier": float(skm.brier_score_loss(labels, score, pos_label=1)),
            "confusion_matrix": confusion.tolist(),
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
    with sklearn.config_context(assume_finite=True, skip_parameter_validation=True):
        mse = float(skm.mean_squared_error(true, pred))
        # R² divides by the targets' variance: undefined for fewer than two distinct values.
        r2 = float(skm.r2_score(true, pred)) if np.unique(true).size > 1 else None
        mae = float(skm.mean_absolute_error(true, pred))
    return {"n": int(true.size), "mse": mse, "rmse": math.sqrt(mse), "mae": mae, "r2": r2}


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


# --- metrics from (noised) histograms of predicted risk ------------------------------------------

#: The tier thresholds of the early-warning advisor (``client.early_warning.scoring``'s
#: ``RiskThresholds``: low < 0.40 <= moderate < 0.70 <= high), restated here because the data
#: contract layer does not import the client.
TIER_THRESHOLDS: tuple[float, float] = (0.40, 0.70)


def risk_histograms(y_true: Any, prob: Any, bins: int) -> tuple[np.ndarray, np.ndarray]:
    """Exact counts of predicted risk over ``bins`` equal bins of [0, 1], at-risk and not.

    Bins are NumPy's: ``[i/bins, (i+1)/bins)``, the last one closed; NaN rows are dropped.

    Returns:
        ``(positive, negative)`` float arrays of ``bins`` counts each.
    """
    true, score = _paired(y_true, prob)
    edges = np.linspace(0.0, 1.0, bins + 1)
    positive, _ = np.histogram(score[true == 1], bins=edges)
    negative, _ = np.histogram(score[true == 0], bins=edges)
    return positive.astype(np.float64), negative.astype(np.float64)


def sum_histograms(
    releases: list[tuple[Any, Any, float]],
) -> tuple[np.ndarray, np.ndarray, float]:
    """Sum several institutions' ``(positive, negative, noise_std)`` histogram releases.

    Independent Gaussian noise adds in variance: the sum's noise std is ``sqrt(sum(std²))``
    (``sigma·sqrt(k)`` for ``k`` releases with the same ``sigma``).

    Raises:
        ValueError: no release, or histograms of different lengths.
    """
    if not releases:
        raise ValueError("no histogram to sum")
    shapes = {np.shape(pos) for pos, _, _ in releases} | {np.shape(neg) for _, neg, _ in releases}
    if len(shapes) != 1:
        raise ValueError(f"histograms of different shapes cannot be summed: {sorted(shapes)}")
    positive = np.sum([np.asarray(pos, dtype=np.float64) for pos, _, _ in releases], axis=0)
    negative = np.sum([np.asarray(neg, dtype=np.float64) for _, neg, _ in releases], axis=0)
    std = math.sqrt(sum(float(s) ** 2 for _, _, s in releases))
    return positive, negative, std


def histogram_metrics(
    hist_pos: Any,
    hist_neg: Any,
    *,
    noise_std: float = 0.0,
    threshold: float = 0.5,
    extra_thresholds: tuple[float, ...] = TIER_THRESHOLDS,
) -> dict[str, Any]:
    """Classification metrics from counts of predicted risk over equal bins of [0, 1].

    The counts may be noised (a DP release: negative or fractional). Negative counts are
    clipped to 0 first (post-processing, so no privacy cost; ``clipped`` says how many were),
    then every student of a bin is taken to score the bin's centre and the metrics come from
    scikit-learn with the counts as sample weights. Thresholds on bin edges (0.4, 0.5 and 0.7 with
    10 bins) flag exactly the students the exact scores would flag; ROC-AUC and average
    precision treat a bin's students as ties, and the Brier score uses the bin centres, so these
    approximate the exact figures more closely the finer the bins.

    Args:
        hist_pos: counts of at-risk students per bin.
        hist_neg: counts of the other students per bin.
        noise_std: the standard deviation of the noise on each count (0 for exact counts); it is
            returned as ``noise_std`` next to the figures, which all derive from those counts.
        threshold: flag at risk when the bin centre is >= ``threshold`` (accuracy, precision,
            recall, F1 and the confusion matrix).
        extra_thresholds: more thresholds (the advisor's tiers), reported under ``at``.

    Returns:
        ``n``, ``n_positive`` (clipped counts' sums), ``noise_std``, ``bins``, ``clipped``,
        ``threshold``, ``accuracy``, ``precision``, ``recall``, ``f1``, ``roc_auc``,
        ``average_precision``, ``brier``, ``ece`` (expected calibration error over the bins),
        ``confusion_matrix`` as ``[[tn, fp], [fn, tp]]`` (floats), and ``at``:
        ``{"0.40": {accuracy, precision, recall, f1, flagged}, ...}``. A figure undefined on the
        counts (no student, one class) is None.

    Raises:
        ValueError: the two histograms differ in length, are empty, or hold NaN or infinity.
    """
    pos = np.asarray(hist_pos, dtype=np.float64).reshape(-1)
    neg = np.asarray(hist_neg, dtype=np.float64).reshape(-1)
    if pos.shape != neg.shape or pos.size == 0:
        raise ValueError(f"histograms must be non-empty, of equal length: {pos.size}, {neg.size}")
    if not (np.isfinite(pos).all() and np.isfinite(neg).all()):
        raise ValueError("histogram counts must be finite numbers")
    bins = pos.size
    clipped = int((pos < 0).sum() + (neg < 0).sum())
    pos, neg = np.clip(pos, 0.0, None), np.clip(neg, 0.0, None)
    centres = (np.arange(bins) + 0.5) / bins
    n_pos, n_neg = float(pos.sum()), float(neg.sum())
    out: dict[str, Any] = {
        "n": n_pos + n_neg,
        "n_positive": n_pos,
        "noise_std": float(noise_std),
        "bins": bins,
        "clipped": clipped,
        "threshold": float(threshold),
    }
    # One weighted sample per (bin, class) with a count: label, score = bin centre, weight.
    keep_pos, keep_neg = pos > 0, neg > 0
    labels = np.concatenate([np.ones(keep_pos.sum()), np.zeros(keep_neg.sum())]).astype(int)
    scores = np.concatenate([centres[keep_pos], centres[keep_neg]])
    weights = np.concatenate([pos[keep_pos], neg[keep_neg]])
    at_threshold = _weighted_flags(labels, scores, weights, threshold)
    out |= {k: v for k, v in at_threshold.items() if k != "flagged"}
    out["at"] = {f"{t:.2f}": _weighted_flags(labels, scores, weights, t) for t in extra_thresholds}
    if labels.size == 0:
        out |= dict.fromkeys(("roc_auc", "average_precision", "brier", "ece"))
        return out
    two_classes = n_pos > 0 and n_neg > 0
    out |= {
        "roc_auc": (
            float(skm.roc_auc_score(labels, scores, sample_weight=weights)) if two_classes else None
        ),
        "average_precision": (
            float(skm.average_precision_score(labels, scores, sample_weight=weights))
            if n_pos > 0
            else None
        ),
        "brier": float(skm.brier_score_loss(labels, scores, sample_weight=weights, pos_label=1)),
        # Calibration over the histogram's own bins: |bin centre - share at risk|, weighted by
        # the bin's students (the bin's mean score is approximated by its centre).
        "ece": float(np.sum(np.abs((pos + neg) * centres - pos)) / (n_pos + n_neg)),
    }
    return out


def _weighted_flags(
    labels: np.ndarray, scores: np.ndarray, weights: np.ndarray, threshold: float
) -> dict[str, Any]:
    """Accuracy, precision, recall, F1, the confusion matrix and the flagged count at a cut."""
    if labels.size == 0:
        empty: dict[str, Any] = dict.fromkeys(("accuracy", "precision", "recall", "f1"))
        return empty | {"confusion_matrix": [[0.0, 0.0], [0.0, 0.0]], "flagged": 0.0}
    flagged = (scores >= threshold).astype(int)
    kwargs = {"sample_weight": weights, "zero_division": 0}
    return {
        "accuracy": float(skm.accuracy_score(labels, flagged, sample_weight=weights)),
        "precision": float(skm.precision_score(labels, flagged, **kwargs)),
        "recall": float(skm.recall_score(labels, flagged, **kwargs)),
        "f1": float(skm.f1_score(labels, flagged, **kwargs)),
        "confusion_matrix": skm.confusion_matrix(
            labels, flagged, labels=[0, 1], sample_weight=weights
        ).tolist(),
        "flagged": float(weights[flagged == 1].sum()),
    }
