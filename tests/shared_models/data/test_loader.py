from __future__ import annotations

import csv
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from shared_models.data.cohort import CohortArrays, Normalizer
from shared_models.data.contract import default_spec
from shared_models.data.loader import completeness, load_cohort
from shared_models.errors import DataContractError

SPEC = default_spec()


def test_loaded_shapes_follow_the_contract(export_copy: Path) -> None:
    cohort = load_cohort(export_copy)
    n = len(cohort)
    assert cohort.dynamic.shape == (n, SPEC.weeks, len(SPEC.dynamic))
    assert cohort.week_mask.shape == (n, SPEC.weeks)
    assert cohort.static.shape == (n, len(SPEC.static_names))
    assert cohort.grade.shape == cohort.at_risk.shape == (n,)
    assert cohort.dynamic_names == SPEC.dynamic_names
    assert set(np.unique(cohort.at_risk)) <= {0.0, 1.0}
    assert set(cohort.institution) == {"export"}


def test_values_land_in_the_right_cell(export_copy: Path) -> None:
    activity = pd.read_csv(export_copy / "activity.csv")
    row = activity.dropna().iloc[40]
    cohort = load_cohort(export_copy)
    i = int(np.flatnonzero(cohort.student_ids == row["student_id"])[0])
    week = int(row["week"]) - 1
    for j, name in enumerate(SPEC.dynamic_names):
        assert cohort.dynamic[i, week, j] == pytest.approx(row[name], rel=1e-6)
    assert cohort.week_mask[i, week] == 1.0


def test_missing_values_are_nan_and_missing_weeks_are_masked(export_copy: Path) -> None:
    rows = list(csv.reader((export_copy / "activity.csv").open()))
    header, sid = rows[0], rows[1][0]
    quiz = header.index("quiz_score")
    rows[1][quiz] = ""  # one missing value in week 1 of the first student
    kept = [r for r in rows if not (r[0] == sid and r[2] == "2")]  # week 2 absent
    with (export_copy / "activity.csv").open("w", newline="") as fh:
        csv.writer(fh).writerows(kept)
    cohort = load_cohort(export_copy)
    i = int(np.flatnonzero(cohort.student_ids == sid)[0])
    assert np.isnan(cohort.dynamic[i, 0, SPEC.dynamic_names.index("quiz_score")])
    assert cohort.week_mask[i, 0] == 1.0 and cohort.week_mask[i, 1] == 0.0
    assert np.isnan(cohort.dynamic[i, 1]).all()

    inputs = Normalizer(0.0, 4.0).fit(cohort).transform(cohort)
    assert np.isfinite(inputs.dynamic).all()
    assert (inputs.dynamic[i, 1] == 0.0).all()  # unobserved week carries no values


def test_incomplete_records_are_dropped_unless_asked(consortium_dir: Path) -> None:
    folder = consortium_dir / "institution_01"
    kept = load_cohort(folder)
    everyone = load_cohort(folder, drop_incomplete=False)
    assert len(everyone) > len(kept)
    assert (completeness(kept) >= SPEC.min_completeness).all()
    assert len(everyone) == len(pd.read_csv(folder / "students.csv"))


def test_mapping_file_renames_columns_codes_and_units(export_copy: Path) -> None:
    reference = load_cohort(export_copy)
    students = pd.read_csv(export_copy / "students.csv", dtype=str, keep_default_na=False)
    students = students.rename(columns={"student_id": "pseudo_id", "program": "faculty"})
    students["gender"] = (
        students["gender"].map({"female": "F", "male": "M"}).fillna(students["gender"])
    )
    students.to_csv(export_copy / "students.csv", index=False)
    activity = pd.read_csv(export_copy / "activity.csv", dtype=str, keep_default_na=False)
    pct = pd.to_numeric(activity["attendance_rate"], errors="coerce") * 100
    activity["attendance_rate"] = pct.map(lambda v: "" if np.isnan(v) else f"{v:g}")
    activity = activity.rename(columns={"attendance_rate": "Attendance %"})
    activity.to_csv(export_copy / "activity.csv", index=False)
    (export_copy / "mapping.toml").write_text(
        '[columns.students]\nstudent_id = "pseudo_id"\nprogram = "faculty"\n'
        '[columns.activity]\nattendance_rate = "Attendance %"\n'
        '[values.gender]\nF = "female"\nM = "male"\n'
        "[scale]\nattendance_rate = 0.01\n"
    )
    mapped = load_cohort(export_copy)
    np.testing.assert_array_equal(mapped.student_ids, reference.student_ids)
    np.testing.assert_allclose(mapped.dynamic, reference.dynamic, rtol=1e-5, equal_nan=True)
    np.testing.assert_array_equal(mapped.static, reference.static)


def test_bad_mapping_file_is_named(export_copy: Path) -> None:
    (export_copy / "mapping.toml").write_text('[colums.students]\nstudent_id = "x"\n')
    with pytest.raises(DataContractError, match=r"mapping.toml.*colums: unknown key"):
        load_cohort(export_copy)


def test_unusable_export_raises_with_the_problems(export_copy: Path) -> None:
    rows = list(csv.reader((export_copy / "outcomes.csv").open()))
    rows[1][2] = "excellent"
    with (export_copy / "outcomes.csv").open("w", newline="") as fh:
        csv.writer(fh).writerows(rows)
    with pytest.raises(DataContractError, match=r"outcomes.csv line 2, column 'final_grade'"):
        load_cohort(export_copy)


def test_scoring_part_way_through_the_term_sees_only_early_weeks(export_copy: Path) -> None:
    early = load_cohort(export_copy, observed_weeks=6)
    assert early.week_mask[:, 6:].sum() == 0
    assert np.isnan(early.dynamic[:, 6:]).all()
    full = load_cohort(export_copy)
    same = np.isin(early.student_ids, full.student_ids)
    assert same.mean() > 0.9


def test_pooled_cohorts_keep_their_institution(consortium_dir: Path) -> None:
    parts = [load_cohort(f) for f in sorted(consortium_dir.glob("institution_*"))]
    pooled = CohortArrays.concatenate(parts)
    assert len(pooled) == sum(len(p) for p in parts)
    assert set(pooled.institution) == {"institution_01", "institution_02", "institution_03"}
