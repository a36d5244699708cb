from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from torch import Tensor, nn

from client.early_warning.indicators import compute_indicators, vocabulary
from client.early_warning.reasons import Attribution, explain, occlusion, window_weeks
from client.early_warning.scoring import ScoringModel
from shared_models.data.cohort import CohortArrays, Normalizer
from shared_models.data.contract import default_spec
from shared_models.models.artifact import ModelCard

SPEC = default_spec()
NAMES = SPEC.dynamic_names
ATT, SUBMITTED, SCORE = (
    NAMES.index(n) for n in ("attendance_rate", "quiz_submitted", "quiz_score")
)
TYPICAL = np.array([0.7, 5.0, 2.0, 3.0, 1.0, 0.8, 60.0])


def _cohort(dynamic: np.ndarray, week_mask: np.ndarray | None = None) -> CohortArrays:
    n = dynamic.shape[0]
    mask = np.ones(dynamic.shape[:2], np.float32) if week_mask is None else week_mask
    return CohortArrays(
        student_ids=np.array([f"s{i:03d}" for i in range(n)], dtype=object),
        terms=np.full(n, "t", dtype=object),
        dynamic=dynamic.astype(np.float32),
        week_mask=mask.astype(np.float32),
        static=np.zeros((n, len(SPEC.static_names)), np.float32),
        grade=np.full(n, np.nan, np.float32),
        at_risk=np.full(n, np.nan, np.float32),
        dynamic_names=NAMES,
        static_names=SPEC.static_names,
    )


def _typical_cohort(n: int) -> np.ndarray:
    return np.tile(TYPICAL, (n, SPEC.weeks, 1)).astype(np.float32)


class _RecentAttendanceModel(nn.Module):
    """Risk rises as attendance in weeks 5-8 falls below typical; nothing else matters."""

    def forward(self, dynamic: Tensor, week_mask: Tensor, static: Tensor) -> dict[str, Tensor]:
        return {"risk": -3.0 * dynamic[:, 4:8, ATT].mean(dim=1)}


def _scorer() -> ScoringModel:
    normalizer = Normalizer(
        0.0,
        4.0,
        dyn_mean=TYPICAL.astype(np.float64),
        dyn_std=np.array([0.2, 2.0, 1.0, 1.0, 1.0, 0.3, 15.0]),
        static_mean=np.zeros(len(SPEC.static_names)),
        static_std=np.ones(len(SPEC.static_names)),
    )
    card = ModelCard("stub", {}, "risk", SPEC.fingerprint, SPEC.weeks, len(NAMES), 0, {}, {})
    return ScoringModel(_RecentAttendanceModel(), normalizer, card, Path("stub"))


def test_windows_are_the_last_four_weeks_and_the_weeks_before() -> None:
    assert window_weeks(8) == {"last4": slice(4, 8), "earlier": slice(0, 4)}
    assert window_weeks(3) == {"last4": slice(0, 3)}  # nothing "earlier" yet


def test_occlusion_credits_only_the_block_the_model_uses() -> None:
    dynamic = _typical_cohort(3)
    dynamic[0, 4:8, ATT] = 0.3  # stopped attending: risk up
    dynamic[1, 4:8, ATT] = 0.95  # attends more than most: risk down
    dynamic[2, :, SCORE] = 10.0  # terrible quiz scores, which this model ignores
    attribution = occlusion(_scorer(), _cohort(dynamic), observed_weeks=8)

    assert len(attribution.blocks) == 2 * len(NAMES)
    used = attribution.blocks.index(("attendance_rate", "last4"))
    others = np.delete(attribution.contribution, used, axis=1)
    np.testing.assert_allclose(others, 0.0, atol=1e-6)
    contribution = attribution.contribution[:, used]
    assert contribution[0] > 0.3 and contribution[1] < -0.1
    assert contribution[2] == pytest.approx(0.0, abs=1e-6)
    assert attribution.probability[0] > 0.9  # the unoccluded score is returned too


def test_reasons_name_the_driving_indicator_with_its_values() -> None:
    dynamic = _typical_cohort(2)
    dynamic[0, :4, ATT] = 0.9
    dynamic[0, 4:8, ATT] = 0.3
    dynamic[1, 4:8, ATT] = 0.95
    cohort, scorer = _cohort(dynamic), _scorer()
    attribution = occlusion(scorer, cohort, observed_weeks=8)
    indicators = compute_indicators(cohort, 8, probability=attribution.probability)
    reasons = explain(attribution, indicators, SPEC, TYPICAL)

    (reason,) = reasons[0]
    assert (reason.feature, reason.window) == ("attendance_rate", "last4")
    assert reason.text.startswith("Attendance over the last 4 weeks: 30 % (earlier 90 %")
    assert "typical 70 %" in reason.text and "pts risk" in reason.text
    assert reasons[1] == []  # nothing raised the risk of a student who attends well


