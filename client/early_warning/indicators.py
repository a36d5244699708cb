"""The indicator vocabulary: per-student trend statistics that reasons and rules are written in.

Indicators are computed from the periods observed so far (period 1 to the scoring period ``k``)
in the contract's period (`FeatureSpec.period`: weeks by default). The recent window is the last
``r`` periods, ``r = FeatureSpec.recent_periods``: 4 for weeks, the periods closest to 4 weeks
otherwise (1 for semesters or months, 2 for fortnights). "last r" means periods k-r+1..k and
"earlier" means periods 1..k-r. Missing cells are ignored in a mean; an indicator with nothing to
average is NaN, and a rule condition on a NaN indicator never holds. The vocabulary depends on the
data contract: each feature contributes ``<alias>_last<r>`` (``attendance_last4`` on a weekly
contract, ``approved_last1`` on a per-semester one), ``<alias>_earlier``, ``<alias>_trend``
(last r minus earlier) and ``<alias>_total``, where the alias is a short name (``attendance``
for ``attendance_rate``).
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass

import numpy as np

from shared_models.data.cohort import CohortArrays
from shared_models.data.contract import DynamicFeature, FeatureSpec

#: Periods in the "recent" window of a weekly contract (``*_last4``); see `recent_window`.
RECENT_WEEKS = 4

#: Short names for the default contract's features (others use their own name).
ALIASES: dict[str, str] = {
    "attendance_rate": "attendance",
    "lms_logins": "logins",
    "lectures_viewed": "lectures",
    "resources_accessed": "resources",
}

#: How a person reads a feature's value: label, and "share" (0-1 as %), "score" or "count".
_DISPLAY: dict[str, tuple[str, str]] = {
    "attendance_rate": ("attendance", "share"),
    "lms_logins": ("LMS log-ins", "count"),
    "lectures_viewed": ("recorded lectures viewed", "count"),
    "resources_accessed": ("course resources opened", "count"),
    "forum_posts": ("forum posts", "count"),
    "quiz_submitted": ("quizzes submitted", "share"),
    "quiz_score": ("quiz score", "score"),
}

_QUIZ_SUBMITTED = "quiz_submitted"


@dataclass(frozen=True)
class IndicatorInfo:
    """One entry of the vocabulary: what it means and the values it can take."""

    name: str
    description: str
    low: float  # smallest possible value (-inf when unbounded)
    high: float  # largest possible value (inf when unbounded)


def alias(feature: str) -> str:
    """The short name a feature's indicators start with."""
    return ALIASES.get(feature, feature)


def display(feature: DynamicFeature) -> tuple[str, str]:
    """``(label, kind)`` of a weekly feature; kind is "share", "score" or "count"."""
    if feature.name in _DISPLAY:
        return _DISPLAY[feature.name]
    kind = "share" if (feature.min, feature.max) == (0.0, 1.0) else "count"
    return feature.name.replace("_", " "), kind


def format_value(value: float, kind: str, period: str = "week") -> str:
    """A feature value as a person reads it (``42 %``, ``61/100``, ``2.5/week``)."""
    if np.isnan(value):
        return "no data"
    if kind == "share":
        return f"{100 * value:.0f} %"
    if kind == "score":
        return f"{value:.0f}"
    return f"{value:.1f}/{period}"


def recent_window(spec: FeatureSpec) -> int:
    """Periods in the recent window of ``spec`` (4 weeks, 1 semester...)."""
    return spec.recent_periods


def recent_suffix(recent: int) -> str:
    """The window part of a recent indicator's name: ``last4`` for 4 periods."""
    return f"last{recent}"


def protected_names(spec: FeatureSpec) -> frozenset[str]:
    """Every name a protected attribute goes by (``gender``, ``gender=F``...): never an indicator,
    a rule's condition or a reason."""
    return frozenset(n for a in spec.static if a.protected for n in (a.name, *a.encoded_names))


