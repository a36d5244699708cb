"""One trained scorer of a reproduction: centralized, federated or federated with DP, and scored.

Every mode is scored the same way, on the same students: each institution splits its own records
70/15/15 with the run's seed (`shared_models.data.node.split_node`, as a federation node does);
centralized
training pools those splits, and a federated model is evaluated on every institution's test split
with that institution's own normalisation (as the node would), the predictions pooled. So a
centralized row and a federated row of the same seed are scored on identical test students, and
their confusion matrices and paired tests are comparable.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np

from server.checkpoints import CheckpointStore
from server.config import FederationConfig
from server.rounds import RoundReport
from shared_models.baselines import fit_baselines
from shared_models.data.cohort import CohortArrays, ModelInputs, Normalizer
from shared_models.data.contract import FeatureSpec
from shared_models.data.node import NodeSplits, prepare_node_data, split_node
from shared_models.data.splits import kfold_splits
from shared_models.evaluation import predict
from shared_models.metrics import classification_metrics, regression_metrics
from shared_models.models.checkpoints import checkpoint_model
from shared_models.models.registry import build_model, config_class
from shared_models.training import FitConfig, fit, set_seed
from simulations.reproduce.config import (
    GRADE_METRICS,
    HEADS,
    RISK_METRICS,
    DifferentialPrivacy,
    Federated,
    ModelEntry,
    NaiveBaseline,
    ReproductionError,
    Target,
    Training,
)
from simulations.reproduce.data import PreparedData

logger = logging.getLogger(__name__)

TASKS = {"risk": "risk", "grade": "grade", "both": "multitask"}


@dataclass
class Scored:
    """What training and scoring one model (or fitting one baseline) gave."""

    metrics: dict[str, float | None]  # the experiment's metrics; None where undefined
    confusion_matrix: list[list[int]] | None  # [[tn, fp], [fn, tp]] at threshold 0.5
    n_train: int
    n_test: int
    details: dict[str, Any] = field(default_factory=dict)  # epochs, epsilon spent, ...
    #: Per-student test labels and predictions, for plots only (never written to disk).
    scores: dict[str, np.ndarray] = field(default_factory=dict, repr=False)


@dataclass
class Outcome:
    """One row's result on one repeat of one mode (and cut-off week or epsilon)."""

    label: str  # a model label or a baseline name
    kind: Literal["model", "baseline"]
    mode: str  # centralized, federated or federated-dp
    repeat: int  # seed or fold number, from 0
    seed: int
    week: int | None  # cut-off week of the data, None for the whole term
    epsilon: float | None  # each institution's DP budget, None without DP
    seconds: float
    scored: Scored

    def to_json(self) -> dict[str, Any]:
        """Everything but the per-student predictions."""
        out = {k: v for k, v in vars(self).items() if k != "scored"}
        return out | {k: v for k, v in vars(self.scored).items() if k != "scores"}


@dataclass(frozen=True)
class PooledSplit:
    """Train, validation and test records pooled over institutions (raw values)."""

    train: CohortArrays
    val: CohortArrays
    test: CohortArrays


class SplitCache:
    """Each export's seeded 70/15/15 split, loaded once per seed (`data.node.split_node`)."""

    def __init__(self, data: PreparedData) -> None:
        self.data = data
        self._nodes: dict[int, list[NodeSplits]] = {}

    def holdout(self, seed: int) -> PooledSplit:
        """The institutions' own splits for ``seed``, pooled: the federation's very students."""
        if seed not in self._nodes:
            spec = self.data.spec
            self._nodes[seed] = [split_node(p, spec, seed=seed) for p in self.data.exports]
        nodes = self._nodes[seed]
        return PooledSplit(
            *(CohortArrays.concatenate([getattr(n, part) for n in nodes]) for part in
              ("train", "val", "test"))
        )  # fmt: skip

    def kfold(self, folds: int, seed: int) -> list[PooledSplit]:
        """K stratified folds over the pooled records (centralized only: nodes split 70/15/15)."""
        pooled = self.holdout(seed)
        cohort = CohortArrays.concatenate([pooled.train, pooled.val, pooled.test])
        return [
            PooledSplit(cohort.subset(s.train), cohort.subset(s.val), cohort.subset(s.test))
            for s in kfold_splits(cohort, folds, seed=seed)
        ]


def model_overrides(entry: ModelEntry, target: Target, spec: FeatureSpec) -> dict[str, Any]:
    """The entry's model config for ``target``: its heads and, for CNN models, the activity map."""
    overrides: dict[str, Any] = {"targets": list(HEADS[target])}
    fields = config_class(entry.model).model_fields
    if "activity_index" in fields and spec.activity_index:  # empty (UCI): every channel
        overrides["activity_index"] = list(spec.activity_index)
    return overrides | entry.overrides


