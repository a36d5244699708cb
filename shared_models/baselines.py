"""The seed papers' classical baselines on flattened features (`ModelInputs.flat`).

Linear/logistic regression, decision tree, SVM, random forest, MLP ("ANN") and k-NN, for the
at-risk classification (``"risk"``) and the grade regression (``"grade"``). Classifiers weight
classes as ``"balanced"`` where scikit-learn supports it (all but the MLP and k-NN); estimators
that depend on feature scale get a ``StandardScaler`` in their pipeline, fitted on the training
split only. Settings keep a few thousand students x ~150 features to seconds on two cores.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, Literal

import numpy as np
from sklearn.base import BaseEstimator, ClassifierMixin
from sklearn.calibration import CalibratedClassifierCV
from sklearn.compose import TransformedTargetRegressor
from sklearn.ensemble import RandomForestClassifier, RandomForestRegressor
from sklearn.linear_model import LinearRegression, LogisticRegression
from sklearn.neighbors import KNeighborsClassifier, KNeighborsRegressor
from sklearn.neural_network import MLPClassifier, MLPRegressor
from sklearn.pipeline import Pipeline, make_pipeline
from sklearn.preprocessing import StandardScaler
from sklearn.svm import SVC, SVR
from sklearn.tree import DecisionTreeClassifier, DecisionTreeRegressor

from shared_models.metrics import classification_metrics, regression_metrics

logger = logging.getLogger(__name__)

BaselineTask = Literal["risk", "grade"]


class LinearProbabilityClassifier(ClassifierMixin, BaseEstimator):  # type: ignore[misc]
    """Least-squares regression on 0/1 labels, clipped to [0, 1] as a probability.

    The CNN-LSTM paper's ROC figure scores "linear regression for binary prediction" this way.
    """

    def fit(self, X: np.ndarray, y: np.ndarray) -> LinearProbabilityClassifier:
        self.regressor_ = LinearRegression().fit(X, y)
        self.classes_ = np.array([0.0, 1.0])
        return self

    def predict_proba(self, X: np.ndarray) -> np.ndarray:
        positive = np.clip(self.regressor_.predict(X), 0.0, 1.0)
        return np.column_stack([1.0 - positive, positive])

    def predict(self, X: np.ndarray) -> np.ndarray:
        return (self.predict_proba(X)[:, 1] >= 0.5).astype(float)


def _scaled(estimator: Any) -> Pipeline:
    return make_pipeline(StandardScaler(), estimator)


def _standardised_target(estimator: Any) -> TransformedTargetRegressor:
    """Fit on z-scored targets: SVR's epsilon and the MLP's stopping tolerance are absolute, and
    grades on a [0, 1] scale vary too little for their defaults (the MLP stops almost at once).
    """
    return TransformedTargetRegressor(regressor=estimator, transformer=StandardScaler())


_CLASSIFIERS: dict[str, Callable[[int], Any]] = {
    "linear-regression": lambda seed: LinearProbabilityClassifier(),
    "logistic-regression": lambda seed: _scaled(
        LogisticRegression(class_weight="balanced", max_iter=2000)
    ),
    "decision-tree": lambda seed: DecisionTreeClassifier(
        class_weight="balanced", min_samples_leaf=5, random_state=seed
    ),
    # SVC(probability=True) runs an internal 5-fold CV and is slow; 3-fold calibration of an
    # RBF SVC gives probabilities (for ROC-AUC and Brier) at a fraction of the cost.
    "svm": lambda seed: _scaled(
        CalibratedClassifierCV(SVC(kernel="rbf", class_weight="balanced", random_state=seed), cv=3)
    ),
    "random-forest": lambda seed: RandomForestClassifier(
        n_estimators=100, min_samples_leaf=2, class_weight="balanced", random_state=seed
    ),
    "mlp": lambda seed: _scaled(
        MLPClassifier(
            hidden_layer_sizes=(64,), early_stopping=True, max_iter=300, random_state=seed
        )
    ),
    "knn": lambda seed: _scaled(KNeighborsClassifier(n_neighbors=15, weights="distance")),
}

_REGRESSORS: dict[str, Callable[[int], Any]] = {
    "linear-regression": lambda seed: LinearRegression(),
    "decision-tree": lambda seed: DecisionTreeRegressor(min_samples_leaf=5, random_state=seed),
    "svm": lambda seed: _standardised_target(_scaled(SVR(kernel="rbf"))),
    "random-forest": lambda seed: RandomForestRegressor(
        n_estimators=100, min_samples_leaf=2, max_features="sqrt", random_state=seed
    ),
    "mlp": lambda seed: _standardised_target(
        _scaled(
            MLPRegressor(
                hidden_layer_sizes=(64,),
                alpha=1e-3,
                early_stopping=True,
                max_iter=300,
                random_state=seed,
            )
        )
    ),
    "knn": lambda seed: _scaled(KNeighborsRegressor(n_neighbors=15, weights="distance")),
}


def _table(task: str) -> dict[str, Callable[[int], Any]]:
    if task == "risk":
        return _CLASSIFIERS
    if task == "grade":
        return _REGRESSORS
    raise ValueError(f"unknown baseline task {task!r}; valid tasks are 'risk', 'grade'")


def baseline_names(task: BaselineTask) -> tuple[str, ...]:
    """Names of the baselines for ``task`` (``"risk"``: classifiers, ``"grade"``: regressors)."""
    return tuple(_table(task))


def make_baseline(task: BaselineTask, name: str, seed: int = 0) -> Any:
    """A fresh, unfitted scikit-learn estimator for baseline ``name``.

    Raises:
        ValueError: unknown task or name (the message lists the valid names).
    """
    table = _table(task)
    if name not in table:
        raise ValueError(f"unknown {task} baseline {name!r}; valid names are: {', '.join(table)}")
    return table[name](seed)


@dataclass(frozen=True)
class BaselineResult:
    """One fitted baseline's test metrics and predictions.

    ``predictions`` are at-risk probabilities for ``"risk"``, grades for ``"grade"``, one per
    test row (also for rows whose target is NaN).
    """

    name: str
    metrics: dict[str, Any]
    predictions: np.ndarray
    fit_seconds: float


def fit_baselines(
    task: BaselineTask,
    X_train: np.ndarray,
    y_train: np.ndarray,
    X_test: np.ndarray,
    y_test: np.ndarray,
    seed: int = 0,
    names: Sequence[str] | None = None,
) -> dict[str, BaselineResult]:
    """Fit each baseline on the training split and score it on the test split.

    Training rows whose target is NaN (ungraded students) are dropped; test rows with a NaN
    target are predicted but left out of the metrics.

    Args:
        task: ``"risk"`` (0/1 labels) or ``"grade"`` (numeric grade, any scale).
        X_train: (n_train, n_features), e.g. ``ModelInputs.flat()``.
        y_train: (n_train,).
        X_test: (n_test, n_features).
        y_test: (n_test,).
        seed: random state of every stochastic estimator.
        names: a subset of `baseline_names`; all by default.

    Raises:
        ValueError: mismatched shapes, too few usable rows, or one class only for ``"risk"``.
    """
    chosen = list(names) if names is not None else list(_table(task))
    for name in chosen:
        make_baseline(task, name)  # validates every name before any fitting
    x_train = np.asarray(X_train, dtype=np.float64)
    x_test = np.asarray(X_test, dtype=np.float64)
    target = np.asarray(y_train, dtype=np.float64).reshape(-1)
    if x_train.ndim != 2 or x_train.shape[0] != target.size:
        raise ValueError(f"X_train {x_train.shape} and y_train ({target.size},) do not match")
    if x_test.ndim != 2 or x_test.shape[1] != x_train.shape[1]:
        raise ValueError(f"X_test {x_test.shape} has not the {x_train.shape[1]} training features")
    keep = np.isfinite(target)
    x_train, target = x_train[keep], target[keep]
    if task == "risk":
        counts = [int((target == label).sum()) for label in (0.0, 1.0)]
        if min(counts) < 3:  # the SVM's 3-fold calibration needs 3 of each class
            raise ValueError(
                f"the risk baselines need at least 3 students of each class in y_train, got "
                f"{counts[0]} not at risk and {counts[1]} at risk"
            )
    if target.size < 2:
        raise ValueError(f"need at least 2 training rows with a target, got {target.size}")

    results: dict[str, BaselineResult] = {}
    for name in chosen:
        estimator = make_baseline(task, name, seed)
        if name == "knn":  # fewer training rows than neighbours would fail at predict time
            last = estimator.steps[-1][1]
            last.set_params(n_neighbors=min(last.n_neighbors, target.size))
        start = time.perf_counter()
        estimator.fit(x_train, target)
        seconds = time.perf_counter() - start
        if task == "risk":
            predictions = estimator.predict_proba(x_test)[:, 1]
            metrics = classification_metrics(y_test, predictions)
        else:
            predictions = estimator.predict(x_test)
            metrics = regression_metrics(y_test, predictions)
        logger.debug("baseline %s (%s) fitted in %.2fs", name, task, seconds)
        results[name] = BaselineResult(name, metrics, np.asarray(predictions), seconds)
    return results
