"""Metrics from (noised) histograms of predicted risk against the exact metrics of the scores."""

from __future__ import annotations

import math

import numpy as np
import pytest

from shared_models.metrics import (
    TIER_THRESHOLDS,
    classification_metrics,
    histogram_metrics,
    risk_histograms,
    sum_histograms,
)


def _scores(n: int = 3000, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, 2, n)
    prob = np.clip(rng.normal(0.35 + 0.3 * labels, 0.2), 0.0, 1.0)
    return labels, prob


def test_a_fine_histogram_without_noise_agrees_with_the_exact_metrics() -> None:
    labels, prob = _scores()
    exact = classification_metrics(labels, prob)
    found = histogram_metrics(*risk_histograms(labels, prob, 1000))
    assert found["n"] == exact["n"] and found["n_positive"] == exact["n_positive"]
    for key in ("accuracy", "precision", "recall", "f1"):  # 0.5 is a bin edge: exact
        assert found[key] == pytest.approx(exact[key], abs=1e-12), key
    assert found["confusion_matrix"] == exact["confusion_matrix"]
    for key in ("roc_auc", "average_precision", "brier"):  # ties within a bin of 0.001
        assert found[key] == pytest.approx(exact[key], abs=1e-3), key
    assert found["noise_std"] == 0.0 and found["clipped"] == 0


def test_tier_thresholds_on_bin_edges_flag_exactly_the_students_the_scores_flag() -> None:
    labels, prob = _scores(seed=1)
    found = histogram_metrics(*risk_histograms(labels, prob, 10))
    assert TIER_THRESHOLDS == (0.40, 0.70)
    for threshold in TIER_THRESHOLDS:
        exact = classification_metrics(labels, prob, threshold=threshold)
        at = found["at"][f"{threshold:.2f}"]
        assert at["recall"] == pytest.approx(exact["recall"], abs=1e-12)
        assert at["precision"] == pytest.approx(exact["precision"], abs=1e-12)
        assert at["flagged"] == float((prob >= threshold).sum())


def test_expected_calibration_error_is_zero_when_each_bin_holds_its_centres_share() -> None:
    centres = (np.arange(10) + 0.5) / 10
    pos, neg = 100 * centres, 100 * (1 - centres)
    assert histogram_metrics(pos, neg)["ece"] == pytest.approx(0.0, abs=1e-12)
    # Everyone at risk in the lowest bin: off by its whole 0.95.
    assert histogram_metrics([5, 0, 0], [0, 0, 0])["ece"] == pytest.approx(5 / 6)


def test_negative_noised_counts_are_clipped_to_zero_and_counted() -> None:
    pos = [-2.5, 0.0, 3.0, 10.0]
    neg = [8.0, 4.0, -1.0, 1.5]
    found = histogram_metrics(pos, neg, noise_std=2.0)
    assert found["clipped"] == 2
    assert found == histogram_metrics([0, 0, 3, 10], [8, 4, 0, 1.5], noise_std=2.0) | {"clipped": 2}
    assert found["n"] == pytest.approx(26.5) and found["noise_std"] == 2.0


@pytest.mark.parametrize(
    ("pos", "neg"), [([0.0] * 10, [0.0] * 10), ([-1.0] * 10, [-0.5] * 10)], ids=["zero", "negative"]
)
def test_no_student_left_after_clipping_gives_undefined_figures_not_an_error(
    pos: list[float], neg: list[float]
) -> None:
    found = histogram_metrics(pos, neg)
    assert found["n"] == 0.0
    for key in ("roc_auc", "average_precision", "brier", "ece", "accuracy", "f1"):
        assert found[key] is None, key
    assert found["at"]["0.40"]["recall"] is None


def test_one_class_leaves_roc_auc_undefined() -> None:
    found = histogram_metrics([0, 0, 5, 5], [0, 0, 0, 0])
    assert found["roc_auc"] is None and found["recall"] == 1.0
    assert found["average_precision"] is not None


def test_bad_histograms_are_refused() -> None:
    with pytest.raises(ValueError, match="equal length"):
        histogram_metrics([1, 2], [1, 2, 3])
    with pytest.raises(ValueError, match="finite"):
        histogram_metrics([1, math.nan], [1, 2])


def test_summed_releases_add_their_noise_in_variance() -> None:
    pos, neg, std = sum_histograms([([1, 2], [3, 4], 3.0), ([1, 1], [0, 0], 4.0)])
    assert pos.tolist() == [2, 3] and neg.tolist() == [3, 4]
    assert std == pytest.approx(5.0)  # sqrt(9 + 16)
    with pytest.raises(ValueError, match="shapes"):
        sum_histograms([([1, 2], [3, 4], 1.0), ([1], [0], 1.0)])
