"""Local scoring: a risk probability, a predicted grade and a risk tier per student.

Tiers follow the at-risk LSTM paper: low P < 0.40 <= moderate < 0.70 <= high, configurable.
Scoring works part-way through a term: the cohort is built from the weeks observed so far and
the model summarises each student at their last observed week. Everything runs on the
institution's own machine; nothing here leaves it. `load_scoring_model` puts the model on the
device asked for (``edufl client score --device``); inputs follow it batch by batch, and every
score comes back to the CPU as NumPy.
"""

from __future__ import annotations

import copy
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any

import numpy as np
import torch
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator
from torch import nn

from client.early_warning.calibration import (
    CalibrationReport,
    Calibrator,
    ece_noise_floor,
    expected_calibration_error,
    fit_calibrator,
    load_calibration,
    save_calibration,
)
from client.early_warning.tiers import TIERS
from shared_models.data.cohort import CohortArrays, Normalizer
from shared_models.data.contract import FeatureSpec
from shared_models.data.loader import completeness, load_cohort
from shared_models.data.node import split_node
from shared_models.errors import EduflError
from shared_models.evaluation import predict
from shared_models.models.artifact import ModelCard, load_trained

logger = logging.getLogger(__name__)


class ScoringError(EduflError, ValueError):
    """Scoring cannot run as asked: bad thresholds, a model without a risk head, no data."""


