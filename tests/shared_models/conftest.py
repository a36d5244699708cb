"""Tiny synthetic cohorts for the shared_models tests (no files, no downloads)."""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import pytest

from shared_models.data.cohort import ModelInputs

MakeInputs = Callable[..., ModelInputs]


def synthetic_inputs(
    n: int = 64,
    n_weeks: int = 6,
    n_dynamic: int = 4,
    n_static: int = 3,
    seed: int = 0,
    missing_rate: float = 0.2,
) -> ModelInputs:
    """Normalised-looking inputs whose labels depend on the mean of dynamic channel 0.

    At-risk students have low activity on channel 0; the grade rises with it. About a tenth of
    the students (every tenth) are ungraded (NaN grade), as withdrawn students are.
    """
    rng = np.random.default_rng(seed)
    week_mask = (rng.random((n, n_weeks)) >= missing_rate).astype(np.float32)
    week_mask[:, 0] = 1.0  # everyone is seen in week one
    dynamic = rng.normal(size=(n, n_weeks, n_dynamic)).astype(np.float32)
    level = rng.normal(size=n).astype(np.float32)
    dynamic[:, :, 0] += level[:, None]
    dynamic *= week_mask[..., None]  # as Normalizer.transform leaves unobserved weeks
    static = rng.normal(size=(n, n_static)).astype(np.float32)
    observed_mean = dynamic[:, :, 0].sum(1) / week_mask.sum(1)
    at_risk = (observed_mean < 0).astype(np.float32)
    grade = (1.0 / (1.0 + np.exp(-observed_mean))).astype(np.float32)
    grade[::10] = np.nan
    return ModelInputs(
        dynamic=dynamic, week_mask=week_mask, static=static, grade=grade, at_risk=at_risk
    )


@pytest.fixture
def make_inputs() -> MakeInputs:
    return synthetic_inputs


@pytest.fixture
def tiny_inputs() -> ModelInputs:
    return synthetic_inputs(n=32, seed=1)
