"""One early-warning run at an institution: score, explain, recommend, store, report.

This is what a university gets back for joining the consortium, computed on its own machine
from its own export and a trained (centralized or federated) model folder.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import pandas as pd

from client.early_warning.adopt import resolve_model
from client.early_warning.indicators import compute_indicators
from client.early_warning.reasons import Reason, explain, occlusion
from client.early_warning.rules import Recommendation, apply_rules, load_rules
from client.early_warning.scoring import (
    RiskThresholds,
    Scores,
    load_observed_term,
    load_scoring_model,
    risk_trajectory,
    score_cohort,
)
from client.early_warning.store import RunInfo, Store
from shared_models.data.cohort import CohortArrays
from shared_models.data.contract import FeatureSpec, default_spec

if TYPE_CHECKING:
    import torch

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class EarlyWarning:
    """Everything one scoring run produced; lists and arrays have one entry per scored record.

    Attributes:
        trajectory: (n, observed_weeks) P(at risk) as scored after each week so far, when asked
            for (the report's risk-by-week view and sparklines), else None.
        calibration: the model's ``calibration.json`` (None: scores are uncalibrated).
        changes: tier changes since the previous report (`client.early_warning.watch`), when
            a watch made this run; ``changes_since`` names that report (None: the first).
    """

    cohort: CohortArrays
    scores: Scores
    indicators: dict[str, np.ndarray]
    reasons: list[list[Reason]]
    recommendations: list[list[Recommendation]]
    unscored_ids: tuple[str, ...]
    info: RunInfo
    spec: FeatureSpec
    trajectory: np.ndarray | None = None
    calibration: dict[str, Any] | None = None
    changes: pd.DataFrame | None = None
    changes_since: str | None = None


def run_early_warning(
    data_dir: Path,
    model_dir: Path | None,
    *,
    home: Path | None = None,
    observed_weeks: int | None = None,
    thresholds: RiskThresholds | None = None,
    rules_path: Path | None = None,
    spec: FeatureSpec | None = None,
    top_k: int = 3,
    with_trajectory: bool = False,
    device: torch.device | str | None = None,
) -> EarlyWarning:
    """Score an export after ``observed_weeks`` weeks (all weeks in it when None).

    ``model_dir`` is anything `resolve_model` takes: a model folder, its ``model.pt``, a run
    folder or a checkpoint (adopted into ``home`` first), or None for the latest adoption in
    ``home``. The model and the rule file are validated before the export is read, so a typo
    fails fast. The model scores on ``device`` (None: the CPU).

    Raises:
        DataContractError: unusable export, or a model trained on another contract.
        RuleFileError: an invalid rule file.
        ScoringError: a model without a risk head, or an export without activity.
    """
    spec = spec or default_spec()
    model_dir = resolve_model(model_dir, Path(data_dir), spec, home=home)
    scorer = load_scoring_model(model_dir, spec, device=device)
    ruleset = load_rules(rules_path, spec)
    term = load_observed_term(Path(data_dir), spec, observed_weeks)
    k = term.observed_weeks
    scores = score_cohort(scorer, term.cohort, k, thresholds)
    indicators = compute_indicators(
        term.cohort,
        k,
        probability=scores.probability,
        grade=scores.grade,
        recent=spec.recent_periods,
    )
    reasons = explain(
        occlusion(scorer, term.cohort, k, recent=spec.recent_periods),
        indicators,
        spec,
        scorer.normalizer.dynamic_reference(),
        top_k=top_k,
    )
    info = RunInfo(
        data_dir=str(data_dir),
        model_dir=str(model_dir),
        model_name=scorer.card.model,
        rules=str(rules_path) if rules_path else "default rules",
    )
    return EarlyWarning(
        cohort=term.cohort,
        scores=scores,
        indicators=indicators,
        reasons=reasons,
        recommendations=apply_rules(ruleset, scores.tier, indicators),
        unscored_ids=term.unscored_ids,
        info=info,
        spec=spec,
        trajectory=risk_trajectory(scorer, term.cohort, k) if with_trajectory else None,
        calibration=scorer.calibration,
    )


def save_to_store(warning: EarlyWarning, db_path: Path) -> int:
    """Write the run to the store at ``db_path`` (created if new); returns its ``run_id``."""
    with Store(db_path) as store:
        return store.save_run(
            warning.info,
            warning.scores,
            warning.reasons,
            warning.recommendations,
            unscored=len(warning.unscored_ids),
        )
