"""The centralized reference of a federated simulation: the same students, pooled.

Each export is split exactly as its node splits it (`shared_models.data.node.split_node`, same
seed), the
train, validation and test parts are pooled, normalised with the pooled train statistics, and
one model is trained with early stopping (`shared_models.training.fit`). It is scored the way
the federation is: ROC-AUC per institution's test split, averaged weighted by test records, and
also on the pooled test set. (`simulations.centralized` is the full centralized study with
baselines and plots; this is the like-for-like reference of one federated run.)
"""

from __future__ import annotations

import logging
import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from server.config import FederationConfig
from shared_models.data.cohort import CohortArrays, Normalizer
from shared_models.data.contract import load_spec
from shared_models.data.node import split_node
from shared_models.evaluation import evaluate
from shared_models.models.registry import build_model
from shared_models.training import FitConfig, fit, set_seed

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class CentralizedReference:
    """ROC-AUC of the pooled model; ``weighted_roc_auc`` compares with the federated figure."""

    weighted_roc_auc: float  # mean of per-institution test ROC-AUC, weighted by test records
    pooled_roc_auc: float  # ROC-AUC over all institutions' test records at once
    per_institution: dict[str, dict[str, Any]]
    epochs: int  # epochs trained (early stopping included)
    best_epoch: int | None


def centralized_reference(
    config: FederationConfig,
    data_paths: Sequence[Path | str],
    *,
    max_epochs: int = 100,
    patience: int = 10,
) -> CentralizedReference:
    """Train the federation's model on the pooled splits of ``data_paths`` and score it."""
    spec = load_spec(config.spec_path)
    nodes = [split_node(p, spec, seed=config.seed) for p in data_paths]
    train = CohortArrays.concatenate([n.train for n in nodes])
    val = CohortArrays.concatenate([n.val for n in nodes])
    normalizer = Normalizer(spec.target.grade_min, spec.target.grade_max).fit(train)
    set_seed(config.seed)
    model = build_model(
        config.model, spec.weeks, train.n_dynamic, train.n_static, config.model_overrides
    )
    history = fit(
        model,
        normalizer.transform(train),
        normalizer.transform(val),
        config.task,
        FitConfig(
            max_epochs=max_epochs, batch_size=config.batch_size, patience=patience, seed=config.seed
        ),
    )
    per_institution: dict[str, dict[str, Any]] = {}
    for node in nodes:
        report = evaluate(model, normalizer.transform(node.test), config.task)
        per_institution[node.institution] = {
            "n": len(node.test),
            "roc_auc": report.get("risk", {}).get("roc_auc"),
        }
    pooled = evaluate(
        model, normalizer.transform(CohortArrays.concatenate([n.test for n in nodes])), config.task
    )
    scored = [v for v in per_institution.values() if v["roc_auc"] is not None]
    total = sum(v["n"] for v in scored)
    weighted = sum(v["n"] * v["roc_auc"] for v in scored) / total if total else math.nan
    pooled_auc = pooled.get("risk", {}).get("roc_auc")
    logger.info("centralized: weighted ROC-AUC %.4f, pooled %s", weighted, pooled_auc)
    return CentralizedReference(
        weighted_roc_auc=weighted,
        pooled_roc_auc=math.nan if pooled_auc is None else float(pooled_auc),
        per_institution=per_institution,
        epochs=len(history.history),
        best_epoch=history.best_epoch,
    )
