"""Classical baselines: registry, learning on separable data, NaN handling, speed."""

from __future__ import annotations

import numpy as np
import pytest

from shared_models.baselines import baseline_names, fit_baselines, make_baseline


def _data(n: int, d: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(n, d)).astype(np.float32)
    score = x[:, 0] + 0.5 * x[:, 1]
    return x, (score > 0.3).astype(np.float32), (0.5 + 0.15 * score).astype(np.float32)


def test_registries_hold_the_papers_baselines() -> None:
    common = {"linear-regression", "decision-tree", "svm", "random-forest", "mlp", "knn"}
    assert set(baseline_names("grade")) == common
    assert set(baseline_names("risk")) == common | {"logistic-regression"}


def test_unknown_baseline_or_task_is_refused_with_the_valid_names() -> None:
    with pytest.raises(ValueError, match="valid names are: linear-regression"):
        make_baseline("risk", "xgboost")
    with pytest.raises(ValueError, match="valid tasks"):
        baseline_names("dropout")  # type: ignore[arg-type]


def test_classifiers_weight_classes_as_balanced_where_sklearn_can() -> None:
    for name in baseline_names("risk"):
        estimator = make_baseline("risk", name)
        params = estimator.get_params(deep=True)
        weights = {v for k, v in params.items() if k.endswith("class_weight")}
        if weights:
            assert weights == {"balanced"}, name
    assert make_baseline("risk", "logistic-regression").get_params()["steps"][0][0] == (
        "standardscaler"
    )


def test_every_classifier_separates_a_learnable_risk_label() -> None:
    x, y, _ = _data(600, 10)
    results = fit_baselines("risk", x[:400], y[:400], x[400:], y[400:], seed=0)
    assert set(results) == set(baseline_names("risk"))
    for name, result in results.items():
        assert result.predictions.shape == (200,)
        assert ((result.predictions >= 0) & (result.predictions <= 1)).all(), name
        assert result.metrics["roc_auc"] > 0.8, name


def test_every_regressor_explains_a_learnable_grade() -> None:
    x, _, grade = _data(600, 10)
    grade_train = grade[:400].copy()
    grade_train[::7] = np.nan  # ungraded students are dropped from training
    results = fit_baselines("grade", x[:400], grade_train, x[400:], grade[400:], seed=0)
    for name, result in results.items():
        assert result.metrics["r2"] > 0.5, name
        assert result.metrics["n"] == 200


def test_one_class_training_labels_are_refused_clearly() -> None:
    x, _, _ = _data(20, 3)
    with pytest.raises(ValueError, match="at least 3 students of each class"):
        fit_baselines("risk", x, np.zeros(20), x, np.zeros(20))


def test_same_seed_gives_the_same_predictions() -> None:
    x, y, _ = _data(300, 8)
    names = ["random-forest", "mlp"]
    a = fit_baselines("risk", x[:200], y[:200], x[200:], y[200:], seed=4, names=names)
    b = fit_baselines("risk", x[:200], y[:200], x[200:], y[200:], seed=4, names=names)
    for name in names:
        assert np.array_equal(a[name].predictions, b[name].predictions), name


@pytest.mark.slow
def test_all_baselines_fit_a_few_thousand_students_with_many_features() -> None:
    # How long they take is measured by the benchmarks, not asserted here.
    x, y, grade = _data(3500, 150)
    risk = fit_baselines("risk", x[:3000], y[:3000], x[3000:], y[3000:])
    grade_results = fit_baselines("grade", x[:3000], grade[:3000], x[3000:], grade[3000:])
    # Many uninformative features must not break any of them (an MLP on unscaled grades did).
    assert all(r.metrics["roc_auc"] > 0.6 for r in risk.values())
    assert all(r.metrics["r2"] > 0.2 for r in grade_results.values())
