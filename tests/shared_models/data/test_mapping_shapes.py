"""Wide tables, one file for several tables, defaults, and mapping errors that name the fix."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from shared_models.data.contract import default_spec, load_spec, parse_spec
from shared_models.data.export import read_export
from shared_models.data.mapping import find_mapping, load_mapping, period_patterns
from shared_models.data.validate import validate_export
from shared_models.errors import DataContractError

FIXTURE = Path(__file__).resolve().parents[2] / "fixtures" / "uci_dropout"
SPEC = load_spec(FIXTURE / "spec.toml")


@pytest.fixture
def uci(tmp_path: Path) -> Path:
    return Path(shutil.copytree(FIXTURE, tmp_path / "uci", ignore=shutil.ignore_patterns("*.py")))


def _errors(folder: Path) -> list[str]:
    report, parsed = validate_export(folder, SPEC)
    assert parsed is None
    return [str(p) for p in report.errors]


def test_a_misspelled_mapped_column_is_named_with_the_closest_match(uci: Path) -> None:
    mapping = uci / "mapping.toml"
    mapping.write_text(mapping.read_text().replace('= "Target"', '= "Targt"'))
    errors = _errors(uci)
    assert any("'Targt'" in e and "did you mean 'Target'" in e for e in errors), errors


def test_a_misspelled_pattern_names_the_missing_column_and_the_closest(uci: Path) -> None:
    mapping = uci / "mapping.toml"
    mapping.write_text(mapping.read_text().replace("sem (approved)", "sem (aproved)"))
    (error,) = [e for e in _errors(uci) if "aproved" in e]
    assert "Curricular units 1st sem (aproved)" in error
    assert "did you mean 'Curricular units 1st sem (approved)'" in error


def test_a_missing_column_suggests_the_closest_export_column(export_copy: Path) -> None:
    students = export_copy / "students.csv"
    students.write_text(students.read_text().replace("program", "Programme", 1))
    report, _ = validate_export(export_copy, default_spec())
    (error,) = [str(p) for p in report.errors if "'program'" in str(p)]
    assert "closest export column is 'Programme'" in error


def test_a_wide_table_given_as_activity_says_a_reshape_is_needed(uci: Path) -> None:
    text = (uci / "mapping.toml").read_text()
    (uci / "mapping.toml").write_text(text.split("[wide]")[0])  # files and defaults only
    errors = _errors(uci)
    (error,) = [e for e in errors if "reshape" in e]
    assert "wide table" in error and "[wide]" in error and "'1st', '2nd'" in error
    assert "mapping init" in error


def test_shared_file_reports_each_unused_column_once(uci: Path) -> None:
    report, parsed = validate_export(uci, SPEC)
    assert parsed is not None and report.usable
    ignored = [p.where for p in report.warnings if "not in the data contract" in p.message]
    assert len(ignored) == len(set(ignored))
    assert any("'Marital status'" in w for w in ignored)
    assert not any("1st sem (approved)" in w for w in ignored)  # reshaped, not unused


def test_a_bad_cell_in_a_wide_table_is_located_in_the_file(uci: Path) -> None:
    lines = (uci / "data.csv").read_text(encoding="utf-8-sig").splitlines()
    header = lines[0].split(";")
    col = header.index("Curricular units 2nd sem (grade)")
    cells = lines[3].split(";")
    cells[col] = "twelve"
    lines[3] = ";".join(cells)
    (uci / "data.csv").write_text("\n".join(lines) + "\n", encoding="utf-8")
    errors = _errors(uci)
    assert any(
        "data.csv line 4, column 'Curricular units 2nd sem (grade)'" in e and "'twelve'" in e
        for e in errors
    ), errors


def test_row_numbers_need_one_file_for_every_table(tmp_path: Path) -> None:
    path = tmp_path / "mapping.toml"
    path.write_text('[defaults]\nstudent_id = "s-{row}"\n')
    with pytest.raises(DataContractError, match="one file"):
        load_mapping(path)


def test_patterns_need_a_wide_section_and_the_reverse(tmp_path: Path) -> None:
    path = tmp_path / "mapping.toml"
    path.write_text('[columns.activity]\nlms_logins = "Logins w{period}"\n')
    with pytest.raises(DataContractError, match=r"no \[wide\] section"):
        load_mapping(path)
    path.write_text('[wide]\nperiods = ["1", "2"]\n')
    with pytest.raises(DataContractError, match=r"no \[columns.activity\] entry"):
        load_mapping(path)


def test_more_periods_than_the_contract_has_is_one_error(uci: Path) -> None:
    mapping = uci / "mapping.toml"
    mapping.write_text(mapping.read_text().replace('["1st", "2nd"]', '["1st", "2nd", "3rd"]'))
    errors = _errors(uci)
    assert len(errors) == 1 and "3 periods" in errors[0] and "2 semesters" in errors[0]


def test_period_patterns_group_columns_differing_in_one_number() -> None:
    columns = ["G1", "G2", "G3", "x 1st sem (a)", "x 2nd sem (a)", "Age", "Target"]
    assert period_patterns(columns) == {
        "G{period}": {"1": "G1", "2": "G2", "3": "G3"},
        "x {period} sem (a)": {"1st": "x 1st sem (a)", "2nd": "x 2nd sem (a)"},
    }


def test_existing_long_exports_read_unchanged(consortium_dir: Path) -> None:
    folder = consortium_dir / "institution_01"
    raw = read_export(folder, find_mapping(folder, None))
    assert not raw["activity"].wide and raw["activity"].source_rows is None
    assert raw["activity"].where(0, "week") == "activity.csv line 2, column 'week'"


@pytest.mark.parametrize(
    ("period", "recent"),
    [("week", 4), ("day", 28), ("fortnight", 2), ("month", 1), ("semester", 1), ("year", 1)],
)
def test_the_recent_window_covers_about_four_weeks_in_the_contracts_period(
    period: str, recent: int
) -> None:
    text = default_spec().to_toml().replace('period = "week"', f'period = "{period}"')
    spec = parse_spec(text)
    assert spec.period == period and spec.recent_periods == recent


def test_a_weekly_contract_keeps_its_fingerprint_when_it_names_its_period() -> None:
    spec = default_spec()
    assert 'period = "week"' in spec.to_toml()
    text = spec.to_toml().replace('period = "week"\n', "")
    assert parse_spec(text).fingerprint == spec.fingerprint
    other = parse_spec(spec.to_toml().replace('period = "week"', 'period = "month"'))
    assert other.fingerprint != spec.fingerprint