def test_explain_ranks_by_contribution_keeps_top_k_and_drops_small_effects() -> None:
    blocks = tuple((name, "last4") for name in NAMES)
    contribution = np.array(
        [[0.02, 0.30, 0.005, 0.10, 0.0, 0.20, -0.4], [0.001, 0, 0, 0, 0, 0, 0]], np.float32
    )
    attribution = Attribution(blocks, contribution, np.array([0.9, 0.1], np.float32))
    indicators = compute_indicators(_cohort(_typical_cohort(2)), 8)
    reasons = explain(attribution, indicators, SPEC, TYPICAL, top_k=3, min_effect=0.01)
    assert [r.feature for r in reasons[0]] == ["lms_logins", "quiz_submitted", "resources_accessed"]
    assert [r.contribution for r in reasons[0]] == pytest.approx([0.30, 0.20, 0.10])
    assert reasons[1] == []


def test_trend_indicators_compare_the_last_four_weeks_with_earlier() -> None:
    dynamic = _typical_cohort(1)
    dynamic[0, :8, ATT] = [0.9, 0.9, 0.9, 0.9, 0.4, 0.4, 0.4, 0.4]
    dynamic[0, :8, SUBMITTED] = [1, 1, 0, 0, 0, 1, 0, 1]
    dynamic[0, :8, SCORE] = [80, 80, 0, 0, 0, 50, 0, 40]
    dynamic[0, 8:, :] = 0.0  # weeks after the scoring week must not count
    values = compute_indicators(_cohort(dynamic), observed_weeks=8)

    assert values["attendance_last4"][0] == pytest.approx(0.4)
    assert values["attendance_earlier"][0] == pytest.approx(0.9)
    assert values["attendance_trend"][0] == pytest.approx(-0.5)
    assert values["attendance_total"][0] == pytest.approx(5.2)
    assert values["quizzes_missed_last4"][0] == 2
    assert values["quiz_missed_streak"][0] == 3
    assert values["quiz_score_trend"][0] == pytest.approx(22.5 - 40.0)
    assert values["observed_weeks"][0] == 8 and values["weeks_missing"][0] == 0


def test_missing_weeks_are_ignored_and_empty_windows_are_nan() -> None:
    dynamic = _typical_cohort(2)
    dynamic[0, 4:8, ATT] = [0.2, 0.2, 0.9, np.nan]  # week 8 row present, value missing
    mask = np.ones((2, SPEC.weeks), np.float32)
    mask[0, 6] = 0.0  # week 7 absent: its 0.9 must not count
    values = compute_indicators(_cohort(dynamic, mask), observed_weeks=8)
    assert values["attendance_last4"][0] == pytest.approx(0.2)
    assert values["weeks_missing"][0] == 1

    early = compute_indicators(_cohort(dynamic, mask), observed_weeks=3)
    assert np.isnan(early["attendance_earlier"]).all()
    assert np.isnan(early["attendance_trend"]).all()
    assert np.isnan(early["risk_probability"]).all()  # no score given


def test_every_computed_indicator_is_in_the_documented_vocabulary() -> None:
    computed = compute_indicators(_cohort(_typical_cohort(1)), 6)
    assert set(computed) == set(vocabulary(SPEC))


def test_occlusion_works_on_a_real_registered_architecture() -> None:
    from shared_models.models.registry import build_model

    torch.manual_seed(0)
    scorer = _scorer()
    model = build_model(
        "gru", SPEC.weeks, len(NAMES), len(SPEC.static_names), {"targets": ["risk"]}
    )
    model.eval()
    real = ScoringModel(model, scorer.normalizer, scorer.card, Path("gru"))
    dynamic = _typical_cohort(4) + np.random.default_rng(0).normal(0, 0.1, (4, SPEC.weeks, 7))
    attribution = occlusion(real, _cohort(dynamic), observed_weeks=10)
    assert attribution.contribution.shape == (4, 2 * len(NAMES))
    assert np.isfinite(attribution.contribution).all()
    assert np.abs(attribution.contribution).max() > 0  # a real model reacts to occlusion
