from __future__ import annotations

import csv
import hashlib
import shutil
from pathlib import Path

import pandas as pd
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from shared_models.data.contract import default_spec
from shared_models.data.validate import validate_export

SPEC = default_spec()


def _rows(path: Path) -> list[list[str]]:
    with path.open(newline="") as fh:
        return list(csv.reader(fh))


def _write(path: Path, rows: list[list[str]]) -> None:
    with path.open("w", newline="") as fh:
        csv.writer(fh).writerows(rows)


def _errors(export: Path) -> list[str]:
    report, parsed = validate_export(export, SPEC)
    assert (parsed is None) == (not report.usable)
    return [str(p) for p in report.errors]


def _digest(folder: Path) -> dict[str, str]:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(folder.iterdir())}


def test_generated_export_is_usable_and_summarised(consortium_dir: Path) -> None:
    for folder in sorted(consortium_dir.glob("institution_*")):
        report, parsed = validate_export(folder, SPEC)
        assert report.usable, report.errors
        assert parsed is not None
        assert report.weeks_covered == (1, 15)
        assert report.n_students == report.rows["students"]
        for share in report.feature_completeness.values():
            assert 0.85 < share < 0.99  # ~5 % missing plus a few incomplete records
        assert 0.05 < (report.at_risk_rate or 0) < 0.7


def test_validation_modifies_nothing(export_copy: Path) -> None:
    before = _digest(export_copy)
    validate_export(export_copy, SPEC)
    assert _digest(export_copy) == before


def test_missing_column_is_named_with_file_and_fix(export_copy: Path) -> None:
    rows = _rows(export_copy / "activity.csv")
    col = rows[0].index("quiz_score")
    _write(export_copy / "activity.csv", [r[:col] + r[col + 1 :] for r in rows])
    errors = _errors(export_copy)
    assert any(
        "activity.csv, column 'quiz_score'" in e
        and "required column is missing" in e
        and "mapping.toml" in e
        for e in errors
    )


def test_text_in_numeric_column_names_line_and_column(export_copy: Path) -> None:
    rows = _rows(export_copy / "activity.csv")
    col = rows[0].index("lms_logins")
    rows[10][col] = "lots"
    _write(export_copy / "activity.csv", rows)
    assert "ERROR   activity.csv line 11, column 'lms_logins': 'lots' is not a number" in _errors(
        export_copy
    )


def test_value_out_of_range_is_refused(export_copy: Path) -> None:
    rows = _rows(export_copy / "activity.csv")
    col = rows[0].index("attendance_rate")
    rows[3][col] = "1.7"
    _write(export_copy / "activity.csv", rows)
    assert any(
        "line 4, column 'attendance_rate': 1.7 is outside the allowed range [0, 1]" in e
        for e in _errors(export_copy)
    )


@pytest.mark.parametrize(
    "column", ["email", "E-Mail Address", "student_name", "phone", "national_id", "date_of_birth"]
)
def test_identifier_columns_are_refused(export_copy: Path, column: str) -> None:
    rows = _rows(export_copy / "students.csv")
    rows[0].append(column)
    for i, row in enumerate(rows[1:]):
        row.append(f"v{i}")
    _write(export_copy / "students.csv", rows)
    errors = _errors(export_copy)
    assert any(
        f"students.csv, column '{column}'" in e and "direct identifiers" in e for e in errors
    )


def test_identifier_values_in_an_innocent_column_are_refused(export_copy: Path) -> None:
    rows = _rows(export_copy / "students.csv")
    rows[0].append("contact")
    for i, row in enumerate(rows[1:]):
        row.append(f"student{i}@example.edu")
    _write(export_copy / "students.csv", rows)
    assert any("column 'contact'" in e and "e-mail" in e for e in _errors(export_copy))


def test_names_as_student_ids_are_refused(export_copy: Path) -> None:
    frames = {
        t: pd.read_csv(export_copy / f"{t}.csv", dtype=str, keep_default_na=False)
        for t in ("students", "activity", "outcomes")
    }
    ids = frames["students"]["student_id"]
    names = {sid: f"Ada {chr(65 + i % 26)}{'a' * (1 + i // 26)}" for i, sid in enumerate(ids)}
    for t, frame in frames.items():
        frame["student_id"] = frame["student_id"].map(names)
        frame.to_csv(export_copy / f"{t}.csv", index=False)
    assert any("student IDs look like a person's name" in e for e in _errors(export_copy))


def test_duplicate_student_week_rows_are_refused_with_both_lines(export_copy: Path) -> None:
    rows = _rows(export_copy / "activity.csv")
    rows.append(rows[5])
    _write(export_copy / "activity.csv", rows)
    errors = _errors(export_copy)
    dup = [e for e in errors if "duplicate row" in e]
    assert len(dup) == 1
    assert f"activity.csv line {len(rows)}, column 'week'" in dup[0]
    assert "first at activity.csv line 6" in dup[0]