def score(
    target: Target,
    at_risk: np.ndarray,
    grade: np.ndarray,
    prob: np.ndarray | None,
    grade_pred: np.ndarray | None,
    **details: Any,
) -> Scored:
    """The experiment's metrics of at-risk probabilities and grades (on the contract's scale)."""
    metrics: dict[str, float | None] = {}
    confusion = None
    kept = {"at_risk": at_risk, "grade": grade}
    if "risk" in HEADS[target] and prob is not None:
        found = classification_metrics(at_risk, prob)
        metrics |= {m: found[m] for m in RISK_METRICS}
        confusion = found["confusion_matrix"]
        kept["prob"] = np.asarray(prob, dtype=np.float64)
    if "grade" in HEADS[target] and grade_pred is not None:
        found = regression_metrics(grade, grade_pred)
        metrics |= {m: found[m] for m in GRADE_METRICS}
        kept["grade_pred"] = np.asarray(grade_pred, dtype=np.float64)
    n_train = int(details.pop("n_train", 0))
    return Scored(metrics, confusion, n_train, len(at_risk), details, kept)


def train_centralized(
    entry: ModelEntry,
    target: Target,
    spec: FeatureSpec,
    split: PooledSplit,
    training: Training,
    seed: int,
    device: str | None = None,
) -> Scored:
    """Fit ``entry`` on the pooled train split with early stopping; score the test split.

    ``device``: where it trains (`shared_models.devices`); None leaves it on the CPU.
    """
    norm = Normalizer(spec.target.grade_min, spec.target.grade_max).fit(split.train)
    train, val, test = (norm.transform(c) for c in (split.train, split.val, split.test))
    set_seed(seed)
    model = build_model(
        entry.model, spec.weeks, split.train.n_dynamic, split.train.n_static,
        model_overrides(entry, target, spec),
    )  # fmt: skip
    config = FitConfig(
        max_epochs=training.max_epochs,
        batch_size=training.batch_size,
        patience=training.patience,
        class_weighting=training.class_weighting,
        seed=seed,
        device=device,
    )
    result = fit(model, train, val if len(val) else None, TASKS[target], config)
    pred = predict(model, test)
    return score(
        target,
        split.test.at_risk,
        split.test.grade,
        pred.get("risk"),
        _grade_scale(spec, pred["grade"]) if "grade" in pred else None,
        n_train=len(train),
        epochs=len(result.history),
        best_epoch=result.best_epoch,
    )


def fit_baseline_rows(
    names: Sequence[str], target: Target, spec: FeatureSpec, split: PooledSplit, seed: int
) -> dict[str, Scored]:
    """Each scikit-learn baseline on the same split, normalised and flattened."""
    norm = Normalizer(spec.target.grade_min, spec.target.grade_max).fit(split.train)
    train, test = norm.transform(split.train), norm.transform(split.test)
    probs: dict[str, np.ndarray] = {}
    grades: dict[str, np.ndarray] = {}
    if "risk" in HEADS[target]:
        found = fit_baselines(
            "risk", train.flat(), train.at_risk, test.flat(), test.at_risk, seed, names
        )
        probs = {n: r.predictions for n, r in found.items()}
    if "grade" in HEADS[target]:
        found = fit_baselines(
            "grade", train.flat(), split.train.grade, test.flat(), split.test.grade, seed, names
        )
        grades = {n: r.predictions for n, r in found.items()}
    return {
        name: score(
            target,
            split.test.at_risk,
            split.test.grade,
            probs.get(name),
            grades.get(name),
            n_train=len(train),
        )
        for name in names
    }


def naive_row(
    naive: NaiveBaseline, target: Target, spec: FeatureSpec, split: PooledSplit
) -> Scored:
    """Cortez & Silva's naive predictor: the last observed value of ``naive.feature``.

    The grade is predicted as that value and a student flagged at risk when it is below the
    contract's grade threshold (a 0/1 score, so its ROC-AUC is that of one threshold). It learns
    nothing, so it is the same in every mode.
    """
    if naive.feature not in spec.dynamic_names:
        raise ReproductionError(
            f"the naive baseline reads dynamic feature {naive.feature!r}, which this dataset's "
            f"contract lacks (it has {', '.join(spec.dynamic_names)}); use a dataset that has it"
        )
    threshold = spec.target.at_risk_below_grade
    if "risk" in HEADS[target] and threshold is None:
        raise ReproductionError("the naive baseline needs the contract's at_risk_below_grade")
    test = split.test
    values = test.dynamic[:, :, spec.dynamic_names.index(naive.feature)]
    seen = (test.week_mask > 0) & np.isfinite(values)
    any_seen = seen.any(axis=1)
    last = np.where(any_seen, seen.shape[1] - 1 - np.argmax(seen[:, ::-1], axis=1), 0)
    grade = np.where(any_seen, values[np.arange(len(test)), last], np.nan)
    prob = None if threshold is None else (np.nan_to_num(grade, nan=0.0) < threshold) * 1.0
    return score(target, test.at_risk, test.grade, prob, grade, n_train=len(split.train))