def vocabulary(spec: FeatureSpec) -> dict[str, IndicatorInfo]:
    """Every indicator a rule may name for this contract, with its possible range."""
    inf = float("inf")
    target = spec.target
    r, period, periods = recent_window(spec), spec.period, spec.periods
    last = recent_suffix(r)
    recent_text = f"last {r} {periods}" if r > 1 else f"last {period}"
    entries = [
        IndicatorInfo("risk_probability", "P(at risk) from the model, 0-1", 0.0, 1.0),
        IndicatorInfo(
            "predicted_grade",
            f"predicted final grade ({target.grade_scale}); NaN without a grade head",
            target.grade_min,
            target.grade_max,
        ),
        IndicatorInfo("observed_weeks", f"{periods} of the term observed so far", 1, spec.weeks),
        IndicatorInfo("weeks_missing", f"{periods} so far with no activity row", 0, spec.weeks),
    ]
    for feature in spec.dynamic:
        name, label = alias(feature.name), display(feature)[0]
        lo = -inf if feature.min is None else feature.min
        hi = inf if feature.max is None else feature.max
        span = hi - lo
        total_lo = min(0.0, lo * spec.weeks) if lo != -inf else -inf
        entries += [
            IndicatorInfo(f"{name}_{last}", f"mean {label}, {recent_text}", lo, hi),
            IndicatorInfo(
                f"{name}_earlier", f"mean {label}, {periods} before the {recent_text}", lo, hi
            ),
            IndicatorInfo(f"{name}_trend", f"{name}_{last} minus {name}_earlier", -span, span),
            IndicatorInfo(
                f"{name}_total",
                f"sum of {label} over the {periods} so far",
                total_lo,
                hi * spec.weeks,
            ),
        ]
    if _QUIZ_SUBMITTED in spec.dynamic_names:
        entries += [
            IndicatorInfo(
                f"quizzes_missed_{last}",
                f"{periods} among the {recent_text} with the quiz not submitted",
                0,
                r,
            ),
            IndicatorInfo(
                "quiz_missed_streak",
                f"longest run of {periods} with the quiz not submitted",
                0,
                spec.weeks,
            ),
        ]
    return {e.name: e for e in entries}


def compute_indicators(
    cohort: CohortArrays,
    observed_weeks: int,
    *,
    probability: np.ndarray | None = None,
    grade: np.ndarray | None = None,
    recent: int = RECENT_WEEKS,
) -> dict[str, np.ndarray]:
    """Every indicator of `vocabulary` for each record (float64 arrays of shape (n,)).

    Only periods 1..observed_weeks are read, whatever the cohort holds beyond them. ``recent``
    is the contract's `recent_window` (4 for a weekly contract).
    """
    n, k = len(cohort), observed_weeks
    last = recent_suffix(recent)
    values = np.where(cohort.week_mask[:, :k, None] > 0, cohort.dynamic[:, :k], np.nan)
    values = values.astype(np.float64)
    split = max(k - recent, 0)
    nan = np.full(n, np.nan)
    out: dict[str, np.ndarray] = {
        "risk_probability": nan if probability is None else np.asarray(probability, np.float64),
        "predicted_grade": nan if grade is None else np.asarray(grade, np.float64),
        "observed_weeks": np.full(n, float(k)),
        "weeks_missing": (cohort.week_mask[:, :k] <= 0).sum(axis=1).astype(np.float64),
    }
    for j, feature in enumerate(cohort.dynamic_names):
        name = alias(feature)
        mean_recent = _nanmean(values[:, split:, j])
        earlier = _nanmean(values[:, :split, j]) if split else nan
        out[f"{name}_{last}"] = mean_recent
        out[f"{name}_earlier"] = earlier
        out[f"{name}_trend"] = mean_recent - earlier
        out[f"{name}_total"] = np.nansum(values[:, :, j], axis=1)
    if _QUIZ_SUBMITTED in cohort.dynamic_names:
        submitted = values[:, :, cohort.dynamic_names.index(_QUIZ_SUBMITTED)]
        missed = submitted < 0.5  # NaN compares False: a week without data is not a miss
        out[f"quizzes_missed_{last}"] = missed[:, split:].sum(axis=1).astype(np.float64)
        out["quiz_missed_streak"] = _longest_run(missed).astype(np.float64)
    return out


def _nanmean(values: np.ndarray) -> np.ndarray:
    if values.shape[1] == 0:
        return np.full(values.shape[0], np.nan)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # all-NaN rows give NaN, as documented
        return np.nanmean(values, axis=1)


def _longest_run(flags: np.ndarray) -> np.ndarray:
    best = np.zeros(flags.shape[0], dtype=int)
    run = np.zeros(flags.shape[0], dtype=int)
    for week in range(flags.shape[1]):
        run = np.where(flags[:, week], run + 1, 0)
        best = np.maximum(best, run)
    return best