class RiskThresholds(BaseModel):
    """Probability cut-offs between tiers: low < ``moderate`` <= moderate < ``high`` <= high."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    moderate: Annotated[float, Field(gt=0.0, lt=1.0)] = 0.40  # at-risk LSTM paper
    high: Annotated[float, Field(gt=0.0, le=1.0)] = 0.70  # at-risk LSTM paper

    @model_validator(mode="after")
    def _ordered(self) -> RiskThresholds:
        if self.moderate >= self.high:
            raise ValueError(f"moderate ({self.moderate}) must be below high ({self.high})")
        return self

    @classmethod
    def parse(cls, text: str) -> RiskThresholds:
        """From ``"0.4,0.7"`` (the CLI's ``--thresholds``).

        Raises:
            ScoringError: not two numbers, or not 0 < moderate < high <= 1.
        """
        parts = [p.strip() for p in text.split(",")]
        try:
            moderate, high = (float(p) for p in parts)
        except ValueError:
            raise ScoringError(
                f"thresholds {text!r}: expected two numbers MODERATE,HIGH such as 0.4,0.7"
            ) from None
        try:
            return cls(moderate=moderate, high=high)
        except ValidationError as exc:
            why = "; ".join(e["msg"] for e in exc.errors())
            raise ScoringError(
                f"thresholds {text!r}: {why}; use 0 < MODERATE < HIGH <= 1, e.g. 0.4,0.7"
            ) from None

    def __str__(self) -> str:
        return f"low < {self.moderate:g} <= moderate < {self.high:g} <= high"


def assign_tiers(probability: np.ndarray, thresholds: RiskThresholds | None = None) -> np.ndarray:
    """Tier name of each probability (an object array of ``TIERS`` entries).

    Thresholds are compared in the probabilities' own precision: a float32 model output of
    0.7 is high, although float32(0.7) is slightly below the float64 0.7.
    """
    cut = thresholds or RiskThresholds()
    p = np.asarray(probability)
    dtype = p.dtype if np.issubdtype(p.dtype, np.floating) else np.float64
    moderate, high = np.asarray(cut.moderate, dtype=dtype), np.asarray(cut.high, dtype=dtype)
    index = (p >= moderate).astype(int) + (p >= high).astype(int)
    return np.asarray(TIERS, dtype=object)[index]


@dataclass(frozen=True)
class ScoringModel:
    """A trained model ready to score: the network, its training normalisation, its card.

    Attributes:
        calibrator: this institution's map from raw to calibrated P(at risk), None when the
            folder has no ``calibration.json`` (scores are then the raw probabilities).
        calibration: the whole ``calibration.json`` (fit, selection, test-split reliability).
    """

    model: nn.Module
    normalizer: Normalizer
    card: ModelCard
    path: Path
    calibrator: Calibrator | None = None
    calibration: dict[str, Any] | None = None

    def risk(self, raw: np.ndarray) -> np.ndarray:
        """Calibrated P(at risk) of raw model outputs (unchanged without a calibrator)."""
        return raw if self.calibrator is None else self.calibrator.apply(raw)


def load_scoring_model(
    model_dir: Path,
    spec: FeatureSpec | None = None,
    *,
    calibrated: bool = True,
    device: torch.device | str | None = None,
) -> ScoringModel:
    """Load a model folder written by `edufl train`, `edufl client adopt` or a federation run.

    ``model_dir`` may also be the folder's ``model.pt`` or ``model.json``. With ``calibrated``
    the folder's ``calibration.json``, if any, is applied to every probability. The model is
    loaded and checked on the CPU, then moved to ``device`` (None: it stays on the CPU).

    Raises:
        DataContractError: missing or malformed files, or another data contract.
        ScoringError: the model has no risk head (trained with ``--target grade``).
    """
    model_dir = Path(model_dir)
    if model_dir.is_file():
        model_dir = model_dir.parent
    model, normalizer, card = load_trained(model_dir, spec)
    model.eval()
    generator = torch.Generator().manual_seed(0)
    probe = (
        torch.randn(8, card.n_weeks, card.n_dynamic, generator=generator),
        (torch.rand(8, card.n_weeks, generator=generator) > 0.2).float(),
        torch.randn(8, card.n_static, generator=generator),
    )
    with torch.no_grad():  # a tiny forward pass tells which heads the model really has
        expected = model(*probe)
    if "risk" not in expected:
        raise ScoringError(
            f"{model_dir}: this model predicts {sorted(expected)} but no risk; scoring needs a "
            "model trained with --target risk or --target both"
        )
    found = load_calibration(model_dir) if calibrated else None
    inference = _inference_model(model, probe, expected)
    return ScoringModel(
        inference if device is None else inference.to(device),
        normalizer,
        card,
        model_dir,
        calibrator=found[0] if found else None,
        calibration=found[1] if found else None,
    )


def calibrate_model_dir(
    model_dir: Path, data_dir: Path, spec: FeatureSpec, *, seed: int = 0, method: str = "auto"
) -> CalibrationReport:
    """Fit the model's calibration on this institution's validation split; write it beside it.

    The splits are `split_node`'s, with the federation's ``seed``: exactly the students the
    node held out of training. The raw and calibrated reliability on the test split (never
    used to fit) are stored too, for the report. Runs locally; nothing leaves the machine.

    Raises:
        DataContractError: the export is unusable or its validation split lacks an outcome.
    """
    scorer = load_scoring_model(model_dir, spec, calibrated=False)
    splits = split_node(data_dir, spec, seed=seed)
    val_raw = predict(scorer.model, scorer.normalizer.transform(splits.val))["risk"]
    calibrator, selection = fit_calibrator(val_raw, splits.val.at_risk, method, seed=seed)
    test_raw = predict(scorer.model, scorer.normalizer.transform(splits.test))["risk"]
    test_cal = calibrator.apply(test_raw)
    labelled = ~np.isnan(np.asarray(splits.test.at_risk, dtype=float))
    report = CalibrationReport(
        calibrator=calibrator,
        fitted_on={
            "split": "validation",
            "n": int((~np.isnan(np.asarray(splits.val.at_risk, dtype=float))).sum()),
            "at_risk": int(np.nansum(splits.val.at_risk)),
            "seed": seed,
            "method_asked": method,
        },
        selection=selection,
        raw=expected_calibration_error(test_raw, splits.test.at_risk) if labelled.any() else None,
        calibrated=(
            expected_calibration_error(test_cal, splits.test.at_risk) if labelled.any() else None
        ),
        ece_noise_floor=ece_noise_floor(test_cal[labelled]) if labelled.any() else None,
    )
    save_calibration(model_dir, report)
    return report


def _inference_model(
    model: nn.Module, probe: tuple[torch.Tensor, ...], expected: dict[str, torch.Tensor]
) -> nn.Module:
    """The model with Opacus' DP recurrent layers swapped for torch's fused ones, if equivalent.

    ``DPLSTM``/``DPGRU`` step through time in Python so that per-sample gradients can be taken;
    scoring needs no gradients, and ``nn.LSTM`` computes the same function several times faster
    (same state-dict names, by Opacus' design). The swap is kept only if it reproduces the
    original outputs on a probe batch. Matched by class name: only ``privacy`` imports opacus.
    """
    fast = copy.deepcopy(model)
    swapped = 0
    for parent in list(fast.modules()):
        for name, child in list(parent.named_children()):
            torch_class = {"DPLSTM": nn.LSTM, "DPGRU": nn.GRU}.get(type(child).__name__)
            if torch_class is None:
                continue
            replacement = torch_class(
                child.input_size,
                child.hidden_size,
                child.num_layers,
                bias=child.bias,
                batch_first=child.batch_first,
                dropout=child.dropout,
                bidirectional=child.bidirectional,
            )
            replacement.load_state_dict(child.state_dict())
            setattr(parent, name, replacement)
            swapped += 1
    if not swapped:
        return model
    fast.eval()
    with torch.no_grad():
        got = fast(*probe)
    same = got.keys() == expected.keys() and all(
        torch.allclose(got[k], expected[k], atol=1e-5) for k in expected
    )
    if not same:
        logger.warning("fused recurrent layers disagree with the trained ones; scoring unfused")
        return model
    return fast


@dataclass(frozen=True)
class ObservedTerm:
    """A cohort as seen so far in the term, and who could not be scored."""

    cohort: CohortArrays
    observed_weeks: int  # weeks 1..observed_weeks are visible
    unscored_ids: tuple[str, ...]  # records below the contract's completeness, not scored


def load_observed_term(
    data_dir: Path, spec: FeatureSpec, observed_weeks: int | None = None
) -> ObservedTerm:
    """Load an export for scoring after ``observed_weeks`` weeks (the latest week in it if None).

    Completeness is judged on the weeks observed so far, so a week-6 export is not dropped for
    lacking weeks 7-15. Records still below the contract's ``min_completeness`` are not scored
    (the model never saw such records) and are returned by ID so a person can follow them up.

    Raises:
        DataContractError: the export is not usable (see `edufl client validate`).
        ScoringError: the export holds no weekly activity at all.
    """
    cohort = load_cohort(data_dir, spec, observed_weeks=observed_weeks, drop_incomplete=False)
    seen = np.flatnonzero(cohort.week_mask.any(axis=0))
    if not len(seen):
        raise ScoringError(f"{data_dir}: no weekly activity to score; check activity.csv")
    horizon = observed_weeks or int(seen.max()) + 1
    keep = completeness(cohort, horizon) >= spec.min_completeness
    unscored = tuple(str(s) for s in cohort.student_ids[~keep])
    if unscored:
        logger.warning(
            "%s: %d record(s) below %.0f %% completeness over weeks 1-%d are not scored",
            data_dir,
            len(unscored),
            100 * spec.min_completeness,
            horizon,
        )
    return ObservedTerm(cohort.subset(np.flatnonzero(keep)), horizon, unscored)


@dataclass(frozen=True)
class Scores:
    """One scoring of a cohort; arrays have one entry per record, in the cohort's order."""

    student_ids: np.ndarray
    terms: np.ndarray
    probability: np.ndarray  # P(at risk), float32 in [0, 1], calibrated when the model is
    grade: np.ndarray  # predicted final grade on the contract's scale; NaN without a grade head
    tier: np.ndarray  # object array of TIERS entries, from ``probability``
    observed_weeks: int
    thresholds: RiskThresholds
    raw_probability: np.ndarray | None = None  # the model's own output, before calibration

    def __len__(self) -> int:
        return len(self.student_ids)

    def tier_counts(self) -> dict[str, int]:
        return {t: int((self.tier == t).sum()) for t in TIERS}


def score_cohort(
    scorer: ScoringModel,
    cohort: CohortArrays,
    observed_weeks: int,
    thresholds: RiskThresholds | None = None,
    batch_size: int = 4096,
) -> Scores:
    """Risk probability, predicted grade and tier of every record of ``cohort``."""
    cut = thresholds or RiskThresholds()
    out = predict(scorer.model, scorer.normalizer.transform(cohort), batch_size)
    grade = (
        scorer.normalizer.grade_to_scale(out["grade"]).astype(np.float32)
        if "grade" in out
        else np.full(len(cohort), np.nan, dtype=np.float32)
    )
    probability = scorer.risk(out["risk"])
    return Scores(
        student_ids=cohort.student_ids,
        terms=cohort.terms,
        probability=probability,
        grade=grade,
        tier=assign_tiers(probability, cut),
        observed_weeks=observed_weeks,
        thresholds=cut,
        raw_probability=out["risk"],
    )


def risk_trajectory(
    scorer: ScoringModel, cohort: CohortArrays, observed_weeks: int, batch_size: int = 4096
) -> np.ndarray:
    """P(at risk) of each record as it would have been scored after weeks 1..observed_weeks.

    Calibrated as `score_cohort` is, so the weekly tiers use the same thresholds.

    Returns:
        float32 array (n, observed_weeks); column w - 1 is the score after week w.
    """
    columns = [
        scorer.risk(
            predict(
                scorer.model, scorer.normalizer.transform(cohort.truncate_weeks(week)), batch_size
            )["risk"]
        )
        for week in range(1, observed_weeks + 1)
    ]
    return np.stack(columns, axis=1) if columns else np.zeros((len(cohort), 0), np.float32)


def tier_outcomes(scores: Scores, at_risk: np.ndarray) -> dict[str, tuple[int, float]]:
    """Per tier: records with a known outcome and their observed at-risk rate (NaN if none).

    This is how an institution checks, after the term, that the tiers mean something.
    """
    labels = np.asarray(at_risk, dtype=np.float64)
    known = ~np.isnan(labels)
    result: dict[str, tuple[int, float]] = {}
    for tier in TIERS:
        rows = known & (scores.tier == tier)
        n = int(rows.sum())
        result[tier] = (n, float(labels[rows].mean()) if n else float("nan"))
    return result