def train_federated(
    entry: ModelEntry,
    target: Target,
    data: PreparedData,
    federated: Federated,
    dp: DifferentialPrivacy | None,
    seed: int,
    run_dir: Path,
    on_round: Callable[[RoundReport], None] | None = None,
    device: str = "cpu",
    engine: str = "ray",
) -> Scored:
    """Run one federation on a Flower simulation, then score its final global model.

    The model is scored on every institution's test split, normalised with that institution's
    own train split, and the predictions pooled; the federation's own weighted-average metrics
    are kept in the details as ``federation_reported`` (under DP, ``federation_released``: the
    figures computed from the nodes' noised histograms, each marked noised with its noise std
    and ledger entries). ``dp``: DP-SGD at every institution, its rounds, local epochs, batch
    and learning rate (where set) over ``federated``'s. ``engine``: ``ray`` (in the open
    `simulations.ray_session`, if any) or ``inline`` (`simulations.runner.simulate`).
    """
    from simulations.runner import simulate  # imports Flower's simulation engine

    settings: dict[str, Any] = {
        "model": entry.model,
        "model_overrides": model_overrides(entry, target, data.spec),
        "task": TASKS[target],
        "strategy": federated.strategy,
        "rounds": federated.rounds,
        "local_epochs": federated.local_epochs,
        "batch_size": federated.batch_size,
        "learning_rate": federated.learning_rate,
        "min_nodes": len(data.exports),
        "seed": seed,
        "out_dir": run_dir,
        "spec_path": data.spec_path,
    }
    if dp is not None:
        settings |= {
            "dp_epsilon": dp.epsilon,
            "dp_delta": dp.delta,
            "dp_max_grad_norm": dp.max_grad_norm,
            "learning_rate": dp.learning_rate or federated.learning_rate,
            "batch_size": dp.batch_size or federated.batch_size,
            "local_epochs": dp.local_epochs or federated.local_epochs,
            "rounds": dp.rounds or federated.rounds,
            "average_rounds": dp.average_rounds,  # None: the federation's DP default
        }
    config = FederationConfig.from_options(None, settings, source=f"the federated run in {run_dir}")
    result = simulate(config, data.exports, on_round=on_round, device=device, engine=engine)
    store = CheckpointStore(run_dir)
    last = store.latest()
    if last is None:
        raise ReproductionError(f"{run_dir}: the federation committed no round")
    model = checkpoint_model(last, data.spec)  # what the run committed, hashes checked
    nodes = [prepare_node_data(p, data.spec, seed=seed) for p in data.exports]
    test = ModelInputs.concatenate([n.test for n in nodes])
    pred = predict(model, test)
    details: dict[str, Any] = {"rounds": last.round}
    if result.noised:
        # Released figures (`server.release`: value, noised, noise_std, ledger), computed from
        # noised histograms: kept as such and apart, never as bare numbers that read as exact.
        details["federation_released"] = result.released
    else:
        details["federation_reported"] = result.evaluate
    records = store.read_metrics()
    if records and "epsilon_max" in records[-1]:
        details["epsilon_spent"] = records[-1]["epsilon_max"]
    # A node that declines a round (its budget would buy only noise, `privacy.dp`) sits it out
    # and may join later with fewer rounds left: the model then saw part of the federation.
    details["node_rounds_failed"] = sum(len(r.get("failures", [])) for r in records)
    details["node_rounds"] = len(records) * len(data.exports)
    return score(
        target,
        test.at_risk,
        _grade_scale(data.spec, test.grade),
        pred.get("risk"),
        _grade_scale(data.spec, pred["grade"]) if "grade" in pred else None,
        n_train=sum(len(n.train) for n in nodes),
        **details,
    )


def timed(fn: Callable[[], Any]) -> tuple[Any, float]:
    """``fn()`` and the seconds it took."""
    started = time.perf_counter()
    return fn(), time.perf_counter() - started


def _grade_scale(spec: FeatureSpec, scaled: np.ndarray) -> np.ndarray:
    return spec.target.grade_min + np.asarray(scaled, dtype=np.float64) * (
        spec.target.grade_max - spec.target.grade_min
    )
