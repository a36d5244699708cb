from __future__ import annotations

import zipfile
from pathlib import Path

import numpy as np
import pytest

from shared_models.data.loader import load_cohort
from shared_models.data.validate import validate_export
from shared_models.errors import DataContractError
from simulations.datasets.uci import loader as uci

SHARED = Path(__file__).resolve().parents[3].parent / "shared" / "datasets"
UCI_DIR = SHARED / "uci_student_performance"
HEADER = (
    "school;sex;age;address;famsize;Pstatus;Medu;Fedu;Mjob;Fjob;reason;guardian;traveltime;"
    "studytime;failures;schoolsup;famsup;paid;activities;nursery;higher;internet;romantic;famrel;"
    "freetime;goout;Dalc;Walc;health;absences;G1;G2;G3"
)


def _line(school: str, g1: int, g2: int, g3: int, absences: int = 4) -> str:
    """One row as UCI writes it: text quoted, numbers bare, except G1 and G2 (quoted)."""
    return (
        f'"{school}";"F";17;"U";"GT3";"T";4;3;"at_home";"other";"course";"mother";2;2;0;"yes";'
        f'"no";"no";"no";"yes";"yes";"no";"no";4;3;4;1;1;3;{absences};"{g1}";"{g2}";{g3}'
    )


MAT = [("GP", 5, 6, 6), ("GP", 12, 13, 14), ("GP", 9, 10, 10), ("MS", 7, 0, 0), ("MS", 15, 15, 16)]
POR = [("GP", 11, 11, 11), ("GP", 8, 9, 9), ("MS", 14, 15, 15), ("MS", 10, 10, 10)]
POR_LINES = [_line(*r) for r in POR]


def _write(folder: Path, mat: list[str] | None = None) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    rows = {"student-mat.csv": mat or [_line(*r) for r in MAT], "student-por.csv": POR_LINES}
    for name, lines in rows.items():
        (folder / name).write_text("\n".join([HEADER, *lines]) + "\n")
    return folder


@pytest.fixture
def download(tmp_path: Path) -> Path:
    return _write(tmp_path / "uci")


def test_g1_and_g2_are_the_sequence_and_g3_only_the_target(download: Path) -> None:
    tables = uci.load(download)
    first = tables.activity[tables.activity["student_id"] == "mat-001"]
    assert first["week"].tolist() == [1, 2] and first["period_grade"].tolist() == [5, 6]
    assert "G3" not in tables.students.columns and "G3" not in tables.activity.columns
    assert tables.outcomes["final_grade"].tolist() == [g3 for *_, g3 in MAT + POR]


def test_pass_means_g3_of_at_least_ten(download: Path) -> None:
    tables = uci.load(download)
    assert tables.outcomes["final_result"].tolist()[:5] == ["fail", "pass", "pass", "fail", "pass"]
    np.testing.assert_array_equal(tables.at_risk(uci.spec())[:5], [1, 0, 0, 1, 0])


def test_as_of_period_one_only_g1_is_an_input(download: Path, tmp_path: Path) -> None:
    tables = uci.load(download, week=1)
    assert tables.activity["week"].unique().tolist() == [1]
    folders = uci.to_exports(download, tmp_path / "out", week=1)
    assert all(validate_export(f, uci.spec(1))[0].usable for f in folders)
    with pytest.raises(DataContractError, match="period must be 1"):
        uci.load(download, week=3)


def test_school_subject_partition_gives_four_exports_that_validate_and_load(
    download: Path, tmp_path: Path
) -> None:
    folders = uci.to_exports(download, tmp_path / "out", partition="school-subject")
    assert [f.name for f in folders] == ["GP-mat", "GP-por", "MS-mat", "MS-por"]
    sizes = []
    for folder in folders:
        report, _ = validate_export(folder, uci.spec())
        assert report.usable, [str(p) for p in report.errors]
        sizes.append(len(load_cohort(folder, uci.spec())))
    assert sizes == [3, 2, 2, 2]
    cohort = load_cohort(folders[2], uci.spec())
    assert cohort.dynamic[:, :, 0].tolist() == [[7, 0], [15, 15]]
    assert cohort.grade.tolist() == [0, 16] and cohort.at_risk.tolist() == [1, 0]


def test_school_partition_pools_both_subjects(download: Path, tmp_path: Path) -> None:
    folders = uci.to_exports(download, tmp_path / "out", partition="school")
    assert [len(load_cohort(f, uci.spec())) for f in folders] == [5, 4]


def test_zip_download_reads_like_the_folder(download: Path, tmp_path: Path) -> None:
    archive = tmp_path / "student.zip"
    with zipfile.ZipFile(archive, "w") as zf:
        for name in ("student-mat.csv", "student-por.csv"):
            zf.write(download / name, name)
    a, b = uci.load(download), uci.load(archive)
    assert a.activity.equals(b.activity) and a.students.equals(b.students)


def test_bad_value_is_reported_with_file_line_and_column(tmp_path: Path) -> None:
    rows = [_line(*r) for r in MAT]
    rows[2] = rows[2].replace('"course"', '"money"')
    with pytest.raises(DataContractError, match=r"student-mat\.csv line 4, column 'reason'"):
        uci.load(_write(tmp_path / "bad", rows))
    rows = [_line(*r) for r in MAT]
    rows[0] = _line("GP", 5, 6, 6, absences=120)
    with pytest.raises(DataContractError, match=r"line 2, column 'absences': 120 is outside"):
        uci.load(_write(tmp_path / "bad2", rows))


@pytest.mark.needs_shared
@pytest.mark.skipif(not UCI_DIR.is_dir(), reason="../shared/datasets is not present")
def test_real_files_split_into_two_schools_by_two_subjects(tmp_path: Path) -> None:
    folders = uci.to_exports(UCI_DIR, tmp_path / "uci")
    sizes = {}
    for folder in folders:
        report, _ = validate_export(folder, uci.spec())
        assert report.usable, [str(p) for p in report.errors[:5]]
        sizes[folder.name] = report.n_students
    assert sizes == {"GP-mat": 349, "GP-por": 423, "MS-mat": 46, "MS-por": 226}
