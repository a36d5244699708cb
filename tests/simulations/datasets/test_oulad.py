from __future__ import annotations

import tracemalloc
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from shared_models.data.loader import load_cohort
from shared_models.data.validate import validate_export
from shared_models.errors import DataContractError
from simulations.datasets.oulad import loader as oulad
from tests.simulations.oulad_fixture import FILES, write_oulad, zip_oulad

SAMPLE = Path(__file__).resolve().parents[3].parent / "shared" / "datasets" / "oulad_sample_AAA"
TYPE = {name: i for i, name in enumerate(oulad.ACTIVITY_TYPES)}
SUBMITTED, SCORE, DELAY = range(3)


@pytest.fixture(scope="module")
def download(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_oulad(tmp_path_factory.mktemp("oulad") / "OULAD")


@pytest.fixture(scope="module")
def cohort(download: Path) -> oulad.OuladCohort:
    return oulad.read(download)


def _row(cohort: oulad.OuladCohort, student: int, term: str) -> int:
    regs = cohort.registrations
    hit = np.flatnonzero((regs["id_student"] == student) & (regs["term"] == term))
    assert len(hit) == 1, (student, term)
    return int(hit[0])


def test_fixture_is_written_in_oulads_dialect(download: Path) -> None:
    raw = (download / "studentInfo.csv").read_bytes()
    assert raw.startswith(b'"code_module","code_presentation"') and b'\r\n"AAA"' in raw
    assert b'"?"' in raw and b'""' in raw


def test_one_record_per_registration_and_a_retake_is_its_own_record(
    cohort: oulad.OuladCohort,
) -> None:
    regs = cohort.registrations
    assert len(regs) == 10
    assert set(regs.loc[regs["id_student"] == 101, "term"]) == {"AAA-2013J", "AAA-2014J"}
    assert regs.groupby("term")["weeks"].first().to_dict() == {
        "AAA-2013J": 39,
        "AAA-2014J": 34,
        "BBB-2014B": 35,
    }


def test_clicks_before_the_start_fold_into_week_one(cohort: oulad.OuladCohort) -> None:
    r = _row(cohort, 101, "AAA-2013J")
    assert cohort.clicks[r, 0, TYPE["resource"]] == 4 + 1 + 2
    assert cohort.clicks[r, 0, TYPE["forumng"]] == 5
    assert cohort.clicks[r, 1, TYPE["quiz"]] == 7
    assert cohort.clicks[r, 38, TYPE["resource"]] == 1  # day 267 is in week 39
    assert cohort.clicks[_row(cohort, 101, "AAA-2014J"), 0, TYPE["oucontent"]] == 3  # day -24


def test_withdrawn_student_keeps_every_week_with_zero_clicks_after_leaving(
    cohort: oulad.OuladCohort,
) -> None:
    r = _row(cohort, 102, "AAA-2013J")
    assert cohort.clicks[r, 5, TYPE["forumng"]] == 3  # day 38, before unregistering on day 40
    assert cohort.clicks[r, 6:].sum() == 0
    activity = oulad.to_tables(cohort).activity
    assert (activity["student_id"] == "102").sum() == 39


def test_activity_logged_after_unregistering_is_dropped(cohort: oulad.OuladCohort) -> None:
    r = _row(cohort, 103, "AAA-2013J")
    assert cohort.clicks[r].sum() == 1  # the 9 clicks on day 60 (after day 50) are gone
    week8 = cohort.assessment[r, 7]
    assert week8[SUBMITTED] == 0.0 and np.isnan(week8[SCORE])  # submitted on day 53


def test_imd_band_question_mark_and_empty_are_missing_and_10_20_gets_its_percent(
    cohort: oulad.OuladCohort,
) -> None:
    regs = cohort.registrations.set_index(["id_student", "term"])
    assert pd.isna(regs.loc[(104, "AAA-2013J"), "imd_band"])
    assert pd.isna(regs.loc[(106, "AAA-2013J"), "imd_band"])
    assert regs.loc[(107, "AAA-2014J"), "imd_band"] == "10-20%"


def test_weekly_assessment_features_on_the_due_week(cohort: oulad.OuladCohort) -> None:
    a = cohort.assessment[_row(cohort, 101, "AAA-2013J")]
    np.testing.assert_allclose(a[2], [1.0, 80.0, 6.0])  # due day 19, submitted day 25
    np.testing.assert_allclose(a[7], [1.0, 70.0, -4.0])
    assert np.isnan(a[[0, 1, 3, 38]]).all()  # nothing due; AAA's exam has no results at all
    no_score = cohort.assessment[_row(cohort, 106, "AAA-2013J"), 2]
    assert no_score[SUBMITTED] == 1.0 and np.isnan(no_score[SCORE]) and no_score[DELAY] == 0.0


def test_banked_assessment_counts_as_submitted_without_a_delay(
    cohort: oulad.OuladCohort,
) -> None:
    week3 = cohort.assessment[_row(cohort, 101, "AAA-2014J"), 2]
    assert week3[SUBMITTED] == 1.0 and week3[SCORE] == 77.0 and np.isnan(week3[DELAY])
    timeline = cohort.timeline
    assert timeline.loc[timeline["is_banked"] == 1, "id_assessment"].tolist() == [4]


def test_exam_without_a_date_is_due_in_the_last_week(cohort: oulad.OuladCohort) -> None:
    np.testing.assert_allclose(cohort.assessment[_row(cohort, 201, "BBB-2014B"), 34], [1, 20, 0])


def test_grade_is_the_weighted_assessment_score(cohort: oulad.OuladCohort) -> None:
    grade = cohort.registrations.set_index(["id_student", "term"])["final_grade"]
    assert grade[(101, "AAA-2013J")] == pytest.approx(0.4 * 80 + 0.6 * 70)
    assert grade[(102, "AAA-2013J")] == pytest.approx(0.4 * 40)  # missing TMA scores 0
    assert grade[(103, "AAA-2013J")] == pytest.approx(0.4 * 55 + 0.6 * 90)  # labels are final
    assert grade[(104, "AAA-2013J")] == 0.0
    assert grade[(106, "AAA-2013J")] == pytest.approx(75.0)  # the missing score is skipped
    assert grade[(101, "AAA-2014J")] == pytest.approx(0.5 * 77 + 0.5 * 90)  # banked counts
    assert grade[(201, "BBB-2014B")] == pytest.approx(20.0)  # the weight-0 CMA does not count


def test_as_of_week_k_leaves_out_later_clicks_submissions_and_registrations(
    download: Path,
) -> None:
    early = oulad.read(download, week=3)
    assert 105 not in set(early.registrations["id_student"])  # registered on day 30
    r = _row(early, 101, "AAA-2013J")
    assert early.assessment[r, 2, SUBMITTED] == 0.0  # submitted on day 25, after week 3
    assert early.clicks[r, 3:].sum() == 0
    tables = oulad.to_tables(early)
    assert tables.activity["week"].max() == 3 and oulad.spec(3).weeks == 3
    later = oulad.read(download, week=4)
    assert later.assessment[_row(later, 101, "AAA-2013J"), 2, SUBMITTED] == 1.0
    assert early.registrations["final_result"].tolist() == [
        "pass", "withdrawn", "withdrawn", "fail", "pass", "distinction", "pass", "fail",
        "distinction",
    ]  # fmt: skip


def test_directory_and_zip_give_the_same_tensors(download: Path, tmp_path: Path) -> None:
    archive = zip_oulad(download, tmp_path / "anonymisedData.zip")
    a, b = oulad.read(download), oulad.read(archive)
    np.testing.assert_array_equal(a.clicks, b.clicks)
    np.testing.assert_array_equal(a.assessment, b.assessment)
    pd.testing.assert_frame_equal(a.registrations, b.registrations)
    ta, tb = oulad.to_tables(a), oulad.to_tables(b)
    pd.testing.assert_frame_equal(ta.activity, tb.activity)


def test_chunk_size_does_not_change_the_result(download: Path) -> None:
    small = oulad.read(download, chunksize=4)
    whole = oulad.read(download)
    np.testing.assert_array_equal(small.clicks, whole.clicks)


def test_streaming_memory_grows_with_students_not_with_log_rows(tmp_path: Path) -> None:
    rows = FILES["studentVle.csv"][1:] * 20_000  # 360,000 log rows, the same 10 registrations
    big = write_oulad(tmp_path / "big", {"studentVle.csv": [FILES["studentVle.csv"][0], *rows]})
    tracemalloc.start()
    oulad.read(big, chunksize=20_000)
    _, streamed = tracemalloc.get_traced_memory()
    tracemalloc.reset_peak()
    pd.read_csv(big / "studentVle.csv")
    _, whole = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    assert streamed < whole / 3, (streamed, whole)


@pytest.mark.parametrize(
    ("partition", "parts", "first_at_risk"),
    [
        ("natural-presentation", ["AAA-2013J", "AAA-2014J", "BBB-2014B"], [0, 1, 1, 1, 0, 0]),
        ("natural-module", ["AAA", "BBB"], [0, 1, 1, 1, 0, 0, 0, 0]),
    ],
)
def test_natural_partitions_write_exports_that_validate_and_load(
    download: Path, tmp_path: Path, partition: str, parts: list[str], first_at_risk: list[int]
) -> None:
    folders = oulad.to_exports(download, tmp_path / "out", partition=partition)
    assert [f.name for f in folders] == parts
    spec = oulad.spec()
    assert (tmp_path / "out" / "spec.toml").read_text() == spec.to_toml()
    for folder in folders:
        report, _ = validate_export(folder, spec)
        assert report.usable, [str(p) for p in report.errors]
        assert not report.warnings, [str(p) for p in report.warnings]
    cohort = load_cohort(folders[0], spec, drop_incomplete=False)
    assert cohort.dynamic.shape[1:] == (39, 23)
    assert cohort.at_risk.tolist() == first_at_risk  # fail or withdrawn


def test_shorter_presentation_leaves_later_weeks_unobserved(download: Path, tmp_path: Path) -> None:
    folders = oulad.to_exports(download, tmp_path / "out")
    cohort = load_cohort(folders[1], oulad.spec())  # AAA-2014J: 234 days, 34 weeks
    assert cohort.week_mask[:, :34].all() and not cohort.week_mask[:, 34:].any()
    assert cohort.dynamic[:, 33, TYPE["oucontent"]].tolist() == [2.0, 0.0]  # day 233


def test_week_cut_export_validates_under_its_own_contract(download: Path, tmp_path: Path) -> None:
    folders = oulad.to_exports(download, tmp_path / "out", week=5)
    spec = oulad.spec(5)
    assert "weeks = 5" in (tmp_path / "out" / "spec.toml").read_text()
    for folder in folders:
        assert validate_export(folder, spec)[0].usable


@pytest.mark.parametrize(
    ("table", "row", "needle"),
    [
        ("studentVle.csv", ["AAA", "2013J", "101", "11", "x3", "2"], "line 2, column 'date'"),
        ("studentVle.csv", ["AAA", "2013J", "101", "99", "3", "2"], "line 2, column 'id_site'"),
        ("vle.csv", ["11", "AAA", "2013J", "hologram", "", ""], "line 2, column 'activity_type'"),
    ],
)
def test_bad_cell_is_reported_with_file_line_and_column(
    tmp_path: Path, table: str, row: list[str], needle: str
) -> None:
    rows = [FILES[table][0], row, *FILES[table][2:]]
    bad = write_oulad(tmp_path / "bad", {table: rows})
    with pytest.raises(DataContractError, match=f"{table} {needle}"):
        oulad.read(bad)


def test_incomplete_download_names_the_missing_files(tmp_path: Path) -> None:
    folder = write_oulad(tmp_path / "partial")
    (folder / "studentVle.csv").unlink()
    with pytest.raises(DataContractError, match=r"missing studentVle\.csv"):
        oulad.read(folder)


@pytest.mark.needs_shared
@pytest.mark.skipif(not SAMPLE.is_dir(), reason="../shared/datasets is not present")
def test_aaa_sample_builds_its_two_presentations_and_both_validate(tmp_path: Path) -> None:
    folders = oulad.to_exports(SAMPLE, tmp_path / "aaa")
    assert [f.name for f in folders] == ["AAA-2013J", "AAA-2014J"]
    spec = oulad.spec()
    sizes = []
    for folder in folders:
        report, _ = validate_export(folder, spec)
        assert report.usable, [str(p) for p in report.errors[:5]]
        sizes.append(report.n_students)
    assert sizes == [383, 365]
