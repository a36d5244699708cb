"""Why a student was scored at risk: occlusion over weeks x features, read as short sentences.

Method: occlusion. For each weekly feature and each window (the last 4 observed weeks, and the
weeks before), the feature's values in that window are replaced by the training mean (0 after
normalisation) and the student is scored again. The drop in P(at risk) is that block's
contribution, in probability points. Chosen over integrated gradients because it is
model-agnostic (any registered architecture, or a future non-differentiable one, with no
gradient plumbing through Opacus layers), it needs no arbitrary baseline path or step count,
it is deterministic, its unit (risk points) is one an advisor can read, and its blocks are the
same windows as the trend indicators, so the sentence and the number describe the same weeks.
Cost: one forward pass per (feature, window) block, 2 x 7 with the default contract.

Only behaviour is offered as a reason. Static attributes (gender, age band, program...) feed the
model but are never occluded or named: an advisor cannot act on them, and naming them invites
profiling a student by who they are rather than by what they did. `explain` refuses an
attribution that names an attribute the contract marks protected.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import numpy as np

from client.early_warning.indicators import (
    RECENT_WEEKS,
    alias,
    display,
    format_value,
    protected_names,
    recent_suffix,
)
from client.early_warning.scoring import ScoringModel
from shared_models.data.cohort import CohortArrays, ModelInputs
from shared_models.data.contract import DynamicFeature, FeatureSpec
from shared_models.evaluation import predict

logger = logging.getLogger(__name__)

#: Windows a contribution is measured over: the last 4 observed weeks, and the weeks before.
WINDOWS: tuple[str, ...] = ("last4", "earlier")


@dataclass(frozen=True)
class Attribution:
    """Occlusion contributions of every (feature, window) block for every student.

    Attributes:
        blocks: ``(feature, window)`` of each column of ``contribution``.
        contribution: (n, n_blocks) P(at risk) minus P(at risk with the block set to the training
            mean); positive where the student's values in that block raised the risk.
        probability: (n,) the unoccluded P(at risk).
    """

    blocks: tuple[tuple[str, str], ...]
    contribution: np.ndarray
    probability: np.ndarray


@dataclass(frozen=True)
class Reason:
    """One human-readable reason; ``contribution`` is in probability points (0.12 = 12 pts)."""

    feature: str
    window: str
    contribution: float
    text: str


def window_weeks(observed_weeks: int, recent: int = RECENT_WEEKS) -> dict[str, slice]:
    """Period slices (0-based) of each non-empty window after ``observed_weeks`` periods.

    ``recent`` is the contract's recent window (`FeatureSpec.recent_periods`), as in the
    indicators: the windows are named ``last<recent>`` and ``earlier``.
    """
    split = max(observed_weeks - recent, 0)
    windows = {recent_suffix(recent): slice(split, observed_weeks)}
    if split:
        windows["earlier"] = slice(0, split)
    return windows


def occlusion(
    scorer: ScoringModel,
    cohort: CohortArrays,
    observed_weeks: int,
    batch_size: int = 4096,
    *,
    recent: int = RECENT_WEEKS,
) -> Attribution:
    """Contribution of every (feature, window) block to each student's risk."""
    inputs = scorer.normalizer.transform(cohort)
    base = predict(scorer.model, inputs, batch_size)["risk"]
    dynamic = inputs.dynamic.copy()  # occluded in place, one block at a time, then restored
    probe = ModelInputs(dynamic, inputs.week_mask, inputs.static, inputs.grade, inputs.at_risk)
    blocks: list[tuple[str, str]] = []
    columns: list[np.ndarray] = []
    for j, feature in enumerate(cohort.dynamic_names):
        for window, weeks in window_weeks(observed_weeks, recent).items():
            saved = dynamic[:, weeks, j].copy()
            dynamic[:, weeks, j] = 0.0  # the training mean after z-scoring
            occluded = predict(scorer.model, probe, batch_size)["risk"]
            dynamic[:, weeks, j] = saved
            blocks.append((feature, window))
            columns.append(base - occluded)
    contribution = np.stack(columns, axis=1) if columns else np.zeros((len(cohort), 0))
    return Attribution(tuple(blocks), contribution.astype(np.float32), base)


def explain(
    attribution: Attribution,
    indicators: dict[str, np.ndarray],
    spec: FeatureSpec,
    typical: np.ndarray,
    *,
    top_k: int = 3,
    min_effect: float = 0.01,
) -> list[list[Reason]]:
    """The ``top_k`` blocks that raised each student's risk most, as sentences.

    Args:
        attribution: from `occlusion`.
        indicators: from `client.early_warning.indicators.compute_indicators` on the same cohort.
        spec: the data contract (feature labels and ranges).
        typical: each weekly feature's reference on the export's scale (the normaliser's
            `dynamic_reference`: the training mean, or the contract's centre), shown as the
            reference a value is compared with.
        top_k: most reasons per student.
        min_effect: smallest contribution (probability points) worth naming; smaller ones are
            within what retraining noise moves.
    Raises:
        ValueError: ``attribution`` has a block on a protected attribute.
    """
    named = sorted({feature for feature, _ in attribution.blocks} & protected_names(spec))
    if named:
        raise ValueError(
            f"reasons may not name protected attribute(s) {', '.join(named)} of contract "
            f"{spec.name!r}: a reason must be a behaviour an advisor can act on; occlude "
            "weekly features only"
        )
    features = {f.name: f for f in spec.dynamic}
    index = {name: j for j, name in enumerate(spec.dynamic_names)}
    contrib = attribution.contribution
    order = np.argsort(-contrib, axis=1, kind="stable")[:, :top_k]
    observed = indicators["observed_weeks"]
    reasons: list[list[Reason]] = []
    for i in range(contrib.shape[0]):
        mine: list[Reason] = []
        for col in order[i]:
            effect = float(contrib[i, col])
            if effect < min_effect:
                break
            feature, window = attribution.blocks[col]
            body = _sentence(
                features[feature],
                window,
                indicators,
                i,
                typical[index[feature]],
                int(observed[i]),
                spec,
            )
            mine.append(Reason(feature, window, effect, f"{body} (+{100 * effect:.0f} pts risk)"))
        reasons.append(mine)
    return reasons


def _sentence(
    feature: DynamicFeature,
    window: str,
    indicators: dict[str, np.ndarray],
    i: int,
    typical: float,
    k: int,
    spec: FeatureSpec,
) -> str:
    label, kind = display(feature)
    name, period, recent = alias(feature.name), spec.period, spec.recent_periods
    value = format_value(indicators[f"{name}_{window}"][i], kind, period)
    reference = f"typical {format_value(typical, kind, period)}"
    if window == "earlier":
        span = f"{period} 1" if k - recent == 1 else f"{spec.periods} 1-{k - recent}"
        return f"{label.capitalize()} in {span}: {value} ({reference})"
    earlier = indicators[f"{name}_earlier"][i]
    if not np.isnan(earlier):
        reference = f"earlier {format_value(earlier, kind, period)}; {reference}"
    missed = indicators.get(f"quizzes_missed_{recent_suffix(recent)}")
    if feature.name == "quiz_submitted" and missed is not None:
        reference = f"{int(missed[i])} of {min(recent, k)} missed; {reference}"
    last = f"{min(recent, k)} {spec.periods}" if min(recent, k) > 1 else period
    return f"{label.capitalize()} over the last {last}: {value} ({reference})"
