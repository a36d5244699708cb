"""Preprocessing inside the guarantee: clamps and scales from the contract, not from the data."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from shared_models.data.cohort import CohortArrays, Normalizer
from shared_models.data.contract import FeatureSpec, default_spec, load_spec, parse_spec
from shared_models.data.node import node_normalizer
from shared_models.errors import DataContractError

ROOT = Path(__file__).resolve().parents[3]
SHIPPED_SPECS = [
    ROOT / "shared_models/specs/default.toml",
    *sorted((ROOT / "simulations/datasets").glob("*/spec.toml")),
]


def _cohort(spec: FeatureSpec, n: int = 40, seed: int = 0) -> CohortArrays:
    rng = np.random.default_rng(seed)
    dynamic = rng.poisson(4.0, (n, spec.weeks, len(spec.dynamic))).astype(np.float32)
    dynamic[:, :, 0] = rng.random((n, spec.weeks))  # attendance_rate, a share
    static = rng.random((n, len(spec.static_names))).astype(np.float32)
    return CohortArrays(
        student_ids=np.array([f"s{i}" for i in range(n)], dtype=object),
        terms=np.array(["t"] * n, dtype=object),
        dynamic=dynamic,
        week_mask=np.ones((n, spec.weeks), dtype=np.float32),
        static=static,
        grade=rng.random(n).astype(np.float32) * 4,
        at_risk=(rng.random(n) < 0.3).astype(np.float32),
        dynamic_names=spec.dynamic_names,
        static_names=spec.static_names,
    )


def _with_outlier(cohort: CohortArrays, logins: float) -> CohortArrays:
    extra = cohort.subset(np.array([0]))
    dynamic = extra.dynamic.copy()
    dynamic[:, :, 1] = logins  # lms_logins, every week
    outlier = CohortArrays(
        **{**extra.__dict__, "dynamic": dynamic, "student_ids": np.array(["x"], dtype=object)}
    )
    return CohortArrays.concatenate([cohort, outlier])


def test_one_extreme_record_moves_no_other_record_under_contract_normalisation() -> None:
    spec = default_spec()
    cohort = _cohort(spec)
    polluted = _with_outlier(cohort, 10_000.0)
    others = np.arange(len(cohort))

    def moved(fit: bool) -> float:
        if fit:  # train-zscore: statistics of whatever it is fitted on
            before = Normalizer(0.0, 4.0).fit(cohort).transform(cohort)
            after = Normalizer(0.0, 4.0).fit(polluted).transform(polluted.subset(others))
        else:
            norm = Normalizer.from_contract(spec)
            before, after = norm.transform(cohort), norm.transform(polluted.subset(others))
        return float(np.abs(after.dynamic - before.dynamic).max())

    assert moved(fit=False) == 0.0
    assert moved(fit=True) > 1.0  # the old behaviour the issue measured (up to 5.9)


def test_contract_normalisation_clamps_to_the_training_range() -> None:
    spec = default_spec()
    inputs = Normalizer.from_contract(spec).transform(_with_outlier(_cohort(spec), 10_000.0))
    assert inputs.dynamic[-1, :, 1].max() == pytest.approx(1.0)  # clip_max maps onto 1
    assert np.abs(inputs.dynamic).max() <= 1.0 + 1e-6
    assert np.abs(inputs.static).max() <= 1.0 + 1e-6


def test_contract_normaliser_does_not_depend_on_the_data() -> None:
    spec = default_spec()
    a, b = _cohort(spec, seed=1), _cohort(spec, n=7, seed=2)
    via_node = [node_normalizer(spec, c, "contract").state() for c in (a, b)]
    assert via_node[0] == via_node[1] == Normalizer.from_contract(spec).state()
    assert node_normalizer(spec, a, "train-zscore").state() != via_node[0]


def test_missing_value_becomes_the_middle_of_the_range_and_grades_scale_to_0_1() -> None:
    spec = default_spec()
    cohort = _cohort(spec, n=3)
    cohort.dynamic[0, 0, :] = np.nan
    cohort.grade[:] = [0.0, 2.0, 4.0]
    inputs = Normalizer.from_contract(spec).transform(cohort)
    assert (inputs.dynamic[0, 0] == 0.0).all()
    np.testing.assert_allclose(inputs.grade, [0.0, 0.5, 1.0])


def test_contract_normaliser_state_round_trips_with_its_clamps() -> None:
    spec = load_spec(ROOT / "simulations/datasets/oulad/spec.toml")
    norm = Normalizer.from_contract(spec)
    back = Normalizer.from_state(norm.state())
    cohort = _cohort(spec, n=5)
    cohort.dynamic[0, :, 0] = 1e6
    np.testing.assert_array_equal(back.transform(cohort).dynamic, norm.transform(cohort).dynamic)
    assert back.method == "contract"


@pytest.mark.parametrize("path", SHIPPED_SPECS, ids=lambda p: p.parent.name)
def test_every_shipped_spec_bounds_every_numeric_feature(path: Path) -> None:
    spec = load_spec(path)
    numeric = [*spec.dynamic, *(a for a in spec.static if a.kind == "numeric")]
    assert all(None not in f.training_range for f in numeric)
    Normalizer.from_contract(spec)  # raises when a range is missing


def test_a_feature_without_range_is_refused_with_its_name_and_the_fix() -> None:
    spec = parse_spec(
        'name = "x"\nversion = "1.0.0"\nweeks = 2\n'
        '[[dynamic]]\nname = "logins"\nmin = 0.0\n'
        '[[dynamic]]\nname = "share"\nmin = 0.0\nmax = 1.0\n'
    )
    with pytest.raises(DataContractError, match=r"logins has no training range.*clip_max"):
        Normalizer.from_contract(spec)


def test_clip_bounds_must_lie_inside_the_valid_range() -> None:
    with pytest.raises(DataContractError, match="clip_max"):
        parse_spec(
            'name = "x"\nversion = "1.0.0"\nweeks = 2\n'
            '[[dynamic]]\nname = "share"\nmin = 0.0\nmax = 1.0\nclip_max = 2.0\n'
        )
