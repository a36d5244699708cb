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


_COUNTS = (
    'name = "x"\nversion = "1.0.0"\nweeks = 2\n'
    '[[dynamic]]\nname = "clicks"\nmin = 0.0\nclip_max = 200.0\ncenter = 0.0\n{transform}'
    '[[dynamic]]\nname = "share"\nmin = 0.0\nmax = 1.0\n'
)


def _counts(transform: str) -> FeatureSpec:
    return parse_spec(_COUNTS.format(transform=transform))


def _two_weeks(spec: FeatureSpec, clicks: list[float]) -> CohortArrays:
    n = len(clicks)
    dynamic = np.zeros((n, 2, 2), dtype=np.float32)
    dynamic[:, 0, 0] = clicks
    dynamic[:, :, 1] = 0.5
    dynamic[0, 1, 0] = np.nan  # missing stays missing
    return CohortArrays(
        student_ids=np.array([f"s{i}" for i in range(n)], dtype=object),
        terms=np.array(["t"] * n, dtype=object),
        dynamic=dynamic,
        week_mask=np.ones((n, 2), dtype=np.float32),
        static=np.zeros((n, 0), dtype=np.float32),
        grade=np.zeros(n, dtype=np.float32),
        at_risk=np.zeros(n, dtype=np.float32),
        dynamic_names=spec.dynamic_names,
        static_names=spec.static_names,
    )


def test_log1p_maps_counts_after_clamping_with_centre_and_scale_in_log_units() -> None:
    spec = _counts('transform = "log1p"\n')
    clicks = [0.0, 1.0, 10.0, 200.0, 5000.0]
    norm = Normalizer.from_contract(spec)
    cohort = _two_weeks(spec, clicks)
    inputs = norm.transform(cohort).dynamic
    np.testing.assert_array_equal(cohort.dynamic[:, 0, 0], clicks)  # the cohort stays raw
    unclamped = Normalizer.from_state({**norm.state(), "dyn_low": None, "dyn_high": None})
    unclamped.transform(cohort)
    np.testing.assert_array_equal(cohort.dynamic[:, 0, 0], clicks)  # also without clamps
    half = np.log(201.0) / 2  # the default scale: half the clamped range in log units
    expected = np.log1p(np.minimum(clicks, 200.0)) / half
    np.testing.assert_allclose(inputs[:, 0, 0], expected, rtol=1e-6)
    assert inputs[0, 1, 0] == 0.0  # a missing week is the centre, as without the transform
    np.testing.assert_allclose(inputs[:, 0, 1], 0.0)  # the other feature is untouched
    # Without the transform the same ordinary week of 10 clicks is a twentieth of that input.
    linear = Normalizer.from_contract(_counts("")).transform(_two_weeks(spec, clicks)).dynamic
    assert linear[2, 0, 0] == pytest.approx(0.1)
    assert inputs[2, 0, 0] > 0.85


def test_log1p_normaliser_round_trips_and_reports_the_reference_in_counts() -> None:
    spec = parse_spec(
        _COUNTS.format(transform='transform = "log1p"\n').replace(
            "0.0\ncenter = 0.0", "0.0\ncenter = 2.0", 1
        )
    )
    norm = Normalizer.from_contract(spec)
    back = Normalizer.from_state(norm.state())
    cohort = _two_weeks(spec, [3.0, 40.0])
    np.testing.assert_array_equal(back.transform(cohort).dynamic, norm.transform(cohort).dynamic)
    np.testing.assert_allclose(back.dynamic_reference(), [np.expm1(2.0), 0.5])
    # A card written before the transform existed reads every column linearly.
    old = norm.state()
    del old["dyn_log1p"]
    assert Normalizer.from_state(old).dyn_log1p is None


def test_train_zscore_ignores_the_contract_transform() -> None:
    spec = _counts('transform = "log1p"\n')
    cohort = _two_weeks(spec, [0.0, 4.0, 8.0])
    fitted = Normalizer.from_contract(spec).fit(cohort)
    assert fitted.dyn_log1p is None and "dyn_log1p" not in fitted.state()


def test_log1p_needs_non_negative_counts_and_leaves_older_fingerprints_alone() -> None:
    with pytest.raises(DataContractError, match=r"log1p.*min = 0"):
        parse_spec(
            _COUNTS.format(transform='transform = "log1p"\n').replace(
                "min = 0.0\nclip", "min = -5.0\nclip"
            )
        )
    with pytest.raises(DataContractError, match="transform"):
        _counts('transform = "log"\n')
    # The field is left out of the fingerprint when unset, so contracts written before it keep
    # their fingerprint; setting it is a new contract.
    plain = _counts("")
    assert plain.fingerprint == parse_spec(plain.to_toml()).fingerprint
    assert _counts('transform = "log1p"\n').fingerprint != plain.fingerprint
    assert "transform" not in plain.to_toml()


def test_the_oulad_contract_reads_clicks_on_a_log_scale() -> None:
    spec = load_spec(ROOT / "simulations/datasets/oulad/spec.toml")
    clicks = [f for f in spec.dynamic if f.name.startswith("clicks_")]
    assert len(clicks) == 20 and all(f.transform == "log1p" for f in clicks)
    assert all(f.transform is None for f in spec.dynamic if f not in clicks)