def test_unknown_category_lists_the_allowed_ones(export_copy: Path) -> None:
    rows = _rows(export_copy / "students.csv")
    rows[2][rows[0].index("program")] = "astrology"
    _write(export_copy / "students.csv", rows)
    assert any(
        "line 3, column 'program': 'astrology' is not one of: stem" in e
        for e in _errors(export_copy)
    )


def test_activity_for_unknown_student_is_refused(export_copy: Path) -> None:
    rows = _rows(export_copy / "activity.csv")
    rows.append(["s-unknown", "2025-autumn", "1"] + ["1"] * (len(rows[0]) - 3))
    _write(export_copy / "activity.csv", rows)
    assert any("'s-unknown'" in e and "not in students.csv" in e for e in _errors(export_copy))


def test_week_outside_the_term_is_refused(export_copy: Path) -> None:
    rows = _rows(export_copy / "activity.csv")
    rows[1][rows[0].index("week")] = "16"
    _write(export_copy / "activity.csv", rows)
    assert any("line 2, column 'week'" in e and "outside" in e for e in _errors(export_copy))


def test_missing_table_and_malformed_csv(export_copy: Path) -> None:
    (export_copy / "students.csv").unlink()
    assert any("no students.csv or students.parquet" in e for e in _errors(export_copy))
    (export_copy / "students.csv").write_text('student_id,term\n"unterminated,x\n')
    assert _errors(export_copy)


def test_outcomes_table_is_optional_for_scoring(export_copy: Path) -> None:
    (export_copy / "outcomes.csv").unlink()
    report, parsed = validate_export(export_copy, SPEC)
    assert report.usable and parsed is not None and parsed.outcomes is None
    assert any("scoring" in w.message for w in report.warnings)


def test_parquet_export_validates_like_csv(export_copy: Path, tmp_path: Path) -> None:
    pq_dir = tmp_path / "pq"
    pq_dir.mkdir()
    for t in ("students", "activity", "outcomes"):
        pd.read_csv(export_copy / f"{t}.csv").to_parquet(pq_dir / f"{t}.parquet")
    csv_report, _ = validate_export(export_copy, SPEC)
    pq_report, parsed = validate_export(pq_dir, SPEC)
    assert pq_report.usable and parsed is not None
    assert pq_report.feature_completeness == csv_report.feature_completeness
    assert pq_report.low_completeness == csv_report.low_completeness


def test_incomplete_records_are_listed(consortium_dir: Path) -> None:
    lows = [
        validate_export(f, SPEC)[0].low_completeness
        for f in sorted(consortium_dir.glob("institution_*"))
    ]
    assert sum(len(x) for x in lows) >= 1
    assert all(share < 0.6 for low in lows for _, _, share in low)


_DAMAGE = st.sampled_from(["delete", "insert", "replace", "truncate", "dup_line", "swap_cols"])


@settings(
    max_examples=40,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@given(
    table=st.sampled_from(["students", "activity", "outcomes", "mapping"]),
    damage=_DAMAGE,
    where=st.floats(0, 1),
    junk=st.text(min_size=1, max_size=8),
)
def test_random_damage_never_raises(
    consortium_dir: Path,
    tmp_path_factory: pytest.TempPathFactory,
    table: str,
    damage: str,
    where: float,
    junk: str,
) -> None:
    export = tmp_path_factory.mktemp("fuzz") / "e"
    shutil.copytree(consortium_dir / "institution_02", export)
    path = export / ("mapping.toml" if table == "mapping" else f"{table}.csv")
    text = path.read_text() if path.exists() else '[columns.students]\nstudent_id = "student_id"\n'
    cut = int(where * len(text))
    if damage == "delete":
        text = text[:cut] + text[cut + 5 :]
    elif damage == "insert":
        text = text[:cut] + junk + text[cut:]
    elif damage == "replace":
        text = text[:cut] + junk + text[cut + len(junk) :]
    elif damage == "truncate":
        text = text[:cut]
    elif damage == "dup_line":
        lines = text.splitlines(keepends=True)
        text = "".join(lines + lines[int(where * (len(lines) - 1)) :][:3])
    else:
        lines = [",".join(reversed(line.split(","))) for line in text.splitlines()]
        text = "\n".join(lines)
    path.write_text(text)
    report, parsed = validate_export(export, SPEC)  # must not raise
    assert (parsed is None) == bool(report.errors)
    for problem in report.errors:
        assert problem.where and problem.message


def test_missing_mask_agrees_with_is_missing_cell_by_cell():
    import pandas as pd

    from shared_models.data.export import is_missing
    from shared_models.data.validate import _missing

    cells = ["", " ", "NA", " n/a", "N/A ", "nan", "NaN", "NULL", "None", "?", "0", "na1", "x"]
    text = pd.Series(cells).astype(str)
    assert _missing(text).tolist() == [is_missing(c) for c in cells]
    assert _missing(pd.Series([], dtype=object).astype(str)).dtype == bool
